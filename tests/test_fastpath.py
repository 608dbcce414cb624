"""The refits' fast paths (fastpath.py): the token cap per fit, and bf16 activations for bf16 sources."""

from __future__ import annotations

import pytest
import torch

from hc_smoe_hub.fastpath import (
    MIN_GROUP_FIT_TOKENS,
    MIN_JOINT_FIT_TOKENS,
    activation_dtype,
    group_fit_tokens,
    hidden_fp32,
    joint_fit_tokens,
    project_fp32,
)
from hc_smoe_hub.merging import fix_dom_merge, reduce_router
from hc_smoe_hub.methods import LayerContext
from hc_smoe_hub.refit import lower_gram, refit_down, refit_down_rerouted
from hc_smoe_hub.routing import Experts, Routing, moe_output
from hc_smoe_hub.stats import _fast_hidden, collect

ACT = torch.nn.functional.silu


def test_fit_token_caps_grow_with_the_intermediate_size_above_a_floor():
    assert group_fit_tokens(64) == MIN_GROUP_FIT_TOKENS and joint_fit_tokens(64) == MIN_JOINT_FIT_TOKENS
    assert (group_fit_tokens(1024), joint_fit_tokens(1024)) == (8192, 4096)
    # Mixtral-8x7B (I = 14336): neither binds at the default 32 x 2048 calibration tokens.
    assert group_fit_tokens(14336) > 65536 and joint_fit_tokens(14336) * 6 // 2 > 65536


def test_activation_dtype_follows_the_weights():
    assert activation_dtype(torch.float32, "cpu") == torch.float32
    assert activation_dtype(torch.float16, "cpu") == torch.float32
    fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert activation_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if fast else torch.float32)
    assert activation_dtype(torch.bfloat16, "cuda") == torch.bfloat16


def test_bf16_products_are_fp32_results_within_bf16_rounding():
    g = torch.Generator().manual_seed(0)
    x, gate, up = torch.randn(300, 48, generator=g), torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    down = torch.randn(48, 64, generator=g)
    exact = ACT(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    h32, h16 = hidden_fp32(x, gate, up, ACT), hidden_fp32(x, gate, up, ACT, torch.bfloat16)
    assert h32.dtype == h16.dtype == torch.float32
    assert torch.allclose(h32.double(), exact, rtol=1e-5, atol=1e-5)
    rel = float((h16.double() - exact).norm() / exact.norm())
    assert 1e-4 < rel < 2e-2  # really computed in bf16, and only as far off as bf16 rounding
    p16 = project_fp32(h32, down, torch.bfloat16)
    assert p16.dtype == torch.float32
    assert float((p16 - h32 @ down.T).norm() / (h32 @ down.T).norm()) < 2e-2


def test_fix_dom_on_a_bf16_layer_still_recovers_a_permuted_copy():
    # The bf16 correlation must still find the permutation: member 1 is member 0 with its neurons shuffled.
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    down = torch.randn(32, 64, generator=g)
    perm = torch.randperm(64, generator=g)
    ex = Experts(torch.stack([gate, gate[perm]]).bfloat16(), torch.stack([up, up[perm]]).bfloat16(),
                 torch.stack([down, down[:, perm]]).bfloat16())
    x = torch.randn(2000, 32, generator=g)
    merged = fix_dom_merge(ex, [[0, 1]], torch.zeros(2, 4), [x], ACT)
    assert torch.equal(merged.gate[0], ex.gate[0]) and torch.equal(merged.down[0], ex.down[0])


@pytest.mark.parametrize("limit", [100, 333, 5000])
def test_routed_tokens_are_capped_at_the_limit(limit):
    g = torch.Generator().manual_seed(2)
    experts = Experts(torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g),
                      torch.randn(4, 8, 16, generator=g))
    x, router = torch.randn(1000, 8, generator=g), torch.randn(4, 8, generator=g)
    routing = Routing(top_k=2, renormalize=True)
    stats = collect(x, experts, router, routing, ACT)
    ctx = LayerContext(0, 2, x, experts, router, routing, ACT, stats)
    tokens = ctx.routed_tokens([0, 1], limit)
    routed = ctx.routed_tokens([0, 1], 10**6)
    assert min(limit, routed.shape[0]) // 2 <= tokens.shape[0] <= limit
    assert routed.shape[0] > 333  # the smaller limits do bind


