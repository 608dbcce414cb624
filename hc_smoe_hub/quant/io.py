"""Quantized checkpoints at the I/O layer: the engine reads and writes unquantized key names and never sees a format.

`QuantSource` wraps a `SourceCheckpoint` whose config declares a `QuantFormat`. It lists the LOGICAL keys (an FP8
``x.weight`` without its ``x.weight_scale_inv``, a gpt-oss ``experts.gate_up_proj`` instead of its ``_blocks`` and
``_scales``) with their unquantized shapes and the compute dtype, and returns each quantized weight dequantized to
that dtype, one weight at a time; `read(..., index=e)` dequantizes one expert ``[e]`` of a fused ``(E, ...)``
weight from its slice of blocks and scales. Weights that are not quantized (norms, routers, embeddings) pass
through unchanged.

`QuantWriter` is the `ShardedWriter` for such a source. `disk_plan` turns the engine's logical output plan into the
exact on-disk one before anything is written (the writer reserves the disk up front): with ``out_dtype=None`` every
quantized weight keeps the source's format (its weight and scale tensors, their shapes computed by the format), with
``out_dtype`` (``--dtype bfloat16``) it is one tensor of that dtype. A tensor the engine copies unchanged
(`write_chunks`) is copied as its on-disk tensors, byte for byte, or dequantized; a tensor the engine computes
(`write`: merged experts) is quantized with the source's scheme, or cast. A computed weight equal to the source's
dequantized weight of the same name keeps the source's bytes: re-quantizing a dequantized FP8 block can move its
scale by one ulp, and an unchanged expert (keeping all N) must reproduce the source exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from hc_smoe_hub.checkpoint import OutputTensor, ShardedWriter, SourceCheckpoint, TensorInfo, dtype_name, torch_dtype
from hc_smoe_hub.errors import HcSmoeError, SourceError
from hc_smoe_hub.quant.formats import QuantFormat

log = logging.getLogger(__name__)


class QuantSource:
    """A quantized checkpoint seen through its unquantized key names (the `SourceCheckpoint` reading interface)."""

    def __init__(self, inner: SourceCheckpoint, fmt: QuantFormat, dtype: torch.dtype):
        self.inner, self.fmt, self.dtype = inner, fmt, dtype
        self.dir = inner.dir
        disk = inner.tensors
        # logical key -> its on-disk keys, for the quantized weights only
        self.quantized: dict[str, list[str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for key in disk:
            logical = fmt.weight_key_of(key)
            if fmt.is_quantized(logical, disk):
                if logical in self.tensors:
                    continue
                parts = fmt.tensor_keys(logical)
                self.quantized[logical] = parts
                shape = fmt.logical_shape(logical, {k: disk[k].shape for k in parts})
                first = disk[parts[0]]
                # The byte range is the first part's: only `file` is used of a logical entry (the source digest)
                self.tensors[logical] = replace(first, dtype=dtype_name(dtype), shape=tuple(shape))
            else:
                self.tensors[key] = disk[key]
        if not self.quantized:
            raise SourceError(f"config.json declares {fmt.name} quantization but no weight in {inner.dir} is stored "
                              f"so ({' + '.join(fmt.tensor_keys('<key>'))}): the config and the weights do not "
                              "match; download the checkpoint again")
        log.info("%s source: %d quantized weights read dequantized to %s", fmt.name, len(self.quantized),
                 str(dtype).removeprefix("torch."))

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def total_bytes(self) -> int:
        return self.inner.total_bytes()

    def is_quantized(self, key: str) -> bool:
        return key in self.quantized

    def read(self, keys: Iterable[str], device: str | torch.device = "cpu",
             index: int | None = None) -> dict[str, torch.Tensor]:
        """Load the given logical tensors; a quantized weight is dequantized alone (its parts are read, converted
        and dropped before the next), so at most one weight's quantized parts are held beside the results. With
        `index`, row `index` of each (one expert of a fused ``(E, ...)`` weight), as `SourceCheckpoint.read`: the
        same rows of a quantized weight's parts are read and only they are dequantized."""
        keys = list(keys)
        plain = self.inner.read([k for k in keys if k not in self.quantized], device, index=index)
        return {k: plain[k] if k in plain else self.read_as(k, self.dtype, device, index) for k in keys}

    def read_as(self, key: str, dtype: torch.dtype, device: str | torch.device = "cpu",
                index: int | None = None) -> torch.Tensor:
        """One quantized weight (or its row `index`) dequantized to `dtype`."""
        parts = self.inner.read(self.quantized[key], device, index=index)
        return self.fmt.dequantize(parts, key, dtype)

    def copy_raw(self, key: str) -> Iterator[bytes]:
        """The logical tensor's bytes: a quantized weight's are its dequantized values in the compute dtype.

        `QuantWriter.write_chunks` never consumes this for a quantized weight (it copies the on-disk parts), so the
        generator, lazy, costs nothing there."""
        if key not in self.quantized:
            yield from self.inner.copy_raw(key)
            return
        t = self.read_as(key, self.dtype).contiguous()
        yield t.view(torch.uint8).numpy().tobytes()


