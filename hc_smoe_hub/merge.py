"""One merge from a source checkpoint to an output directory that stock transformers loads.

`merge_checkpoint` validates everything it can before compute (model family, --keep, shards, tokenizer,
calibration text, disk space, a partial directory left by an earlier run), then streams the layers into the
partial directory `partial_dir_for(output_dir)`, renamed into place only when the config, tokenizer files and
provenance (`hc_smoe.json`) are all written. A failed or interrupted merge keeps its finished layers there and
`resume=True` (`--resume`) continues after them with an identical result (resume.py). Evaluation and the card
come afterwards (pipeline.py), so a finished merge survives any failure after it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hc_smoe_hub import __version__
from hc_smoe_hub.architectures import ArchSpec, spec_for
from hc_smoe_hub.calibration import CalibrationSpec, build_blocks
from hc_smoe_hub.checkpoint import ShardedWriter, SourceCheckpoint, free_bytes, parse_size
from hc_smoe_hub.errors import HcSmoeError, OutputError, SourceError
from hc_smoe_hub.methods import METHOD_DESCRIPTIONS, MethodOptions
from hc_smoe_hub.quant import format_for, output_config
from hc_smoe_hub.quant.io import QuantSource, QuantWriter, disk_plan, quant_dtypes, weights_record
from hc_smoe_hub.resume import PartialMergeError, PartialRun, partial_dir_for, tokens_digest, weights_digest
from hc_smoe_hub.streaming import EngineSettings, LayerRecord, StreamingMerger

log = logging.getLogger(__name__)

PROVENANCE_NAME = "hc_smoe.json"
# Files besides the weights that a loadable model directory needs, copied verbatim.
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "*.tiktoken",
              "chat_template*", "generation_config.json", "LICENSE*", "NOTICE*", "USE_POLICY*")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
__all__ = ["MergeRequest", "MergeResult", "PartialMergeError", "merge_checkpoint", "partial_dir_for"]


@dataclass
class MergeRequest:
    source: str
    keep: str
    output_dir: Path
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    options: MethodOptions = field(default_factory=MethodOptions)
    sequential: bool = True
    device: str | None = None
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False  # replace an existing output directory, and discard a partial one unless resuming
    revision: str | None = None
    token: str | None = None
    resume: bool = False  # continue the partial merge an interrupted run of the same request left behind


@dataclass
class MergeResult:
    output_dir: Path
    source_dir: Path
    source_revision: str | None
    family: str
    model_type: str
    experts_before: int
    experts_after: int
    top_k_before: int
    top_k_after: int
    layers: list[LayerRecord]
    timings: dict[str, float]
    provenance: dict[str, Any]


def parse_keep(keep: str | int | float, n_experts: int) -> int:
    """--keep as a count 1..N or a fraction in (0, 1) of N."""
    text = str(keep).strip()
    bad = HcSmoeError(f"--keep must be a whole count from 1 to {n_experts} or a fraction in (0, 1), got '{text}'")
    try:
        value = float(text)
    except ValueError:
        raise bad from None
    if 0 < value < 1:
        return max(1, round(value * n_experts))
    if value.is_integer() and 1 <= value <= n_experts:
        return int(value)
    raise bad


def resolve_keep(keep: str | int | float, spec: ArchSpec, config: dict[str, Any]) -> int:
    """--keep as a count, checked against the family's constraints (grouped routing) from config.json alone."""
    value = parse_keep(keep, spec.num_experts(config))
    spec.check_keep(config, value)
    return value


def is_hub_id(source: str) -> bool:
    """Not an existing local path, and shaped like org/name."""
    return (not Path(source).expanduser().exists() and bool(REPO_ID.match(source))
            and not source.startswith((".", "/", "~")))


def resolve_source(source: str, revision: str | None, token: str | None) -> tuple[Path, str | None]:
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), revision
    if path.exists():
        raise SourceError(f"{source} is a file: pass the model directory (with config.json) or a Hub repo id")
    if not is_hub_id(source):
        raise SourceError(f"{source} is neither a local model directory nor a Hub repo id (org/name)")
    from hc_smoe_hub import hub  # deferred: the Hub client is only needed for remote sources

    return hub.download_source(source, revision=revision, token=token)


