"""gpt-oss's expert math against transformers' own modules on random weights: the router (bias on the logits, top-k
then softmax), the biased experts with the clamped, interleaved GLU, and every merge step with biases (frequency
merge, fix-dom alignment, the least-squares refits of down projection and bias, router bias reduction, methods).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

from hc_smoe_hub import subset_search
from hc_smoe_hub.activations import ClampedGlu
from hc_smoe_hub.arch.strategies import ExpertActivation, Scoring
from hc_smoe_hub.baselines import O_PRUNE_TOKENS, _sample_rows, o_prune_problem
from hc_smoe_hub.merging import fix_dom_merge, reduce_router, weighted_merge
from hc_smoe_hub.methods import METHODS, LayerContext, MethodOptions, merge_groups, plan_error
from hc_smoe_hub.refit import refit_down
from hc_smoe_hub.routing import Experts, Routing, expert_output, moe_output, route
from hc_smoe_hub.stats import collect

N, H, INTER, TOP_K, T = 6, 32, 16, 2, 256


def tiny_config(**over) -> GptOssConfig:
    cfg = dict(hidden_size=H, intermediate_size=INTER, num_local_experts=N, num_experts_per_tok=TOP_K,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)
    return GptOssConfig(**(cfg | over))


@pytest.fixture(scope="module")
def mlp() -> GptOssMLP:
    torch.manual_seed(0)
    module = GptOssMLP(tiny_config()).float()
    with torch.no_grad():
        for p in module.parameters():
            # Unit-scale weights: the gate and up products reach past the clamp limit (7), so the clamp is tested.
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 1.0))
    return module


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(1))


def as_experts(mlp: GptOssMLP) -> tuple[Experts, torch.Tensor, Routing, ClampedGlu]:
    """The module's weights in the package's layout: gate/up (N, I, H) de-interleaved, down (N, H, I), biases."""
    ex = mlp.experts
    gate_up = ex.gate_up_proj.detach()
    experts = Experts(gate_up[..., ::2].transpose(1, 2).contiguous(), gate_up[..., 1::2].transpose(1, 2).contiguous(),
                      ex.down_proj.detach().transpose(1, 2).contiguous(), ex.gate_up_proj_bias.detach()[:, ::2],
                      ex.gate_up_proj_bias.detach()[:, 1::2], ex.down_proj_bias.detach().clone())
    config = tiny_config().to_dict()
    routing = Scoring(scores="topk-softmax", renormalize="always", logit_bias="router.bias").routing(
        config, TOP_K, logit_bias=mlp.router.bias.detach())
    act = ExpertActivation("clamped-glu").build(config)
    assert isinstance(act, ClampedGlu) and (act.alpha, act.limit) == (ex.alpha, ex.limit)
    return experts, mlp.router.weight.detach(), routing, act


def context(mlp: GptOssMLP, x: torch.Tensor, keep: int) -> LayerContext:
    experts, router, routing, act = as_experts(mlp)
    stats = collect(x, experts, router, routing, act, sample_rows=torch.arange(x.shape[0]))
    return LayerContext(0, keep, x, experts, router, routing, act, stats)


def test_route_matches_the_gpt_oss_router(mlp, x):
    _, router, routing, _ = as_experts(mlp)
    _, ref_w, ref_i = mlp.router(x)
    w, i = route(x @ router.T, routing)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w)
    # The router bias matters: without it the choice differs on some tokens.
    assert not torch.equal(route(x @ router.T, Routing(TOP_K, True, "topk-softmax"))[1], ref_i)


def test_moe_output_matches_the_gpt_oss_block(mlp, x):
    experts, router, routing, act = as_experts(mlp)
    with torch.no_grad():
        ref = mlp(x[None])[0][0]
        gate_up = x @ mlp.experts.gate_up_proj[3] + mlp.experts.gate_up_proj_bias[3]
        assert gate_up[..., ::2].abs().max() > act.limit  # the clamp is exercised
        one = mlp.experts._apply_gate(gate_up) @ mlp.experts.down_proj[3] + mlp.experts.down_proj_bias[3]
    torch.testing.assert_close(expert_output(x, experts, 3, act), one, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(moe_output(x, experts, router, routing, act), ref, rtol=1e-5, atol=1e-4)
    # The fast path (products in a given dtype, the rest in fp32) computes the same in fp32.
    torch.testing.assert_close(moe_output(x, experts, router, routing, act, torch.float32), ref, rtol=1e-5, atol=1e-4)


def test_bf16_fast_path_adds_the_biases_in_fp32(mlp, x):
    """bf16 products (the fast path of a bf16 source), biases and activation in fp32: within bf16 rounding of the
    fp32 block."""
    experts, router, routing, act = as_experts(mlp)
    ref = moe_output(x, experts, router, routing, act)
    fast = moe_output(x, experts.to(dtype=torch.bfloat16), router, routing, act, torch.bfloat16)
    assert float((fast - ref).norm() / ref.norm()) < 2e-2
    unbiased = Experts(experts.gate, experts.up, experts.down)
    assert float((moe_output(x, unbiased, router, routing, act) - ref).norm() / ref.norm()) > 0.1


def test_statistics_see_what_the_block_computes(mlp, x):
    experts, router, routing, act = as_experts(mlp)
    stats = collect(x, experts, router, routing, act, chunk=100)
    with torch.no_grad():
        ref = mlp(x[None])[0][0]
    torch.testing.assert_close(stats.routed_output, ref, rtol=1e-5, atol=1e-4)
    means = torch.stack([expert_output(x, experts, i, act).mean(0) for i in range(N)])
    torch.testing.assert_close(stats.features, means, rtol=1e-5, atol=1e-4)
    assert float(stats.counts.sum()) == T * TOP_K


def test_frequency_merge_weights_biases_like_their_matrices(mlp):
    experts, *_ = as_experts(mlp)
    coeffs = torch.tensor([3.0, 1.0, 0, 0, 0, 2.0])
    merged = weighted_merge(experts, [[0, 1], [5]], coeffs)
    for got, src in zip(merged.tensors(), experts.tensors(), strict=True):
        torch.testing.assert_close(got[0], 0.75 * src[0] + 0.25 * src[1])
        assert torch.equal(got[1], src[5])
    assert merged.has_bias


def test_fix_dom_moves_bias_entries_with_their_neurons(mlp, x):
    """A member that is the dominant expert with its neurons permuted is aligned back onto it exactly, biases
    included, so merging the two gives the dominant expert itself."""
    experts, _, _, act = as_experts(mlp)
    perm = torch.randperm(INTER, generator=torch.Generator().manual_seed(2))
    twin = Experts(torch.stack([experts.gate[0], experts.gate[0][perm]]),
                   torch.stack([experts.up[0], experts.up[0][perm]]),
                   torch.stack([experts.down[0], experts.down[0][:, perm]]),
                   torch.stack([experts.gate_bias[0], experts.gate_bias[0][perm]]),
                   torch.stack([experts.up_bias[0], experts.up_bias[0][perm]]),
                   torch.stack([experts.down_bias[0], experts.down_bias[0]]))
    features = torch.zeros(2, H)
    merged = fix_dom_merge(twin, [[0, 1]], features, [x], act)
    for got, src in zip(merged.tensors(), twin.tensors(), strict=True):
        torch.testing.assert_close(got[0], src[0])


def test_least_squares_refit_fits_the_down_bias(mlp, x):
    """Two experts that differ only in their down bias, equally routed: the group computes the dominant's output
    with the mean bias, which the refit recovers from a frequency merge that got the bias wrong."""
    experts, router, routing, act = as_experts(mlp)
    pair = Experts(experts.gate[[0, 0]], experts.up[[0, 0]], experts.down[[0, 0]], experts.gate_bias[[0, 0]],
                   experts.up_bias[[0, 0]], torch.stack([experts.down_bias[0], experts.down_bias[0] + 2.0]))
    rows, two = router[[0, 0]], Routing(TOP_K, True, "topk-softmax", logit_bias=routing.logit_bias[[0, 0]])
    base = weighted_merge(pair, [[0, 1]], torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(base.down_bias[0], pair.down_bias[0] + 0.2)
    fitted = refit_down(pair, base, [[0, 1]], [x], rows, act, ridge=1e-8, routing=two)
    torch.testing.assert_close(fitted.down_bias[0], pair.down_bias[0] + 1.0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fitted.down[0], pair.down[0], rtol=1e-3, atol=1e-3)
    assert torch.equal(fitted.gate_bias, base.gate_bias) and torch.equal(fitted.up_bias, base.up_bias)


@pytest.mark.parametrize("strategy", ["dominant", "mean", "fit"])
def test_router_bias_is_reduced_with_the_rows(mlp, x, strategy):
    _, router, routing, _ = as_experts(mlp)
    freqs = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.1, 0.1])
    groups = [[0, 1], [2], [3, 4, 5]]
    rows, bias = reduce_router(router, groups, strategy, freqs, x, routing=routing)
    assert rows.shape == (3, H) and bias is not None and bias.shape == (3,)
    lb = routing.logit_bias
    assert torch.equal(bias[1], lb[2]) or strategy == "fit"  # a singleton keeps its own entry (fit: its fit)
    if strategy == "dominant":
        assert torch.equal(bias, lb[[1, 2, 3]]) and torch.equal(rows, router[[1, 2, 3]])
    elif strategy == "mean":
        torch.testing.assert_close(bias[2], (lb[3] * 0.2 + lb[4] * 0.1 + lb[5] * 0.1) / 0.4)
    else:
        # The fitted rows and bias reproduce the groups' summed probability better than the mean rows and bias.
        target = torch.stack([routing.scores(x @ router.T)[:, g].sum(-1) for g in groups], -1)
        mean_rows, mean_bias = reduce_router(router, groups, "mean", freqs, routing=routing)

        def loss(r, b):
            return float(-(target * torch.log_softmax(x @ r.T + b, -1)).sum(-1).mean())

        assert loss(rows, bias) < loss(mean_rows, mean_bias) - 1e-3
    singles = reduce_router(router, [[i] for i in range(N)], strategy, freqs, x, routing=routing)
    assert torch.equal(singles[0], router) and torch.equal(singles[1], lb)


@pytest.mark.parametrize("tokens", [T, 12], ids=["primal", "dual"])
def test_joint_refit_does_not_raise_the_error(mlp, x, tokens):
    """The joint re-routed refit of down projections and biases, in its primal form and, with fewer tokens per
    expert than I + 1 coefficients, its dual form: the routed-output error on its tokens never goes up."""
    ctx = context(mlp, x[:tokens], 3)
    groups = [[0, 1], [2, 3], [4, 5]]
    lsq = plan_error(ctx, merge_groups(ctx, groups, MethodOptions(merge="fix-dom-lsq")))
    rr = plan_error(ctx, merge_groups(ctx, groups, MethodOptions(merge="fix-dom-rr")))
    assert rr <= lsq + 1e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_plans_biased_experts(mlp, x, method):
    ctx = context(mlp, x, 4)
    plan = METHODS[method](ctx, MethodOptions(method=method))
    assert plan.experts.count == 4 and plan.experts.has_bias and plan.logit_bias is not None
    assert plan.experts.down_bias.shape == (4, H) and plan.experts.gate_bias.shape == (4, INTER)
    assert sorted(i for g in plan.groups for i in g) == list(range(N)) or all(len(g) == 1 for g in plan.groups)
    assert 0 <= plan_error(ctx, plan) < 2


@pytest.mark.parametrize("method", ["takeover", "hc-smoe", "f-prune"])
def test_keeping_every_expert_is_exact(mlp, x, method):
    ctx = context(mlp, x, N)
    plan = METHODS[method](ctx, MethodOptions(method=method))
    assert plan_error(ctx, plan) < 1e-6


def test_o_prune_folds_the_router_bias_into_the_logits(mlp, x):
    """O-prune's subset objective with the router bias folded into the logits is the objective routed with the
    bias, subset for subset; the top-k-then-softmax router is then plain softmax, so the closed-form swap search
    serves gpt-oss (past the exhaustive limit) as it serves Mixtral."""
    ctx = context(mlp, x, 3)
    prob = o_prune_problem(ctx)
    assert prob.routing.logit_bias is None and prob.routing.plain_softmax
    unfolded = replace(prob, logits=ctx.stats.router_logits[_sample_rows(ctx, O_PRUNE_TOKENS)],
                       routing=replace(prob.routing, logit_bias=ctx.routing.logit_bias))
    subsets = torch.tensor(list(itertools.combinations(range(N), 3)))
    folded_losses = subset_search.subset_losses(prob, subsets)
    torch.testing.assert_close(folded_losses, subset_search.subset_losses(unfolded, subsets))
    best = subset_search.search(prob)
    assert best.loss <= subset_search.greedy(prob).loss + 1e-9 * prob.ref
    assert best.loss == pytest.approx(float(folded_losses.min()), rel=1e-6)  # it finds the optimum here
