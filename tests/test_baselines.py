"""Baseline methods: planted cases on synthetic layers, brute-force checks, and end-to-end merges loaded back."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hc_smoe_hub import baselines
from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.cli import main
from hc_smoe_hub.merging import weighted_merge
from hc_smoe_hub.methods import METHOD_DESCRIPTIONS, METHODS, LayerContext, MethodOptions
from hc_smoe_hub.routing import Experts, Routing, moe_output, route
from hc_smoe_hub.stats import collect
from hc_smoe_hub.synthetic import build_tiny_moe

ACT = torch.nn.functional.silu
PRUNING = ("f-prune", "s-prune", "o-prune", "reap")
MERGING = ("m-smoe", "diversify", "random")
BASELINES = PRUNING + MERGING


def random_experts(n: int, hidden: int = 16, inter: int = 12, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    return Experts(torch.randn(n, inter, hidden, generator=g) * 0.5, torch.randn(n, inter, hidden, generator=g) * 0.5,
                   torch.randn(n, hidden, inter, generator=g) * 0.5)


def make_ctx(experts: Experts, router: torch.Tensor, x: torch.Tensor, keep: int, top_k: int = 2,
             renormalize: bool = True, layer: int = 0) -> LayerContext:
    routing = Routing(top_k, renormalize)
    stats = collect(x, experts, router, routing, ACT)
    return LayerContext(layer, keep, x, experts, router, routing, ACT, stats)


def random_ctx(n: int = 8, keep: int = 5, top_k: int = 2, renormalize: bool = True, seed: int = 0,
               tokens: int = 300) -> LayerContext:
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(tokens, 16, generator=g)
    router = torch.randn(n, 16, generator=g)
    return make_ctx(random_experts(n, seed=seed), router, x, keep, top_k, renormalize)


def check_plan(plan, ctx: LayerContext, pruning: bool) -> None:
    k, n = ctx.keep, ctx.experts.count
    assert len(plan.groups) == k and plan.experts.count == k and plan.router.shape == (k, ctx.router.shape[1])
    assert plan.experts.gate.shape[1:] == ctx.experts.gate.shape[1:]
    members = sorted(i for g in plan.groups for i in g)
    if pruning:
        assert all(len(g) == 1 for g in plan.groups) and members == sorted(set(members))
        assert [g[0] for g in plan.groups] == members  # ascending id order
        for new, (old,) in enumerate(plan.groups):  # verbatim experts and router rows
            for a, b in zip((plan.experts.gate, plan.experts.up, plan.experts.down),
                            (ctx.experts.gate, ctx.experts.up, ctx.experts.down), strict=True):
                assert torch.equal(a[new], b[old])
            assert torch.equal(plan.router[new], ctx.router[old])
    else:
        assert members == list(range(n)) and all(plan.groups)


def kept(plan) -> list[int]:
    return [g[0] for g in plan.groups]


def expected_top(scores: torch.Tensor, k: int) -> list[int]:
    assert len(set(scores.tolist())) == len(scores), "test needs distinct scores"
    return sorted(torch.argsort(scores, descending=True)[:k].tolist())


def test_registered_with_descriptions():
    assert set(BASELINES) <= set(METHODS) and set(BASELINES) <= set(METHOD_DESCRIPTIONS)
    assert "hc-smoe" in METHODS


def test_f_prune_keeps_the_most_routed():
    ctx = random_ctx()
    _, idx = route(ctx.x @ ctx.router.T, ctx.routing)
    counts = torch.bincount(idx.flatten(), minlength=8).float()
    plan = METHODS["f-prune"](ctx, MethodOptions())
    check_plan(plan, ctx, pruning=True)
    dropped = [i for i in range(8) if i not in kept(plan)]
    assert counts[kept(plan)].min() >= counts[dropped].max()
    assert kept(plan) == sorted(sorted(range(8), key=lambda i: (-counts[i], i))[:5])


def test_top_ids_breaks_ties_by_lower_id():
    assert baselines.top_ids(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), 2) == [1, 2]


def test_s_prune_keeps_the_largest_probability_mass():
    ctx = random_ctx(seed=1)
    mass = torch.softmax(ctx.x @ ctx.router.T, -1).sum(0)
    plan = METHODS["s-prune"](ctx, MethodOptions())
    check_plan(plan, ctx, pruning=True)
    assert kept(plan) == expected_top(mass, 5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_reap_keeps_the_most_salient(renormalize):
    ctx = random_ctx(seed=2, renormalize=renormalize, top_k=3)
    w, idx = route(ctx.x @ ctx.router.T, ctx.routing)
    saliency = torch.zeros(8)
    for j in range(8):  # by the definition, token by token
        vals = [float(w[t, s]) * float(moe_one(ctx, t, j).norm()) for t in range(ctx.x.shape[0])
                for s in range(3) if int(idx[t, s]) == j]
        saliency[j] = sum(vals) / len(vals) if vals else 0.0
    plan = METHODS["reap"](ctx, MethodOptions())
    check_plan(plan, ctx, pruning=True)
    assert kept(plan) == expected_top(saliency, 5)


def moe_one(ctx: LayerContext, t: int, j: int) -> torch.Tensor:
    x = ctx.x[t : t + 1]
    return (ACT(x @ ctx.experts.gate[j].T) * (x @ ctx.experts.up[j].T)) @ ctx.experts.down[j].T


def brute_force_losses(ctx: LayerContext) -> dict[tuple[int, ...], float]:
    ref = moe_output(ctx.x.double(), ctx.experts.to(dtype=torch.float64), ctx.router.double(), ctx.routing, ACT)
    reduced = Routing(min(ctx.routing.top_k, ctx.keep), ctx.routing.renormalize)
    out = {}
    for sub in itertools.combinations(range(ctx.experts.count), ctx.keep):
        ids = list(sub)
        y = moe_output(ctx.x.double(), ctx.experts.select(ids).to(dtype=torch.float64), ctx.router[ids].double(),
                       reduced, ACT)
        out[sub] = float(((y - ref) ** 2).sum())
    return out


@pytest.mark.parametrize(("renormalize", "top_k", "keep"), [(True, 2, 3), (False, 2, 3), (False, 4, 3), (True, 1, 4)])
def test_o_prune_matches_brute_force(renormalize, top_k, keep):
    ctx = random_ctx(n=6, keep=keep, top_k=top_k, renormalize=renormalize, seed=3)
    ctx.x, ctx.router = ctx.x.double(), ctx.router.double()  # fp64 so that near-ties rank the same both ways
    ctx.experts = ctx.experts.to(dtype=torch.float64)
    ctx.stats = collect(ctx.x, ctx.experts, ctx.router, ctx.routing, ACT)
    losses = brute_force_losses(ctx)
    best = min(losses, key=losses.get)
    plan = METHODS["o-prune"](ctx, MethodOptions())
    check_plan(plan, ctx, pruning=True)
    assert tuple(kept(plan)) == best
    ref = float((moe_output(ctx.x, ctx.experts, ctx.router, ctx.routing, ACT) ** 2).sum())
    info = plan.extra["o_prune"]
    assert info["exhaustive"] and info["subsets"] == math.comb(6, keep)
    assert info["rel_error"] == pytest.approx((losses[best] / ref) ** 0.5, abs=1e-5)


def test_o_prune_drops_a_redundant_copy_that_frequency_keeps():
    # Top-1 routing. Experts 0 and 1 are weight copies, and the first token type routes to one of them with the
    # other a close second: dropping either is lossless, while the others (rarer) cannot be dropped for free.
    # F-prune keeps both copies (they are the most used); o-prune must keep exactly one of them.
    g = torch.Generator().manual_seed(4)
    t, h = 600, 16
    types = torch.multinomial(torch.tensor([0.6, 0.13, 0.13, 0.14]), t, replacement=True, generator=g)
    x = torch.randn(t, h, generator=g) * 0.3
    x[torch.arange(t), types] += 3.0
    x[:, 4] = torch.randn(t, generator=g).sign()
    router = torch.randn(5, h, generator=g) * 0.1
    router[:, :5] = 0.0
    router[0, 0] = router[1, 0] = 10.0
    router[0, 4], router[1, 4] = 2.0, -2.0  # the copies split the first type's tokens
    for e, ty in ((2, 1), (3, 2), (4, 3)):
        router[e, ty] = 10.0
    experts = random_experts(5, h, seed=5)
    for mat in (experts.gate, experts.up, experts.down):
        mat[1] = mat[0]
    ctx = make_ctx(experts, router, x, keep=4, top_k=1, renormalize=True)
    f_kept = kept(METHODS["f-prune"](ctx, MethodOptions()))
    assert 0 in f_kept and 1 in f_kept
    plan = METHODS["o-prune"](ctx, MethodOptions())
    check_plan(plan, ctx, pruning=True)
    assert kept(plan) in ([0, 2, 3, 4], [1, 2, 3, 4])
    assert plan.extra["o_prune"]["rel_error"] < 1e-5


def test_o_prune_drops_never_routed_experts():
    ctx = random_ctx(n=8, keep=6, seed=6)
    ctx.x[:, 0] = 1.0  # a constant feature acts as a router bias
    ctx.router[6:, 0] = -50.0  # experts 6 and 7 are never routed ...
    ctx.experts.down[6:] *= 100.0  # ... however large their outputs
    ctx.stats = collect(ctx.x, ctx.experts, ctx.router, ctx.routing, ACT)
    plan = METHODS["o-prune"](ctx, MethodOptions())
    assert kept(plan) == [0, 1, 2, 3, 4, 5] and plan.extra["o_prune"]["rel_error"] < 1e-5


def test_o_prune_searches_large_cases_deterministically(monkeypatch):
    monkeypatch.setattr(baselines, "O_PRUNE_EXHAUSTIVE", 40)  # C(9, 4) = 126 > 40: the greedy + swap search
    ctx = random_ctx(n=9, keep=4, seed=7)
    plans = [METHODS["o-prune"](ctx, MethodOptions(seed=s)) for s in (1, 1, 2)]
    info = plans[0].extra["o_prune"]
    assert not info["exhaustive"] and info["search"] == "greedy+swaps" and info["subsets"] > 0
    assert kept(plans[0]) == kept(plans[1]) == kept(plans[2])  # no randomness left
    losses = brute_force_losses(ctx)
    f_kept = tuple(kept(METHODS["f-prune"](ctx, MethodOptions())))
    s_kept = tuple(kept(METHODS["s-prune"](ctx, MethodOptions())))
    got = losses[tuple(kept(plans[0]))]
    assert got <= min(losses[f_kept], losses[s_kept]) * (1 + 1e-4)  # never worse than its F/S starts
    assert got <= min(losses.values()) * (1 + 1e-4)  # and here it finds the optimum


def test_m_smoe_groups_near_duplicate_router_profiles_with_their_centre():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(400, 16, generator=g)
    x[:, 0] = 1.0
    router = torch.randn(6, 16, generator=g) * 2.0
    router[3:, 1:] = router[:3, 1:] + 0.05 * torch.randn(3, 15, generator=g)  # 3, 4, 5 copy 0, 1, 2's profile
    router[:3, 0], router[3:, 0] = 1.0, -1.0  # ... but are routed less often
    ctx = make_ctx(random_experts(6, seed=9), router, x, keep=3)
    assert baselines.top_ids(ctx.stats.counts, 3) == [0, 1, 2]
    plan = METHODS["m-smoe"](ctx, MethodOptions(router="mean", merge="average"))  # merge is forced to freq
    check_plan(plan, ctx, pruning=False)
    assert plan.groups == [[0, 3], [1, 4], [2, 5]] and plan.extra["centres"] == [0, 1, 2]
    expected = weighted_merge(ctx.experts, plan.groups, ctx.stats.frequencies)
    assert torch.equal(plan.experts.gate, expected.gate) and torch.equal(plan.experts.down, expected.down)


def test_linear_cka_matches_the_feature_space_formula():
    ctx = random_ctx(n=4, keep=2, seed=10, tokens=200)
    ys = [moe_one_all(ctx, i) for i in range(4)]
    for i, j in itertools.combinations(range(4), 2):
        a, b = ys[i] - ys[i].mean(0), ys[j] - ys[j].mean(0)
        want = (a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())
        assert float(baselines.linear_cka(ctx)[i, j]) == pytest.approx(float(want), rel=1e-4)


def moe_one_all(ctx: LayerContext, j: int) -> torch.Tensor:
    x = ctx.x.double()
    e = ctx.experts.to(dtype=torch.float64)
    return (ACT(x @ e.gate[j].T) * (x @ e.up[j].T)) @ e.down[j].T


def test_diversify_groups_identical_and_rescaled_experts():
    ctx = random_ctx(n=6, keep=4, seed=11)
    for mat in (ctx.experts.gate, ctx.experts.up, ctx.experts.down):
        mat[4] = mat[1]
        mat[5] = mat[2]
    ctx.experts.down[5] *= 3.0  # CKA is scale-invariant: still the same function up to scale
    ctx.stats = collect(ctx.x, ctx.experts, ctx.router, ctx.routing, ACT)
    plan = METHODS["diversify"](ctx, MethodOptions(router="dominant"))
    check_plan(plan, ctx, pruning=False)
    assert [1, 4] in plan.groups and [2, 5] in plan.groups and len(plan.groups) == 4


def test_random_groups_are_k_non_empty_and_seeded():
    for n, k in ((8, 3), (8, 8), (8, 1), (60, 30)):
        groups = baselines.random_groups(n, k, 42, 0)
        assert len(groups) == k and all(groups) and sorted(sum(groups, [])) == list(range(n))
        assert groups == baselines.random_groups(n, k, 42, 0)
    draws = {str(baselines.random_groups(8, 3, s, layer)) for s in range(3) for layer in range(3)}
    assert len(draws) > 1
    ctx = random_ctx(seed=12)
    plan = METHODS["random"](ctx, MethodOptions(seed=5))
    check_plan(plan, ctx, pruning=False)
    assert plan.groups == baselines.random_groups(8, 5, 5, 0)


@pytest.mark.parametrize("method", BASELINES)
def test_keeping_every_expert_is_the_identity(method):
    ctx = random_ctx(n=6, keep=6, seed=13)
    plan = METHODS[method](ctx, MethodOptions())
    assert plan.groups == [[i] for i in range(6)]
    assert torch.equal(plan.experts.gate, ctx.experts.gate) and torch.equal(plan.experts.down, ctx.experts.down)
    assert torch.equal(plan.router, ctx.router)


@pytest.mark.parametrize("method", BASELINES)
def test_one_expert_left(method):
    ctx = random_ctx(n=6, keep=1, seed=14)
    check_plan(METHODS[method](ctx, MethodOptions()), ctx, pruning=method in PRUNING)


# ------------------------------------------------------------------------------------------------- end to end


def run_cli(src: Path, out: Path, keep: str, merge_args: list[str], *extra: str) -> dict:
    assert main([str(src), "--keep", keep, "--output-dir", str(out), *merge_args, *extra]) == 0
    return json.loads((out / "hc_smoe.json").read_text())


IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def check_output(src: Path, out: Path, prov: dict, method: str, keep: int) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    config = json.loads((out / "config.json").read_text())
    spec = spec_for(config)
    assert all(config[k] == keep for k in spec.expert_count_keys)
    assert prov["method"] == method
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    for layer in prov["layers"]:
        clusters, li = layer["clusters"], layer["layer"]
        assert len(clusters) == keep and all(clusters)
        members = sorted(i for c in clusters for i in c)
        if method not in PRUNING:
            assert members == list(range(8))
            continue
        assert all(len(c) == 1 for c in clusters) and members == [c[0] for c in clusters]
        for new, (old,) in enumerate(clusters):  # kept experts are the source experts, bit for bit
            for key_new, key_old in zip(spec.expert_keys(li, new), spec.expert_keys(li, old), strict=True):
                assert b"".join(b.copy_raw(key_new)) == b"".join(a.copy_raw(key_old)), (key_new, key_old)
        router_new = b.read([spec.router_key(li)])[spec.router_key(li)]
        router_old = a.read([spec.router_key(li)])[spec.router_key(li)]
        assert torch.equal(router_new, router_old[members])


@pytest.mark.parametrize("method", BASELINES)
def test_end_to_end_mixtral(method, tiny_models, merge_args, tmp_path):
    src, out = tiny_models["mixtral"], tmp_path / "out"
    prov = run_cli(src, out, "5", merge_args, "--method", method)
    check_output(src, out, prov, method, 5)


@pytest.mark.parametrize("method", ["o-prune", "reap", "m-smoe"])
def test_end_to_end_qwen2_top4_without_renormalization(method, tiny_models, merge_args, tmp_path):
    src, out = tiny_models["qwen2_moe"], tmp_path / "out"  # top-4, norm_topk_prob false, shared expert
    prov = run_cli(src, out, "3", merge_args, "--method", method)
    check_output(src, out, prov, method, 3)
    assert prov["top_k_after"] == 3


def test_end_to_end_bf16_pruning_is_bit_identical(tmp_path, merge_args):
    src = build_tiny_moe(tmp_path / "src", "olmoe", dtype=torch.bfloat16)
    prov = run_cli(src, tmp_path / "out", "4", merge_args, "--method", "o-prune")
    check_output(src, tmp_path / "out", prov, "o-prune", 4)


def test_takeover_joins_each_removed_expert_to_the_survivor_that_receives_its_tokens():
    """Expert 2 computes what expert 0 computes (nearest mean output: 0) but is routed like expert 1: once it is
    removed, its tokens go to expert 1, so takeover merges it into 1 where anchored-o would pick 0."""
    from hc_smoe_hub.methods import anchored_groups, takeover_groups

    g = torch.Generator().manual_seed(5)
    ex = random_experts(3, seed=5)
    ex = Experts(ex.gate.clone(), ex.up.clone(), ex.down.clone())
    for m in (ex.gate, ex.up, ex.down):
        m[2] = m[0]
    router = torch.zeros(3, 16)
    router[0, 0], router[1, 1], router[2, 1], router[2, 2] = 3.0, 3.0, 2.9, 0.5
    for renormalize in (True, False):
        ctx = make_ctx(ex, router, torch.randn(400, 16, generator=g), keep=2, top_k=1, renormalize=renormalize)
        assert bool((ctx.stats.counts > 0).all())
        assert takeover_groups(ctx, [0, 1]) == [[0], [1, 2]]
        assert anchored_groups(ctx.stats.features, [0, 1]) == [[0, 2], [1]]
    plan = METHODS["takeover"](random_ctx(n=8, keep=5), MethodOptions())
    anchors = [g[0] for g in METHODS["o-prune"](random_ctx(n=8, keep=5), MethodOptions()).groups]
    assert sorted(i for grp in plan.groups for i in grp) == list(range(8))
    assert all(any(a in grp for grp in plan.groups) for a in anchors) and len(plan.groups) == 5

