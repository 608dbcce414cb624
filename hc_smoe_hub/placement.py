"""Load a checkpoint for evaluation so that it fits: one device when it fits there, else GPUs, CPU and disk.

On a GPU (or MPS) the model is placed by accelerate's big-model placement (`device_map="auto"`): as many layers as
fit on each visible GPU, then CPU RAM, then memory-mapped files in an offload folder; accelerate's hooks move each
layer's weights to where its inputs are when it runs, so the scores are the same, only slower. On CPU the model is
loaded whole in float32, as before, unless a `cpu` budget is given; then what exceeds it is offloaded to disk.

    model, tokenizer = load_for_eval(Path("mixtral-6e"), torch.device("cuda"), parse_max_memory("0=70GiB,cpu=100GiB"),
                                     Path(".mixtral-6e.offload"))

`parse_max_memory` turns the CLI string into accelerate's per-device budget (bytes). Nothing here imports lm-eval.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from hc_smoe_hub.errors import HcSmoeError

log = logging.getLogger(__name__)

MaxMemory = dict[int | str, int]

_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "TB": 10**12}
_FORM = ("expected DEVICE=SIZE pairs separated by commas, DEVICE a GPU index, cpu or mps, SIZE a number with a unit "
         "(GiB, GB, MiB, MB, TiB, TB), e.g. 0=70GiB,cpu=100GiB")
# Devices filled in from what is free get 90% of it, as transformers does for its own defaults: activations, the
# KV cache and the CUDA context need the rest.
_HEADROOM = 0.9


def parse_max_memory(text: str) -> MaxMemory:
    """`"0=70GiB,cpu=100GiB"` -> `{0: 75161927680, "cpu": 107374182400}`; a bad string is one HcSmoeError line."""
    budget: MaxMemory = {}
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+|cpu|mps)\s*=\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)", part, flags=re.IGNORECASE)
        if not match:
            raise HcSmoeError(f"--max-memory: cannot read {part!r} in {text!r}: {_FORM}")
        device_text, number, unit = match.groups()
        device: int | str = int(device_text) if device_text.isdigit() else device_text.lower()
        if device in budget:
            raise HcSmoeError(f"--max-memory: {device_text} is given twice in {text!r}: {_FORM}")
        budget[device] = int(float(number) * _UNITS[unit.upper()])
    return budget


def eval_dtype(directory: Path, device: torch.device) -> torch.dtype:
    """float32 on CPU (as before); elsewhere the checkpoint's own half dtype, bf16 when it is stored wider."""
    if device.type == "cpu":
        return torch.float32
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    stored = config.get("dtype") or config.get("torch_dtype")
    return torch.float16 if stored in ("float16", "fp16") else torch.bfloat16


def _budget(device: torch.device, max_memory: MaxMemory | None) -> MaxMemory | None:
    """accelerate's per-device budget: the user's caps plus what is free on the devices they did not name."""
    if device.type == "cpu":
        ignored = sorted(str(k) for k in (max_memory or {}) if k != "cpu")
        if ignored:
            log.warning("Evaluating on CPU: --max-memory entries for %s are ignored", ", ".join(ignored))
        return {"cpu": max_memory["cpu"]} if max_memory and "cpu" in max_memory else None
    if not max_memory and device.index is None:
        return None  # transformers' own defaults: every visible GPU at 90%, then CPU, then disk
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    if device.index is not None:  # an explicit cuda:N means that GPU alone (plus CPU and disk)
        free = {k: v for k, v in free.items() if not isinstance(k, int) or k == device.index}
    budget: MaxMemory = {k: int(v * _HEADROOM) for k, v in free.items()}
    for key, value in (max_memory or {}).items():
        if isinstance(key, int) and key not in free and key != device.index:
            visible = ", ".join(str(k) for k in free if isinstance(k, int)) or "none"
            raise HcSmoeError(f"--max-memory names GPU {key}, which is not visible here (visible: {visible})")
        budget[key] = value
    return budget


def _as_built(directory: Path) -> dict[str, Any]:
    """`config=` for a source whose model_type transformers lacks (Kimi K2's `kimi_k2`): loaded as the class the
    family table builds it as, with no remote code; nothing for every other checkpoint."""

    from hc_smoe_hub.architectures import spec_for

    try:
        spec = spec_for(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, HcSmoeError):
        return {}
    return {"config": spec.hf_config(directory)} if spec.load_as else {}


def load_for_eval(directory: Path, device: torch.device, max_memory: MaxMemory | None = None,
                  offload_dir: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the checkpoint in `directory`, placed for evaluation on `device`, in eval mode.

    A whole model is only ever moved onto one device when no budget caps it on CPU; otherwise accelerate places
    it within `max_memory` (see parse_max_memory; devices it does not name get 90% of what is free) and offloads the
    rest into `offload_dir` (a temporary folder, removed with the model, when None). The caller removes a given
    `offload_dir` after use.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    dtype = eval_dtype(directory, device)
    budget = _budget(device, max_memory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    as_built = _as_built(directory)
    if device.type == "cpu" and budget is None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **as_built)
        return model.eval(), tokenizer
    own_folder = offload_dir is None
    folder = Path(tempfile.mkdtemp(prefix="hc_smoe_offload_")) if own_folder else Path(offload_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map="auto", max_memory=budget,
                                                     offload_folder=str(folder), **as_built)
    except BaseException as exc:
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, torch.OutOfMemoryError):
            raise HcSmoeError(f"out of memory loading {directory} for evaluation: lower the GPU's --max-memory so "
                              "that more layers stay in CPU RAM or on disk") from exc
        raise
    if own_folder:
        # The offloaded weights are memory-mapped from this folder for as long as the model lives.
        weakref.finalize(model, shutil.rmtree, folder, True)
    log.info("Placed %s for evaluation (%s): %s", directory.name, dtype, describe_placement(model))
    return model.eval(), tokenizer


def describe_placement(model: Any) -> str:
    """`"cuda:0 x30, cpu x2, disk x3"`: how many top-level blocks of the device map went where."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(next(model.parameters()).device)
    counts = Counter(f"cuda:{v}" if isinstance(v, int) else str(v) for v in device_map.values())
    return ", ".join(f"{device} x{n}" for device, n in counts.items())


def offloaded_modules(model: Any) -> list[str]:
    """Names of the modules accelerate keeps in CPU RAM or on disk while the model runs on an accelerator."""
    device_map = getattr(model, "hf_device_map", None) or {}
    main = {v for v in device_map.values() if v not in ("cpu", "disk")}
    return sorted(name for name, where in device_map.items() if where == "disk" or (main and where == "cpu"))
