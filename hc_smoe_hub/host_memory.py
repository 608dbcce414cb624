"""How the engine tunes the process's native allocators: glibc's malloc thresholds and oneDNN's primitive cache.

Measured on the engine benchmark (benchmarks/RESULTS.md, engine section), three settings matter:

- Between layers, every large freed buffer goes back to the OS (`release_freed_memory`): by default glibc raises
  its mmap threshold after large frees, so later layer-sized buffers come from the heap and stay resident after
  they are freed, and peak memory grows with depth.
- Inside a method (`reusable_heap`), the refits allocate and free many same-sized (T, I) temporaries. As fresh
  mmaps each one pays its page faults again (about 11 ms per 32 MiB on the project's CPU, as long as a bf16
  matmul of it), which made up about a quarter of a default merge there. While a method runs, blocks under
  `METHOD_MMAP_THRESHOLD` come from the heap and are reused; afterwards the 1 MiB threshold is restored and the
  freed heap is trimmed, so the layer's memory is handed back before the next layer. Only for a small layer
  (routed experts under `HEAP_REUSE_MAX_BYTES`): at real layer shapes the reused blocks are tens of MiB, their
  fragments stayed resident and the heap grew layer by layer (a Mixtral-8x7B-shaped merge's per-layer peak rose
  from 5.1 to 6.3 GiB over eight layers; without the reuse it stayed between 4.7 and 5.1 GiB, benchmarks/RESULTS.md,
  real-shapes run 5), while page faults weigh less against their matmuls (the time per layer moved by 0-20%,
  within what these shared machines vary).
- The CPU's bf16 matmuls run through oneDNN, and two caches keep up to 1024 compiled primitives each, one per
  distinct shape: oneDNN's own (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and PyTorch's ideep layer above it
  (`LRU_CACHE_CAPACITY`). The refits' token counts differ per group and layer, so both grew with depth (about
  0.3 MiB per new shape here). Each is read once, when oneDNN first runs, so the package sets both defaults
  (`PRIMITIVE_CACHE_CAPACITY`) at import, unless the user has set them.

glibc only (Linux); elsewhere these are no-ops. `available_ram` and `free_bytes` say how much memory is free now,
for the checks before a job and for the caches a method may keep (`refit.refit_cache_budget`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the package's import sets oneDNN's cache sizes from here, before anything imports torch
    import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LAYER_MMAP_THRESHOLD = 1 << 20
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's own default
METHOD_MMAP_THRESHOLD = 64 << 20
# A layer's routed experts: the engine benchmark's take 24 MiB, Qwen1.5-MoE-A2.7B's 1 GiB, Mixtral-8x7B's 2.6 GiB.
HEAP_REUSE_MAX_BYTES = 256 << 20
PRIMITIVE_CACHE_CAPACITY = "32"


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (musl or another libc has no mallopt: nothing to tune)
        return libc
    except (OSError, AttributeError):
        return None


PRIMITIVE_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_primitive_cache() -> None:
    """Default oneDNN's and ideep's primitive caches to `PRIMITIVE_CACHE_CAPACITY` entries (the user's setting
    wins)."""
    for name in PRIMITIVE_CACHES:
        os.environ.setdefault(name, PRIMITIVE_CACHE_CAPACITY)


def release_freed_memory() -> None:
    """Make glibc hand every freed buffer of 1 MiB or more back to the OS."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LAYER_MMAP_THRESHOLD)


@contextlib.contextmanager
def reusable_heap(layer_experts_bytes: int) -> Iterator[None]:
    """Within the block, for a layer whose routed experts take at most `HEAP_REUSE_MAX_BYTES`, buffers under
    `METHOD_MMAP_THRESHOLD` are reused from the heap; on exit the 1 MiB threshold is back and the freed heap is
    returned to the OS. For a larger layer nothing changes: every buffer of 1 MiB or more is an mmap."""
    libc = _libc()
    if libc is None or layer_experts_bytes > HEAP_REUSE_MAX_BYTES:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, METHOD_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)  # no trimming of the heap's top while the method churns
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, LAYER_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo (free pages alone would count the reclaimable page cache as used)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_bytes(device: torch.device) -> int | None:
    """Memory new buffers on `device` can take now: a GPU's free memory plus what PyTorch's allocator holds
    unused, or the machine's available RAM; None when it cannot be told."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_ram() if device.type == "cpu" else None
