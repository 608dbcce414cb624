"""The original model's scores, cached: a source that does not change is evaluated once per (weights, tasks,
lm-eval version), so a second merge of the same model, or a resumed run, skips its slowest step.

    before = cached_evaluate(cache_dir, {"source": repo_id, "revision": sha, "dtype": "bfloat16"},
                             lambda: load_for_eval(...), settings)
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hc_smoe_hub import evaluation
from hc_smoe_hub.evaluation import EvalSettings, Results, lm_eval_version

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def cache_path(cache_dir: Path, identity: Mapping[str, Any], settings: EvalSettings) -> Path:
    """Where the scores of `identity` (source id, revision, dtype...) under `settings` are cached."""
    # lm-eval's version is part of the key: task definitions and prompts change between releases.
    payload = json.dumps({"identity": identity, "settings": settings.key(), "lm_eval": lm_eval_version()},
                         sort_keys=True, default=str)
    return Path(cache_dir) / f"eval-{hashlib.sha256(payload.encode()).hexdigest()[:24]}.json"


def _read_cache(path: Path) -> Results | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        results = stored["results"]
        if stored.get("format") != _CACHE_FORMAT or not isinstance(results, dict):
            raise ValueError("unexpected layout")
        return {task: {metric: float(value) for metric, value in metrics.items()}
                for task, metrics in results.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("Ignoring unreadable evaluation cache %s (%s)", path, exc)
        return None


def _write_cache(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half-written cache entry behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_evaluate(
    cache_dir: Path,
    identity: Mapping[str, Any],
    model_loader: Callable[[], tuple[Any, Any]],
    settings: EvalSettings,
) -> Results:
    """Scores of a model that does not change (the original), evaluated once per (identity, settings).

    `identity` must pin the weights, e.g. `{"source": repo_id, "revision": commit_sha, "dtype": "bfloat16"}`;
    `model_loader` is only called on a cache miss, so a cached source is neither loaded nor evaluated.
    """
    path = cache_path(cache_dir, identity, settings)
    cached = _read_cache(path)
    if cached is not None:
        log.info("Using cached scores of %s from %s", dict(identity), path)
        return cached
    log.info("No cached scores for %s; loading it for evaluation", dict(identity))
    model, tokenizer = model_loader()
    try:
        results = evaluation.evaluate(model, tokenizer, settings)
    finally:
        # The original is only needed for this; free it before the merge needs the memory.
        del model, tokenizer
        gc.collect()
        _empty_accelerator_cache()
    _write_cache(path, {
        "format": _CACHE_FORMAT,
        "identity": dict(identity),
        "settings": settings.as_dict(),
        "settings_key": settings.key(),
        "lm_eval_version": lm_eval_version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
    })
    return results


def _empty_accelerator_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
