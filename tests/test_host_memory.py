"""host_memory.py: oneDNN's primitive cache bounded by default, and the heap reused inside a method, then trimmed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hc_smoe_hub import host_memory


def _cache_capacity_after_import(env: dict[str, str]) -> str:
    code = "import os, hc_smoe_hub; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_the_package_bounds_onednn_cache_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert _cache_capacity_after_import(env) == host_memory.PRIMITIVE_CACHE_CAPACITY
    assert _cache_capacity_after_import({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}) == "7"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(host_memory._libc() is None, reason="glibc only: elsewhere reusable_heap is a no-op")
def test_reusable_heap_hands_its_buffers_back_on_exit_even_after_an_error():
    host_memory.release_freed_memory()
    mib = 1 << 20
    before = _rss()
    with pytest.raises(RuntimeError), host_memory.reusable_heap():
        kept = [torch.ones(4 * mib) for _ in range(8)]  # 8 x 16 MiB from the heap, under the method threshold
        inside = _rss()
        del kept
        raise RuntimeError("a method failed")
    assert inside - before > 100 * mib
    assert _rss() - before < 16 * mib  # trimmed: the freed heap went back to the OS
