"""Expert-reduction methods: each turns one layer's calibration context into a plan of K experts.

A method is a function `(LayerContext, MethodOptions) -> LayerPlan` registered in `METHODS`; the streaming engine
calls it once per MoE layer and writes whatever plan it returns, so every method shares the same calibration,
streaming and output format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from hc_smoe_hub.clustering import hierarchical_groups
from hc_smoe_hub.fastpath import group_fit_tokens, joint_fit_tokens
from hc_smoe_hub.merging import dominant_merge, fix_dom_merge, reduce_router, router_bias, weighted_merge
from hc_smoe_hub.refit import fix_dom_refit, refit_down, refit_down_rerouted
from hc_smoe_hub.routing import Activation, Experts, Routing, moe_output, route
from hc_smoe_hub.stats import LayerStats


@dataclass(frozen=True)
class MethodOptions:
    method: str = "takeover"
    linkage: str = "average"
    metric: str = "euclidean"
    # The defaults are the configuration that measured best on the demo models (benchmarks/RESULTS.md);
    # the paper's own configuration is method="hc-smoe", merge="freq", one-shot (`hc-smoe-push --paper`).
    merge: str = "fix-dom-rr"
    router: str = "fit"
    paper_frequency: bool = False  # count frequencies over top-2 as the official code does (reproduction only)
    seed: int = 42

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerContext:
    """What a method may look at for one MoE layer."""

    layer: int
    keep: int
    x: torch.Tensor  # (T, H) the MoE block's input on the calibration tokens (compute dtype)
    experts: Experts  # source dtype
    router: torch.Tensor  # (N, H) source dtype
    routing: Routing
    act: Activation
    stats: LayerStats
    _top_k_indices: torch.Tensor | None = field(default=None, repr=False)

    def routed_tokens(self, group: list[int], limit: int = 16384) -> torch.Tensor:
        """Calibration tokens whose top-k includes a member of the group (all tokens if none are), a strided
        sample of at most `limit` of them."""
        if self._top_k_indices is None:  # one routing pass serves every group
            self._top_k_indices = route(self.stats.router_logits, self.routing)[1]
        idx = self._top_k_indices
        mask = torch.isin(idx, torch.tensor(group, device=idx.device)).any(-1)
        xs = self.x[mask] if bool(mask.any()) else self.x
        return xs[:: max(1, -(-xs.shape[0] // limit))]


@dataclass
class LayerPlan:
    groups: list[list[int]]  # original expert ids behind each new expert, in new-expert order
    experts: Experts
    router: torch.Tensor
    extra: dict = field(default_factory=dict)
    # (K,) the reduced per-expert selection bias, for families whose router has one (reduced like the rows).
    bias: torch.Tensor | None = None
    # (K,) the reduced router bias added to the logits (gpt-oss's router.bias), reduced with the rows.
    logit_bias: torch.Tensor | None = None

    def routing(self, source: Routing) -> Routing:
        """The routing of the reduced layer this plan writes."""
        return source.reduced(self.experts.count, self.bias, self.logit_bias)


def merge_groups(ctx: LayerContext, groups: list[list[int]], opts: MethodOptions) -> LayerPlan:
    """Merge each group into one expert and patch the router, as `opts.merge` and `opts.router` say."""
    freqs = ctx.stats.frequencies
    token_sets: list[torch.Tensor] = []
    inter = ctx.experts.gate.shape[1]  # the token caps per fit grow with it (fastpath.py says why)

    def group_tokens() -> list[torch.Tensor]:  # gathered once, shared by the alignment and the refit
        if not token_sets:
            token_sets.extend(ctx.routed_tokens(g, group_fit_tokens(inter)) for g in groups)
        return token_sets

    base_mode, refit, rerouted = opts.merge, False, False
    if opts.merge.endswith("-lsq"):
        base_mode, refit = opts.merge[: -len("-lsq")], True
    elif opts.merge.endswith("-rr"):  # the group refit first, then the joint re-routed one from there
        base_mode, refit, rerouted = opts.merge[: -len("-rr")], True, True
    if base_mode == "freq":
        experts = weighted_merge(ctx.experts, groups, freqs)
    elif base_mode == "average":
        experts = weighted_merge(ctx.experts, groups, None)
    elif base_mode == "dominant":
        experts = dominant_merge(ctx.experts, groups, freqs)
    elif base_mode == "fix-dom" and refit:  # one pass over the members' activations serves both steps
        experts = fix_dom_refit(ctx.experts, groups, ctx.stats.features, group_tokens(), ctx.router, ctx.act,
                                routing=ctx.routing)
        refit = False
    elif base_mode == "fix-dom":
        experts = fix_dom_merge(ctx.experts, groups, ctx.stats.features, group_tokens(), ctx.act)
    else:
        raise ValueError(f"unknown merge mode {opts.merge}")
    if refit:
        experts = refit_down(ctx.experts, experts, groups, group_tokens(), ctx.router, ctx.act,
                             routing=ctx.routing)
    router, logit_bias = reduce_router(ctx.router, groups, opts.router, freqs, ctx.x, routing=ctx.routing)
    bias = router_bias(ctx.routing.bias, groups, opts.router, freqs)
    if rerouted and any(len(g) > 1 for g in groups):  # K = N keeps the layer bit-identical
        # Rows sampled so that each of the K merged experts sees about joint_fit_tokens (k of K per row).
        rows = joint_fit_tokens(inter) * len(groups) // min(ctx.routing.top_k, len(groups))
        experts = refit_down_rerouted(ctx.experts, experts, ctx.router, router, ctx.x, ctx.routing, ctx.act,
                                      routed=ctx.stats.routed_output, new_bias=bias, max_tokens=rows,
                                      new_logit_bias=logit_bias)
    return LayerPlan(groups, experts, router, bias=bias, logit_bias=logit_bias)


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
    """The K experts O-prune keeps (baselines imports this module, hence the late import)."""
    from hc_smoe_hub.baselines import o_prune

    return [g[0] for g in o_prune(ctx, opts).groups]


def plan_error(ctx: LayerContext, plan: LayerPlan) -> float:
    """Relative error of the plan's routed block output against the original's, on the sampled tokens."""
    rows, ref = ctx.stats.sample_rows, ctx.stats.sampled_output
    if rows is None or ref is None:
        raise ValueError("the statistics were collected without a token sample")
    xs = ctx.x[rows]
    out = moe_output(xs, plan.experts, plan.router, plan.routing(ctx.routing), ctx.act)
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
    candidates = {name: METHODS[name](ctx, opts) for name in ("hc-smoe", "anchored-o")}
    errors = {name: plan_error(ctx, plan) for name, plan in candidates.items()}
    chosen = min(errors, key=lambda name: (errors[name], name))
    plan = candidates[chosen]
    plan.extra = {**plan.extra, "grouping": chosen, "grouping_errors": {k: round(v, 6) for k, v in errors.items()}}
    return plan


METHODS: dict[str, Callable[[LayerContext, MethodOptions], LayerPlan]] = {
    "hc-smoe": hc_smoe,
    "anchored": anchored,
    "anchored-o": anchored_o,
    "best-grouping": best_grouping,
    "takeover": takeover,
}

METHOD_DESCRIPTIONS: dict[str, str] = {
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

# Baseline methods (f-prune, s-prune, o-prune, reap, m-smoe, diversify, random) register themselves on import.
from hc_smoe_hub import baselines  # noqa: E402, F401
