"""Qwen3-Next, MiniMax-M2, ERNIE-4.5-MoE, Hunyuan-A13B and Phi-3.5-MoE: families whose experts are stored one key
per expert on disk. Tiny checkpoints built with the real transformers classes (saved by `save_pretrained`, so in
the Hub's per-expert layout, with MTP layers under their own prefixes where the family has them), merged through
the CLI, loaded back with stock `from_pretrained`; `route()` against each family's transformers router module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from router_probe import router_io
from test_families import IDS, _sorted_choice, calibration_ids, load, run_cli
from test_refusals import refuse
from transformers import AutoConfig

from hc_smoe_hub import baselines, subset_search
from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.methods import METHODS, LayerContext, MethodOptions
from hc_smoe_hub.routing import Experts, Routing, route
from hc_smoe_hub.stats import collect
from hc_smoe_hub.synthetic import build_tiny_moe

# name -> (a K < N the family routes, its MoE layers, the router module inside the decoder layer, MTP key prefix)
CASES: dict[str, tuple[int, list[int], str, str | None]] = {
    "qwen3_next": (4, [1, 2], "mlp.gate", "mtp."),
    "minimax_m2": (4, [0, 1, 2], "mlp.gate", None),
    "ernie4_5_moe": (4, [1, 2], "mlp.gate", "model.mtp_"),
    "hunyuan_v1_moe": (4, [0, 1, 2], "mlp.gate", None),
    "phimoe": (4, [0, 1, 2], "mlp.router", None),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("per_expert")
    return {name: build_tiny_moe(root / name, name) for name in CASES}


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_keeping_every_expert_reproduces_the_source(name, family_models, merge_args, tmp_path):
    src = family_models[name]
    config = _config(src)
    spec = spec_for(config)
    n = spec.num_experts(config)
    out = tmp_path / "out"
    prov = run_cli(src, out, n, merge_args)
    with torch.no_grad():
        expected = load(src)[0](IDS).logits
        model, info = load(out)
        assert torch.equal(model(IDS).logits, expected)
    assert not any(info.values()), info
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    mtp_prefix = CASES[name][3]
    kept = {k for k in a.tensors if not (mtp_prefix and k.startswith(mtp_prefix))}
    assert set(b.tensors) == kept  # the MTP layers, and only they, are dropped
    assert all(b"".join(a.copy_raw(k)) == b"".join(b.copy_raw(k)) for k in kept)
    arch = prov["architecture"]
    assert arch["moe_layers"] == CASES[name][1]
    out_config = _config(out)
    if mtp_prefix:
        assert len(kept) < len(a.tensors)
        (count_key,) = [k for k in spec.extra_layers.count_keys if k in config]
        assert config[count_key] == 1 and out_config[count_key] == 0
        assert arch["mtp_layers"] == {"count": 1, "action": "dropped", "config": {count_key: 0},
                                      "keys": [f"{mtp_prefix}*"]}
        assert "MTP layer(s) were dropped" in (out / "README.md").read_text()
    else:
        assert "mtp_layers" not in arch


PLANNED = [(name, paper) for name in sorted(CASES) for paper in (False, True)]


@pytest.mark.parametrize(("name", "paper"), PLANNED, ids=[f"{n}-{'paper' if p else 'default'}" for n, p in PLANNED])
def test_reduced_checkpoint_loads_and_routes_as_planned(name, paper, family_models, merge_args, calib_file,
                                                         tmp_path):
    src = family_models[name]
    keep, moe_layers, router_path, _ = CASES[name]
    out = tmp_path / "out"
    prov = run_cli(src, out, keep, merge_args, *(["--paper"] if paper else []))
    model, info = load(out)
    assert not any(info.values()), info
    src_config, config = _config(src), _config(out)
    spec = spec_for(src_config)
    n = spec.num_experts(src_config)
    assert all(config[k] == keep for k in spec.expert_count_keys)
    assert spec.top_k(config) == min(spec.top_k(src_config), keep)
    assert isinstance(config[spec.top_k_key], list) == isinstance(src_config[spec.top_k_key], list)
    for li in moe_layers:
        assert model.model.layers[li].mlp.experts.gate_up_proj.shape[0] == keep
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    tensors, src_tensors = SourceCheckpoint(out), SourceCheckpoint(src)
    ids = calibration_ids(src, calib_file)
    assert [layer["layer"] for layer in prov["layers"]] == moe_layers
    routing = prov["architecture"]["routing"]
    assert routing["scores"] == spec.scoring.scores and routing["selection_bias"] == spec.scoring.bias
    if spec.scoring.scores == "sparsemixer":
        assert routing["jitter_eps"] == src_config["router_jitter_noise"] == 0.01
    for layer in prov["layers"]:
        li, clusters = layer["layer"], layer["clusters"]
        assert len(clusters) == keep and sorted(i for c in clusters for i in c) == list(range(n))
        router = tensors.read([spec.router_key(li)])[spec.router_key(li)]
        bias = None
        if spec.bias_key(li):
            raw = tensors.read([spec.bias_key(li)])[spec.bias_key(li)]
            old_raw = src_tensors.read([spec.bias_key(li)])[spec.bias_key(li)]
            assert raw.shape == (*old_raw.shape[:-1], keep)  # ERNIE's (1, N) stays (1, K)
            bias, old = raw.reshape(-1), old_raw.reshape(-1)
            freqs = torch.tensor(layer["frequencies"], dtype=torch.float64)
            for k, c in enumerate(clusters):
                w = freqs[c] / freqs[c].sum() if len(c) > 1 and freqs[c].sum() > 0 else \
                    torch.full((len(c),), 1 / len(c), dtype=torch.float64)
                expected = old[c[0]] if len(c) == 1 else (w * old[c].double()).sum()
                assert abs(float(bias[k]) - float(expected)) < 1e-4, (k, c)
        # The stock router of the reduced model chooses exactly what route() says for the written tensors.
        x, idx, w = router_io(model, li, router_path, ids)
        ours_w, ours_i = route(x.float() @ router.float().T, spec.routing(config, bias))
        got_i, got_w = _sorted_choice(idx, w)
        exp_i, exp_w = _sorted_choice(ours_i, ours_w)
        assert torch.equal(got_i, exp_i)
        assert torch.allclose(got_w.float(), exp_w, atol=1e-6)


# model_type -> (router class, config fields, bias attribute path inside the router module or None)
ROUTERS = {
    "qwen3_next": ("Qwen3NextTopKRouter", {"num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": False},
                   None),
    "minimax_m2": ("MiniMaxM2TopKRouter", {"num_local_experts": 16, "num_experts_per_tok": 4}, "argument"),
    "ernie4_5_moe": ("Ernie4_5_MoeTopKRouter", {"moe_num_experts": 16, "moe_k": 4},
                     "moe_statics.e_score_correction_bias"),
    "hunyuan_v1_moe": ("HunYuanMoEV1Gate", {"num_experts": 16, "moe_topk": 3}, None),
    "phimoe": ("PhimoeTopKRouter", {"num_local_experts": 16, "num_experts_per_tok": 2, "router_jitter_noise": 0.01},
               None),
    "phimoe_wide": ("PhimoeTopKRouter", {"num_local_experts": 16, "num_experts_per_tok": 2,
                                         "router_jitter_noise": 0.3}, None),
}


@pytest.mark.parametrize("case", sorted(ROUTERS))
def test_route_matches_the_transformers_router(case):
    model_type = case.removesuffix("_wide")
    cls_name, fields, bias_path = ROUTERS[case]
    config = AutoConfig.for_model(model_type, hidden_size=32, **fields)
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=[cls_name])
    router = getattr(module, cls_name)(config).eval()
    weight = router.wg.weight if hasattr(router, "wg") else router.weight
    g = torch.Generator().manual_seed(1)
    n = weight.shape[0]
    bias = None
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=g))
        if bias_path == "argument":
            bias = torch.randn(n, generator=g) * 0.3
        elif bias_path:
            router.get_parameter(bias_path).copy_(torch.randn(1, n, generator=g) * 0.05)
            bias = router.get_parameter(bias_path).reshape(-1)
        x = torch.randn(300, 32, generator=g)
        _, w, idx = router(x, bias) if bias_path == "argument" else router(x)
    spec = spec_for({"model_type": model_type, **config.to_dict()})
    ours_w, ours_i = route(x @ weight.T, spec.routing(config.to_dict(), bias))
    got_i, got_w = _sorted_choice(idx, w)
    exp_i, exp_w = _sorted_choice(ours_i, ours_w)
    assert torch.equal(got_i, exp_i)
    assert torch.allclose(got_w.float(), exp_w, atol=1e-6)
    if bias is not None:  # the selection bias changes the choice on some tokens
        plain = route(x @ weight.T, spec.routing(config.to_dict()))
        assert not torch.equal(_sorted_choice(plain[1], plain[0])[0], got_i)
    if model_type == "phimoe":  # sparsemixer is not a softmax top-2 over all experts
        probs = torch.softmax(x @ weight.T, dim=-1).topk(2, dim=-1)
        assert not torch.allclose(_sorted_choice(probs.indices, probs.values)[1], got_w, atol=1e-3)


def test_sparsemixer_refuses_fewer_than_two_experts(family_models, merge_args, tmp_path, capsys):
    out = tmp_path / "out"
    refuse(capsys, [str(family_models["phimoe"]), "--keep", "1", "--output-dir", str(out), *merge_args], out,
           "--keep 1", "always routes each token to 2 experts", "--keep 2 or more")


def test_per_layer_top_k_must_be_one_value(family_models, merge_args, tmp_path, capsys):
    src = tmp_path / "hunyuan"
    shutil.copytree(family_models["hunyuan_v1_moe"], src)
    config = _config(src)
    config["moe_topk"] = [2, 3, 2]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "4", "--output-dir", str(out), *merge_args], out,
           "moe_topk differs between layers", "not supported")


def test_subset_scores_route_with_sparsemixer():
    """O-prune's subset losses for a sparsemixer router are those of the pruned model: sparsemixer over the kept
    columns (not a softmax top-2), against the source's sparsemixer output."""
    g = torch.Generator().manual_seed(5)
    n, tokens = 10, 60
    y = torch.randn(n, tokens, 6, generator=g)
    logits = torch.randn(tokens, n, generator=g) * 0.5
    routing = Routing(top_k=2, renormalize=False, scoring="sparsemixer", jitter_eps=0.2)
    assert not routing.plain_softmax  # the closed-form swap search does not apply
    prob = subset_search.problem_from_outputs(y, logits, routing, 5)

    def output(cols: list[int]) -> torch.Tensor:
        w, i = route(logits[:, cols], routing.columns(cols))
        picked = torch.tensor(cols)[i]  # (T, 2) expert ids
        return (w[..., None] * y[picked, torch.arange(tokens)[:, None]]).sum(1)

    ref = output(list(range(n)))
    subsets = [[0, 1, 2, 3, 4], [1, 3, 5, 7, 9], [2, 4, 6, 8, 9]]
    want = torch.stack([((output(s) - ref) ** 2).sum() for s in subsets])
    assert torch.allclose(subset_search.subset_losses(prob, torch.tensor(subsets)).float(), want, rtol=1e-4)


def test_o_prune_takes_the_exact_greedy_path_for_sparsemixer():
    g = torch.Generator().manual_seed(0)
    n, keep, hidden, inter, tokens = 24, 12, 16, 8, 256
    experts = Experts(*(torch.randn(n, *shape, generator=g) * 0.5
                        for shape in ((inter, hidden), (inter, hidden), (hidden, inter))))
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(n, hidden, generator=g) * 0.4
    routing = Routing(top_k=2, renormalize=False, scoring="sparsemixer", jitter_eps=0.01)
    act = torch.nn.functional.silu
    ctx = LayerContext(0, keep, x, experts, router, routing, act, collect(x, experts, router, routing, act))
    plan = METHODS["o-prune"](ctx, MethodOptions())
    info = plan.extra["o_prune"]
    assert info["search"] == "greedy" and not info["exhaustive"]
    kept = [c[0] for c in plan.groups]
    prob = baselines.o_prune_problem(ctx)
    loss = float(subset_search.subset_losses(prob, torch.tensor([kept]))[0])
    assert info["rel_error"] == pytest.approx((loss / prob.ref) ** 0.5, abs=1e-6)
