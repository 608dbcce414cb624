"""End-to-end merges of tiny checkpoints of every supported family, loaded back with stock transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.cli import main
from hc_smoe_hub.merge import partial_dir_for
from hc_smoe_hub.synthetic import build_tiny_moe


def run_cli(src: Path, out: Path, keep: str, merge_args: list[str], *extra: str) -> dict:
    assert main([str(src), "--keep", keep, "--output-dir", str(out), *merge_args, *extra]) == 0
    return json.loads((out / "hc_smoe.json").read_text())


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    ckpt = SourceCheckpoint(directory)
    return ckpt.read(ckpt.keys())


def logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_expert_reproduces_the_source(family, tiny_models, merge_args, tmp_path):
    src = tiny_models[family]
    n = spec_for(json.loads((src / "config.json").read_text())).num_experts(
        json.loads((src / "config.json").read_text()))
    run_cli(src, tmp_path / "out", str(n), merge_args)
    assert torch.equal(logits(src, IDS), logits(tmp_path / "out", IDS))
    a, b = tensors(src), tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_checkpoint_loads_with_stock_transformers(family, tiny_models, merge_args, tmp_path):
    src, out = tiny_models[family], tmp_path / "out"
    prov = run_cli(src, out, "5", merge_args)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    spec = spec_for(config)
    assert all(config[k] == 5 for k in spec.expert_count_keys)
    src_config = json.loads((src / "config.json").read_text())
    changed = {k for k in config if config[k] != src_config.get(k)}
    assert changed <= set(spec.expert_count_keys)  # every other field unchanged
    with torch.no_grad():
        out_logits = model(IDS).logits
    assert torch.isfinite(out_logits).all()
    assert model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    for layer in prov["layers"]:
        assert sorted(i for c in layer["clusters"] for i in c) == list(range(8))
        assert len(layer["clusters"]) == 5
        assert abs(sum(layer["frequencies"]) - 1) < 1e-4
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not partial_dir_for(out).exists()


def test_qwen3_writes_both_expert_count_keys(tiny_models, merge_args, tmp_path):
    run_cli(tiny_models["qwen3_moe"], tmp_path / "out", "3", merge_args)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts"] == 3 and config["num_local_experts"] == 3


def test_top_k_is_clamped_to_the_expert_count(tiny_models, merge_args, tmp_path, caplog):
    prov = run_cli(tiny_models["qwen2_moe"], tmp_path / "out", "2", merge_args)  # top-4 model
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2 and prov["top_k_after"] == 2
    assert torch.isfinite(logits(tmp_path / "out", IDS)).all()


def test_non_expert_tensors_are_copied_byte_for_byte(tiny_models, merge_args, tmp_path):
    src = tiny_models["qwen2_moe"]
    run_cli(src, tmp_path / "out", "3", merge_args)
    a, b = SourceCheckpoint(src), SourceCheckpoint(tmp_path / "out")
    copied = [k for k in a.tensors if ".experts." not in k and not k.endswith("mlp.gate.weight")]
    assert any("shared_expert" in k for k in copied) and any("layers.1.mlp.gate_proj" in k for k in copied)
    for key in copied:
        assert b"".join(a.copy_raw(key)) == b"".join(b.copy_raw(key)), key
        assert a.tensors[key].dtype == b.tensors[key].dtype


@pytest.mark.parametrize("mode", ["freq", "average"])
def test_merged_weights_follow_the_formula(mode, tiny_models, merge_args, tmp_path):
    src, out = tiny_models["mixtral"], tmp_path / "out"
    prov = run_cli(src, out, "4", merge_args, "--method", "hc-smoe", "--merge", mode)
    a, b = tensors(src), tensors(out)
    for layer in prov["layers"]:
        freqs = torch.tensor(layer["frequencies"], dtype=torch.float64)
        for new, group in enumerate(layer["clusters"]):
            w = freqs[group] if mode == "freq" else torch.ones(len(group), dtype=torch.float64)
            w = w / w.sum() if w.sum() > 0 else torch.full((len(group),), 1 / len(group), dtype=torch.float64)
            for name in ("w1", "w2", "w3"):
                key = "model.layers.{}.block_sparse_moe.experts.{}." + name + ".weight"
                expected = sum(wi * a[key.format(layer["layer"], i)].double() for wi, i in zip(w, group, strict=True))
                # frequencies in hc_smoe.json are rounded to 6 decimals
                assert torch.allclose(b[key.format(layer["layer"], new)].double(), expected, atol=1e-5)
        assert b[f"model.layers.{layer['layer']}.block_sparse_moe.gate.weight"].shape[0] == 4


def test_planted_copies_end_in_one_cluster(tmp_path, merge_args):
    src = build_tiny_moe(tmp_path / "src", "mixtral", seed=3)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for copy in (2, 5):
                ex.gate_up_proj[copy] = ex.gate_up_proj[0]
                ex.down_proj[copy] = ex.down_proj[0]
            ex.gate_up_proj[7] = ex.gate_up_proj[4]
            ex.down_proj[7] = ex.down_proj[4]
    shutil.rmtree(src)
    model.save_pretrained(src, max_shard_size="40KB")
    build_tiny_moe(tmp_path / "tok", "mixtral")
    shutil.copy(tmp_path / "tok" / "tokenizer.json", src)
    shutil.copy(tmp_path / "tok" / "tokenizer_config.json", src)
    for linkage in ("average", "single", "complete", "ward"):
        prov = run_cli(src, tmp_path / linkage, "5", merge_args, "--method", "hc-smoe", "--linkage", linkage)
        for layer in prov["layers"]:
            assert [0, 2, 5] in layer["clusters"] and [4, 7] in layer["clusters"], (linkage, layer["clusters"])


def test_shards_are_capped_and_indexed(tiny_models, merge_args, tmp_path):
    out = tmp_path / "out"
    run_cli(tiny_models["olmoe"], out, "4", merge_args, "--max-shard-size", "20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and len(list(out.glob("*.safetensors"))) == len(shards)
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as fh:
            keys = list(fh.keys())
            sizes = [fh.get_tensor(k).nbytes for k in keys]
        assert sum(sizes) <= 20_000 or len(keys) == 1
        assert all(index["weight_map"][k] == shard for k in keys)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total


def test_sequential_and_one_shot_differ_only_after_the_first_layer(tiny_models, merge_args, tmp_path):
    seq = run_cli(tiny_models["mixtral"], tmp_path / "seq", "3", merge_args, "--sequential")
    one = run_cli(tiny_models["mixtral"], tmp_path / "one", "3", merge_args, "--one-shot")
    assert seq["layers"][0]["frequencies"] == one["layers"][0]["frequencies"]
    assert seq["layers"][1]["frequencies"] != one["layers"][1]["frequencies"]
    assert seq["sequential"] is True and one["sequential"] is False


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_one_shot_carries_the_original_models_states_to_the_next_layer(family, tiny_models, merge_args, tmp_path):
    """One-shot calibration reuses the statistics pass's routed output instead of re-running each MoE block: the
    routing frequencies recorded for every layer must be those of the original model on the same calibration."""
    from transformers import AutoTokenizer

    from hc_smoe_hub.calibration import CalibrationSpec, build_blocks

    src = tiny_models[family]
    one = run_cli(src, tmp_path / "one", "3", merge_args, "--one-shot")
    calib = merge_args[merge_args.index("--calibration") + 1]
    blocks = build_blocks(AutoTokenizer.from_pretrained(src), CalibrationSpec(calib, 4, 64))
    model = AutoModelForCausalLM.from_pretrained(src)
    counts: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):  # a dense layer of the tiny Qwen model
            continue
        n = model.config.num_local_experts if family == "mixtral" else model.config.num_experts

        def hook(_m, _args, out, i=i, n=n):
            counts[i] = torch.bincount(out[2].flatten(), minlength=n).float()

        layer.mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        model(blocks)
    assert len(one["layers"]) == len(counts) >= 2
    for rec in one["layers"]:
        expected = counts[rec["layer"]] / counts[rec["layer"]].sum()
        assert torch.allclose(torch.tensor(rec["frequencies"]), expected, atol=2e-3), rec["layer"]


def test_provenance_records_settings_and_versions(tiny_models, merge_args, tmp_path):
    prov = run_cli(tiny_models["mixtral"], tmp_path / "out", "0.5", merge_args, "--method", "hc-smoe",
                   "--linkage", "single",
                   "--router", "mean", "--merge", "fix-dom")
    assert prov["experts_before"] == 8 and prov["experts_after"] == 4
    assert prov["options"]["linkage"] == "single" and prov["options"]["router"] == "mean"
    assert prov["options"]["merge"] == "fix-dom" and prov["method"] == "hc-smoe"
    assert prov["calibration"]["num_samples"] == 4 and "transformers" in prov["versions"]
    assert all(layer["output_rel_error"] >= 0 for layer in prov["layers"])


@pytest.mark.parametrize("method", ["anchored", "anchored-o", "takeover"])
def test_anchored_methods_partition_every_expert_into_k_groups(method, tiny_models, merge_args, tmp_path):
    prov = run_cli(tiny_models["qwen2_moe"], tmp_path / "out", "5", merge_args, "--method", method)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_experts == 5
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    for layer in prov["layers"]:
        assert sorted(i for g in layer["clusters"] for i in g) == list(range(8))
        assert prov["method"] == method and len(layer["clusters"]) == 5


def test_paper_flag_runs_hc_smoe_as_published_and_defaults_are_the_measured_ones(tiny_models, merge_args, tmp_path):
    paper = run_cli(tiny_models["mixtral"], tmp_path / "paper", "4", merge_args, "--paper")
    assert paper["method"] == "hc-smoe" and paper["sequential"] is False
    assert paper["options"]["merge"] == "freq" and paper["options"]["linkage"] == "average"
    default = run_cli(tiny_models["mixtral"], tmp_path / "default", "4", merge_args)
    assert default["method"] == "takeover" and default["options"]["merge"] == "fix-dom-rr"
    assert default["options"]["router"] == "fit" and default["sequential"] is True


def test_best_grouping_keeps_the_candidate_with_the_lower_error(tiny_models, merge_args, tmp_path):
    prov = run_cli(tiny_models["mixtral"], tmp_path / "out", "4", merge_args, "--method", "best-grouping")
    for layer in prov["layers"]:
        errors = layer["grouping_errors"]
        assert set(errors) == {"hc-smoe", "anchored-o"}
        assert errors[layer["grouping"]] == min(errors.values())
        # the recorded error of the written layer is the chosen candidate's (same sample, same routing)
        assert abs(layer["output_rel_error"] - errors[layer["grouping"]]) < 1e-4
