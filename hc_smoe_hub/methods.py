"""Expert-reduction methods: each turns one layer's calibration context into a plan of K experts.

A method is a function `(LayerContext, MethodOptions) -> LayerPlan` registered in `METHODS`; the streaming engine
calls it once per MoE layer and writes whatever plan it returns, so every method shares the same calibration,
streaming and output format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from hc_smoe_hub.baselines import DESCRIPTIONS as BASELINE_DESCRIPTIONS
from hc_smoe_hub.baselines import METHODS as BASELINE_METHODS
from hc_smoe_hub.baselines import o_prune_subset
from hc_smoe_hub.clustering import hierarchical_groups
from hc_smoe_hub.fastpath import product_dtype
from hc_smoe_hub.layer_plan import LayerContext, LayerPlan, MethodOptions, merge_groups
from hc_smoe_hub.routing import moe_output, route

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "LayerContext", "LayerPlan", "MethodOptions", "merge_groups"]


def hc_smoe(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """HC-SMoE (arXiv 2410.08589): hierarchical clustering of mean expert outputs, then merging each cluster."""
    groups = hierarchical_groups(ctx.stats.features, ctx.keep, opts.linkage, opts.metric)
    return merge_groups(ctx, groups, opts)


def anchored_groups(features: torch.Tensor, anchors: list[int]) -> list[list[int]]:
    """Every expert that is not an anchor joins the anchor whose mean output is nearest (euclidean, as HC-SMoE
    measures experts). Ties go to the lower anchor id."""
    anchors = sorted(anchors)
    groups = {a: [a] for a in anchors}
    f = features.float()
    for i in (i for i in range(features.shape[0]) if i not in groups):
        dist = (f[anchors] - f[i]).norm(dim=-1)
        groups[anchors[int(torch.argmin(dist))]].append(i)
    return [sorted(groups[a]) for a in anchors]


def anchored(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """Anchored merging: the most-used experts survive as anchors and absorb the others.

    Where HC-SMoE's clustering may merge two important experts together (and pruning discards what the removed
    experts knew), here the K experts with the largest summed router probability each anchor one group, every
    other expert joins the anchor with the nearest mean output, and each group is merged per `--merge`
    (default: frequency-weighted, then the down projection re-fitted by least squares so that the anchor also
    reproduces what its absorbed experts computed) with router rows per `--router`.
    """
    mass = ctx.stats.prob_mass
    anchors = sorted(range(len(mass)), key=lambda i: (-float(mass[i]), i))[: ctx.keep]
    return merge_groups(ctx, anchored_groups(ctx.stats.features, anchors), opts)


def anchored_o(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """Anchored merging with O-prune's anchors: the K-subset whose re-routed output best reconstructs the
    layer's output survives and absorbs the other experts (see `anchored`)."""
    return merge_groups(ctx, anchored_groups(ctx.stats.features, o_prune_survivors(ctx, opts)), opts)


def o_prune_survivors(ctx: LayerContext, opts: MethodOptions) -> list[int]:
    """The K experts O-prune keeps."""
    return sorted(o_prune_subset(ctx)[0])


def plan_error(ctx: LayerContext, plan: LayerPlan) -> float:
    """Relative error of the plan's routed block output against the original's, on the sampled tokens."""
    rows, ref = ctx.stats.sample_rows, ctx.stats.sampled_output
    if rows is None or ref is None:
        raise ValueError("the statistics were collected without a token sample")
    xs = ctx.x[rows]
    fast = product_dtype(plan.experts.gate.dtype, xs)  # as the statistics pass computed the reference
    out = moe_output(xs, plan.experts, plan.router, plan.routing(ctx.routing), ctx.act,
                     None if fast == xs.dtype else fast)
    return float((out - ref).norm() / ref.norm().clamp(min=1e-12))


