"""Safetensors I/O that never holds a whole model: a lazy shard reader, a planned shard writer, atomic output.

The reader opens a shard only for the tensors asked for and closes it again, so mapped pages do not pile up in
the process. The writer is hand-written because the safetensors library only writes a whole dict at once (which
would hold a 5 GB shard in memory): since every output tensor's shape is known before the merge starts, the
shards, their headers and each tensor's byte offset are planned up front, disk space is reserved (a full disk fails
before any compute), and each tensor is written into place as soon as it exists. A resumed merge reopens the
shards it planned before (the plan is deterministic) instead of creating them again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hc_smoe_hub.errors import OutputError, SourceError

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes are: shard file, dtype name, shape, and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or n + 8 > size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
    except FileNotFoundError as exc:
        raise SourceError(f"shard {path.name} is missing from {path.parent}: download the checkpoint again") from exc
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise SourceError(
            f"shard {path.name} is not a valid safetensors file (truncated or corrupt): download it again"
        ) from exc
    data_start = 8 + n
    last_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + last_end > size:
        raise SourceError(f"shard {path.name} is truncated ({size} bytes, header needs {data_start + last_end})")
    return header, data_start


class SourceCheckpoint:
    """Read-only view of a directory of safetensors shards (with or without an index)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise SourceError(f"{index} is not a valid safetensors index: download it again") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                pickles = [p.name for p in self.dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
                hint = (
                    f"it has only pickle weights ({', '.join(pickles)}): convert them to safetensors first"
                    if pickles else "no *.safetensors files found"
                )
                raise SourceError(f"{self.dir} holds no safetensors checkpoint: {hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.dir / name
            header, data_start = _read_header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                self.tensors[key] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), data_start + start,
                                               data_start + end)
        if index.exists():
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise SourceError(f"tensor {missing[0]} is listed in the index but absent from its shard: "
                                  "the checkpoint is incomplete, download it again")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, keys: Iterable[str], device: str | torch.device = "cpu",
             index: int | None = None) -> dict[str, torch.Tensor]:
        """Load the given tensors; each shard is opened once and closed (unmapped) before returning.

        With `index`, only row `index` along dim 0 of each tensor is read (one expert of a fused (E, ...) tensor),
        never the rest of it. Every weight the engine reads goes through this one method."""
        keys = list(keys)
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for path, file_keys in by_file.items():
            with safe_open(str(path), framework="pt", device=str(device)) as fh:
                for key in file_keys:
                    out[key] = fh.get_tensor(key) if index is None else fh.get_slice(key)[index].to(device)
        return {k: out[k] for k in keys}

    def copy_raw(self, key: str) -> Iterator[bytes]:
        """The tensor's bytes exactly as stored, in bounded chunks (byte-for-byte copies of non-expert tensors)."""
        info = self.tensors[key]
        with info.file.open("rb") as fh:
            fh.seek(info.start)
            left = info.nbytes
            while left:
                chunk = fh.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise SourceError(f"shard {info.file.name} ended early while reading {key}: download it again")
                left -= len(chunk)
                yield chunk


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=_DTYPES[self.dtype]).element_size()
        for d in self.shape:
            n *= d
        return n


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16", "F8_E4M3", ...)."""
    return _DTYPES[name]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes (the units transformers' max_shard_size takes)."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot read size '{text}': use e.g. 5GB, 500MB or a byte count")


class ShardedWriter:
    """Writes a planned set of tensors into capped safetensors shards, each tensor into its reserved place."""

    def __init__(self, directory: Path, plan: list[OutputTensor], max_shard_bytes: int, reopen: bool = False):
        """Plan the shards; create and reserve them, or with `reopen` check and adopt the ones already there."""
        self.dir = Path(directory)
        self.reopen = reopen
        self.dirty: set[Path] = set()
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for t in plan:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.slots: dict[str, tuple[Path, int, OutputTensor]] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0
        for name, group in zip(names, groups, strict=True):
            self._prepare_shard(self.dir / name, group)
        self.written: set[str] = set()
        self.rows_written: dict[str, set[int]] = {}

    def _prepare_shard(self, path: Path, group: list[OutputTensor]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in group:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
        data_start = 8 + len(raw)
        head = struct.pack("<Q", len(raw)) + raw
        if self.reopen:
            _check_reopened(path, head, data_start + offset)
        else:
            with _disk_errors(path), path.open("wb") as fh:
                fh.write(head)
                _reserve(fh, data_start + offset)
        pos = data_start
        for t in group:
            self.slots[t.name] = (path, pos, t)
            self.weight_map[t.name] = path.name
            pos += t.nbytes
        self.total += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        path, pos, spec = self.slots[name]
        t = tensor.detach().to("cpu").contiguous()
        if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}")
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._write_bytes(name, path, pos, [data])

    def write_rows(self, name: str, index: int, tensor: torch.Tensor) -> None:
        """Write row `index` along dim 0 of a planned tensor (one expert of a fused tensor) into its place; the
        tensor counts as written once all its rows are."""
        path, pos, spec = self.slots[name]
        t = tensor.detach().to("cpu").contiguous()
        if tuple(t.shape) != spec.shape[1:] or dtype_name(t.dtype) != spec.dtype or not 0 <= index < spec.shape[0]:
            raise ValueError(f"{name}[{index}]: got {tuple(t.shape)} {t.dtype}, planned rows of {spec.shape} "
                             f"{spec.dtype}")
        row_bytes = spec.nbytes // spec.shape[0]
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        if len(data) != row_bytes:
            raise ValueError(f"{name}[{index}]: {len(data)} bytes, planned {row_bytes}")
        with _disk_errors(path), path.open("r+b") as fh:
            fh.seek(pos + index * row_bytes)
            fh.write(data)
        self.dirty.add(path)
        rows = self.rows_written.setdefault(name, set())
        rows.add(index)
        if len(rows) == spec.shape[0]:
            self.written.add(name)

    def write_chunks(self, name: str, chunks: Iterable[bytes]) -> None:
        path, pos, _ = self.slots[name]
        self._write_bytes(name, path, pos, chunks)

    def _write_bytes(self, name: str, path: Path, pos: int, chunks: Iterable[bytes]) -> None:
        spec = self.slots[name][2]
        n = 0
        with _disk_errors(path), path.open("r+b") as fh:
            fh.seek(pos)
            for chunk in chunks:
                fh.write(chunk)
                n += len(chunk)
        self.dirty.add(path)
        if n != spec.nbytes:
            raise ValueError(f"{name}: wrote {n} bytes, planned {spec.nbytes}")
        self.written.add(name)

    def mark_written(self, names: Iterable[str]) -> None:
        """Tensors a previous run of the same plan wrote and synced (a resumed merge skips their layers)."""
        self.written.update(names)

    def sync(self) -> None:
        """Flush every shard written since the last sync to the disk (before a layer is recorded as finished)."""
        for path in sorted(self.dirty):
            with _disk_errors(path), path.open("r+b") as fh:
                os.fsync(fh.fileno())
        self.dirty.clear()

    def finish(self) -> None:
        missing = set(self.slots) - self.written
        if missing:
            raise RuntimeError(f"internal error: {len(missing)} planned tensors never written, e.g. {min(missing)}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _reserve(fh, size: int) -> None:
    # Reserving the space now turns a full disk into an error before hours of compute, not after.
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        fh.truncate(size)  # filesystems without fallocate: sparse file, written in place later


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"the disk holding {path.parent} is full: free space or choose another --output-dir"
            ) from None
        raise


def _check_reopened(path: Path, head: bytes, size: int) -> None:
    # A shard of the same plan has exactly this header and size; anything else is not ours to write into.
    try:
        with path.open("rb") as fh:
            same = fh.read(len(head)) == head and os.fstat(fh.fileno()).st_size == size
    except FileNotFoundError:
        same = False
    if not same:
        raise OutputError(f"{path} does not match the planned shard (missing or changed): the partial merge in "
                          f"{path.parent} cannot be resumed; pass --overwrite to start again")


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically and durably: a temporary sibling, fsynced, renamed over `path`.

    Tensors are written one at a time straight from their (CPU) memory: no serialized copy of them is built.
    """
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in cpu.items():
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with _disk_errors(path), tmp.open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for t in cpu.values():
                if t.numel():
                    fh.write(memoryview(t.view(torch.uint8).numpy()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash at any moment leaves the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with _disk_errors(path), tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_bytes(directory: Path) -> int:
    d = Path(directory).resolve()
    while not d.exists():
        d = d.parent
    return shutil.disk_usage(d).free
