"""Bad input gets one line on stderr, exit status 2, no traceback and no output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, DbrxConfig, LlamaConfig

from hc_smoe_hub import merge as merge_module
from hc_smoe_hub.cli import main
from hc_smoe_hub.merge import partial_dir_for
from hc_smoe_hub.synthetic import build_tokenizer


def refuse(capsys, argv: list[str], out: Path, *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("hc-smoe-push:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in expected:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not partial_dir_for(out).exists()
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_dense_model_is_refused(tmp_path, capsys, merge_args):
    src = tmp_path / "llama"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(src)
    build_tokenizer(src)
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "2", "--output-dir", str(out), *merge_args], out, "llama", "Mixtral")


def test_unsupported_moe_family_is_refused(tmp_path, capsys, merge_args):
    src = tmp_path / "dbrx"
    src.mkdir()
    (src / "config.json").write_text(DbrxConfig().to_json_string())  # a MoE family with no row
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "2", "--output-dir", str(out), *merge_args], out,
           "model_type 'dbrx' is not a supported")


@pytest.mark.parametrize("keep", ["0", "9", "abc", "-1", "1.5", "2.5"])
def test_keep_out_of_range_is_refused(keep, tiny_models, tmp_path, capsys, merge_args):
    out = tmp_path / "out"
    refuse(capsys, [str(tiny_models["mixtral"]), "--keep", keep, "--output-dir", str(out), *merge_args], out,
           "--keep", "1 to 8")


def test_missing_path_is_refused(tmp_path, capsys, merge_args):
    out = tmp_path / "out"
    refuse(capsys, [str(tmp_path / "nope"), "--keep", "2", "--output-dir", str(out), *merge_args], out,
           "neither a local model directory nor a Hub repo id")


def test_missing_shard_is_refused(tiny_models, tmp_path, capsys, merge_args):
    src = copy_model(tiny_models["mixtral"], tmp_path / "src")
    (src / "model-00003-of-00013.safetensors").unlink()
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "4", "--output-dir", str(out), *merge_args], out,
           "model-00003-of-00013.safetensors", "missing")


def test_corrupt_shard_is_refused(tiny_models, tmp_path, capsys, merge_args):
    src = copy_model(tiny_models["mixtral"], tmp_path / "src")
    shard = src / "model-00005-of-00013.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "4", "--output-dir", str(out), *merge_args], out,
           "model-00005-of-00013.safetensors", "truncated")


def test_garbage_shard_is_refused(tiny_models, tmp_path, capsys, merge_args):
    src = copy_model(tiny_models["mixtral"], tmp_path / "src")
    (src / "model-00002-of-00013.safetensors").write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "4", "--output-dir", str(out), *merge_args], out, "not a valid safetensors")


def test_pickle_only_directory_is_refused(tmp_path, capsys, merge_args):
    src = tmp_path / "pickle"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 8,
                                                 "num_experts_per_tok": 2}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "4", "--output-dir", str(out), *merge_args], out, "pickle")


def test_calibration_too_short_is_refused(tiny_models, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    out = tmp_path / "out"
    refuse(capsys, [str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push", "--skip-eval",
                    "--calibration", str(short), "--num-samples", "4", "--seq-len", "64"], out,
           "fewer than 4 blocks", "--num-samples")


def test_missing_calibration_file_is_refused(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    refuse(capsys, [str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push", "--skip-eval",
                    "--calibration", str(tmp_path / "none.jsonl")], out, "does not exist")


def test_unreachable_calibration_dataset_is_refused(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    refuse(capsys, [str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push", "--skip-eval",
                    "--calibration", "someone/no-such-dataset", "--num-samples", "2", "--seq-len", "32"], out,
           "cannot load calibration dataset", "someone/no-such-dataset")


def test_existing_output_directory_is_kept(tiny_models, tmp_path, capsys, merge_args):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main([str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), *merge_args]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_full_disk_is_refused_before_compute(tiny_models, tmp_path, capsys, merge_args, monkeypatch):
    # A real full disk cannot be made here without root mounts; the free-space probe is the injection point.
    monkeypatch.setattr(merge_module, "free_bytes", lambda _path: 1000)
    out = tmp_path / "out"
    refuse(capsys, [str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), *merge_args], out,
           "disk space")


@pytest.mark.parametrize(("extra", "words"), [
    (["--limit", "0"], "--limit"),
    (["--eval-batch-size", "abc"], "--eval-batch-size"),
    (["--num-fewshot", "-1"], "--num-fewshot"),
    (["--max-shard-size", "0"], "--max-shard-size"),
])
def test_bad_evaluation_and_output_settings_are_refused_before_compute(extra, words, tiny_models, calib_file, tmp_path,
                                                                     capsys):
    from hc_smoe_hub.demo import task_dir

    out = tmp_path / "out"
    argv = [str(tiny_models["mixtral"]), "--keep", "4", "--output-dir", str(out), "--no-push", "--calibration",
            str(calib_file), "--num-samples", "2", "--seq-len", "32", "--tasks", "demo_mc", "--include-path",
            str(task_dir()), *extra]
    line = refuse(capsys, argv, out, words)
    assert "merging layers" not in line
