"""The `QuantFormat` strategies: on-disk key names and layout for one quantized weight, per format.

The tensor math lives in `fp8_block.py` and `mxfp4.py`; these classes only name the keys and move axes so that
callers see the same tensor an unquantized checkpoint stores under the weight's key.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from hc_smoe_hub.quant import fp8_block, mxfp4
from hc_smoe_hub.quant.errors import UnsupportedQuantizationError


@runtime_checkable
class QuantFormat(Protocol):
    """How one weight of a quantized checkpoint is stored; see the package docstring for the contract."""

    name: str

    def tensor_keys(self, weight_key: str) -> list[str]: ...

    def is_quantized(self, weight_key: str, disk_keys: Collection[str]) -> bool: ...

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], weight_key: str, dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor: ...

    def quantize(self, weight: torch.Tensor, weight_key: str) -> dict[str, torch.Tensor]: ...

    def weight_key_of(self, disk_key: str) -> str: ...

    def describe(self) -> str: ...

    def logical_shape(self, weight_key: str, disk_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]: ...

    def disk_layout(self, weight_key: str, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        ...


def _take(tensors: Mapping[str, torch.Tensor], keys: list[str]) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise UnsupportedQuantizationError(
            f"The checkpoint lacks {', '.join(missing)} for a quantized weight: the download is incomplete or the "
            "repository is not in the format its quantization_config names; download it again."
        )
    return [tensors[k] for k in keys]


class _KeyedFormat:
    """What every format shares: a weight is quantized when all its on-disk keys are there."""

    def tensor_keys(self, weight_key: str) -> list[str]:
        raise NotImplementedError

    def is_quantized(self, weight_key: str, disk_keys: Collection[str]) -> bool:
        return all(k in disk_keys for k in self.tensor_keys(weight_key))

    def weight_key_of(self, disk_key: str) -> str:
        """The weight an on-disk key would belong to if it is quantized (itself when it names no part of one)."""
        for suffix in self.tensor_keys(""):  # the keys of the empty name are the suffixes
            if suffix and disk_key.endswith(suffix):
                return disk_key.removesuffix(suffix)
        return disk_key


@dataclass(frozen=True)
class Fp8BlockFormat(_KeyedFormat):
    """FP8 e4m3 with per-block ``weight_scale_inv`` (DeepSeek-V3 convention)."""

    block: tuple[int, int] = (128, 128)
    pow2_scales: bool = False  # scale_fmt "ue8m0": scales rounded up to powers of two
    scale_dtype: torch.dtype = torch.float32  # the dtype of weight_scale_inv written by `quantize`
    name: str = "fp8"

    def describe(self) -> str:
        scales = ", power-of-two (ue8m0)" if self.pow2_scales else ""
        return f"fp8 e4m3, {self.block[0]}x{self.block[1]} block scales (weight_scale_inv{scales})"

    def tensor_keys(self, weight_key: str) -> list[str]:
        # "x.weight" -> "x.weight_scale_inv"; a fused "experts.down_proj" -> "experts.down_proj_scale_inv"
        return [weight_key, weight_key + "_scale_inv"]

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], weight_key: str, dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        q, scale_inv = _take(tensors, self.tensor_keys(weight_key))
        return fp8_block.dequantize(q, scale_inv, block=self.block, dtype=dtype)

    def quantize(self, weight: torch.Tensor, weight_key: str) -> dict[str, torch.Tensor]:
        q, scale_inv = fp8_block.quantize(weight, block=self.block, pow2_scales=self.pow2_scales)
        weight_name, scale_name = self.tensor_keys(weight_key)
        return {weight_name: q, scale_name: scale_inv.to(self.scale_dtype)}

    def logical_shape(self, weight_key: str, disk_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(disk_shapes[weight_key])

    def disk_layout(self, weight_key: str, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The on-disk keys `quantize` writes for a weight of `shape`, with their dtypes and shapes."""
        weight_name, scale_name = self.tensor_keys(weight_key)
        return {weight_name: (fp8_block.FP8_DTYPE, tuple(shape)),
                scale_name: (self.scale_dtype, fp8_block.scale_shape(shape, self.block))}


@dataclass(frozen=True)
class Mxfp4Format(_KeyedFormat):
    """gpt-oss MXFP4: ``<key>_blocks`` and ``<key>_scales``, rows = output features on disk."""

    name: str = "mxfp4"

    def describe(self) -> str:
        return "mxfp4 (e2m1 values, e8m0 scales per 32, *_blocks / *_scales)"

    def tensor_keys(self, weight_key: str) -> list[str]:
        return [weight_key + "_blocks", weight_key + "_scales"]

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], weight_key: str, dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        blocks, scales = _take(tensors, self.tensor_keys(weight_key))
        # Disk rows are output features; the unquantized gpt-oss layout is (..., in, out)
        return mxfp4.dequantize(blocks, scales, dtype=dtype).transpose(-1, -2).contiguous()

    def quantize(self, weight: torch.Tensor, weight_key: str) -> dict[str, torch.Tensor]:
        blocks, scales = mxfp4.quantize(weight.transpose(-1, -2))
        blocks_name, scales_name = self.tensor_keys(weight_key)
        return {blocks_name: blocks, scales_name: scales}

    def logical_shape(self, weight_key: str, disk_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        *lead, rows, groups, half = disk_shapes[self.tensor_keys(weight_key)[0]]
        return (*lead, groups * half * 2, rows)  # the transpose of the disk's (rows = outputs, cols = inputs)

    def disk_layout(self, weight_key: str, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The on-disk keys `quantize` writes for a weight of `shape` ``(*lead, in, out)``, dtypes and shapes."""
        *lead, cols, rows = shape
        if cols % mxfp4.GROUP:
            raise UnsupportedQuantizationError(
                f"MXFP4 quantizes rows in groups of {mxfp4.GROUP}; {weight_key} of shape {tuple(shape)} does not "
                "split so: write this model with --dtype bfloat16."
            )
        blocks_name, scales_name = self.tensor_keys(weight_key)
        grid = (*lead, rows, cols // mxfp4.GROUP)
        return {blocks_name: (torch.uint8, (*grid, mxfp4.GROUP // 2)), scales_name: (torch.uint8, grid)}
