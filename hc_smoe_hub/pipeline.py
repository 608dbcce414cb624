"""The whole job, top to bottom: access check, download, merge, evaluate, model card, push.

Every check that can fail fast runs before compute: the Hub token and write access, the target repo, the source,
--keep, the calibration text and the disk. Evaluation and the card are written inside the merge's temporary
directory, so an output directory only ever appears complete.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hc_smoe_hub import __version__
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.merge import PROVENANCE_NAME, MergeRequest, MergeResult, merge_checkpoint, pick_device

log = logging.getLogger(__name__)

EVAL_RESULTS_NAME = "eval_results.json"
# The stages `run_job` reports through `on_stage`, in order (evaluation and push only when asked for).
STAGES = ("access", "download", "merge", "evaluate original", "evaluate merged", "card", "push")


@dataclass
class JobRequest:
    merge: MergeRequest
    push: bool = True
    repo_id: str | None = None
    private: bool = False
    evaluation: Any | None = None  # evaluation.EvalSettings; None skips evaluation
    eval_cache_dir: Path = field(default_factory=lambda: default_cache_dir() / "eval")
    command: str = ""  # the command that reproduces this run, for the card


@dataclass
class JobResult:
    output_dir: Path
    repo_id: str | None
    repo_url: str | None
    merge: MergeResult | None
    results_before: dict | None
    results_after: dict | None
    timings: dict[str, float]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hc_smoe_hub"


def default_repo_name(source: str, method: str, keep: str) -> str:
    name = source.rstrip("/").split("/")[-1]
    text = str(keep).strip()
    suffix = f"{text}e" if text.isdigit() else f"{round(float(text) * 100)}pct" if _is_float(text) else text
    return f"{name}-{method}-{suffix}"


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _stage(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = time.perf_counter() - started
    log.info("stage %s done in %.1fs", name, timings[name])


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
    """(parameters, bytes on disk) of a safetensors checkpoint directory."""
    ckpt = SourceCheckpoint(directory)
    params = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        params += n
    disk = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
    return params, disk


def _load_for_eval(directory: Path, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(directory)


def run_job(request: JobRequest, on_stage: Callable[[str], None] | None = None) -> JobResult:
    """Run the job; `on_stage` is told the name of each stage as it starts (the Space shows it)."""
    timings: dict[str, float] = {}
    notify = on_stage or (lambda _name: None)
    mreq = request.merge
    repo_id = None
    if request.push:
        from hc_smoe_hub import hub

        notify("access")
        t = time.perf_counter()
        repo_id = hub.check_push_access(
            request.repo_id, token=mreq.token,
            default_name=default_repo_name(mreq.source, mreq.options.method, mreq.keep),
            overwrite=mreq.overwrite, private=request.private)
        _stage(timings, "access", t)
        log.info("will push to %s", repo_id)

    from hc_smoe_hub.architectures import spec_for
    from hc_smoe_hub.merge import is_hub_id, parse_keep, resolve_source

    if request.evaluation is not None:
        from hc_smoe_hub import evaluation

        evaluation.check_tasks(request.evaluation)  # a missing lm-eval or task fails now, not after the merge

    notify("download")
    if is_hub_id(mreq.source):
        from hc_smoe_hub import hub

        # The family and --keep are checked on config.json alone, before gigabytes of weights come down.
        config = hub.fetch_config(mreq.source, revision=mreq.revision, token=mreq.token)
        parse_keep(mreq.keep, spec_for(config).num_experts(config))

    t = time.perf_counter()
    src_dir, revision = resolve_source(mreq.source, mreq.revision, mreq.token)
    mreq.revision = revision
    _stage(timings, "download", t)

    results: dict[str, Any] = {}

    def finish(tmp: Path, merged: MergeResult) -> None:
        timings.update(merged.timings)
        device = pick_device(mreq.device)
        if request.evaluation is not None:
            results["before"], results["after"] = _evaluate_both(request, src_dir, revision, tmp, device, timings,
                                                                 notify)
            (tmp / EVAL_RESULTS_NAME).write_text(json.dumps(
                {"original": results["before"], "merged": results["after"],
                 "settings": request.evaluation.as_dict()}, indent=2) + "\n")
        notify("card")
        _write_card(request, repo_id, src_dir, revision, tmp, merged, results, timings, device)

    notify("merge")
    merged = merge_checkpoint(mreq, src_dir=src_dir, finalize=finish)

    repo_url = None
    if request.push and repo_id:
        notify("push")
        t = time.perf_counter()
        repo_url = hub.push_folder(merged.output_dir, repo_id, token=mreq.token, private=request.private,
                                   delete_stale=mreq.overwrite,
                                   commit_message=f"HC-SMoE merge of {mreq.source}: {merged.experts_before} -> "
                                   f"{merged.experts_after} experts per layer")
        _stage(timings, "push", t)
    return JobResult(merged.output_dir, repo_id, repo_url, merged, results.get("before"), results.get("after"),
                     timings)


def _evaluate_both(request: JobRequest, src_dir: Path, revision: str | None, merged_dir: Path,
                   device: torch.device, timings: dict[str, float], notify: Callable[[str], None]):
    from hc_smoe_hub import evaluation

    settings = request.evaluation
    settings.device = str(device)
    notify("evaluate original")
    t = time.perf_counter()
    identity = {"source": request.merge.source, "revision": revision,
                "weights": _weights_fingerprint(src_dir), "dtype": "float32" if device.type == "cpu" else "auto"}
    before = evaluation.cached_evaluate(request.eval_cache_dir, identity, lambda: _load_for_eval(src_dir, device),
                                        settings)
    _stage(timings, "eval_original", t)
    notify("evaluate merged")
    t = time.perf_counter()
    model, tokenizer = _load_for_eval(merged_dir, device)
    after = evaluation.evaluate(model, tokenizer, settings)
    del model
    _stage(timings, "eval_merged", t)
    for task in after:
        acc_b, acc_a = before.get(task, {}).get("acc"), after[task].get("acc")
        if acc_b is not None and acc_a is not None:
            log.info("%s: acc %.4f -> %.4f", task, acc_b, acc_a)
    return before, after


def _weights_fingerprint(src_dir: Path) -> str:
    """Names, sizes and mtimes of the weight files: a changed local checkpoint is not served stale scores."""
    parts = [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in sorted(src_dir.glob("*.safetensors"))]
    return "|".join(parts)


def _write_card(request: JobRequest, repo_id: str | None, src_dir: Path, revision: str | None, out: Path,
                merged: MergeResult, results: dict, timings: dict[str, float], device: torch.device) -> None:
    from hc_smoe_hub.card import CardInputs, inherit_license, write_card

    mreq = request.merge
    params_before, disk_before = checkpoint_size(src_dir)
    params_after, disk_after = checkpoint_size(out)
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    calibration = mreq.calibration.source
    if Path(calibration).expanduser().is_file():
        calibration = Path(calibration).name  # a local file: its name, not the user's directory layout
    settings = {"keep": merged.experts_after, **mreq.options.as_dict(),
                "calibration": calibration, "num_samples": mreq.calibration.num_samples,
                "seq_len": mreq.calibration.seq_len, "calibration_seed": mreq.calibration.seed,
                "sequential": mreq.sequential, "compute_dtype": provenance["compute_dtype"]}
    eval_settings = request.evaluation.as_dict() if request.evaluation is not None else None
    local = Path(mreq.source).expanduser().is_dir()
    inputs = CardInputs(
        source_id=Path(mreq.source).name if local else mreq.source, source_is_local=local,
        source_revision=revision, model_family=merged.model_type,
        method=mreq.options.method, settings=settings, experts_before=merged.experts_before,
        experts_after=merged.experts_after, top_k_before=merged.top_k_before, top_k_after=merged.top_k_after,
        params_before=params_before, params_after=params_after, disk_bytes_before=disk_before,
        disk_bytes_after=disk_after, clusters={r.layer: r.clusters for r in merged.layers},
        results_before=results.get("before"), results_after=results.get("after"), eval_settings=eval_settings,
        command=request.command, tool_version=__version__, hardware=hardware_description(device),
        timings=dict(timings), repo_id=repo_id or Path(mreq.output_dir).name,
        calibration_dataset=calibration,
        **inherit_license(src_dir, out),
    )
    write_card(inputs, out)


def push_only(directory: Path, repo_id: str | None, token: str | None, private: bool, overwrite: bool) -> str:
    """Push a finished output directory (e.g. after a failed upload); checks it is complete first."""
    from hc_smoe_hub import hub

    directory = Path(directory)
    prov_path = directory / PROVENANCE_NAME
    if not prov_path.exists() or not (directory / "config.json").exists():
        raise HcSmoeError(f"{directory} is not a finished hc-smoe-push output (no {PROVENANCE_NAME} or config.json)")
    SourceCheckpoint(directory)  # refuses missing or truncated shards before anything is uploaded
    prov = json.loads(prov_path.read_text())
    name = default_repo_name(prov["source"]["id"], prov["method"], str(prov["experts_after"]))
    target = hub.check_push_access(repo_id, token=token, default_name=name, overwrite=overwrite, private=private)
    return hub.push_folder(directory, target, token=token, private=private, delete_stale=overwrite,
                           commit_message=f"Upload {directory.name} (hc-smoe-hub {__version__})")
