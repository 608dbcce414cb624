"""Baseline expert-reduction methods, registered next to HC-SMoE so every one shares calibration and output format.

Pruning methods keep K original experts verbatim (bit-identical) and slice their router rows; their plan's
`groups` are `[[kept id], ...]` in ascending id order, so they name only the kept experts. Merging methods
partition all N experts into K groups and merge each group with `layer_plan.merge_groups` (frequency-weighted
experts, router rows per `opts.router`).

- `f-prune`: the K most frequently routed experts.
- `s-prune`: the K experts with the largest summed router probability over the calibration tokens.
- `o-prune` (Lu et al. 2024, "Not All Experts are Equal"): the K-subset whose re-routed layer output best
  reconstructs the original routed output on a token sample (exhaustive when small, else `subset_search`).
- `reap` (Cerebras 2025, arXiv 2510.13999): the K experts with the largest router-weighted activation norm.
- `m-smoe` (MC-SMoE's merge step, arXiv 2310.01334): most-used experts as centres, others join the centre with the
  most similar router-logit profile, frequency-weighted merging.
- `diversify` (Zhang et al. 2024, arXiv 2407.09590): average-linkage clustering on 1 - linear CKA of the experts'
  outputs, frequency-weighted merging of each group.
- `random`: a seeded random partition into K non-empty groups, frequency-weighted merging; a floor.

Everything here is a pure tensor function of the `LayerContext`: no I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from hc_smoe_hub import subset_search
from hc_smoe_hub.clustering import labels_to_groups
from hc_smoe_hub.fastpath import hidden_fp32, product_dtype, project_fp32
from hc_smoe_hub.layer_plan import LayerContext, LayerPlan, MethodOptions, merge_groups
from hc_smoe_hub.routing import expert_output

log = logging.getLogger(__name__)

O_PRUNE_TOKENS = 2048  # token sample on which o-prune scores subsets
# Every subset is scored up to this many (the demo models' largest case, C(16, 8) = 12,870, stays exhaustive);
# beyond it the greedy + swap search of `subset_search`, which scales to any N.
O_PRUNE_EXHAUSTIVE = 20_000
DIVERSIFY_TOKENS = 1024  # token sample for CKA: the token-space Gram matrices are (S, S) per expert


# --------------------------------------------------------------------------------------------------- helpers


def top_ids(scores: torch.Tensor, k: int) -> list[int]:
    """Ids of the k largest scores, ascending; ties go to the lower id (deterministic, unlike torch.topk)."""
    values = scores.detach().double().cpu().tolist()
    best = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    return sorted(best)


def prune_plan(ctx: LayerContext, kept: list[int], extra: dict | None = None) -> LayerPlan:
    """Keep the listed experts unchanged (bit-identical) with their own router rows, in ascending id order."""
    kept = sorted(kept)
    if len(set(kept)) != ctx.keep:
        raise ValueError(f"expected {ctx.keep} distinct experts, got {kept}")
    router = ctx.router[torch.tensor(kept, device=ctx.router.device)].clone()
    bias = None if ctx.routing.bias is None else ctx.routing.bias[kept].clone()
    logit_bias = None if ctx.routing.logit_bias is None else ctx.routing.logit_bias[kept].clone()
    return LayerPlan([[i] for i in kept], ctx.experts.select(kept), router, extra or {}, bias, logit_bias)


def _sample_rows(ctx: LayerContext, limit: int) -> torch.Tensor:
    """Evenly strided calibration rows, at most `limit` (deterministic, spread over every sample)."""
    t = ctx.x.shape[0]
    return torch.arange(0, t, max(1, math.ceil(t / limit)), device=ctx.x.device)[:limit]


def _output(ctx: LayerContext, xs: torch.Tensor, i: int) -> torch.Tensor:
    """E_i(xs) in fp32, with its products in the dtype the statistics pass uses (`stats.collect`): the fast path
    (bf16 for a bf16 source on fast hardware, `fastpath.py`) for fp32 xs, else xs's dtype."""
    ex = ctx.experts
    dt = product_dtype(ex.gate.dtype, xs)
    if dt == xs.dtype:
        return expert_output(xs, ex, i, ctx.act).float()
    return project_fp32(hidden_fp32(xs, ex.gate[i], ex.up[i], ctx.act, dt, *ex.in_bias(i)), ex.down[i], dt,
                        ex.out_bias(i))


