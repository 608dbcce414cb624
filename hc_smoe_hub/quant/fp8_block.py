"""FP8 e4m3 weights with per-block scales (``weight_scale_inv``), the DeepSeek-V3 convention.

A weight ``W`` of shape ``(*lead, rows, cols)`` is stored as ``q`` (``torch.float8_e4m3fn``, same shape) and
``scale_inv`` (float32, ``(*lead, ceil(rows / bm), ceil(cols / bn))``); block ``(i, j)`` covers rows
``i*bm : (i+1)*bm`` and columns ``j*bn : (j+1)*bn``, cut short at the edges. Dequantization is DeepSeek-V3's
``weight_dequant``: ``W = q.float() * scale_inv[i, j]`` in float32, then cast. Quantization is transformers'
``Fp8Quantize``: ``scale = 448 / amax`` per block (1 for an all-zero block), ``q = clamp(W * scale, -448, 448)``
cast to e4m3 (round to nearest even), ``scale_inv = 1 / scale``. With ``pow2_scales`` (``scale_fmt`` "ue8m0")
``scale_inv`` is first rounded up to a power of two and ``scale = 1 / scale_inv``, as transformers does.
"""

from __future__ import annotations

import math

import torch

from hc_smoe_hub.quant.errors import UnsupportedQuantizationError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: torch.Size | tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """The ``weight_scale_inv`` shape for a weight of ``shape``: one scale per (possibly ragged) block."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _scales_as_float(scale_inv: torch.Tensor) -> torch.Tensor:
    if scale_inv.dtype == torch.uint8:
        # Raw e8m0 bytes (some MX-style exports): the scale is 2 ** (byte - 127)
        return torch.ldexp(torch.ones_like(scale_inv, dtype=torch.float32), scale_inv.to(torch.int32) - 127)
    return scale_inv.to(torch.float32)


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-block scales repeated to one per element, cropped to the weight's (ragged) shape."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The weight ``q.float() * scale_inv`` per block, cast to ``dtype``."""
    if q.dtype != FP8_DTYPE:
        raise UnsupportedQuantizationError(
            f"An FP8 weight is stored as {q.dtype}, not float8_e4m3fn: the checkpoint is not DeepSeek-style block "
            "FP8; use the model's bf16 release."
        )
    if q.ndim < 2 or tuple(scale_inv.shape) != scale_shape(q.shape, block):
        raise UnsupportedQuantizationError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)} for a weight of shape {tuple(q.shape)}; "
            f"{block[0]}x{block[1]} blocks need {scale_shape(q.shape, block)}: check weight_block_size in "
            "quantization_config or download the checkpoint again."
        )
    rows, cols = q.shape[-2:]
    return (q.to(torch.float32) * _expand(_scales_as_float(scale_inv), rows, cols, block)).to(dtype)


def quantize(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK, pow2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` of a weight ``(*lead, rows, cols)``: e4m3 values and float32 per-block inverse scales."""
    if w.ndim < 2:
        raise UnsupportedQuantizationError(
            f"Only matrices are FP8 block-quantized; got a tensor of shape {tuple(w.shape)}."
        )
    if not torch.isfinite(w).all():
        raise UnsupportedQuantizationError(
            "A weight to quantize to FP8 holds NaN or infinite values: the merge produced a broken expert; "
            "check the source checkpoint and rerun."
        )
    *lead, rows, cols = w.shape
    grid_r, grid_c = scale_shape(w.shape, block)[-2:]
    # Zero padding fills the ragged edge blocks without changing any block's amax
    padded = torch.zeros(*lead, grid_r * block[0], grid_c * block[1], dtype=torch.float32, device=w.device)
    padded[..., :rows, :cols] = w.to(torch.float32)
    tiles = padded.reshape(*lead, grid_r, block[0], grid_c, block[1])
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    scale_inv = (1.0 / scale).to(torch.float32)
    if pow2_scales:
        scale_inv = torch.pow(2.0, torch.ceil(torch.log2(scale_inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scale = 1.0 / scale_inv
    q = torch.clamp(tiles * scale[..., :, None, :, None], min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, grid_r * block[0], grid_c * block[1])[..., :rows, :cols].contiguous()
    return q, scale_inv
