"""Where a merge's memory goes, layer by layer, at Mixtral-8x7B's layer shape: the probe behind real-shapes run 5.

Writes a random bf16 Mixtral-shaped checkpoint of `--layers` decoder layers (`real_shapes.fields_for`, shard by
shard), merges it 8 -> 6 with the default method on 8 x 512 tokens, and samples the process every 20 ms. For each
layer it prints the peak RSS, glibc's heap (mallinfo2: arena, in use, free, mmapped) at that peak, the innermost
`hc_smoe_hub` frames of the main thread at that peak (which phase holds it), and the RSS once the layer is done.
`--no-heap-reuse` turns the heap reuse inside a method off for every layer size (host_memory.py) to compare.

Run: python benchmarks/memory_probe.py [--layers 4] [--no-heap-reuse] [--scale 16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import re
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import torch

from hc_smoe_hub import host_memory
from hc_smoe_hub.calibration import CalibrationSpec
from hc_smoe_hub.merge import MergeRequest, merge_checkpoint
from hc_smoe_hub.methods import MethodOptions
from hc_smoe_hub.synthetic import calibration_text, write_random_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from real_shapes import fields_for  # noqa: E402

GIB = 1 << 30


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap() -> str:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    return (f"heap arena {m.arena / GIB:.2f} GiB (in use {m.uordblks / GIB:.2f}, free {m.fordblks / GIB:.2f}), "
            f"mmapped {m.hblkhd / GIB:.2f} GiB")


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class Probe(logging.Handler):
    """Samples RSS every 20 ms; at each new peak of the running layer keeps the heap figures and the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.peak, self.where, self.done = 0, 0, "", threading.Event()
        self.main = threading.get_ident()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self) -> None:
        while not self.done.wait(0.02):
            now = rss()
            if now > self.peak:
                frame = sys._current_frames().get(self.main)
                frames = [f for f in traceback.extract_stack(frame) if "hc_smoe_hub" in f.filename][-3:]
                del frame  # a kept frame would keep the layer's tensors alive
                self.peak = now
                self.where = heap() + "\n" + "".join(f"    {Path(f.filename).name}:{f.lineno} {f.name}\n"
                                                     for f in frames)

    def emit(self, record: logging.LogRecord) -> None:  # the engine logs "layer i: ..." as it finishes layer i
        found = re.match(r"layer (\d+):", record.getMessage())
        if found:
            print(f"layer {found.group(1)}: peak RSS {self.peak / GIB:.2f} GiB, at it {self.where}"
                  f"  after the layer: RSS {rss() / GIB:.2f} GiB, {heap()}", flush=True)
            self.layer, self.peak = self.layer + 1, 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (1: the real shape)")
    ap.add_argument("--no-heap-reuse", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.no_heap_reuse:
        host_memory.HEAP_REUSE_MAX_BYTES = -1
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="hcsmoe-probe-"))
    src = write_random_checkpoint(tmp / "mixtral", {**fields_for("mixtral", args.scale),
                                                     "num_hidden_layers": args.layers})
    calib = calibration_text(tmp / "calib.txt", paragraphs=2000)
    probe = Probe()
    logging.getLogger("hc_smoe_hub.streaming").addHandler(probe)
    logging.getLogger("hc_smoe_hub.streaming").setLevel(logging.INFO)
    merge_checkpoint(MergeRequest(source=str(src), keep="6", output_dir=tmp / "out",
                                  calibration=CalibrationSpec(str(calib), 8, 512), device="cpu",
                                  options=MethodOptions(), overwrite=True))
    probe.done.set()


if __name__ == "__main__":
    main()
