"""Quantized source checkpoints: which on-disk tensors hold one weight, and how to read and write them.

Two formats are supported, both as pure tensor functions (no model, no kernels, CPU only):

- ``fp8`` (`fp8_block.py`): FP8 e4m3 weights with per-block scales, the DeepSeek-V3 convention used by
  DeepSeek-V3/R1, Kimi K2, MiniMax-M2 and the GLM FP8 repos. ``x.weight`` is ``float8_e4m3fn``;
  ``x.weight_scale_inv`` is float32 of shape ``(*lead, ceil(rows / 128), ceil(cols / 128))`` and
  ``W ~= q.float() * scale_inv`` per block (edge blocks are ragged when a dim is not a multiple of 128).
  A fused 3-D weight stored under a key without ``.weight`` (``experts.gate_up_proj``) has its scales under
  ``experts.gate_up_proj_scale_inv``, the name transformers' ``Fp8Quantize`` writes.
- ``mxfp4`` (`mxfp4.py`): the gpt-oss experts. ``experts.gate_up_proj`` is stored as
  ``experts.gate_up_proj_blocks`` (uint8, ``(E, 2I, H / 32, 16)``, two e2m1 values per byte, the low nibble
  first) and ``experts.gate_up_proj_scales`` (uint8 e8m0 exponents, bias 127, ``(E, 2I, H / 32)``); likewise
  ``down_proj`` with ``(E, H, I / 32, 16)`` / ``(E, H, I / 32)``. On disk the rows are the output features; the
  unquantized gpt-oss layout (what transformers' ``convert_moe_packed_tensors`` returns) is the transpose,
  ``gate_up_proj`` ``(E, H, 2I)``, and that is what `QuantFormat.dequantize` returns and `QuantFormat.quantize`
  takes.

The interface the architecture table refers to (`QuantFormat`, implemented by `Fp8BlockFormat` and
`Mxfp4Format` in `formats.py`):

- ``format_for(config) -> QuantFormat | None`` reads ``quantization_config`` (top level, or inside
  ``text_config``): ``quant_method`` "fp8" with ``weight_block_size`` (and ``scale_fmt`` "ue8m0" for power-of-two
  scales, DeepSeek-V3.1), or "mxfp4". ``None`` when the checkpoint is not quantized; any other method (or fp8
  without block scales) raises `UnsupportedQuantizationError` with one line saying what to do.
- ``fmt.tensor_keys(weight_key)`` lists the on-disk keys that hold one weight, e.g. for fp8
  ``["...down_proj.weight", "...down_proj.weight_scale_inv"]``. Not every weight of a quantized checkpoint is
  quantized (norms, routers, embeddings, ``modules_to_not_convert``): ``fmt.is_quantized(weight_key, disk_keys)``
  says whether this one is (all its keys are on disk). A weight that is not is read and written as usual.
- ``fmt.dequantize(tensors, weight_key, dtype)`` takes a dict holding those keys and returns the weight in the
  layout an unquantized checkpoint stores under ``weight_key``. The values may be sliced along leading dims
  first (one expert of a fused ``(E, ...)`` tensor: ``blocks[e]``, ``scales[e]``), so that only one expert is
  ever dequantized at a time.
- ``fmt.quantize(weight, weight_key)`` is the inverse: a dict from on-disk key to tensor, re-quantized with the
  same scheme (for a merged expert, or a stack of K merged experts).
- ``fmt.weight_key_of(disk_key)`` names the weight an on-disk key would be a part of; ``fmt.logical_shape`` gives
  the unquantized shape from the parts' shapes and ``fmt.disk_layout(weight_key, shape)`` the parts' keys, dtypes
  and shapes for a weight of ``shape`` (what an output plan reserves before anything is quantized);
  ``fmt.describe()`` is the one-line name hc_smoe.json and the card use.
- ``output_config(config, keep_quantized)``: a re-quantized output keeps ``quantization_config`` unchanged (same
  method, block size and ``modules_to_not_convert``; the experts' names and the layer count do not change). A
  dequantized output (``--dtype bfloat16``) has ``quantization_config`` removed, top level and ``text_config``.

The engine uses all this through `io.py` (`QuantSource`, `QuantWriter`, `disk_plan`), which merge.py builds for a
source whose config declares a format: the engine and the family table see unquantized key names only.

Loading on CPU with stock transformers 5.24 ``from_pretrained`` (checked by tests/test_quant_load.py): the
quantizers log that they dequantize (no GPU / no triton kernels) and the model holds plain weights equal to
``dequantize`` of this package, for an MXFP4 gpt-oss checkpoint and for an FP8 DeepSeek-V3 checkpoint whose experts
are per-expert keys (``experts.{e}.gate_proj.weight`` + ``weight_scale_inv``, the real Hub layout). Not on CPU:
a fused 3-D FP8 expert (``experts.gate_up_proj`` + ``_scale_inv``) is loaded as raw e4m3 values with its scales
reported unexpected, and an FP8 dim with more than one block and a ragged edge is either refused (320 rows: grid 3)
or silently wrong (160 rows: transformers takes blocks of 80). So write FP8 experts per expert, and in CPU tests
use dims that are multiples of 128 (or below 128).
"""

from __future__ import annotations

import copy
from typing import Any

from hc_smoe_hub.quant.errors import UnsupportedQuantizationError
from hc_smoe_hub.quant.formats import Fp8BlockFormat, Mxfp4Format, QuantFormat

__all__ = [
    "Fp8BlockFormat",
    "Mxfp4Format",
    "QuantFormat",
    "UnsupportedQuantizationError",
    "format_for",
    "output_config",
    "quantization_config_of",
]


def quantization_config_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a ``config.json`` dict, at the top level or in its ``text_config``."""
    found = config.get("quantization_config")
    if found is None and isinstance(config.get("text_config"), dict):
        found = config["text_config"].get("quantization_config")
    return found


def format_for(config: dict[str, Any]) -> QuantFormat | None:
    """The format of a checkpoint's quantized weights, or None when its config declares no quantization."""
    qcfg = quantization_config_of(config)
    if qcfg is None:
        return None
    method = qcfg.get("quant_method")
    if method == "fp8":
        block = qcfg.get("weight_block_size")
        if not block or len(block) != 2:
            raise UnsupportedQuantizationError(
                "This FP8 checkpoint has per-tensor scales (no weight_block_size in quantization_config); only "
                "block-scaled FP8 (weight_scale_inv) is supported: use a bf16 or block-FP8 version of the model."
            )
        return Fp8BlockFormat(block=(int(block[0]), int(block[1])), pow2_scales=qcfg.get("scale_fmt") == "ue8m0")
    if method == "mxfp4":
        return Mxfp4Format()
    raise UnsupportedQuantizationError(
        f"Quantization method {method!r} is not supported (only 'fp8' with block scales and 'mxfp4'): use the "
        "model's bf16 or FP8 release instead."
    )


def output_config(config: dict[str, Any], keep_quantized: bool) -> dict[str, Any]:
    """A copy of ``config`` with ``quantization_config`` kept (re-quantized output) or removed (dequantized)."""
    out = copy.deepcopy(config)
    if keep_quantized:
        return out
    out.pop("quantization_config", None)
    if isinstance(out.get("text_config"), dict):
        out["text_config"].pop("quantization_config", None)
    return out