def disk_plan(plan: list[OutputTensor], source: QuantSource, out_dtype: torch.dtype | None) -> list[OutputTensor]:
    """The on-disk output plan of the engine's logical plan: quantized weights as their format's tensors (source's
    format kept, `out_dtype` None) or as one `out_dtype` tensor (dequantized output)."""
    out: list[OutputTensor] = []
    disk = source.inner.tensors
    for t in plan:
        if not source.is_quantized(t.name):
            out.append(t)
        elif out_dtype is not None:
            out.append(OutputTensor(t.name, dtype_name(out_dtype), t.shape))
        else:
            for key, (dtype, shape) in source.fmt.disk_layout(t.name, t.shape).items():
                # A part of the source's shape keeps its dtype (scales stored as bf16 stay bf16)
                same = key in disk and disk[key].shape == tuple(shape)
                out.append(OutputTensor(key, disk[key].dtype if same else dtype_name(dtype), tuple(shape)))
    return out


class QuantWriter(ShardedWriter):
    """The planned writer of a quantized source's output: takes the engine's logical tensors (see module doc)."""

    def __init__(self, directory: Path, plan: list[OutputTensor], max_shard_bytes: int, reopen: bool = False, *,
                 source: QuantSource, out_dtype: torch.dtype | None = None):
        """`plan` is `disk_plan`'s (what merge.py sized the disk for); `out_dtype` None keeps the format."""
        super().__init__(directory, plan, max_shard_bytes, reopen=reopen)
        self.source, self.out_dtype = source, out_dtype

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self.source.is_quantized(name):
            super().write(name, tensor)
            return
        if self.out_dtype is not None:
            super().write(name, tensor.to(self.out_dtype))
            return
        if self._unchanged(name, tensor):
            self._copy_parts(name)
            return
        for key, part in self.source.fmt.quantize(tensor, name).items():
            super().write(key, part.to(torch_dtype(self.slots[key][2].dtype)))

    def write_rows(self, name: str, index: int, tensor: torch.Tensor) -> None:
        """Row `index` (one expert) of a fused weight, as `write` treats a whole one: quantized with the source's
        scheme (that row's blocks and scales: MXFP4 scales rows, not experts), cast to `out_dtype`, or, when it
        equals the source's row `index`, the source's own bytes for that row (keeping all N reproduces it)."""
        if not self.source.is_quantized(name):
            super().write_rows(name, index, tensor)
            return
        if self.out_dtype is not None:
            super().write_rows(name, index, tensor.to(self.out_dtype))
            return
        parts = self.source.quantized[name]
        original = self.source.read_as(name, tensor.dtype, tensor.device, index)
        if original.shape == tensor.shape and torch.equal(original, tensor):
            raw = self.source.inner.read(parts, index=index)
            for key in parts:
                super().write_rows(key, index, raw[key])
            return
        for key, part in self.source.fmt.quantize(tensor, name).items():
            super().write_rows(key, index, part.to(torch_dtype(self.slots[key][2].dtype)))

    def write_chunks(self, name: str, chunks: Iterable[bytes]) -> None:
        if not self.source.is_quantized(name):
            super().write_chunks(name, chunks)
        elif self.out_dtype is not None:
            super().write(name, self.source.read_as(name, self.out_dtype))
        else:
            self._copy_parts(name)

    def _copy_parts(self, name: str) -> None:
        for key in self.source.quantized[name]:
            super().write_chunks(key, self.source.inner.copy_raw(key))

    def _unchanged(self, name: str, tensor: torch.Tensor) -> bool:
        parts = self.source.quantized[name]
        if any(key not in self.slots or self.slots[key][2].shape != self.source.inner.tensors[key].shape
               for key in parts):
            return False
        original = self.source.read_as(name, tensor.dtype, tensor.device)
        return original.shape == tensor.shape and torch.equal(original, tensor)



def quant_dtypes(requested: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(compute dtype, output dtype) of a quantized source: `--dtype` names the OUTPUT's weights here.

    "auto" keeps the source's format (output dtype None); "bfloat16" writes the whole model dequantized in bf16.
    The computation runs in fp32 on a CPU (slow bf16 matmuls gain nothing there) and bf16 on a GPU, the dtype
    the quantized weights are dequantized to."""
    if requested not in ("auto", "bfloat16"):
        raise HcSmoeError(f"--dtype {requested} is not available for a quantized source: --dtype auto keeps its "
                          "format (merged experts re-quantized), --dtype bfloat16 writes it dequantized in bf16")
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    return compute, (torch.bfloat16 if requested == "bfloat16" else None)


def weights_record(fmt: QuantFormat, out_dtype: torch.dtype | None) -> dict[str, str]:
    """What hc_smoe.json (and the model card) say about a quantized source's output weights."""
    if out_dtype is None:
        return {"source_format": fmt.describe(), "output": "re-quantized", "output_format": fmt.describe()}
    return {"source_format": fmt.describe(), "output": "dequantized",
            "output_format": str(out_dtype).removeprefix("torch.")}
