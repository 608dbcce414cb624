"""Finished work is never lost: the checkpoint is in place before evaluation, a failure after it prints the command
that finishes the job (`--eval-only`), and the terminal shows one line while run.log keeps the traceback."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hc_smoe_hub import demo
from hc_smoe_hub.cli import main
from hc_smoe_hub.runlog import pending_log_path


def error_lines(capsys) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("hc-smoe-push:")], err


BROKEN_SCORER = """def process_results(doc, results):
    raise RuntimeError("fragile_mc cannot score a document")
"""
FIXED_SCORER = """def process_results(doc, results):
    lls = [ll for ll, _greedy in results]
    return {"acc": float(lls.index(max(lls)) == doc["label"])}
"""


@pytest.fixture()
def broken_task(tmp_path) -> tuple[Path, Path]:
    """The demo multiple-choice task with a scorer that raises: the task and its data load (so the checks before
    the merge pass), and it breaks only when lm-eval scores it, i.e. during evaluation, after the merge."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    yaml = (demo.task_dir() / "demo_mc.yaml").read_text()
    yaml = yaml.replace("task: demo_mc", "task: fragile_mc")
    yaml = yaml.split("metric_list:")[0] + (
        "process_results: !function fragile.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "fragile_mc.yaml").write_text(yaml)
    scorer = folder / "fragile.py"
    scorer.write_text(BROKEN_SCORER)
    return folder, scorer


def test_failed_evaluation_keeps_the_checkpoint_and_eval_only_finishes_it(tiny_models, calib_file, tmp_path, capsys,
                                                                          broken_task, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, scorer = broken_task
    out = tmp_path / "out"
    argv = [str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push", "--calibration",
            str(calib_file), "--num-samples", "4", "--seq-len", "64", "--tasks", "fragile_mc", "--include-path",
            str(folder), "--limit", "8"]
    code = main(argv)
    lines, err = error_lines(capsys)
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "evaluation failed" in lines[0] and "--eval-only" in lines[0] and str(out) in lines[0]
    # The checkpoint is complete and loads; evaluation left nothing half-written.
    for name in ("config.json", "hc_smoe.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert list(out.glob("*.safetensors"))
    assert not (out / "eval_results.json").exists() and not (out / "README.md").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
    log = (out / "run.log").read_text()
    assert "Traceback" in log
    assert not pending_log_path(out).exists()
    # Mend the scorer and run exactly the command the line printed.
    scorer.write_text(FIXED_SCORER)
    command = lines[0].split("finish with: ", 1)[1]
    words = shlex.split(command)
    assert words[0] == "hc-smoe-push"
    assert main(words[1:]) == 0, capsys.readouterr().err
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["merged"]["fragile_mc"]["acc"] <= 1 and "fragile_mc" in results["original"]
    card = (out / "README.md").read_text()
    assert "https://arxiv.org/abs/2410.08589" in card and "fragile_mc" in card
    assert "hc-smoe-push " in card and "--keep 4" in card  # the reproduce command, rebuilt from hc_smoe.json
    assert not list(out.glob(".*"))  # no staging folder or temporary file left


def test_unexpected_failure_is_one_line_with_the_log(tiny_models, calib_file, tmp_path, capsys, monkeypatch):
    from hc_smoe_hub import streaming

    def boom(*_args, **_kwargs):
        raise RuntimeError("synthetic failure inside the merge")

    monkeypatch.setattr(streaming.StreamingMerger, "_process_layer", boom)
    out = tmp_path / "out"
    code = main([str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push", "--skip-eval",
                 "--calibration", str(calib_file), "--num-samples", "4", "--seq-len", "64"])
    lines, err = error_lines(capsys)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "merge failed unexpectedly (RuntimeError: synthetic failure inside the merge)" in lines[0]
    log_path = pending_log_path(out)
    assert str(log_path) in lines[0]
    assert "Traceback" in log_path.read_text() and "synthetic failure" in log_path.read_text()
    assert not out.exists()


def test_terminal_shows_the_tool_and_run_log_keeps_the_libraries(tiny_models, calib_file, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main([str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push",
                 "--calibration", str(calib_file), "--num-samples", "4", "--seq-len", "64", "--tasks", "demo_mc",
                 "--include-path", str(demo.task_dir()), "--limit", "4"]) == 0
    captured = capsys.readouterr()
    assert "hc_smoe_hub.pipeline" in captured.err  # the tool's stage lines
    assert "lm_eval" not in captured.err and "transformers" not in captured.err
    log = (out / "run.log").read_text()
    assert "lm_eval" in log and "hc_smoe_hub.pipeline" in log
    assert "demo_mc" in captured.out  # the summary table


def test_refusal_before_any_work_leaves_no_log(tiny_models, tmp_path, capsys, merge_args):
    out = tmp_path / "out"
    assert main([str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--dtype", "int3",
                 *merge_args]) == 2
    lines, _err = error_lines(capsys)
    assert len(lines) == 1 and "--dtype" in lines[0]
    assert not out.exists() and not pending_log_path(out).exists()


def test_offline_with_the_default_tasks_is_refused_before_the_merge(tiny_models, calib_file, tmp_path, capsys):
    import time

    out = tmp_path / "out"
    start = time.perf_counter()
    code = main([str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push",
                 "--calibration", str(calib_file), "--num-samples", "4", "--seq-len", "64"])
    elapsed = time.perf_counter() - start
    lines, err = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "arc_challenge" in lines[0] and "--skip-eval" in lines[0] and "HF_DATASETS_OFFLINE" in lines[0]
    assert "merging layers" not in err and not out.exists()
    assert elapsed < 60  # seconds, not the minutes of retries a dataset download would take