def read_config(src_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((src_dir / "config.json").read_text())
    except FileNotFoundError:
        raise SourceError(f"{src_dir} has no config.json: pass a transformers model directory") from None
    except ValueError:
        raise SourceError(f"{src_dir}/config.json is not valid JSON: download it again") from None


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HcSmoeError(f"--device {device} was asked for but CUDA is not available: use --device cpu")
    return dev


def pick_dtype(name: str, device: torch.device, source_dtype: str) -> torch.dtype:
    if name == "auto":
        # CPUs run bf16 matmuls slowly and gain nothing from them: compute in fp32 there.
        if device.type == "cpu":
            return torch.float32
        return {"BF16": torch.bfloat16, "F16": torch.float16}.get(source_dtype, torch.float32)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise HcSmoeError(f"--dtype must be auto, float32, bfloat16 or float16, got '{name}'")
    return table[name]


def inspect_source(src_dir: Path) -> tuple[dict[str, Any], ArchSpec, SourceCheckpoint]:
    config = read_config(src_dir)
    spec = spec_for(config)
    return config, spec, SourceCheckpoint(src_dir)


def merge_checkpoint(request: MergeRequest, src_dir: Path | None = None) -> MergeResult:
    """Merge `request.source` into `request.output_dir`, which appears only complete and loadable."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if src_dir is None:
        src_dir, revision = resolve_source(request.source, request.revision, request.token)
        timings["download"] = time.perf_counter() - t0
    else:
        revision = request.revision
    config, spec, raw_source = inspect_source(src_dir)
    fmt = format_for(config)  # an unsupported quantization is refused here, from config.json alone
    n = spec.num_experts(config)
    keep = resolve_keep(request.keep, spec, config)
    top_k = spec.top_k(config)
    if keep < top_k:
        log.warning("keeping %d experts, fewer than top-k %d: num_experts_per_tok set to %d", keep, top_k, keep)
    device = pick_device(request.device)
    # For a quantized source --dtype is the output's dtype (auto: the source's format kept), see quant_dtypes.
    source: SourceCheckpoint | QuantSource = raw_source
    out_dtype: torch.dtype | None = None
    if fmt is None:
        merger_dtype = pick_dtype(request.dtype, device, next(iter(raw_source.tensors.values())).dtype)
    else:
        merger_dtype, out_dtype = quant_dtypes(request.dtype, device)
        source = QuantSource(raw_source, fmt, merger_dtype)
    try:
        max_shard = parse_size(request.max_shard_size)
    except ValueError as exc:
        raise HcSmoeError(f"--max-shard-size: {exc}") from None
    if max_shard <= 0:
        raise HcSmoeError(f"--max-shard-size must be positive, got '{request.max_shard_size}'")

    fingerprint = _fingerprint(request, src_dir, revision, raw_source, keep, device, merger_dtype, max_shard)
    if fmt is not None:
        fingerprint["weights_format"] = weights_record(fmt, out_dtype)
    partial = PartialRun(request.output_dir, fingerprint,
                         resume=request.resume, overwrite=request.overwrite)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise SourceError(f"cannot load the tokenizer from {src_dir} ({type(exc).__name__}): calibration needs "
                          "the model's tokenizer files") from exc
    settings = EngineSettings(keep, request.options, device, merger_dtype, request.sequential)
    merger = StreamingMerger(source, config, spec, str(src_dir), settings)
    plan = merger.output_plan()
    if isinstance(source, QuantSource):  # the exact on-disk tensors (weights and their scales) are planned now
        plan = disk_plan(plan, source, out_dtype)
    # The shards, plus two copies of the calibration hidden states kept for --resume while one replaces the other.
    cal = request.calibration
    hidden_bytes = 2 * cal.num_samples * cal.seq_len * int(config.get("hidden_size", 0)) * merger_dtype.itemsize
    need = sum(t.nbytes for t in plan) * 1.05 + hidden_bytes
    if partial.resuming:  # the shards are reserved already
        need -= sum(f.stat().st_size for f in partial.dir.glob("*.safetensors"))
    if free_bytes(request.output_dir) < need:
        raise OutputError(f"not enough disk space for the output ({need / 1e9:.2f} GB needed next to "
                          f"{request.output_dir}): free space or choose another --output-dir")

    t1 = time.perf_counter()
    # The job's own token (on a Space the signed-in user's), not whatever HF_TOKEN the process has: a Space
    # must not read its owner's private datasets for a visitor.
    blocks = build_blocks(tokenizer, request.calibration, request.token)
    timings["calibration"] = time.perf_counter() - t1
    partial.check_calibration(tokens_digest(blocks))

    with partial.session() as tmp:
        t2 = time.perf_counter()
        start = partial.resume_point(device)
        if isinstance(source, QuantSource):
            writer = QuantWriter(tmp, plan, max_shard, reopen=partial.resuming, source=source, out_dtype=out_dtype)
        else:
            writer = ShardedWriter(tmp, plan, max_shard, reopen=partial.resuming)
        if start is None:
            records = merger.run(blocks, writer, on_finished=partial.layer_done)
        else:
            records = merger.run(blocks, writer, start_layer=start.next_layer, records=start.records,
                                 hidden_states=start.hidden, on_finished=partial.layer_done)
        writer.finish()
        timings["merge"] = time.perf_counter() - t2
        out_config = spec.reduced_config(config, keep)
        if fmt is not None:  # quantization_config kept for a re-quantized output, removed for a dequantized one
            out_config = output_config(out_config, keep_quantized=out_dtype is None)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        for pattern in SIDE_FILES:
            for f in src_dir.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        provenance = _provenance(request, revision, spec, config, out_config, keep, device, merger_dtype,
                                 records, timings)
        if fmt is not None:  # the card's architecture notes say it too
            provenance["architecture"]["weights_format"] = weights_record(fmt, out_dtype)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        partial.finalize()
    result = MergeResult(Path(request.output_dir).resolve(), src_dir, revision, spec.family,
                         config.get("model_type", ""), n, keep, top_k, min(top_k, keep), records, timings, provenance)
    log.info("wrote %s (%d -> %d experts per MoE layer)", request.output_dir, n, keep)
    return result


def _fingerprint(request: MergeRequest, src_dir: Path, revision: str | None, source: SourceCheckpoint, keep: int,
                 device: torch.device, dtype: torch.dtype, max_shard: int) -> dict[str, Any]:
    """Everything that determines the merged tensors and hc_smoe.json: a resumed run must match it exactly."""
    import transformers

    return {"source_id": request.source, "source": str(src_dir), "revision": revision,
            "weights": weights_digest(source), "keep": keep,
            "options": request.options.as_dict(), "calibration": asdict(request.calibration),
            "sequential": request.sequential, "compute_dtype": str(dtype).removeprefix("torch."),
            "device": device.type, "max_shard_bytes": max_shard, "version": __version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _provenance(request: MergeRequest, revision: str | None, spec: ArchSpec, config: dict, out_config: dict,
                keep: int, device: torch.device, dtype: torch.dtype, records: list[LayerRecord],
                timings: dict[str, float]) -> dict[str, Any]:
    import transformers

    return {
        "tool": "hc-smoe-hub",
        "version": __version__,
        "paper": "https://arxiv.org/abs/2410.08589",
        "method": request.options.method,
        "method_description": METHOD_DESCRIPTIONS.get(request.options.method, ""),
        "options": request.options.as_dict(),
        "source": {"id": request.source, "revision": revision},
        "family": spec.family,
        "model_type": config.get("model_type"),
        "architecture": spec.describe(config),
        "experts_before": spec.num_experts(config),
        "experts_after": keep,
        "top_k_before": spec.top_k(config),
        "top_k_after": spec.top_k(out_config),
        "calibration": asdict(request.calibration),
        "sequential": request.sequential,
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "layers": [
            {"layer": r.layer, "clusters": r.clusters, "frequencies": [round(f, 6) for f in r.frequencies],
             "output_rel_error": round(r.output_rel_error, 6), "seconds": round(r.seconds, 3), **r.extra}
            for r in records
        ],
    }
