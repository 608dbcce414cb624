"""lm-eval wrapper: score a loaded model on lm-eval tasks, in process, and cache the original model's scores.

This is the only module that imports `lm_eval`; it does so inside functions, so the rest of the package works
without the `eval` extra. Results come back as `{task: {metric: value}}`, e.g.
`{"arc_easy": {"acc": 0.74, "acc_stderr": 0.009, "acc_norm": 0.70, "acc_norm_stderr": 0.009}}`, with lm-eval's
`"metric,none"` keys flattened to `"metric"` (other filters keep their `"metric,filter"` key).

    settings = EvalSettings(tasks=PAPER_TASKS, limit=100)
    prepare_tasks(settings)                      # before any compute: names, settings, every task's data
    model, tokenizer = load_for_eval(Path("merged"), torch.device("cuda"), None, Path(".merged.offload"))
    results = evaluate(model, tokenizer, settings)
    print(headline(results))

`load_for_eval` and `parse_max_memory` live in hc_smoe_hub.placement (re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import numbers
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.placement import load_for_eval as load_for_eval
from hc_smoe_hub.placement import parse_max_memory as parse_max_memory

log = logging.getLogger(__name__)

# The eight zero-shot tasks of the HC-SMoE paper's headline table (metric `acc`, plain mean).
PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte", "winogrande"]

Results = dict[str, dict[str, float]]

_INSTALL_HINT = "lm-eval is not installed: pip install 'hc-smoe-hub[eval]'"
_DATA_FIXES = ("choose other tasks with --tasks (local ones with --include-path), merge without evaluating "
               "with --skip-eval")
_PROBE_TIMEOUT_S = 5.0
# Indexing lm-eval's built-in tasks takes 10-20 s on 2 cores; a run checks and evaluates with the same index.
_MANAGERS: dict[tuple[str | None, bool, str | None], Any] = {}


@dataclass
class EvalSettings:
    """What to evaluate and how; `key()` identifies the measurement for caching."""

    tasks: list[str]
    num_fewshot: int = 0
    batch_size: int | str = 8
    limit: int | float | None = None
    include_path: str | None = None
    device: str = "cpu"

    def key(self) -> str:
        """A stable hash of what is measured.

        Batch size and device change speed, not what is measured, so they stay out of the key and a score
        cached on one machine serves another. The include path enters by the content of its files, not by its
        location, so moving the task folder (site-packages vs. a checkout) keeps the key and editing a task
        changes it.
        """
        payload = {
            "tasks": sorted(self.tasks),
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "include": _tree_digest(Path(self.include_path)) if self.include_path else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tree_digest(root: Path) -> str:
    """Hash of every regular file under `root` (relative name + bytes), or of the missing path itself."""
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(f"missing:{root}".encode())
        return digest.hexdigest()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != "lm_eval":
            # lm-eval itself is there but its Hugging Face backend lacks a dependency (e.g. accelerate).
            raise HcSmoeError(f"lm-eval cannot run: missing package {exc.name!r}: "
                              "pip install 'hc-smoe-hub[eval]'") from exc
        raise HcSmoeError(_INSTALL_HINT) from exc
    return lm_eval, HFLM, TaskManager


def _manager(task_manager_cls: Any, include_path: str | None, include_defaults: bool) -> Any:
    """A TaskManager, reused while the task folder's content is unchanged."""
    key = (include_path, include_defaults, _tree_digest(Path(include_path)) if include_path else None)
    manager = _MANAGERS.get(key)
    if manager is None or not isinstance(manager, task_manager_cls):
        if len(_MANAGERS) >= 4:
            _MANAGERS.clear()
        manager = _MANAGERS[key] = task_manager_cls(include_path=include_path, include_defaults=include_defaults)
    return manager


