"""MXFP4 (OCP Microscaling, e2m1 elements, e8m0 shared scales) in gpt-oss' on-disk layout.

A weight ``(*lead, rows, cols)`` with ``cols`` a multiple of 32 is stored as ``blocks`` (uint8,
``(*lead, rows, cols / 32, 16)``: 32 e2m1 codes per group, two per byte, element ``2k`` in the low nibble and
``2k + 1`` in the high nibble) and ``scales`` (uint8, ``(*lead, rows, cols / 32)``: the group's scale is
``2 ** (byte - 127)``). An e2m1 code is a sign bit (8) and one of the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.

Quantization follows the OCP MX spec 1.0: the group's shared exponent is ``floor(log2(amax)) - 2`` (2 is e2m1's
largest exponent), clamped to e8m0's range [-127, 127]; each element divided by the scale is rounded to the
nearest e2m1 value, ties to the even code, and clamped to +-6. An all-zero group gets exponent -127 (byte 0).
"""

from __future__ import annotations

import torch

from hc_smoe_hub.quant.errors import UnsupportedQuantizationError

GROUP = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_EMAX = 2
SCALE_BIAS = 127
# Midpoints between neighbouring magnitudes, each with whether a tie rounds up (the upper code is even)
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight ``(*lead, rows, cols)`` of gpt-oss ``*_blocks`` / ``*_scales``, in the disk's row order."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise UnsupportedQuantizationError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}: the checkpoint is not "
            "in gpt-oss' MXFP4 layout; use the model's bf16 release."
        )
    if blocks.ndim < 2 or blocks.shape[-1] != GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise UnsupportedQuantizationError(
            f"MXFP4 blocks of shape {tuple(blocks.shape)} do not match scales of shape {tuple(scales.shape)} "
            f"(expected blocks = scales + ({GROUP // 2},)); download the checkpoint again."
        )
    if (scales == 255).any():
        raise UnsupportedQuantizationError(
            "An MXFP4 scale byte is 255 (NaN in e8m0): the checkpoint is corrupt; download it again."
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int64)
    values = lut[codes].flatten(-2)  # (*lead, rows, groups, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, 0..15) of values already divided by their group scale: RNE, clamped to +-6."""
    mag = scaled.abs()
    code = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint, tie_up in _MIDPOINTS:
        code += (mag >= midpoint) if tie_up else (mag > midpoint)
    # A value that rounds to zero keeps code 0, so +0 and -0 share one byte pattern
    return code | ((scaled < 0) & (code > 0)).to(torch.uint8) << 3


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of a weight ``(*lead, rows, cols)`` quantized along ``cols`` in groups of 32."""
    if w.ndim < 2 or w.shape[-1] % GROUP:
        raise UnsupportedQuantizationError(
            f"MXFP4 quantizes rows in groups of {GROUP}; a weight of shape {tuple(w.shape)} does not split so: "
            "write this model with --dtype bfloat16."
        )
    if not torch.isfinite(w).all():
        raise UnsupportedQuantizationError(
            "A weight to quantize to MXFP4 holds NaN or infinite values: the merge produced a broken expert; "
            "check the source checkpoint and rerun."
        )
    groups = w.to(torch.float32).unflatten(-1, (-1, GROUP))
    amax = groups.abs().amax(dim=-1)
    # frexp gives amax = m * 2**e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly
    _, exp = torch.frexp(amax)
    shared = torch.where(amax > 0, exp - 1 - E2M1_EMAX, torch.full_like(exp, -SCALE_BIAS))
    shared = shared.clamp(-SCALE_BIAS, SCALE_BIAS)
    codes = _e2m1_codes(torch.ldexp(groups, -shared.unsqueeze(-1)))
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (shared + SCALE_BIAS).to(torch.uint8)
