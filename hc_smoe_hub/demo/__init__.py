"""Demo assets shipped with the package: three small, really trained MoE models, their calibration text and two
lm-eval tasks on held-out text, so expert merging can be tried and judged offline in minutes on a CPU.

Everything was produced by `scripts/train_demo.py` from the Python 3.11 documentation (PSF License Agreement);
see `TRAINING.md` next to this file for the recipe, the held-out losses and the scores of the unmerged models.

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from hc_smoe_hub.demo import DEMO_MODELS, DEMO_TASKS, task_dir

    tm = TaskManager(include_path=str(task_dir()), include_defaults=False)
    path = str(DEMO_MODELS["mixtral"])
    lm = HFLM(pretrained=path, tokenizer=path, batch_size=8, device="cpu")  # HFLM's default device is cuda
    lm_eval.simple_evaluate(model=lm, tasks=DEMO_TASKS, task_manager=tm)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DATA_DIR = DEMO_DIR / "data"
TASK_TEMPLATES_DIR = DEMO_DIR / "tasks"

DEMO_MODELS: dict[str, Path] = {
    "mixtral": DEMO_DIR / "mixtral-demo",  # MixtralForCausalLM: 8 experts, top-2
    "qwen-moe": DEMO_DIR / "qwen-moe-demo",  # Qwen2MoeForCausalLM: 16 experts, top-4, one shared expert
    # Qwen2MoeForCausalLM with Qwen1.5-MoE-A2.7B's expert layout: 60 narrow experts, top-4, one shared expert
    "qwen15-moe": DEMO_DIR / "qwen15-moe-demo",
}
CALIBRATION_TEXT: Path = DATA_DIR / "calibration.txt"  # documents separated by blank lines
HELDOUT_TEXT: Path = DATA_DIR / "heldout.jsonl"  # {"text", "source"} per line; never seen in training
HELDOUT_MC: Path = DATA_DIR / "heldout_mc.jsonl"  # {"context", "choices", "label"} per line
DEMO_TASKS: list[str] = ["demo_mc", "demo_ppl"]

_PLACEHOLDER = "@DEMO_DATA@"

__all__ = ["CALIBRATION_TEXT", "DEMO_MODELS", "DEMO_TASKS", "HELDOUT_MC", "HELDOUT_TEXT", "task_dir"]


def _rendered_tasks() -> dict[str, str]:
    """The task YAMLs with the placeholder replaced by this installation's data directory."""
    data = DATA_DIR.as_posix().replace("\\", "\\\\").replace('"', '\\"')
    return {p.name: p.read_text(encoding="utf-8").replace(_PLACEHOLDER, data)
            for p in sorted(TASK_TEMPLATES_DIR.glob("*.yaml"))}


def _write_if_changed(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        target = directory / name
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        # Write then rename, so a concurrent reader (another evaluating process) never sees half a file.
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)


def task_dir() -> Path:
    """A directory with the demo lm-eval task YAMLs, their data paths made absolute for this installation.

    lm-eval resolves `data_files` against the working directory, not the YAML, and the package may be
    installed anywhere (often read-only), so the YAMLs are materialised into a per-installation cache
    directory (`$XDG_CACHE_HOME/hc_smoe_hub/demo_tasks/<hash>`, or a temporary directory when that is not
    writable).
    Pass the result to `lm_eval.tasks.TaskManager(include_path=str(task_dir()), include_defaults=False)`.
    """
    files = _rendered_tasks()
    digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in files.items()).encode()).hexdigest()[:16]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache_root = cache_home / "hc_smoe_hub" / "demo_tasks"
    try:
        directory = cache_root / digest
        _write_if_changed(directory, files)
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix="hc_smoe_demo_tasks_"))
        _write_if_changed(directory, files)
    return directory
