"""The whole job, top to bottom: checks, download, merge, then evaluation, model card and push.

Every check that can fail fast runs before any download or compute: the options, the output directory, the Hub
token and write access, the evaluation tasks and their data, the source's config and --keep. The merged checkpoint
is complete and in place before evaluation starts; a failure after that raises `UnfinishedJob`, which names the
stage and carries the checkpoint's directory, so the caller can say how to finish (`--eval-only`, `--push-only`).
Evaluation results and the card are written atomically, file by file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hc_smoe_hub import __version__
from hc_smoe_hub.card_writer import write_checkpoint_card
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.errors import HcSmoeError, OutputError
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
    max_memory: dict[str, Any] | None = None  # accelerate's per-device budget for evaluation
    # Told the output directory as soon as the merged checkpoint is in place (the CLI moves its log there).
    on_checkpoint: Callable[[Path], None] | None = None


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


class UnfinishedJob(HcSmoeError):
    """A stage after the merge failed; the merged checkpoint in `output_dir` is complete and loadable."""

    def __init__(self, stage: str, output_dir: Path, cause: BaseException, repo_id: str | None = None):
        self.stage, self.output_dir, self.cause, self.repo_id = stage, Path(output_dir), cause, repo_id
        reason = str(cause) if isinstance(cause, HcSmoeError) else f"{type(cause).__name__}: {cause}"
        if isinstance(cause, KeyboardInterrupt):
            reason = "interrupted"
        super().__init__(f"{stage} failed ({reason}); the merged checkpoint is complete in {output_dir}")


def preflight(request: JobRequest) -> None:
    """Every refusal that needs no download: options, the output directory, evaluation tasks and their data."""
    from hc_smoe_hub.checkpoint import parse_size
    from hc_smoe_hub.merge import pick_dtype

    mreq = request.merge
    device = pick_device(mreq.device)
    pick_dtype(mreq.dtype, device, "BF16")
    try:
        max_shard = parse_size(mreq.max_shard_size)
    except ValueError as exc:
        raise HcSmoeError(f"--max-shard-size: {exc}") from None
    if max_shard <= 0:
        raise HcSmoeError(f"--max-shard-size must be positive, got '{mreq.max_shard_size}'")
    out = Path(mreq.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not mreq.overwrite:
        raise OutputError(f"output directory {out} exists and is not empty: remove it, pass --overwrite, or "
                          f"choose another --output-dir")
    _check_partial(mreq)
    if request.evaluation is not None:
        from hc_smoe_hub import evaluation

        # Unknown tasks and unreachable task data fail now, not after hours of merging.
        evaluation.prepare_tasks(request.evaluation)


def _check_partial(mreq: MergeRequest) -> None:
    """A dead run's finished layers are neither silently redone nor discarded: refuse before the download."""
    from hc_smoe_hub.resume import STATE_NAME, PartialMergeError, partial_dir_for

    partial = partial_dir_for(mreq.output_dir)
    if mreq.resume or mreq.overwrite or not partial.is_dir():
        return
    try:
        finished = int(json.loads((partial / STATE_NAME).read_text())["next_layer"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no resumable state: the merge itself decides (discard an empty one, refuse a damaged one)
    if finished > 0:
        raise PartialMergeError(f"a partial merge of an earlier run ({finished} decoder layers finished) is in "
                                f"{partial}: run the same command with --resume to continue it, or with "
                                "--overwrite to discard it", partial, "exists")


def run_job(request: JobRequest, on_stage: Callable[[str], None] | None = None) -> JobResult:
    """Run the job; `on_stage` is told the name of each stage as it starts (the Space shows it)."""
    timings: dict[str, float] = {}
    notify = on_stage or (lambda _name: None)
    mreq = request.merge
    preflight(request)
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
    from hc_smoe_hub.merge import is_hub_id, resolve_keep, resolve_source

    notify("download")
    if is_hub_id(mreq.source):
        from hc_smoe_hub import hub

        # The family and --keep are checked on config.json alone, before gigabytes of weights come down.
        config = hub.fetch_config(mreq.source, revision=mreq.revision, token=mreq.token)
        resolve_keep(mreq.keep, spec_for(config), config)
        from hc_smoe_hub.quant import format_for
        from hc_smoe_hub.quant.io import quant_dtypes

        if format_for(config) is not None:  # an unreadable quantization, or a --dtype it cannot be written in
            quant_dtypes(mreq.dtype, pick_device(mreq.device))

    t = time.perf_counter()
    src_dir, revision = resolve_source(mreq.source, mreq.revision, mreq.token)
    mreq.revision = revision
    _stage(timings, "download", t)

    notify("merge")
    merged = merge_checkpoint(mreq, src_dir=src_dir)
    timings.update(merged.timings)
    if request.on_checkpoint is not None:
        request.on_checkpoint(merged.output_dir)
    finished = complete(merged.output_dir, request, src_dir=src_dir, repo_id=repo_id, timings=timings,
                        notify=notify)
    return JobResult(merged.output_dir, repo_id, finished.repo_url, merged, finished.results_before,
                     finished.results_after, finished.timings)


def eval_only(directory: Path, request: JobRequest, on_stage: Callable[[str], None] | None = None) -> JobResult:
    """Evaluate a finished output directory, write its results and card, then push when asked."""
    directory = Path(directory).resolve()
    provenance = read_finished(directory, "--eval-only")
    notify = on_stage or (lambda _name: None)
    timings: dict[str, float] = {k: float(v) for k, v in provenance.get("timings_s", {}).items()}
    mreq = request.merge
    mreq.source = provenance["source"]["id"]
    mreq.revision = provenance["source"].get("revision")
    preflight_eval = JobRequest(merge=mreq, evaluation=request.evaluation)
    pick_device(mreq.device)
    if preflight_eval.evaluation is not None:
        from hc_smoe_hub import evaluation

        evaluation.prepare_tasks(preflight_eval.evaluation)
    repo_id = None
    if request.push:
        from hc_smoe_hub import hub

        notify("access")
        repo_id = hub.check_push_access(
            request.repo_id, token=mreq.token,
            default_name=default_repo_name(mreq.source, provenance["method"], str(provenance["experts_after"])),
            overwrite=mreq.overwrite, private=request.private)
    from hc_smoe_hub.merge import resolve_source

    notify("download")
    src_dir, _revision = resolve_source(mreq.source, mreq.revision, mreq.token)
    finished = complete(directory, request, src_dir=src_dir, repo_id=repo_id, timings=timings, notify=notify)
    return JobResult(directory, repo_id, finished.repo_url, None, finished.results_before, finished.results_after,
                     finished.timings)


@dataclass
class _Finished:
    repo_url: str | None
    results_before: dict | None
    results_after: dict | None
    timings: dict[str, float]


def complete(out: Path, request: JobRequest, *, src_dir: Path, repo_id: str | None, timings: dict[str, float],
             notify: Callable[[str], None]) -> _Finished:
    """Evaluation, card and push of a merged checkpoint that is already in place at `out`.

    Any failure, Ctrl-C included, becomes `UnfinishedJob` naming the stage: the checkpoint itself is never touched.
    """
    stage = "evaluation"
    results: dict[str, Any] = {}
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    device = pick_device(request.merge.device)
    try:
        if request.evaluation is not None:
            results["before"], results["after"] = _evaluate_both(request, src_dir, provenance, out, device,
                                                                 timings, notify)
            _write_atomic(out / EVAL_RESULTS_NAME, json.dumps(
                {"original": results["before"], "merged": results["after"],
                 "settings": request.evaluation.as_dict()}, indent=2) + "\n")
        stage = "card"
        notify("card")
        write_checkpoint_card(out, provenance, src_dir=src_dir, repo_id=repo_id, results=results,
                              eval_settings=request.evaluation.as_dict() if request.evaluation else None,
                              command=request.command, timings=timings, device=device)
        repo_url = None
        if request.push and repo_id:
            from hc_smoe_hub import hub

            stage = "push"
            notify("push")
            t = time.perf_counter()
            repo_url = hub.push_folder(
                out, repo_id, token=request.merge.token, private=request.private,
                delete_stale=request.merge.overwrite,
                commit_message=f"HC-SMoE merge of {provenance['source']['id']}: {provenance['experts_before']} -> "
                f"{provenance['experts_after']} experts per layer")
            _stage(timings, "push", t)
    except (Exception, KeyboardInterrupt) as exc:
        raise UnfinishedJob(stage, out, exc, repo_id) from exc
    return _Finished(repo_url, results.get("before"), results.get("after"), timings)


def read_finished(directory: Path, flag: str) -> dict[str, Any]:
    """The provenance of a complete merged checkpoint in `directory`; refuses anything less, before any work."""
    directory = Path(directory)
    prov_path = directory / PROVENANCE_NAME
    if not directory.is_dir():
        raise HcSmoeError(f"{flag} {directory}: no such directory; give the output directory of a finished merge")
    if not prov_path.exists() or not (directory / "config.json").exists():
        raise HcSmoeError(f"{flag} {directory}: not a finished hc-smoe-push output (no {PROVENANCE_NAME} or "
                          "config.json); finish the merge first (same command with --resume)")
    try:
        provenance = json.loads(prov_path.read_text())
        provenance["source"]["id"], provenance["experts_after"], provenance["method"]  # noqa: B018
    except (ValueError, KeyError, TypeError):
        raise HcSmoeError(f"{flag} {directory}: {PROVENANCE_NAME} is unreadable; merge again") from None
    SourceCheckpoint(directory)  # refuses missing or truncated shards before anything is evaluated or uploaded
    return provenance


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _evaluate_both(request: JobRequest, src_dir: Path, provenance: dict, merged_dir: Path,
                   device: torch.device, timings: dict[str, float], notify: Callable[[str], None]):
    from hc_smoe_hub import eval_cache, evaluation

    settings = request.evaluation
    settings.device = str(device)
    notify("evaluate original")
    t = time.perf_counter()
    identity = {"source": provenance["source"]["id"], "revision": provenance["source"].get("revision"),
                "weights": _weights_fingerprint(src_dir), "dtype": "float32" if device.type == "cpu" else "auto"}
    offload = merged_dir.parent / f".{merged_dir.name}.offload"

    def load(directory: Path):
        # Each model offloads into a fresh folder: the original's offloaded weights are gone before the merged
        # model is placed.
        shutil.rmtree(offload, ignore_errors=True)
        return evaluation.load_for_eval(directory, device, request.max_memory, offload)

    try:
        before = eval_cache.cached_evaluate(request.eval_cache_dir, identity, lambda: load(src_dir), settings)
        _stage(timings, "eval_original", t)
        notify("evaluate merged")
        t = time.perf_counter()
        model, tokenizer = load(merged_dir)
        after = evaluation.evaluate(model, tokenizer, settings)
        del model
    finally:
        shutil.rmtree(offload, ignore_errors=True)
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


def push_only(directory: Path, repo_id: str | None, token: str | None, private: bool, overwrite: bool) -> str:
    """Push a finished output directory (e.g. after a failed upload); checks it is complete first."""
    from hc_smoe_hub import hub

    directory = Path(directory)
    prov = read_finished(directory, "--push-only")
    name = default_repo_name(prov["source"]["id"], prov["method"], str(prov["experts_after"]))
    target = hub.check_push_access(repo_id, token=token, default_name=name, overwrite=overwrite, private=private)
    return hub.push_folder(directory, target, token=token, private=private, delete_stale=overwrite,
                           commit_message=f"Upload {directory.name} (hc-smoe-hub {__version__})")
