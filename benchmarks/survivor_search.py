"""Survivor search of o-prune (and takeover / anchored-o, which use its subset) at real expert counts.

Synthetic layers with realistic structure (random SwiGLU experts, clustered tokens, router logits with a per-expert
bias so that usage is skewed) at the expert counts of Qwen1.5-MoE (60, keep 45 and 30, top-4, no renormalization),
Qwen3-30B-A3B (128, keep 64, top-8, renormalized) and DeepSeek-V3 (256, keep 128, top-8, renormalized; its sigmoid
and grouped routing are not modelled, only the size). Each layer has 2048 calibration tokens, which is o-prune's
token sample (`O_PRUNE_TOKENS`), so the search sees as many tokens as on a real model; the hidden size is small,
which only makes the one-off Gram step (every expert on every sampled token, then per-token inner products)
cheaper than on a real model: that step is timed separately and scales with H, the search does not depend on H.

For each layer: the time of the Gram step, of the new search (greedy elimination with a beam, then swap descent;
`subset_search.search`) and its objective (relative error sqrt(loss / ||y||^2), as o-prune reports it), against the
former search (best of 100,000 uniform subsets plus the F-prune and S-prune subsets): that is run here with
`--old-samples` subsets (default 5,000) and its time is extrapolated linearly to 100,000; its objective with 100,000
samples can only be equal or better than the figure printed for fewer, so the comparison is indicative.

Run: python benchmarks/survivor_search.py [--old-samples 5000] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from hc_smoe_hub import baselines
from hc_smoe_hub import subset_search as ss
from hc_smoe_hub.methods import LayerContext
from hc_smoe_hub.routing import Experts, Routing
from hc_smoe_hub.stats import collect

SETTINGS = [  # (label, N, K, top-k, renormalize)
    ("Qwen1.5-MoE 60 -> 45", 60, 45, 4, False),
    ("Qwen1.5-MoE 60 -> 30", 60, 30, 4, False),
    ("Qwen3-30B-A3B 128 -> 64", 128, 64, 8, True),
    ("DeepSeek-V3 size 256 -> 128", 256, 128, 8, True),
]
OLD_SAMPLES = 100_000


def skewed_layer(n: int, keep: int, top_k: int, renorm: bool, tokens: int = 2048, hidden: int = 64,
                 seed: int = 0) -> LayerContext:
    """Random SwiGLU experts, clustered tokens, router logits with a per-expert bias: skewed usage, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    inter = 32
    experts = Experts(*(torch.randn(n, *shape, generator=g) / math.sqrt(shape[1])
                        for shape in ((inter, hidden), (inter, hidden), (hidden, inter))))
    centres = torch.randn(32, hidden, generator=g) * 1.5
    x = centres[torch.randint(0, 32, (tokens,), generator=g)] + torch.randn(tokens, hidden, generator=g)
    x[:, 0] = 1.0  # a constant feature: the router row's first entry is a per-expert bias
    router = torch.randn(n, hidden, generator=g) * 0.3
    router[:, 0] = torch.randn(n, generator=g) * 1.5
    routing = Routing(top_k, renorm)
    act = torch.nn.functional.silu
    return LayerContext(0, keep, x, experts, router, routing, act, collect(x, experts, router, routing, act))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-samples", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"2048 sampled tokens per layer; old search run with {args.old_samples:,} subsets, time x "
          f"{OLD_SAMPLES / args.old_samples:g} for 100,000")
    print("| layer | Gram step s | new search s | new rel. error | subsets scored | swaps | "
          f"old ({args.old_samples:,}) s | old, 100,000 extrapolated s | old rel. error | F-prune | S-prune |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, n, k, top_k, renorm in SETTINGS:
        ctx = skewed_layer(n, k, top_k, renorm)
        t0 = time.perf_counter()
        prob = baselines.o_prune_problem(ctx)
        t1 = time.perf_counter()
        starts = [baselines.top_ids(ctx.stats.counts, k), baselines.top_ids(ctx.stats.prob_mass, k)]
        res = ss.search(prob, starts)
        t2 = time.perf_counter()
        _, old, _ = ss.sampled(prob, args.old_samples, [42, 0], starts)
        t3 = time.perf_counter()

        def rel(subset: list[int], prob: ss.SubsetProblem = prob) -> float:
            return math.sqrt(max(float(ss.subset_losses(prob, torch.tensor([subset]))[0]), 0.0) / prob.ref)

        old_rel = math.sqrt(max(old, 0.0) / prob.ref)
        print(f"| {label} | {t1 - t0:.2f} | {t2 - t1:.2f} | {rel(res.kept):.4f} | {res.evaluated:,} | {res.swaps} | "
              f"{t3 - t2:.1f} | {(t3 - t2) * OLD_SAMPLES / args.old_samples:.0f} | {old_rel:.4f} | "
              f"{rel(starts[0]):.4f} | {rel(starts[1]):.4f} |", flush=True)


if __name__ == "__main__":
    main()
