"""What a method works on and returns: its options, one layer's context and the plan of K experts, and
`merge_groups`, which every grouping method (HC-SMoE's, the baselines' merges) finishes with.

Kept apart from the method registry (`methods.py`) so that the registry and the literature's baselines
(`baselines.py`) both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from hc_smoe_hub.fastpath import group_fit_tokens, joint_fit_tokens
from hc_smoe_hub.merging import dominant_merge, fix_dom_merge, reduce_router, router_bias, weighted_merge
from hc_smoe_hub.refit import fix_dom_refit, refit_cache_budget, refit_down, refit_down_rerouted
from hc_smoe_hub.routing import Activation, Experts, Routing, route
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
    # The engine sets it: no one reads `experts` after the method, so its final merge may write the merged experts
    # into their rows (`merged_rows.py`) and leave `experts` as shapes only, on the meta device.
    experts_expendable: bool = False
    _top_k_indices: torch.Tensor | None = field(default=None, repr=False)

    def give_up_experts(self) -> Experts:
        """The source experts, for a merge to overwrite; `experts` keeps only their shapes from now on."""
        if not self.experts_expendable:
            raise RuntimeError("the source experts are still needed")
        experts, self.experts_expendable = self.experts, False
        self.experts = Experts.of([torch.empty_like(t, device="meta") for t in experts.tensors()])
        return experts

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
        # Nothing after this merge reads the source experts (the joint refit takes the original's routed output from
        # the statistics), so the merged experts may take their rows: the layer is held once, not 1 + K/N times.
        in_place = ctx.experts_expendable
        experts = fix_dom_refit(ctx.give_up_experts() if in_place else ctx.experts, groups, ctx.stats.features,
                                group_tokens(), ctx.router, ctx.act, routing=ctx.routing, in_place=in_place)
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
                                      new_logit_bias=logit_bias, overwrite_base=True,
                                      cache_bytes=refit_cache_budget(ctx.x.device))
    return LayerPlan(groups, experts, router, bias=bias, logit_bias=logit_bias)