def _bf16_layer(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(torch.randn(6, 96, 64, generator=g).bfloat16() / 8, torch.randn(6, 96, 64, generator=g).bfloat16() / 8,
                 torch.randn(6, 64, 96, generator=g).bfloat16() / 10)
    return ex, torch.randn(6, 64, generator=g), torch.randn(3000, 64, generator=g)


def test_moe_output_on_the_fast_path_is_the_fp32_output_within_bf16_rounding():
    ex, router, x = _bf16_layer()
    routing = Routing(top_k=2, renormalize=True)
    ref, fast = moe_output(x, ex, router, routing, ACT), moe_output(x, ex, router, routing, ACT, torch.bfloat16)
    rel = float((fast - ref).norm() / ref.norm())
    assert 1e-5 < rel < 1e-2


@pytest.mark.parametrize("tokens", [150, 3000])  # dual blocks (fewer tokens than I = 96) and primal ones
def test_rerouted_refit_of_a_bf16_layer_lowers_its_error_and_matches_the_fp32_fit(tokens):
    ex, router, x = _bf16_layer(4)
    x = x[:tokens]
    routing = Routing(top_k=2, renormalize=True)
    groups, freqs = [[0, 3], [1, 4], [2, 5]], torch.full((6,), 1 / 6)
    base = refit_down(ex, fix_dom_merge(ex, groups, torch.zeros(6, 8), [x] * 3, ACT), groups, [x] * 3, router, ACT)
    new_router = reduce_router(router, groups, "fit", freqs, x)[0]
    ref = moe_output(x, ex, router, routing, ACT)

    def err(e: Experts) -> float:
        return float((moe_output(x, e, new_router, routing, ACT) - ref).norm() / ref.norm())

    fitted = refit_down_rerouted(ex, base, router, new_router, x, routing, ACT)
    as_fp32 = Experts(base.gate.float(), base.up.float(), base.down.float())
    exact = refit_down_rerouted(Experts(ex.gate.float(), ex.up.float(), ex.down.float()), as_fp32, router,
                                new_router, x, routing, ACT)
    assert err(fitted) < err(base) - 1e-3
    # The bf16 products move the solution by about bf16 rounding, no more.
    assert abs(err(fitted) - err(exact)) < 0.1 * (err(base) - err(exact))


@pytest.mark.parametrize("n", [1, 3, 7, 96])  # fewer columns than blocks, uneven blocks, even blocks
def test_lower_gram_is_the_lower_triangle_of_the_full_product(n):
    a = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    got, full = lower_gram(a), a.T @ a
    assert torch.allclose(torch.tril(got), torch.tril(full), rtol=1e-5, atol=1e-4)
    shifted = full.clone()
    shifted.diagonal().add_(1.0)
    lower = got.clone()
    lower.diagonal().add_(1.0)
    # Cholesky reads only the lower triangle: whatever the unset upper one holds, the factor is the full one's.
    assert torch.allclose(torch.linalg.cholesky(lower), torch.linalg.cholesky(shifted), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [torch.nn.functional.silu, torch.nn.functional.gelu])
@pytest.mark.parametrize("biased", [False, True])
def test_statistics_pass_activations_into_buffers_equal_hidden_fp32(act, biased):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(700, 32, generator=g).bfloat16()
    gate, up = torch.randn(48, 32, generator=g).bfloat16(), torch.randn(48, 32, generator=g).bfloat16()
    biases = (torch.randn(48, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()) if biased else ()
    buffers = (torch.full((1024, 48), float("nan")), torch.full((1024, 48), float("nan"), dtype=torch.bfloat16))
    got = _fast_hidden(x, gate, up, act, buffers, *biases, rows=256)  # 700 rows: a ragged last row block
    assert got.dtype == torch.float32 and got.shape == (700, 48)
    assert torch.equal(got, hidden_fp32(x, gate, up, act, torch.bfloat16, *biases))


def test_statistics_pass_of_a_bf16_layer_runs_on_the_fast_path():
    ex, router, x = _bf16_layer()
    routing = Routing(top_k=2, renormalize=True)
    dt = activation_dtype(ex.gate.dtype, x.device)  # bf16 where the CPU has fast bf16 matmuls, else fp32
    stats = collect(x, ex, router, routing, ACT, chunk=1000)
    # The mean output: the (linear) down projection, in fp32, of the mean activation.
    expected = torch.stack([ex.down[i].float() @ hidden_fp32(x, ex.gate[i], ex.up[i], ACT, dt).mean(0)
                            for i in range(ex.count)])
    assert torch.allclose(stats.features, expected, rtol=1e-3, atol=1e-5)
    assert torch.allclose(stats.routed_output, moe_output(x, ex, router, routing, ACT, dt), rtol=1e-3, atol=1e-4)
    # Within bf16 rounding of the fp32 computation either way.
    ref = moe_output(x, ex, router, routing, ACT)
    assert float((stats.routed_output - ref).norm() / ref.norm()) < 1e-2
