"""MXFP4 (gpt-oss) dequantize/quantize: against a reference written here and transformers' own converter."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from hc_smoe_hub.quant import Mxfp4Format, UnsupportedQuantizationError, format_for, mxfp4

MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _reference_dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Element by element: byte k of a group holds element 2k (low nibble) and 2k + 1 (high nibble)."""
    rows, groups, _ = blocks.shape
    out = torch.empty(rows, groups * 32, dtype=torch.float64)
    for r in range(rows):
        for g in range(groups):
            scale = 2.0 ** (int(scales[r, g]) - 127)
            for k in range(16):
                byte = int(blocks[r, g, k])
                for pos, nibble in ((2 * k, byte & 0xF), (2 * k + 1, byte >> 4)):
                    sign = -1.0 if nibble & 8 else 1.0
                    out[r, g * 32 + pos] = sign * MAGNITUDES[nibble & 7] * scale
    return out


def _random_packed(*lead: int, groups: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(117, 135, (*lead, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


def test_nibble_order_on_hand_made_bytes():
    # 0x21: low nibble 1 (0.5) first, high nibble 2 (1.0) second; 0xF9: low 9 (-0.5), high 15 (-6)
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 1] = 0x21, 0xF9
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2 ** 1
    got = mxfp4.dequantize(blocks, scales, dtype=torch.float32)
    assert got.shape == (1, 32)
    assert got[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert (got[0, 4:] == 0).all()


def test_dequantize_matches_element_reference():
    blocks, scales = _random_packed(5, groups=3)
    got = mxfp4.dequantize(blocks, scales, dtype=torch.float32)
    assert torch.equal(got.double(), _reference_dequant(blocks, scales))


def test_format_dequantize_matches_transformers_convert_moe_packed_tensors():
    blocks, scales = _random_packed(3, 8, groups=2, seed=1)  # (E, rows=out, cols/32, 16)
    fmt = Mxfp4Format()
    tensors = {"experts.down_proj_blocks": blocks, "experts.down_proj_scales": scales}
    ours = fmt.dequantize(tensors, "experts.down_proj", dtype=torch.bfloat16)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert ours.shape == theirs.shape == (3, 64, 8)
    assert torch.equal(ours, theirs)
    # One expert sliced first gives that expert's slice of the whole
    one = fmt.dequantize({k: v[1] for k, v in tensors.items()}, "experts.down_proj")
    assert torch.equal(one, theirs[1])


def test_quantize_of_representable_values_is_exact():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (4, 64), generator=g)
    values = torch.tensor(mxfp4.E2M1_VALUES)[codes]
    values[:, 0::32] = 6.0  # every group's amax is 6, so the shared scale is 2 ** (exp)
    exps = torch.randint(-10, 10, (4, 2), generator=g)
    w = torch.ldexp(values, exps.repeat_interleave(32, dim=-1))
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (4, 2, 16) and scales.shape == (4, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert torch.equal(scales.to(torch.int64) - 127, exps)
    assert torch.equal(mxfp4.dequantize(blocks, scales, dtype=torch.float32), w)


def test_shared_exponent_is_floor_log2_amax_minus_two():
    w = torch.zeros(3, 32)
    w[0, 5], w[1, 7], w[2, 0] = 5.9, 8.0, 0.01  # floor(log2): 2, 3, -7
    _, scales = mxfp4.quantize(w)
    assert (scales[:, 0].to(torch.int64) - 127).tolist() == [0, 1, -9]
    # An all-zero group gets the smallest exponent, byte 0, and dequantizes to zeros
    blocks, scales = mxfp4.quantize(torch.zeros(1, 32))
    assert scales.item() == 0 and (blocks == 0).all()


def test_ties_round_to_even_and_values_clamp_to_six():
    # Scale 1 (amax 4..8 -> exponent 0): each midpoint between two e2m1 values rounds to the even code
    row = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9, -0.25, -1.75, -5.0, 0.3]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -2.0, -4.0, 0.5]
    w = torch.zeros(1, 32)
    w[0, : len(row)] = torch.tensor(row)
    blocks, scales = mxfp4.quantize(w)
    assert scales.item() == 127
    got = mxfp4.dequantize(blocks, scales, dtype=torch.float32)[0, : len(row)]
    assert got.tolist() == expected
    # -0.25 rounds to zero and is stored as +0 (code 0), not -0
    assert blocks[0, 0, 4].item() & 0x0F == 0


def test_round_trip_error_within_half_step_of_the_group_scale():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 16, 96, generator=g) * torch.logspace(-3, 1, 16).unsqueeze(-1)
    blocks, scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(blocks, scales, dtype=torch.float32)
    scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127).repeat_interleave(32, dim=-1)
    # Below 4x scale the e2m1 step is at most 1x scale; above, 2x scale (with the 4..8 interval clamped at 6)
    err = (back - w).abs()
    bound = torch.where(w.abs() <= 4 * scale, 0.5 * scale, torch.maximum(scale, w.abs() - 6 * scale))
    assert (err <= bound + 1e-12).all()
    assert err.max() > 0  # random values are not all representable