def _merge(ctx: LayerContext, groups: list[list[int]], opts: MethodOptions, extra: dict | None = None) -> LayerPlan:
    # These baselines are defined with frequency-weighted merging; only the router strategy is the user's.
    plan = merge_groups(ctx, groups, dataclasses.replace(opts, merge="freq"))
    plan.extra.update(extra or {})
    return plan


# --------------------------------------------------------------------------------------------------- pruning


def f_prune(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """F-prune: keep the K experts routed most often (counts over the frequency top-k, see `paper_frequency`).

    Ties in the count go to the lower expert id.
    """
    return prune_plan(ctx, top_ids(ctx.stats.counts, ctx.keep))


def s_prune(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """S-prune: keep the K experts with the largest summed router softmax probability over all calibration tokens."""
    return prune_plan(ctx, top_ids(ctx.stats.prob_mass, ctx.keep))


def reap(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """REAP (Lasby et al., Cerebras 2025): keep the K experts of largest saliency.

    S_j = mean over the tokens routed to j of g_j(x) * ||E_j(x)||_2, with g_j the gate weight the model applies
    (after renormalization when the config renormalizes), as `stats.saliency` holds it; never-routed experts score
    0. The paper renormalizes the gates over the surviving top-k; the pruned model does exactly that when the config
    renormalizes (Mixtral always; Qwen2/Qwen3-MoE and OLMoE when `norm_topk_prob` is true). With
    `norm_topk_prob=False` (e.g. Qwen1.5-MoE) the pruned model's gates are the softmax over the K kept logits,
    without top-k renormalization: we change no config field but the expert count (and top-k when K < top-k), so
    that is what runs.
    """
    return prune_plan(ctx, top_ids(ctx.stats.saliency, ctx.keep))


def o_prune_problem(ctx: LayerContext) -> subset_search.SubsetProblem:
    """O-prune's objective for this layer: every expert's output on a strided sample of at most `O_PRUNE_TOKENS`
    calibration tokens, reduced to per-token Gram matrices (S, N, N) in fp64 (shared experts cancel out)."""
    n = ctx.experts.count
    rows = _sample_rows(ctx, O_PRUNE_TOKENS)
    xs = ctx.x[rows]
    s = xs.shape[0]
    dev = xs.device if xs.device.type in ("cpu", "cuda") else torch.device("cpu")  # fp64 needed
    gram = torch.empty(s, n, n, dtype=torch.float64, device=dev)
    hidden = ctx.experts.down.shape[1]
    chunk = max(1, (1 << 25) // max(1, n * hidden))  # bounds the (N, chunk, H) fp64 block at 256 MiB
    for start in range(0, s, chunk):
        y = torch.stack([_output(ctx, xs[start : start + chunk], i) for i in range(n)]).to(dev, torch.float64)
        gram[start : start + chunk] = torch.einsum("ish,jsh->sij", y, y)
    return subset_search.problem_from_gram(gram, ctx.stats.router_logits[rows], ctx.routing, ctx.keep)


def o_prune(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """O-prune (Lu et al. 2024): the K-subset whose re-routed output best reconstructs the routed layer output.

    On a strided sample of at most `O_PRUNE_TOKENS` calibration tokens, a subset is routed as the pruned model
    routes: softmax over the kept experts' original logits, top-min(k, K), renormalized when the model
    renormalizes; its loss is the squared Frobenius distance to the original routed output (shared experts cancel).
    Every subset is scored when C(N, K) <= `O_PRUNE_EXHAUSTIVE` (ties to the lexicographically first); otherwise
    `subset_search.search` looks for it: greedy elimination from all N experts, then swap descent (1-for-1
    exchanges of a kept and a removed expert, all of them scored at once, until none improves) from the greedy
    subset and, our addition, from the F-prune and S-prune subsets, keeping the best, so never worse than those
    two on the objective. The search scores subsets exactly but is local (no optimality guarantee); it reached
    the exhaustive optimum on every demo-model layer tested (tests/test_subset_search.py). No seed is involved.

    Cost: the loss is a quadratic form in the sparse gate vector, ||sum_a w_a Y_a - y||^2
    = sum_ab w_a w_b M_ab - 2 sum_a w_a <Y_a, y> + ||y||^2 per token, with M the per-token Gram matrix of the
    experts' outputs, computed once (`o_prune_problem`); no subset needs an expert run after that.
    """
    return prune_plan(ctx, *o_prune_subset(ctx))


def o_prune_subset(ctx: LayerContext) -> tuple[list[int], dict]:
    """O-prune's K experts and how they were found (the plan's `extra`), without the plan: the methods that merge
    into these survivors need only their ids, not a copy of K experts."""
    n, k_keep = ctx.experts.count, ctx.keep
    prob = o_prune_problem(ctx)
    exhaustive = math.comb(n, k_keep) <= O_PRUNE_EXHAUSTIVE
    if exhaustive:
        kept, loss, scored = subset_search.exhaustive(prob)
        info: dict = {"search": "exhaustive", "subsets": scored}
    else:
        starts = [top_ids(ctx.stats.counts, k_keep), top_ids(ctx.stats.prob_mass, k_keep)]
        # The closed-form search holds for plain softmax routing only; other routers are scored in full.
        res = (subset_search.search(prob, starts) if prob.routing.plain_softmax
               else subset_search.greedy(prob, starts))
        kept = res.kept
        # Reported as the exhaustive path scores it (fp32 softmax, like the pruned model), so figures compare.
        loss = float(subset_search.subset_losses(prob, torch.tensor([kept]))[0])
        info = {"search": "greedy+swaps" if prob.routing.plain_softmax else "greedy", "subsets": res.evaluated,
                "swaps": res.swaps}
    rel = math.sqrt(max(loss, 0.0) / prob.ref) if prob.ref > 0 else 0.0
    log.debug("o-prune layer %d: kept %s (%s, rel. error %.4f)", ctx.layer, kept, info["search"], rel)
    extra = {"o_prune": {**info, "exhaustive": exhaustive, "tokens": prob.logits.shape[0], "rel_error": round(rel, 6)}}
    return kept, extra


# --------------------------------------------------------------------------------------------------- merging


def m_smoe(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """MC-SMoE's merge step (Li et al. 2023, arXiv 2310.01334), without its neuron-permutation alignment.

    The K most frequently routed experts are group centres (ties to the lower id). Every other expert joins the
    centre whose router-logit profile (its column of router logits over all calibration tokens) has the largest
    cosine similarity (ties to the lower centre id). Each group is merged by frequency-weighted averaging; MC-SMoE
    keeps N router rows pointing at the merged expert, which a stock checkpoint cannot, so the K router rows follow
    `opts.router`. MC-SMoE aligns neurons by weight permutation before averaging; we do not (fix-dom is the
    project's aligned merge), so this is the grouping rule with plain frequency merging. Groups are ordered by
    their smallest member; `extra["centres"]` names each group's centre.
    """
    centres = top_ids(ctx.stats.counts, ctx.keep)
    prof = ctx.routing.biased(ctx.stats.router_logits).T  # (N, T), with the router's own bias when it has one
    prof = prof / prof.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = (prof @ prof[centres].T).cpu()  # (N, K), centres in ascending id order
    members: dict[int, list[int]] = {c: [c] for c in centres}
    for j in range(ctx.experts.count):
        if j not in members:
            members[centres[int(torch.argmax(sim[j]))]].append(j)
    groups = sorted((sorted(g) for g in members.values()), key=lambda g: g[0])
    by_group = [next(c for c in centres if c in g) for g in groups]
    return _merge(ctx, groups, opts, {"centres": by_group})


def linear_cka(ctx: LayerContext, tokens: int = DIVERSIFY_TOKENS) -> torch.Tensor:
    """(N, N) linear CKA of the experts' outputs on a token sample (all tokens, not only routed ones).

    CKA(i, j) = <K_i, K_j>_F / (||K_i||_F ||K_j||_F) with K_i = Yc_i Yc_i^T the token Gram matrix of expert i's
    outputs centred over tokens (equal to ||Yc_i^T Yc_j||_F^2 / (||Yc_i^T Yc_i||_F ||Yc_j^T Yc_j||_F)). An
    expert whose output is constant over the sample has no CKA: it gets similarity 0 to every other expert.
    """
    xs = ctx.x[_sample_rows(ctx, tokens)]
    grams = []
    for i in range(ctx.experts.count):
        y = _output(ctx, xs, i)
        y = y - y.mean(0)
        grams.append((y @ y.T).flatten())
    g = torch.stack(grams)  # (N, S*S)
    inner = (g @ g.T).double()
    norm = inner.diagonal().sqrt()
    cka = inner / (norm[:, None] * norm[None, :]).clamp(min=1e-300)
    cka = torch.where((norm[:, None] > 0) & (norm[None, :] > 0), cka, torch.zeros_like(cka))
    cka.fill_diagonal_(1.0)
    return cka.clamp(0.0, 1.0).cpu()


def diversify(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """Grouping by output similarity (Zhang et al. 2024, arXiv 2407.09590), then merging each group.

    Choices where the paper leaves room: similarity is linear CKA of each expert's outputs on a strided sample of
    at most `DIVERSIFY_TOKENS` calibration tokens, every expert run on every sampled token (the behaviour on the
    data, not only on its routed tokens); grouping is average-linkage (UPGMA) agglomerative clustering on the
    distance 1 - CKA, cut to exactly K groups with SciPy's `cut_tree`; each group's experts are merged by
    frequency-weighted averaging and its router rows combined per `opts.router` (the paper merges the routers
    along with the experts). Groups are ordered by their smallest member.
    """
    n, k = ctx.experts.count, ctx.keep
    if k == n:
        return _merge(ctx, [[i] for i in range(n)], opts)
    if k == 1:
        return _merge(ctx, [list(range(n))], opts)
    dist = (1.0 - linear_cka(ctx)).numpy()
    dist = (dist + dist.T) / 2  # exact symmetry for squareform
    np.fill_diagonal(dist, 0.0)
    labels = cut_tree(linkage(squareform(dist, checks=False), method="average"), n_clusters=k).ravel()
    return _merge(ctx, labels_to_groups(labels), opts)


def random_groups(n: int, k: int, seed: int, layer: int) -> list[list[int]]:
    """A random partition of 0..n-1 into k non-empty groups, determined by (seed, layer)."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    rng = np.random.default_rng([seed, layer])
    labels = np.empty(n, dtype=np.int64)
    order = rng.permutation(n)
    labels[order[:k]] = np.arange(k)  # one expert per group first, so none is empty
    labels[order[k:]] = rng.integers(0, k, size=n - k)
    return labels_to_groups(labels)


def random_merge(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """Random clustering into K non-empty groups (seeded by opts.seed and the layer), frequency merging: a floor."""
    return _merge(ctx, random_groups(ctx.experts.count, ctx.keep, opts.seed, ctx.layer), opts)


METHODS: dict[str, Callable[[LayerContext, MethodOptions], LayerPlan]] = {
    "f-prune": f_prune,
    "s-prune": s_prune,
    "o-prune": o_prune,
    "reap": reap,
    "m-smoe": m_smoe,
    "diversify": diversify,
    "random": random_merge,
}

DESCRIPTIONS: dict[str, str] = {
    "f-prune": "F-prune: the experts routed most often on calibration text are kept unchanged, the rest removed",
    "s-prune": "S-prune: the experts with the largest summed router probability on calibration text are kept "
    "unchanged, the rest removed",
    "o-prune": "O-prune (Lu et al. 2024): the subset of experts whose re-routed output best reconstructs the "
    "layer's output on calibration tokens is kept unchanged",
    "reap": "REAP (Cerebras 2025): the experts with the largest router-weighted activation norm on the tokens "
    "routed to them are kept unchanged",
    "m-smoe": "M-SMoE (MC-SMoE's merging): the most-used experts are centres, every other expert joins the centre "
    "with the most similar router logits, each group merged by frequency-weighted averaging",
    "diversify": "Expert diversification (Zhang et al. 2024): experts grouped by the CKA similarity of their "
    "outputs (average linkage), each group merged by frequency-weighted averaging",
    "random": "Random groups of experts, each merged by frequency-weighted averaging (a floor for comparison)",
}
