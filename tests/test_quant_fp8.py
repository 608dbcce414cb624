"""FP8 block quantization: against a per-block reference written here and against transformers' own FP8 code."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from hc_smoe_hub.quant import Fp8BlockFormat, UnsupportedQuantizationError, fp8_block

E4M3 = torch.float8_e4m3fn


def _blocks(rows: int, cols: int, bm: int = 128, bn: int = 128):
    """(i, j, row slice, col slice) of every block, ragged at the edges."""
    for i in range(math.ceil(rows / bm)):
        for j in range(math.ceil(cols / bn)):
            yield i, j, slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)


def _random_fp8(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 100).clamp(-448, 448).to(E4M3)


def _hf_quantizer(scale_fmt: str = "float") -> FineGrainedFP8HfQuantizer:
    return FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=(128, 128), scale_fmt=scale_fmt))


@pytest.mark.parametrize("shape", [(300, 260), (128, 256), (2, 130, 257), (5, 7)])
def test_dequantize_matches_per_block_reference(shape):
    q = _random_fp8(*shape)
    scale_inv = torch.rand(fp8_block.scale_shape(shape)) + 0.01
    got = fp8_block.dequantize(q, scale_inv, dtype=torch.float32)
    assert got.shape == q.shape
    expected = torch.empty(shape)
    for lead in range(shape[0] if len(shape) == 3 else 1):
        qs, ss, es = (q[lead], scale_inv[lead], expected[lead]) if len(shape) == 3 else (q, scale_inv, expected)
        for i, j, r, c in _blocks(*qs.shape):
            es[r, c] = qs[r, c].to(torch.float32) * ss[i, j].item()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(300, 260), (2, 130, 257), (256, 384)])
def test_dequantize_matches_transformers(shape):
    q = _random_fp8(*shape, seed=1)
    scale_inv = torch.rand(fp8_block.scale_shape(shape)) + 0.01
    # transformers' backward-pass dequantizer handles ragged blocks; it multiplies in the output dtype, so only its
    # float32 result is the reference formula (DeepSeek's weight_dequant multiplies in float32, then casts)
    ours = fp8_block.dequantize(q, scale_inv, dtype=torch.float32)
    assert torch.equal(ours, _dequantize_fp8_weight(q, scale_inv, [128, 128], torch.float32))
    if all(n % 128 == 0 for n in shape[-2:]):
        # the dequantizer `from_pretrained` runs on CPU multiplies in float32 too, but needs whole blocks
        fp8_dequantize = Fp8Dequantize(_hf_quantizer())
        for dtype in (torch.float32, torch.bfloat16):
            theirs = fp8_dequantize._dequantize_one(q, scale_inv, output_dtype=dtype)
            assert torch.equal(fp8_block.dequantize(q, scale_inv, dtype=dtype), theirs)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_matches_transformers_bit_for_bit(scale_fmt):
    w = torch.randn(3, 256, 384, dtype=torch.bfloat16) * 0.02
    w[0, :128, :128] = 0  # an all-zero block keeps scale 1
    theirs = Fp8Quantize(_hf_quantizer(scale_fmt))._quantize_one("experts.down_proj", w)
    q, scale_inv = fp8_block.quantize(w, pow2_scales=scale_fmt == "ue8m0")
    assert torch.equal(q.view(torch.uint8), theirs["experts.down_proj"].view(torch.uint8))
    assert torch.equal(scale_inv, theirs["experts.down_proj_scale_inv"].to(torch.float32))
    assert scale_inv.dtype == torch.float32 and scale_inv[0, 0, 0] == 1


def test_quantize_matches_reference_formula_on_ragged_edges():
    w = torch.randn(300, 260) * 3
    q, scale_inv = fp8_block.quantize(w)
    assert q.dtype == E4M3 and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 3)
    for i, j, r, c in _blocks(300, 260):
        block = w[r, c]
        scale = 448.0 / block.abs().max()
        assert scale_inv[i, j] == (1.0 / scale)
        expected = torch.clamp(block * scale, -448, 448).to(E4M3)
        assert torch.equal(q[r, c].view(torch.uint8), expected.view(torch.uint8)), (i, j)


def test_round_trip_error_within_e4m3_bound():
    w = torch.randn(2, 260, 300) * torch.logspace(-3, 1, 300)  # columns of very different size
    q, scale_inv = fp8_block.quantize(w)
    back = fp8_block.dequantize(q, scale_inv, dtype=torch.float32)
    per_element_scale = fp8_block._expand(scale_inv, 260, 300, (128, 128))
    # 3 mantissa bits: half an ulp is 2**-4 relative for normals; subnormal steps are 2**-9 in scaled units
    bound = torch.maximum(w.abs() * 2**-4, per_element_scale * 2**-10) * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    assert (back - w).abs().max() > 0  # the bound is not vacuous: quantization does lose bits here


def test_exactly_representable_weights_quantize_exactly():
    q0 = _random_fp8(260, 300, seed=3)
    scale0 = torch.pow(2.0, torch.randint(-12, 3, (3, 3)).float())
    for _, _, r, c in _blocks(260, 300):
        q0[r, c][0, 0] = torch.tensor(-448.0).to(E4M3)  # every block reaches the e4m3 maximum
    w = fp8_block.dequantize(q0, scale0, dtype=torch.float32)
    q, scale_inv = fp8_block.quantize(w)
    assert torch.equal(scale_inv, scale0)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8))
    assert torch.equal(fp8_block.dequantize(q, scale_inv, dtype=torch.float32), w)


def test_pow2_scales_are_powers_of_two_covering_the_block():
    w = torch.randn(200, 140)
    q, scale_inv = fp8_block.quantize(w, pow2_scales=True)
    assert torch.equal(torch.exp2(torch.log2(scale_inv).round()), scale_inv)
    for i, j, r, c in _blocks(200, 140):
        assert scale_inv[i, j] * 448 >= w[r, c].abs().max()
    back = fp8_block.dequantize(q, scale_inv, dtype=torch.float32)
    assert ((back - w).abs() <= w.abs() * 2**-4 + fp8_block._expand(scale_inv, 200, 140, (128, 128)) * 2**-10).all()


def test_format_keys_and_round_trip_through_a_dict():
    fmt = Fp8BlockFormat()
    assert fmt.tensor_keys("model.layers.3.mlp.experts.7.down_proj.weight") == [
        "model.layers.3.mlp.experts.7.down_proj.weight",
        "model.layers.3.mlp.experts.7.down_proj.weight_scale_inv",
    ]
    assert fmt.tensor_keys("mlp.experts.gate_up_proj") == [
        "mlp.experts.gate_up_proj",
        "mlp.experts.gate_up_proj_scale_inv",
    ]
    w = torch.randn(4, 256, 200, dtype=torch.bfloat16)
    stored = fmt.quantize(w, "mlp.experts.gate_up_proj")
    assert fmt.is_quantized("mlp.experts.gate_up_proj", stored.keys())
    assert not fmt.is_quantized("mlp.experts.down_proj", stored.keys())
    # one expert at a time: slicing the stored tensors first gives that expert's weight
    one = fmt.dequantize({k: v[2] for k, v in stored.items()}, "mlp.experts.gate_up_proj", torch.bfloat16)
    assert torch.equal(one, fmt.dequantize(stored, "mlp.experts.gate_up_proj")[2])
    assert one.dtype == torch.bfloat16 and ((one.float() - w[2].float()).abs() <= w[2].float().abs() / 8 + 1e-3).all()


def test_bad_input_is_refused_with_one_clear_line():
    q, scale_inv = fp8_block.quantize(torch.randn(300, 260))
    with pytest.raises(UnsupportedQuantizationError, match=r"weight_scale_inv has shape \(2, 3\).*need \(3, 3\)"):
        fp8_block.dequantize(q, scale_inv[:2])
    with pytest.raises(UnsupportedQuantizationError, match="not float8_e4m3fn"):
        fp8_block.dequantize(q.to(torch.bfloat16), scale_inv)
    with pytest.raises(UnsupportedQuantizationError, match="NaN or infinite"):
        fp8_block.quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(UnsupportedQuantizationError, match="lacks a.weight_scale_inv"):
        Fp8BlockFormat().dequantize({"a.weight": q}, "a.weight")