def test_format_quantize_writes_gpt_oss_disk_shapes_and_round_trips():
    experts, hidden, inter = 2, 64, 32
    gate_up = torch.randn(experts, hidden, 2 * inter)  # unquantized gpt-oss layout (E, H, 2I)
    fmt = Mxfp4Format()
    out = fmt.quantize(gate_up, "model.layers.0.mlp.experts.gate_up_proj")
    assert sorted(out) == [
        "model.layers.0.mlp.experts.gate_up_proj_blocks",
        "model.layers.0.mlp.experts.gate_up_proj_scales",
    ]
    assert out["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (experts, 2 * inter, hidden // 32, 16)
    assert out["model.layers.0.mlp.experts.gate_up_proj_scales"].shape == (experts, 2 * inter, hidden // 32)
    back = fmt.dequantize(out, "model.layers.0.mlp.experts.gate_up_proj", dtype=torch.float32)
    assert back.shape == gate_up.shape
    assert torch.equal(back, convert_moe_packed_tensors(*out.values(), dtype=torch.float32))
    assert (back - gate_up).abs().max() < 0.25 * gate_up.abs().max()


def test_format_for_mxfp4_and_keys():
    fmt = format_for({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}})
    assert isinstance(fmt, Mxfp4Format)
    assert fmt.tensor_keys("e.down_proj") == ["e.down_proj_blocks", "e.down_proj_scales"]
    assert fmt.is_quantized("e.down_proj", {"e.down_proj_blocks", "e.down_proj_scales"})
    assert not fmt.is_quantized("e.down_proj_bias", {"e.down_proj_blocks", "e.down_proj_scales", "e.down_proj_bias"})


@pytest.mark.parametrize(
    ("blocks", "scales", "needle"),
    [
        (torch.zeros(2, 1, 16, dtype=torch.int8), torch.zeros(2, 1, dtype=torch.uint8), "uint8"),
        (torch.zeros(2, 1, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8), "do not match"),
        (torch.zeros(2, 1, 16, dtype=torch.uint8), torch.full((2, 1), 255, dtype=torch.uint8), "255"),
    ],
)
def test_bad_packed_tensors_are_refused_with_one_line(blocks, scales, needle):
    with pytest.raises(UnsupportedQuantizationError, match=needle) as info:
        mxfp4.dequantize(blocks, scales)
    assert "\n" not in str(info.value)


def test_quantize_refuses_ragged_or_non_finite_weights():
    with pytest.raises(UnsupportedQuantizationError, match="groups of 32"):
        mxfp4.quantize(torch.ones(4, 40))
    bad = torch.ones(2, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(UnsupportedQuantizationError, match="NaN"):
        mxfp4.quantize(bad)
    missing = {"e.down_proj_blocks": torch.zeros(1, 1, 16, dtype=torch.uint8)}
    with pytest.raises(UnsupportedQuantizationError, match="e.down_proj_scales"):
        Mxfp4Format().dequantize(missing, "e.down_proj")
