"""What keeping the joint refit's design rows and Cholesky factors across sweeps saves, at a shape where they do not
fit the old fixed 1 GiB budget.

Six merged experts of half Mixtral-8x7B's width (hidden 2048, intermediate 7168, bf16), top-2, on enough tokens that
every merged expert sees more tokens than I (primal blocks, as at the default calibration's 65,536 tokens at full
width): the design rows are about 0.8 GB and the six (I, I) factors 1.2 GB. The same refit runs with nothing kept,
with the old 1 GiB budget (the design rows only), and with `refit_cache_budget` (half the free memory); the results
must agree, and the seconds are compared as ratios within the run.

Run: python benchmarks/refit_cache.py [--record] [--scale 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from hc_smoe_hub.merging import reduce_router, weighted_merge
from hc_smoe_hub.refit import refit_cache_budget, refit_down_rerouted
from hc_smoe_hub.routing import Experts, Routing

sys.path.insert(0, str(Path(__file__).parent))
from engine import record  # noqa: E402

GIB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--scale", type=int, default=1, help="divide the widths by this (a quick check of the script)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden, inter, n, tokens = 2048 // args.scale, 7168 // args.scale, 12, 28000 // args.scale
    g = torch.Generator().manual_seed(0)
    ex = Experts(*(torch.randn(n, *shape, generator=g).mul_(0.02).to(torch.bfloat16)
                   for shape in ((inter, hidden), (inter, hidden), (hidden, inter))))
    router, x = torch.randn(n, hidden, generator=g), torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    groups = [[i, i + 6] for i in range(6)]
    base = weighted_merge(ex, groups, None)
    new_router = reduce_router(router, groups, "mean", torch.full((n,), 1 / n))[0]
    routing = Routing(2, True)
    budgets = {"nothing kept": 0, "old fixed budget (1 GiB)": GIB,
               "refit_cache_budget (half the free memory)": refit_cache_budget(torch.device("cpu"))}
    rows = [f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; hidden {hidden}, "
            f"intermediate {inter}, 12 experts -> 6, top-2, {tokens} tokens, bf16, 2 sweeps.", "",
            "| budget | GiB | seconds | vs nothing kept |", "|---|---|---|---|"]
    first, ref = None, None
    for label, budget in budgets.items():
        start = time.perf_counter()
        out = refit_down_rerouted(ex, base, router, new_router, x, routing, torch.nn.functional.silu,
                                  cache_bytes=budget, max_tokens=tokens)
        seconds = time.perf_counter() - start
        if ref is None:
            ref, first = out.down.float(), seconds
        elif not torch.allclose(out.down.float(), ref, atol=1e-2, rtol=1e-2):
            raise SystemExit(f"{label}: the refitted experts differ from the refit that kept nothing")
        rows.append(f"| {label} | {budget / GIB:.2f} | {seconds:.1f} | {seconds / first:.2f} |")
        print(rows[-1], flush=True)
    report = "\n".join(rows) + "\n"
    print(report)
    if args.record:
        record("refit-cache", f"Command: `python benchmarks/refit_cache.py {' '.join(sys.argv[1:])}`\n\n{report}")


if __name__ == "__main__":
    main()