def _task_manager(task_manager_cls: Any, settings: EvalSettings,
                  before_builtins: Callable[[list[str]], None] | None = None) -> Any:
    """Index only the local tasks when they cover the request (indexing lm-eval's built-ins takes seconds).

    `before_builtins` is told the names not found locally before lm-eval's own tasks are indexed.
    """
    missing = list(settings.tasks)
    if settings.include_path:
        path = Path(settings.include_path)
        if not path.is_dir():
            raise HcSmoeError(f"task folder {path} does not exist: check the include path")
        local = _manager(task_manager_cls, str(path), False)
        missing = [name for name in settings.tasks if name not in local.all_tasks]
        if not missing:
            manager = local
        else:
            log.info("Not every task is in %s; adding lm-eval's built-in tasks", path)
    if missing:
        if before_builtins is not None:
            before_builtins(missing)
        manager = _manager(task_manager_cls, settings.include_path and str(settings.include_path), True)
    unknown = [name for name in settings.tasks if name not in manager.all_tasks]
    if unknown:
        where = f" in {settings.include_path} or" if settings.include_path else ""
        raise HcSmoeError(f"unknown lm-eval task(s): {', '.join(unknown)} (not found{where} among lm-eval's "
                          "tasks; list them with `lm-eval ls tasks`)")
    return manager


def _place(model: Any, device: str) -> None:
    """Move the model to the requested device unless accelerate has already dispatched it."""
    if getattr(model, "hf_device_map", None):
        return
    import torch

    target = torch.device(device)
    current = next(model.parameters()).device
    if current.type != target.type or (target.index is not None and current.index != target.index):
        log.info("Moving the model from %s to %s for evaluation", current, target)
        model.to(target)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """simple_evaluate reseeds the global RNGs; restore them so later steps do not depend on evaluating."""
    import numpy as np
    import torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda_live else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _numeric_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """Keep every numeric `metric,filter` value; lm-eval writes "N/A" for stderrs it cannot compute."""
    metrics: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        metric, filter_name = key.split(",", 1)
        metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


def _flatten(raw: Mapping[str, Any], requested: Sequence[str], manager: Any) -> Results:
    """One entry per requested name: a task's own scores, a group's aggregate, a tag's member tasks."""
    table: Mapping[str, Mapping[str, Any]] = raw["results"]
    results: Results = {}
    for name in requested:
        if name in table:
            results[name] = _numeric_metrics(table[name])
            continue
        # A tag (e.g. ai2_arc) has no row of its own; its member tasks do.
        entry = manager.task_index.get(name)
        members = sorted(m for m in (entry.tags if entry is not None else ()) if m in table)
        if not members:
            log.warning("lm-eval returned no scores for %s", name)
        for member in members:
            results[member] = _numeric_metrics(table[member])
    return results


def _check_settings(settings: EvalSettings) -> None:
    if not settings.tasks:
        raise HcSmoeError("no evaluation tasks given: name at least one lm-eval task")
    if settings.limit is not None and not settings.limit > 0:
        raise HcSmoeError(f"--limit must be a positive count or a fraction in (0, 1), got {settings.limit}")
    if settings.num_fewshot < 0:
        raise HcSmoeError(f"--num-fewshot must be 0 or more, got {settings.num_fewshot}")
    batch = str(settings.batch_size)
    if not ((batch.isdigit() and int(batch) > 0) or batch == "auto" or re.fullmatch(r"auto:\d+", batch)):
        raise HcSmoeError(f"--eval-batch-size must be a positive number, 'auto' or 'auto:N', got '{batch}'")


def check_tasks(settings: EvalSettings) -> None:
    """Refuse bad settings, unknown task names and a missing task folder now, before any merge runs."""
    _check_settings(settings)
    _task_manager(_import_lm_eval()[2], settings)


def prepare_tasks(settings: EvalSettings) -> None:
    """check_tasks, then build every task once, so that its data is fetched into the datasets cache or found there.

    Run before any compute: a dataset that cannot be had (Hub unreachable, gated, missing, a local data file gone)
    is one HcSmoeError line naming the task, its dataset and the fixes. With the Hub unreachable and lm-eval's own
    tasks requested it fails in about a second, before indexing them: one probe of the endpoint, because the Hub
    client otherwise retries each dataset with backoff for ~23 s. Built tasks are dropped (their data stays in the
    datasets cache, where evaluate() finds it again).
    """
    _check_settings(settings)
    manager = _task_manager(_import_lm_eval()[2], settings,
                            before_builtins=lambda names: _probe_hub(names, settings.include_path))
    owner: dict[str, str] = {}
    for name in settings.tasks:
        try:
            leaves = list(manager.load([name])["tasks"])
        except Exception as exc:  # lm-eval and datasets raise many kinds; each becomes the one line below
            raise HcSmoeError(_data_error(name, exc)) from exc
        for leaf in leaves:
            if owner.setdefault(leaf, name) != name:
                raise HcSmoeError(f"evaluation task {leaf} is part of both {owner[leaf]} and {name}: "
                                  "drop one of them from --tasks")


