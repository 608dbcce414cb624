"""host_memory.py: oneDNN's primitive cache bounded by default, and the heap reused inside a method, then trimmed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hc_smoe_hub import host_memory


def _capacities_after_import(env: dict[str, str]) -> list[str]:
    code = "import os, hc_smoe_hub; print(*(os.environ[n] for n in hc_smoe_hub.host_memory.PRIMITIVE_CACHES))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_the_package_bounds_the_primitive_caches_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k not in host_memory.PRIMITIVE_CACHES}
    bound = host_memory.PRIMITIVE_CACHE_CAPACITY
    assert _capacities_after_import(env) == [bound, bound]
    assert _capacities_after_import({**env, "LRU_CACHE_CAPACITY": "7"}) == [bound, "7"]


def _bf16_matmuls_growth(env: dict[str, str]) -> float:
    """MiB of resident memory added by bf16 matmuls of 150 distinct shapes, after importing the package."""
    code = """
import ctypes, hc_smoe_hub, torch
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # small buffers are mmaps: only the caches stay resident
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = torch.randn(256, 128).bfloat16()
x = torch.randn(1400, 128).bfloat16()
start = rss()
for m in range(1000, 1300, 2):
    x[:m] @ w.T
print(rss() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(host_memory._libc() is None or not torch.backends.mkldnn.is_available()
                    or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="the caches belong to oneDNN's bf16 matmuls: a CPU without them never fills them")
def test_bounded_caches_keep_distinct_matmul_shapes_from_piling_up():
    env = {k: v for k, v in os.environ.items() if k not in host_memory.PRIMITIVE_CACHES}
    unbounded = _bf16_matmuls_growth({**env, **dict.fromkeys(host_memory.PRIMITIVE_CACHES, "1024")})
    bounded = _bf16_matmuls_growth(env)
    assert bounded < unbounded / 2


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(host_memory._libc() is None, reason="glibc only: elsewhere reusable_heap is a no-op")
def test_reusable_heap_hands_its_buffers_back_on_exit_even_after_an_error():
    host_memory.release_freed_memory()
    mib = 1 << 20
    before = _rss()
    with pytest.raises(RuntimeError), host_memory.reusable_heap(24 * mib):
        kept = [torch.ones(4 * mib) for _ in range(8)]  # 8 x 16 MiB from the heap, under the method threshold
        inside = _rss()
        del kept
        raise RuntimeError("a method failed")
    assert inside - before > 100 * mib
    assert _rss() - before < 16 * mib  # trimmed: the freed heap went back to the OS


LARGE_AND_SMALL_LAYER = """
import ctypes, torch
from hc_smoe_hub import host_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
host_memory.release_freed_memory()
for size in (host_memory.HEAP_REUSE_MAX_BYTES + 1, 24 << 20):
    with host_memory.reusable_heap(size):
        before = libc.mallinfo2().hblkhd
        kept = torch.ones(4 << 20)  # 16 MiB
        print(libc.mallinfo2().hblkhd - before)
        del kept
"""


@pytest.mark.skipif(host_memory._libc() is None or not hasattr(host_memory._libc(), "mallinfo2"),
                    reason="glibc 2.33+ only")
def test_only_a_small_layer_reuses_the_heap():
    """At real layer shapes the heap's fragments grew layer by layer: a large layer's 16 MiB temporaries are
    mmaps (handed back when freed), a small layer's come from the heap (reused). In a fresh process: a heap that
    already holds a free 16 MiB block serves it whatever the threshold."""
    out = subprocess.run([sys.executable, "-c", LARGE_AND_SMALL_LAYER], capture_output=True, text=True, check=True)
    large, small = (int(v) for v in out.stdout.split())
    assert large >= 16 << 20
    assert small < 1 << 20
