"""The whole job against a loopback Hub: pull, merge, real lm-eval, card, push, load back; refusals before compute."""

from __future__ import annotations

import json
import shlex
import time

import pytest
import torch
from huggingface_hub import ModelCard, constants
from test_hub import ALICE, BOB, hf_env, hub  # noqa: F401  (pytest fixtures)
from transformers import AutoModelForCausalLM

from hc_smoe_hub.cli import main
from hc_smoe_hub.demo import task_dir
from hc_smoe_hub.synthetic import build_tiny_moe

SOURCE = "upstream/tiny-moe"


@pytest.fixture()
def seeded(hub, tmp_path, monkeypatch):  # noqa: F811  (the imported fixture)
    src = build_tiny_moe(tmp_path / "src", "mixtral")
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (src / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    hub.seed_repo(SOURCE, {p.name: p for p in src.iterdir()})
    # transformers downloads without an explicit endpoint, through these values frozen at import time.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return hub


def job_args(tmp_path, calib_file, *extra: str) -> list[str]:
    return [SOURCE, "--keep", "4", "--output-dir", str(tmp_path / "out"), "--calibration", str(calib_file),
            "--num-samples", "4", "--seq-len", "64", "--tasks", "demo_mc", "--include-path", str(task_dir()),
            "--limit", "8", "-q", *extra]


def test_pull_merge_evaluate_push_and_load_back(seeded, tmp_path, calib_file, capsys):
    assert main(job_args(tmp_path, calib_file, "--token", ALICE, "--repo-id", "alice/tiny-merged")) == 0
    printed = capsys.readouterr().out
    assert "pushed to" in printed and "demo_mc" in printed and ALICE not in printed
    files = seeded.repo_files("alice/tiny-merged")
    for name in ("config.json", "model.safetensors", "README.md", "hc_smoe.json", "eval_results.json",
                 "eval_comparison.png", "LICENSE", "tokenizer.json"):
        assert name in files, name
    assert all(ALICE.encode() not in data for data in files.values())
    assert "run.log" not in files and (tmp_path / "out" / "run.log").exists()
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == SOURCE and card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0"
    assert "https://arxiv.org/abs/2410.08589" in card.text and "--token" not in card.text
    results = json.loads(files["eval_results.json"])
    assert 0 <= results["merged"]["demo_mc"]["acc"] <= 1 and "demo_mc" in results["original"]
    pushed = AutoModelForCausalLM.from_pretrained("alice/tiny-merged", token=ALICE)
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert pushed.config.num_local_experts == 4
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert torch.equal(pushed(ids).logits, local(ids).logits)


def test_original_scores_are_cached(seeded, tmp_path, calib_file, caplog):
    assert main(job_args(tmp_path, calib_file, "--no-push")) == 0
    cache = list((tmp_path / "cache" / "hc_smoe_hub" / "eval").glob("*.json"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    second = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in job_args(tmp_path, calib_file)]
    assert main([*second, "--no-push", "--keep", "3"]) == 0
    assert cache[0].stat().st_mtime_ns == stamp  # not evaluated nor rewritten again
    a = json.loads((tmp_path / "out" / "eval_results.json").read_text())["original"]
    b = json.loads((tmp_path / "out2" / "eval_results.json").read_text())["original"]
    assert a == b


def refused(capsys, argv, out, *words) -> None:
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hc-smoe-push:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    assert time.perf_counter() - start < 20
    assert not out.exists()
    for token in (ALICE, BOB):
        assert token not in err


def test_no_token_is_refused_before_download(seeded, tmp_path, calib_file, capsys):
    refused(capsys, job_args(tmp_path, calib_file), tmp_path / "out", "token")
    assert not any("/resolve/" in path for _method, path in seeded.requests)


def test_read_only_token_is_refused(seeded, tmp_path, calib_file, capsys):
    refused(capsys, job_args(tmp_path, calib_file, "--token", BOB), tmp_path / "out", "write")
    assert not any("/resolve/" in path for _method, path in seeded.requests)


def test_non_empty_target_is_refused_without_overwrite(seeded, tmp_path, calib_file, capsys):
    seeded.seed_repo("alice/taken", {"config.json": b"{}"})
    refused(capsys, job_args(tmp_path, calib_file, "--token", ALICE, "--repo-id", "alice/taken"),
            tmp_path / "out", "--overwrite")


def test_gated_source_is_refused(seeded, tmp_path, calib_file, capsys):
    seeded.seed_repo(SOURCE, {}, gated=True)
    refused(capsys, job_args(tmp_path, calib_file, "--token", ALICE, "--no-push"), tmp_path / "out", "gated")


def test_failed_upload_keeps_the_output_and_push_only_finishes(seeded, tmp_path, calib_file, capsys):
    # A refused commit (transient errors are retried first: tests/test_hub.py covers that path).
    seeded.fail_next("POST", r"/(commit|preupload)/", status=400, times=100)
    argv = job_args(tmp_path, calib_file, "--token", ALICE, "--repo-id", "alice/flaky", "--skip-eval")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--push-only" in err and (tmp_path / "out" / "config.json").exists()
    seeded._failures.clear()
    assert main(["--push-only", str(tmp_path / "out"), "--repo-id", "alice/flaky", "--token", ALICE]) == 0
    assert "model.safetensors" in seeded.repo_files("alice/flaky")


def test_dense_or_bad_keep_on_the_hub_is_refused_before_the_weights_download(seeded, tmp_path, calib_file, capsys):
    refused(capsys, [*job_args(tmp_path, calib_file, "--token", ALICE, "--no-push"), "--keep", "9"],
            tmp_path / "out", "--keep", "1 to 8")
    seeded.seed_repo("upstream/dense", {"config.json": json.dumps({"model_type": "llama"}).encode(),
                                        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "})
    argv = job_args(tmp_path, calib_file, "--token", ALICE, "--no-push")
    refused(capsys, ["upstream/dense", *argv[1:]], tmp_path / "out", "llama", "not a supported")
    assert not any(path.endswith(".safetensors") for _method, path in seeded.requests if "/resolve/" in path)


def test_unknown_eval_task_is_refused_before_the_merge(tmp_path, calib_file, capsys):
    src = build_tiny_moe(tmp_path / "src", "mixtral")
    argv = [str(src), "--keep", "4", "--output-dir", str(tmp_path / "out"), "--no-push", "--calibration",
            str(calib_file), "--num-samples", "4", "--seq-len", "64", "--tasks", "no_such_task",
            "--include-path", str(task_dir())]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Offline (as here) the line says the Hub holding lm-eval's own tasks is unreachable; online, that it is unknown.
    line = [x for x in err.splitlines() if x.startswith("hc-smoe-push:")][0]
    assert "no_such_task" in line and "--tasks" in line and "merging layers" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (["--max-shard-size", "lots"], ["--max-shard-size"]),
    (["--dtype", "int3"], ["--dtype"]),
    (["--device", "cuda:7"], ["--device"]),
    (["--max-memory", "0=seventy"], ["--max-memory"]),
])
def test_bad_runtime_options_are_refused_before_any_download(seeded, tmp_path, calib_file, capsys, extra, words):
    refused(capsys, [*job_args(tmp_path, calib_file, "--token", ALICE, "--no-push"), *extra], tmp_path / "out", *words)
    assert not any("/resolve/" in path for _method, path in seeded.requests)


def test_existing_output_and_dead_partial_are_refused_before_any_download(seeded, tmp_path, calib_file, capsys):
    from hc_smoe_hub.merge import partial_dir_for

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(job_args(tmp_path, calib_file, "--token", ALICE, "--no-push")) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    out2 = tmp_path / "out2"
    partial = partial_dir_for(out2)
    partial.mkdir()
    (partial / "resume.json").write_text(json.dumps({"next_layer": 2}))
    argv = [a if a != str(out) else str(out2) for a in job_args(tmp_path, calib_file, "--token", ALICE, "--no-push")]
    assert main(argv) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hc-smoe-push:")][0]
    assert "--resume" in line and str(partial) in line and ALICE not in line
    assert not any("/resolve/" in path for _method, path in seeded.requests)


@pytest.mark.parametrize("flag", ["--eval-only", "--push-only"])
def test_finishing_an_incomplete_directory_is_refused_before_any_work(seeded, tmp_path, capsys, flag):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert main([flag, str(half), "--repo-id", "alice/x", "--token", ALICE, "--skip-eval"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hc-smoe-push:")]
    assert len(lines) == 1 and "not a finished hc-smoe-push output" in lines[0]
    assert not seeded.repo_exists("alice/x")
    assert not any("/resolve/" in path for _method, path in seeded.requests)


def test_interrupted_merge_resumes_with_the_printed_command(tmp_path, calib_file, capsys, monkeypatch):
    from hc_smoe_hub import streaming

    src = build_tiny_moe(tmp_path / "src", "mixtral")
    out = tmp_path / "out"
    argv = [str(src), "--keep", "4", "--output-dir", str(out), "--no-push", "--skip-eval", "--calibration",
            str(calib_file), "--num-samples", "4", "--seq-len", "64"]
    real = streaming.StreamingMerger._process_layer
    calls = []

    def interrupt_after_two(self, layers, layer_idx, *args, **kwargs):
        calls.append(layer_idx)
        if layer_idx == 2 and len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, layers, layer_idx, *args, **kwargs)

    monkeypatch.setattr(streaming.StreamingMerger, "_process_layer", interrupt_after_two)
    assert main(argv) == 130
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hc-smoe-push:")][0]
    assert "interrupted during the merge" in line and "--resume" in line and not out.exists()
    words = shlex.split(line.split("resume with `", 1)[1].split("`", 1)[0])
    assert main(words[1:]) == 0
    assert calls[3:] == list(range(2, len(calls) - 1)) and 0 not in calls[3:]
    assert (out / "hc_smoe.json").exists() and (out / "run.log").exists()


def test_eval_only_with_repo_id_evaluates_and_pushes_a_finished_merge(seeded, tmp_path, calib_file, capsys):
    out = tmp_path / "out"
    assert main(job_args(tmp_path, calib_file, "--no-push", "--skip-eval")) == 0
    assert not (out / "eval_results.json").exists()
    argv = ["--eval-only", str(out), "--tasks", "demo_mc", "--include-path", str(task_dir()), "--limit", "8",
            "--repo-id", "alice/finished", "--token", ALICE, "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    files = seeded.repo_files("alice/finished")
    assert "eval_results.json" in files and "README.md" in files and "run.log" not in files
    results = json.loads(files["eval_results.json"])
    assert "demo_mc" in results["original"] and 0 <= results["merged"]["demo_mc"]["acc"] <= 1
    assert ModelCard(files["README.md"].decode()).data.base_model == SOURCE