def _probe_hub(tasks: list[str], include_path: str | None) -> None:
    """Refuse at once when lm-eval's own tasks are wanted but the Hub, where their data lives, does not answer."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    if datasets_config.HF_HUB_OFFLINE:  # offline: datasets reads its cache and fails fast on a miss
        return
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # any HTTP answer means the Hub is reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        # Checked before lm-eval's tasks are indexed (the slow part), so a name is not known to be one of them.
        what = f"are not in {include_path}, so they would be lm-eval's" if include_path else "are lm-eval's"
        raise HcSmoeError(f"evaluation task(s) {', '.join(tasks)} {what} built-in tasks, whose data is on the "
                          f"Hugging Face Hub ({endpoint}), which cannot be reached ({reason}): "
                          f"{_data_fixes()}") from exc


def _data_fixes() -> str:
    from datasets import config as datasets_config

    if datasets_config.HF_HUB_OFFLINE:
        return f"{_DATA_FIXES}, or run once online (HF_DATASETS_OFFLINE unset) to fill the datasets cache"
    return f"{_DATA_FIXES}, or fetch the data once online and rerun with HF_DATASETS_OFFLINE=1 to use the cache"


def _data_error(name: str, exc: BaseException) -> str:
    """One line: which task (and member task) failed on which dataset, why, and what to do."""
    leaf, dataset = None, None
    tb = exc.__traceback__
    while tb is not None:  # the innermost lm-eval task being built is the one whose data failed
        obj = tb.tb_frame.f_locals.get("self")
        config = getattr(obj, "config", None)
        if type(obj).__module__.startswith("lm_eval") and getattr(config, "dataset_path", None):
            leaf, dataset = getattr(config, "task", None), config.dataset_path
        tb = tb.tb_next
    lines = str(exc).strip().splitlines()
    reason = (lines[0] if lines else type(exc).__name__)[:300]
    task = f"{name} ({leaf})" if leaf and leaf != name else name
    data = f" (dataset {dataset})" if dataset else ""
    gated = "; for a gated dataset accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
    return (f"evaluation task {task}{data} cannot load its data: {reason}: {_data_fixes()}"
            f"{gated if 'gated' in reason.lower() else ''}")


def evaluate(model: Any, tokenizer: Any, settings: EvalSettings) -> Results:
    """Score a loaded causal LM on `settings.tasks` with lm-eval, in process: `{task: {metric: value}}`."""
    if not settings.tasks:
        raise HcSmoeError("no evaluation tasks given: name at least one lm-eval task")
    lm_eval, hflm_cls, task_manager_cls = _import_lm_eval()
    manager = _task_manager(task_manager_cls, settings)
    _place(model, settings.device)
    # HFLM sets a pad token on the tokenizer it is given; a copy keeps the caller's tokenizer (which may be
    # saved next to the merged checkpoint) exactly as the source shipped it.
    tokenizer = copy.deepcopy(tokenizer)
    was_training = model.training
    model.eval()
    log.info("Evaluating on %s (%d-shot, limit %s, batch size %s)", ", ".join(settings.tasks),
             settings.num_fewshot, settings.limit, settings.batch_size)
    try:
        lm = hflm_cls(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        with _preserved_rng():
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(settings.tasks),
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                task_manager=manager,
                log_samples=False,
            )
    finally:
        model.train(was_training)
    if raw is None:  # only non-zero ranks of a distributed launch get None; we always run single-process
        raise RuntimeError("lm-eval returned no results")
    results = _flatten(raw, settings.tasks, manager)
    for task, metrics in results.items():
        shown = {k: round(v, 4) for k, v in metrics.items() if not k.endswith("_stderr")}
        log.info("  %s: %s", task, shown)
    return results


def headline(results: Mapping[str, Mapping[str, float]] | None) -> float | None:
    """The paper's headline: plain mean of `acc` over the tasks that report it (None when none does)."""
    if not results:
        return None
    accs = [metrics["acc"] for metrics in results.values() if "acc" in metrics]
    return sum(accs) / len(accs) if accs else None


def lm_eval_version() -> str:
    """The installed lm-eval version (for the card and the cache key), "unknown" when it is not installed."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "unknown"