def takeover_groups(ctx: LayerContext, anchors: list[int]) -> list[list[int]]:
    """Every expert that is not an anchor joins the anchor that takes over its tokens in the pruned model: the
    anchor a maximizing sum over tokens of (original gate weight of i) x (reduced routing weight of a), with the
    reduced routing computed as the pruned model routes (its routing over the anchors' logits and bias entries,
    top-min(k, K))."""
    anchors = sorted(anchors)
    logits = ctx.stats.router_logits
    w, idx = route(logits, ctx.routing)
    gate_w = torch.zeros_like(logits).scatter_(1, idx, w)
    wa, ia = route(logits[:, anchors], ctx.routing.columns(anchors))
    new_w = torch.zeros(logits.shape[0], len(anchors), device=logits.device).scatter_(1, ia, wa)
    groups = {a: [a] for a in anchors}
    for i in (i for i in range(logits.shape[1]) if i not in groups):
        score = gate_w[:, i] @ new_w
        groups[anchors[int(torch.argmax(score))]].append(i)
    return [sorted(groups[a]) for a in anchors]


def takeover(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """Takeover merging (the default): O-prune's K-subset survives, and every other expert is merged into the
    survivor that takes over its tokens once it is removed (`takeover_groups`).

    Where `anchored-o` joins each removed expert to the survivor with the nearest mean output, here it joins the
    one the reduced router will actually send its tokens to, so the least-squares refits of `--merge fix-dom-lsq`
    and `fix-dom-rr` teach each survivor what the experts it replaces computed on the very tokens it will receive.
    With `fix-dom-rr` it measured best on both demo models and ahead of every pruning baseline at 75% and 50% of
    the experts (benchmarks/RESULTS.md).
    """
    return merge_groups(ctx, takeover_groups(ctx, o_prune_survivors(ctx, opts)), opts)


def best_grouping(ctx: LayerContext, opts: MethodOptions) -> LayerPlan:
    """Per layer, the better of HC-SMoE's clusters and O-prune anchors, both merged per `--merge`.

    Each candidate is judged by the relative error of the layer's routed output on the calibration sample, after its
    merge (so both are compared as they would be written).
    """
    ctx = dataclasses.replace(ctx, experts_expendable=False)  # both candidates merge from the source experts
    candidates = {name: METHODS[name](ctx, opts) for name in ("hc-smoe", "anchored-o")}
    errors = {name: plan_error(ctx, plan) for name, plan in candidates.items()}
    chosen = min(errors, key=lambda name: (errors[name], name))
    plan = candidates[chosen]
    plan.extra = {**plan.extra, "grouping": chosen, "grouping_errors": {k: round(v, 6) for k, v in errors.items()}}
    return plan


METHODS: dict[str, Callable[[LayerContext, MethodOptions], LayerPlan]] = {
    **BASELINE_METHODS,
    "hc-smoe": hc_smoe,
    "anchored": anchored,
    "anchored-o": anchored_o,
    "best-grouping": best_grouping,
    "takeover": takeover,
}

METHOD_DESCRIPTIONS: dict[str, str] = {
    **BASELINE_DESCRIPTIONS,
    "hc-smoe": "HC-SMoE: hierarchical clustering of the experts' mean outputs on calibration text, each cluster "
    "merged into one expert",
    "anchored": "anchored merging (hc-smoe-hub): the experts with the largest router probability mass anchor the "
    "groups, every other expert joins the anchor with the nearest mean output, each group merged into its anchor",
    "anchored-o": "anchored merging (hc-smoe-hub): the K experts whose re-routed output best reconstructs the layer's "
    "(O-prune's subset) anchor the groups, every other expert joins the anchor with the nearest mean output",
    "takeover": "takeover merging (hc-smoe-hub): the K experts whose re-routed output best reconstructs the layer's "
    "(O-prune's subset) survive, and every other expert is merged into the survivor that takes over its tokens in "
    "the reduced model",
    "best-grouping": "per layer, the better (lower routed-output error on calibration tokens after merging) of "
    "HC-SMoE's clusters and anchored-o's groups",
}
