"""DeepSeek-V3/R1, Kimi K2, GLM-4.5, GLM-4-MoE-Lite and DeepSeek-V2: tiny checkpoints built with the real
transformers classes, merged through the CLI, loaded back with stock `from_pretrained`.

Also: `route()` against the transformers router modules themselves, the grouped-routing --keep refusal, and the
README table rendered from the family table. FP8 sources of these families: tests/test_quant_merge.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from router_probe import router_io
from test_refusals import refuse
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hc_smoe_hub.architectures import spec_for, supported_table
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.cli import main
from hc_smoe_hub.merging import router_bias
from hc_smoe_hub.routing import route
from hc_smoe_hub.synthetic import build_tiny_moe

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
# name -> (builder family, config overrides, a K < N the family's routing accepts)
CASES: dict[str, tuple[str, dict, int]] = {
    "deepseek_v3": ("deepseek_v3", {}, 8),
    "kimi_k2": ("kimi_k2", {}, 6),
    "glm4_moe": ("glm4_moe", {}, 4),
    "glm4_moe_lite": ("glm4_moe_lite", {}, 4),
    "deepseek_v2": ("deepseek_v2", {}, 4),
    "deepseek_v2_grouped": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                            "routed_scaling_factor": 4.0}, 4),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_moe(root / name, fam, **over) for name, (fam, over, _) in CASES.items()}


def run_cli(src: Path, out: Path, keep: int | str, merge_args: list[str], *extra: str) -> dict:
    assert main([str(src), "--keep", str(keep), "--output-dir", str(out), *merge_args, *extra]) == 0
    return json.loads((out / "hc_smoe.json").read_text())


def stock_source(src: Path, tmp_path: Path) -> Path:
    """The source as stock transformers loads it: Kimi K2's config names a model_type transformers lacks, so a
    copy says deepseek_v3, the architecture the tool builds and writes it as."""
    config = json.loads((src / "config.json").read_text())
    if config["model_type"] != "kimi_k2":
        return src
    copy = tmp_path / "as_deepseek_v3"
    shutil.copytree(src, copy)
    config["model_type"] = "deepseek_v3"
    config.pop("auto_map")
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def load(directory: Path):
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    return model.eval(), info


def calibration_ids(src: Path, calib_file: Path, n: int = 64) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(src)
    return torch.tensor([tok(calib_file.read_text())["input_ids"][:n]])


@pytest.mark.parametrize("name", sorted(CASES))
def test_keeping_every_expert_reproduces_the_source(name, family_models, merge_args, tmp_path):
    src = family_models[name]
    config = json.loads((src / "config.json").read_text())
    spec = spec_for(config)
    n = spec.num_experts(config)
    out = tmp_path / "out"
    prov = run_cli(src, out, n, merge_args)
    with torch.no_grad():
        expected = load(stock_source(src, tmp_path))[0](IDS).logits
        model, info = load(out)
        assert torch.equal(model(IDS).logits, expected)
    assert not any(info.values()), info
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    mtp = int(config.get("num_nextn_predict_layers") or 0)
    last = config["num_hidden_layers"]
    kept = {k for k in a.tensors if not any(k.startswith(f"model.layers.{last + i}.") for i in range(mtp))}
    assert set(b.tensors) == kept  # the MTP layers, and only they, are dropped
    assert all(b"".join(a.copy_raw(k)) == b"".join(b.copy_raw(k)) for k in kept)
    out_config = json.loads((out / "config.json").read_text())
    arch = prov["architecture"]
    card = (out / "README.md").read_text()
    if mtp:
        assert out_config["num_nextn_predict_layers"] == 0
        assert arch["mtp_layers"] == {"count": mtp, "action": "dropped", "config": {"num_nextn_predict_layers": 0}}
        assert "MTP layer(s) were dropped" in card
    else:
        assert "mtp_layers" not in arch and "Multi-token-prediction" not in card
    assert arch["moe_layers"] == [1, 2]  # the first layer is dense in every family here, and was copied
    if name == "kimi_k2":
        assert out_config["model_type"] == "deepseek_v3" and "auto_map" not in out_config
        assert arch["written_as"] == "deepseek_v3" and "written as `deepseek_v3`" in card


def _sorted_choice(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), w.gather(-1, order)


# The default method on every family; --paper (hc-smoe, frequency merge, one-shot) on one per router kind.
PLANNED = [(name, False) for name in sorted(CASES)] + [(n, True) for n in ("deepseek_v3", "glm4_moe",
                                                                          "deepseek_v2_grouped")]


@pytest.mark.parametrize(("name", "paper"), PLANNED, ids=[f"{n}-{'paper' if p else 'default'}" for n, p in PLANNED])
def test_reduced_checkpoint_loads_and_routes_as_planned(name, paper, family_models, merge_args, calib_file,
                                                         tmp_path):
    src, keep = family_models[name], CASES[name][2]
    out = tmp_path / "out"
    prov = run_cli(src, out, keep, merge_args, *(["--paper"] if paper else []))
    model, info = load(out)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    spec = spec_for(json.loads((src / "config.json").read_text()))
    assert config["n_routed_experts"] == keep
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == keep
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    tensors = SourceCheckpoint(out)
    src_tensors = SourceCheckpoint(src)
    ids = calibration_ids(src, calib_file)
    for layer in prov["layers"]:
        li, clusters = layer["layer"], layer["clusters"]
        assert len(clusters) == keep and sorted(i for c in clusters for i in c) == list(range(spec.num_experts(
            json.loads((src / "config.json").read_text()))))
        router = tensors.read([spec.router_key(li)])[spec.router_key(li)]
        bias = None
        if spec.bias_key(li):
            bias = tensors.read([spec.bias_key(li)])[spec.bias_key(li)]
            old = src_tensors.read([spec.bias_key(li)])[spec.bias_key(li)]
            # The default --router fit (and --paper's) reduces the bias to the frequency-weighted member mean.
            freqs = torch.tensor(layer["frequencies"], dtype=torch.float64)
            for k, c in enumerate(clusters):
                w = freqs[c] / freqs[c].sum() if len(c) > 1 and freqs[c].sum() > 0 else \
                    torch.full((len(c),), 1 / len(c), dtype=torch.float64)
                expected = old[c[0]] if len(c) == 1 else (w * old[c].double()).sum()
                assert abs(float(bias[k]) - float(expected)) < 1e-4, (k, c)
        # The stock router of the reduced model chooses exactly what route() says for the written tensors.
        x, idx, w = router_io(model, li, "mlp.gate", ids)
        ours_w, ours_i = route(x.float() @ router.float().T, spec.routing(config, bias))
        got_i, got_w = _sorted_choice(idx, w)
        exp_i, exp_w = _sorted_choice(ours_i, ours_w)
        assert torch.equal(got_i, exp_i)
        assert torch.allclose(got_w, exp_w, atol=1e-6)


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "deepseek_v2_grouped"])
def test_pruned_model_routes_to_the_kept_experts(name, family_models, merge_args, calib_file, tmp_path):
    """f-prune keeps experts verbatim (clusters are singletons): on calibration tokens, the first MoE layer of the
    pruned model (whose input equals the source's) picks the kept experts the source's router would pick among
    them, with the same weights: the source's routing over the kept columns and bias entries."""
    src, keep = family_models[name], CASES[name][2]
    out = tmp_path / "out"
    prov = run_cli(src, out, keep, merge_args, "--method", "f-prune")
    first = prov["layers"][0]
    kept = [c[0] for c in first["clusters"]]
    assert all(len(c) == 1 for c in first["clusters"])
    ids = calibration_ids(src, calib_file)
    source = load(stock_source(src, tmp_path))[0]
    x_src, src_idx, _ = router_io(source, first["layer"], "mlp.gate", ids)
    x_red, red_idx, red_w = router_io(load(out)[0], first["layer"], "mlp.gate", ids)
    assert torch.equal(x_src, x_red)
    config = json.loads((src / "config.json").read_text())
    spec = spec_for(config)
    gate = source.model.layers[first["layer"]].mlp.gate
    bias = getattr(gate, "e_score_correction_bias", None)
    logits = x_src.float() @ gate.weight.float().T
    exp_w, exp_i = route(logits[:, kept], spec.routing(config, bias).columns(kept))
    mapped = torch.tensor(kept)[red_idx]
    got_i, got_w = _sorted_choice(mapped, red_w)
    want_i, want_w = _sorted_choice(torch.tensor(kept)[exp_i], exp_w)
    assert torch.equal(got_i, want_i)
    assert torch.allclose(got_w, want_w, atol=1e-6)
    if spec.routing(config).grouping != "none":
        return  # the pruned model regroups its K experts (K / n_group consecutive ones per group): see README
    # Where the source chose only kept experts, the pruned model chooses the same ones.
    same = torch.isin(src_idx, torch.tensor(kept)).all(-1)
    assert bool(same.any())
    assert torch.equal(_sorted_choice(src_idx[same], src_idx[same].float())[0], got_i[same])


ROUTER_CASES = {
    "deepseek_v3": ("deepseek_v3", {"n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                                    "num_experts_per_tok": 4, "routed_scaling_factor": 2.5}),
    "glm4_moe": ("glm4_moe", {"n_routed_experts": 16, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3,
                              "routed_scaling_factor": 1.5, "norm_topk_prob": False}),
    "glm4_moe_lite": ("glm4_moe_lite", {"n_routed_experts": 8, "num_experts_per_tok": 2}),
    "deepseek_v2_greedy": ("deepseek_v2", {"n_routed_experts": 8, "num_experts_per_tok": 2,
                                           "topk_method": "greedy", "routed_scaling_factor": 16.0}),
    "deepseek_v2_grouped": ("deepseek_v2", {"n_routed_experts": 16, "num_experts_per_tok": 3, "n_group": 4,
                                            "topk_group": 2, "topk_method": "group_limited_greedy"}),
}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_route_matches_the_transformers_router(case):
    model_type, fields = ROUTER_CASES[case]
    config = AutoConfig.for_model(model_type, hidden_size=32, **fields)
    block_cls = {"deepseek_v3": "DeepseekV3TopkRouter", "glm4_moe": "Glm4MoeTopkRouter",
                 "glm4_moe_lite": "Glm4MoeLiteTopkRouter", "deepseek_v2": "DeepseekV2TopkRouter"}[model_type]
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=[block_cls])
    router = getattr(module, block_cls)(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    x = torch.randn(200, 32, generator=g)
    _, w, idx = router(x)
    spec = spec_for({"model_type": model_type, **config.to_dict()})
    ours_w, ours_i = route(x @ router.weight.T, spec.routing(config.to_dict(), bias))
    got_i, got_w = _sorted_choice(idx, w)
    exp_i, exp_w = _sorted_choice(ours_i, ours_w)
    assert torch.equal(got_i, exp_i)
    assert torch.allclose(got_w, exp_w, atol=1e-6)
    if "grouped" in case or case == "deepseek_v3":  # the grouping changes the choice on some tokens
        plain = spec.routing({**config.to_dict(), "n_group": 1}, bias)
        assert not torch.equal(_sorted_choice(*reversed(route(x @ router.weight.T, plain)))[0], got_i)


@pytest.mark.parametrize("keep", ["4", "6", "10", "0.3"])
def test_grouped_routing_refuses_keeps_it_cannot_route(keep, family_models, merge_args, tmp_path, capsys):
    # 16 experts in 4 groups, top-2 groups, top-4: the reduced model needs K = 4m with m >= 2 per group.
    out = tmp_path / "out"
    refuse(capsys, [str(family_models["deepseek_v3"]), "--keep", keep, "--output-dir", str(out), *merge_args], out,
           "grouped routing", "n_group 4", "valid --keep values: 8, 12, 16")


def test_readme_table_is_the_family_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert supported_table() in readme


def test_selection_bias_is_reduced_by_the_router_rule():
    bias = torch.tensor([0.1, -0.2, 0.4, 0.0])
    freqs = torch.tensor([0.5, 0.25, 0.25, 0.0])
    groups = [[0, 1], [2], [3]]
    assert torch.allclose(router_bias(bias, groups, "mean", freqs), torch.tensor([0.0, 0.4, 0.0]))
    assert torch.equal(router_bias(bias, groups, "fit", freqs), router_bias(bias, groups, "mean", freqs))
    assert torch.equal(router_bias(bias, groups, "dominant", freqs), torch.tensor([0.1, 0.4, 0.0]))
    assert router_bias(None, groups, "mean", freqs) is None
