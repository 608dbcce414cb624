"""The model card of a finished checkpoint, from its own record (`hc_smoe.json`) and the evaluation results.

Used by the pipeline after a merge and by `--eval-only` on a directory merged earlier: everything the card states
comes from the checkpoint's provenance, so both write the same card.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from hc_smoe_hub import __version__
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.quant import format_for
from hc_smoe_hub.quant.io import QuantSource

log = logging.getLogger(__name__)


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU only: {cpu}, {torch.get_num_threads()} threads"


def checkpoint_size(directory: Path) -> tuple[int, int]:
    """(parameters, bytes on disk) of a safetensors checkpoint directory; a quantized one's weights are counted in
    their unquantized shapes (no scale tensors, MXFP4 blocks counted as their values, two per byte)."""
    ckpt: SourceCheckpoint | QuantSource = SourceCheckpoint(directory)
    config_path = Path(directory) / "config.json"
    fmt = format_for(json.loads(config_path.read_text())) if config_path.exists() else None
    if fmt is not None:
        ckpt = QuantSource(ckpt, fmt, torch.bfloat16)
    params = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        params += n
    disk = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
    return params, disk


def write_checkpoint_card(out: Path, provenance: dict[str, Any], *, src_dir: Path, repo_id: str | None,
                          results: dict[str, Any], eval_settings: dict[str, Any] | None, command: str,
                          timings: dict[str, float], device: torch.device) -> None:
    """Render the card into a staging folder inside `out`, then move each file into place."""
    from hc_smoe_hub.card import CardInputs, write_card
    from hc_smoe_hub.card_license import inherit_license

    params_before, disk_before = checkpoint_size(src_dir)
    params_after, disk_after = checkpoint_size(out)
    calib = provenance["calibration"]
    calibration = calib["source"]
    if Path(calibration).expanduser().is_file() or Path(calibration).suffix in (".txt", ".jsonl", ".gz", ".json"):
        calibration = Path(calibration).name  # a local file: its name, not the user's directory layout
    settings = {"keep": provenance["experts_after"], **provenance["options"],
                "calibration": calibration, "num_samples": calib["num_samples"],
                "seq_len": calib["seq_len"], "calibration_seed": calib["seed"],
                "sequential": provenance["sequential"], "compute_dtype": provenance["compute_dtype"]}
    source = provenance["source"]["id"]
    local = Path(source).expanduser().is_dir() or not _looks_like_hub_id(source)
    staging = out / ".card-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        inputs = CardInputs(
            source_id=Path(source).name if local else source, source_is_local=local,
            source_revision=provenance["source"].get("revision"), model_family=provenance.get("model_type") or "",
            method=provenance["method"], settings=settings, experts_before=provenance["experts_before"],
            experts_after=provenance["experts_after"], top_k_before=provenance["top_k_before"],
            top_k_after=provenance["top_k_after"],
            params_before=params_before, params_after=params_after, disk_bytes_before=disk_before,
            disk_bytes_after=disk_after, clusters={r["layer"]: r["clusters"] for r in provenance["layers"]},
            results_before=results.get("before"), results_after=results.get("after"), eval_settings=eval_settings,
            command=command or reproduce_from_provenance(provenance), tool_version=__version__,
            hardware=hardware_description(device), timings=dict(timings), repo_id=repo_id or out.name,
            calibration_dataset=calibration, architecture=provenance.get("architecture") or {},
            **inherit_license(src_dir, staging),
        )
        write_card(inputs, staging)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        log.info("wrote the model card %s", out / "README.md")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _looks_like_hub_id(source: str) -> bool:
    from hc_smoe_hub.merge import REPO_ID

    return bool(REPO_ID.match(source)) and not source.startswith((".", "/", "~"))


def reproduce_from_provenance(provenance: dict) -> str:
    """The command that makes this checkpoint again, from its own record (for a card written by --eval-only)."""
    opts, calib = provenance["options"], provenance["calibration"]
    words = [provenance["source"]["id"], "--keep", str(provenance["experts_after"]), "--method", opts["method"]]
    for key in ("linkage", "metric", "merge", "router"):
        if key in opts:
            words += [f"--{key}", str(opts[key])]
    words += ["--calibration", Path(calib["source"]).name if Path(calib["source"]).suffix else calib["source"],
              "--num-samples", str(calib["num_samples"]), "--seq-len", str(calib["seq_len"]),
              "--seed", str(calib["seed"]), "--sequential" if provenance["sequential"] else "--one-shot"]
    if provenance["source"].get("revision"):
        words += ["--revision", provenance["source"]["revision"]]
    return shlex.join(["hc-smoe-push", *words])
