"""The refits' fast paths (fastpath.py): the token cap per fit, and bf16 activations for bf16 sources."""

from __future__ import annotations

import pytest
import torch

from hc_smoe_hub.fastpath import MIN_FIT_TOKENS, activation_dtype, fit_tokens, hidden_fp32, project_fp32
from hc_smoe_hub.merging import fix_dom_merge
from hc_smoe_hub.methods import LayerContext
from hc_smoe_hub.routing import Experts, Routing
from hc_smoe_hub.stats import collect

ACT = torch.nn.functional.silu


def test_fit_tokens_is_four_rows_per_input_with_a_floor():
    assert fit_tokens(64) == MIN_FIT_TOKENS
    assert fit_tokens(1024) == 4096
    assert fit_tokens(14336) == 4 * 14336  # Mixtral-8x7B: 57344 rows, more than a group sees at 65536 tokens


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
