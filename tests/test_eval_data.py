"""Tests of evaluation.prepare_tasks: every task's data is resolved before any compute, or refused in one line.

Offline throughout: local task YAMLs in tmp_path, the shipped demo tasks, and lm-eval's built-in tasks in a
subprocess whose Hub endpoint is a closed loopback port (or with HF_DATASETS_OFFLINE=1 and an empty cache).
Run: pytest tests/test_eval_data.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from hc_smoe_hub import evaluation  # noqa: E402
from hc_smoe_hub.demo import DEMO_TASKS, task_dir  # noqa: E402
from hc_smoe_hub.errors import HcSmoeError  # noqa: E402
from hc_smoe_hub.evaluation import EvalSettings, prepare_tasks  # noqa: E402

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

GROUP = """group: both
task:
  - present
  - other
metadata:
  version: 1
"""

# Prints the one line prepare_tasks refuses the paper's tasks with, then the seconds the call took.
SCRIPT = """
import time
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.evaluation import PAPER_TASKS, EvalSettings, prepare_tasks
start = time.perf_counter()
try:
    prepare_tasks(EvalSettings(tasks=PAPER_TASKS))
    print("PREPARED")
except HcSmoeError as exc:
    print("REFUSED", exc)
print("SECONDS", time.perf_counter() - start)
"""


@pytest.fixture()
def tasks(tmp_path: Path) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"question": "1 + 1 =", "choices": ["2", "3"], "label": 0}) + "\n")
    (tmp_path / "present.yaml").write_text(TASK.format(name="present", data=data))
    (tmp_path / "other.yaml").write_text(TASK.format(name="other", data=data))
    (tmp_path / "gone.yaml").write_text(TASK.format(name="gone", data=tmp_path / "nowhere" / "gone.jsonl"))
    (tmp_path / "both.yaml").write_text(GROUP)
    return tmp_path


def test_local_tasks_pass_without_asking_the_hub(tasks, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("local tasks must not probe the Hub")

    monkeypatch.setattr(evaluation.urllib.request, "urlopen", no_network)
    prepare_tasks(EvalSettings(tasks=["present"], include_path=str(tasks)))
    prepare_tasks(EvalSettings(tasks=["both"], include_path=str(tasks)))


def test_missing_data_file_is_refused_naming_the_task(tasks):
    with pytest.raises(HcSmoeError) as info:
        prepare_tasks(EvalSettings(tasks=["present", "gone"], include_path=str(tasks)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("evaluation task gone (dataset json) cannot load its data")
    assert "gone.jsonl" in message and "--tasks" in message and "--skip-eval" in message


def test_task_in_two_requested_items_is_refused(tasks):
    with pytest.raises(HcSmoeError, match="present is part of both present and both"):
        prepare_tasks(EvalSettings(tasks=["present", "both"], include_path=str(tasks)))


def test_settings_checked_first(tasks, monkeypatch):
    def unreachable(*args, **kwargs):
        raise evaluation.urllib.error.URLError("no network in this test")

    monkeypatch.setattr(evaluation.urllib.request, "urlopen", unreachable)
    with pytest.raises(HcSmoeError, match="--limit"):
        prepare_tasks(EvalSettings(tasks=["present"], include_path=str(tasks), limit=0))
    # Offline, a name missing from the folder is not looked up among lm-eval's tasks (that takes seconds).
    with pytest.raises(HcSmoeError, match=r"absent are not in .*, so they would be lm-eval's built-in tasks"):
        prepare_tasks(EvalSettings(tasks=["absent"], include_path=str(tasks)))


def test_shipped_demo_tasks_pass():
    prepare_tasks(EvalSettings(tasks=list(DEMO_TASKS), include_path=str(task_dir())))


def _run_paper_tasks(tmp_path: Path, **env: str) -> tuple[str, float, float]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {"HF_HOME": str(tmp_path / "hf"), **env}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environment,
                          timeout=300, check=True)
    wall = time.perf_counter() - start
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[-1] for line in done.stdout.splitlines()}
    assert "REFUSED" in lines, done.stdout + done.stderr
    return lines["REFUSED"], float(lines["SECONDS"]), wall


def test_paper_tasks_refused_at_once_when_the_hub_is_unreachable(tmp_path):
    # Port 9 on loopback is closed: a connection refused, as with no network, whatever this machine can reach.
    message, seconds, wall = _run_paper_tasks(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert message.startswith("evaluation task(s) arc_challenge, arc_easy, boolq, hellaswag, mmlu, openbookqa, "
                              "rte, winogrande are lm-eval's built-in tasks, whose data is on the Hugging Face Hub")
    assert "http://127.0.0.1:9" in message and "cannot be reached" in message
    assert "--tasks" in message and "--skip-eval" in message and "HF_DATASETS_OFFLINE=1" in message
    # Without the probe the Hub client retries each dataset with backoff (1+2+4+8+8 s) before failing.
    assert seconds < 10, seconds
    print(f"refused in {seconds:.2f} s ({wall:.1f} s with interpreter start)")


def test_paper_tasks_refused_offline_with_an_empty_cache(tmp_path):
    message, seconds, _ = _run_paper_tasks(tmp_path, HF_DATASETS_OFFLINE="1")
    assert message.startswith("evaluation task arc_challenge (dataset allenai/ai2_arc) cannot load its data")
    assert "fill the datasets cache" in message
    # Indexing lm-eval's built-in tasks is most of it; the dataset itself fails at once offline.
    assert seconds < 120, seconds
