"""Pure tensor functions for one MoE block: routing, one expert's output, the routed block output.

They mirror transformers 5's routers (softmax, sigmoid or top-k-then-softmax scores in fp32, a router bias added to
the logits, a selection-only bias, grouped top-k, optional renormalization, a scaling factor) and experts (gated
activations from `activations.py`, optional per-expert biases) so that the statistics and the candidate scoring see
exactly what the loaded model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from hc_smoe_hub.activations import gated
from hc_smoe_hub.fastpath import hidden_fp32, project_fp32

Activation = Callable[[torch.Tensor], torch.Tensor]
Bias = torch.Tensor | None


@dataclass
class Experts:
    """The routed experts of one layer, one row per expert: gate/up (N, I, H), down (N, H, I).

    Optional per-expert biases (gpt-oss): gate/up (N, I), down (N, H); all three or none. Without them every
    computation is the bias-free one, operation for operation.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: Bias = None
    up_bias: Bias = None
    down_bias: Bias = None

    @property
    def count(self) -> int:
        return self.gate.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.down_bias is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) and, with biases, (gate_bias, up_bias, down_bias): what a merge reduces row by row."""
        mats = (self.gate, self.up, self.down)
        return mats if self.down_bias is None else (*mats, self.gate_bias, self.up_bias, self.down_bias)

    @staticmethod
    def of(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Experts:
        """The inverse of `tensors()`: three matrices, or three matrices and three biases."""
        return Experts(*tensors)

    def select(self, ids: list[int]) -> Experts:
        idx = torch.tensor(ids, device=self.gate.device)
        return Experts.of([t[idx] for t in self.tensors()])

    def to(self, **kwargs) -> Experts:
        return Experts.of([t.to(**kwargs) for t in self.tensors()])

    def in_bias(self, i: int) -> tuple[Bias, Bias]:
        """(gate bias, up bias) of expert i, or (None, None)."""
        if self.gate_bias is None or self.up_bias is None:
            return None, None
        return self.gate_bias[i], self.up_bias[i]

    def out_bias(self, i: int) -> Bias:
        return None if self.down_bias is None else self.down_bias[i]


@dataclass(frozen=True)
class Routing:
    """How one MoE block turns router logits into (weights, chosen experts), as its transformers module does.

    `scoring` "softmax" or "sigmoid" scores (fp32), or "topk-softmax" (below); `logit_bias` (N,), when set, is the
    router's own bias, added to the logits before anything else (gpt-oss's `router.bias`, reduced with the router
    rows); `bias` (N,), when set, is added to the scores for the choice
    only (DeepSeek-V3's `e_score_correction_bias`), the weights stay the unbiased scores; `grouping` "top2-sum" or
    "max" restricts the choice to the `topk_group` best of `n_group` equal groups of consecutive experts, a group
    scored by the sum of its two best (biased) scores or by its best one; the chosen weights are renormalized to sum
    to one when `renormalize` (denominator + `renorm_eps`), then multiplied by `scale` (`routed_scaling_factor`).
    The defaults are Mixtral / Qwen-MoE / OLMoE routing: softmax, top-k, optional renormalization.
    `scoring` "topk-softmax" (Granite MoE; gpt-oss) chooses the top-k on the fp32 logits (plus `bias`, for the
    choice only) and takes the softmax over the k chosen logits: normalized by construction, so it is the softmax
    top-k with renormalization in exact arithmetic (`scores` is the full softmax, and rows set `renormalize`),
    but computed as the module computes it.
    `scoring` "sparsemixer" is Phi-3.5-MoE's inference routing (`_sparsemixer`, two experts whatever `top_k`, with
    the margin `jitter_eps`); its `scores` are the softmax, the probabilities statistics and router fits use.
    """

    top_k: int
    renormalize: bool
    scoring: str = "softmax"
    bias: torch.Tensor | None = None
    grouping: str = "none"
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    renorm_eps: float = 0.0
    logit_bias: torch.Tensor | None = None
    jitter_eps: float = 0.0

    @property
    def plain_softmax(self) -> bool:
        """Softmax, top-k, optional renormalization and nothing else (the closed forms of subset_search hold)."""
        softmax = self.scoring == "softmax" or (self.scoring == "topk-softmax" and self.renormalize)
        return (softmax and self.bias is None and self.grouping == "none" and self.scale == 1.0
                and self.logit_bias is None)

    def biased(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits in fp32 with the router's own bias added, when it has one."""
        logits = logits.float()
        return logits if self.logit_bias is None else logits + self.logit_bias.to(logits.device, torch.float32)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The router's scores in fp32: the probabilities a group of experts' share is measured in."""
        logits = self.biased(logits)
        return torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)

    def reduced(self, keep: int, bias: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None) -> Routing:
        """The routing of a reduced model with `keep` router rows (and their reduced biases): top-min(k, K)."""
        if (self.bias is None) != (bias is None):
            raise ValueError("a routing with a selection bias needs the reduced bias, and only then")
        if (self.logit_bias is None) != (logit_bias is None):
            raise ValueError("a routing with a router bias needs the reduced router bias, and only then")
        return replace(self, top_k=min(self.top_k, keep), bias=bias, logit_bias=logit_bias)

    def columns(self, ids: torch.Tensor | list[int]) -> Routing:
        """The routing over a subset of the original experts (their logits' columns, in the given order), as the
        model that keeps only them routes: their own bias entries, top-min(k, K). `ids` may be (B, K)."""
        ids_t = torch.as_tensor(ids)
        bias = None if self.bias is None else self.bias[ids_t.to(self.bias.device)]
        lb = None if self.logit_bias is None else self.logit_bias[ids_t.to(self.logit_bias.device)]
        return replace(self, top_k=min(self.top_k, ids_t.shape[-1]), bias=bias, logit_bias=lb)


def route(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices), each (..., top_k), as the transformers routers compute them (any leading dims)."""
    if routing.scoring == "sparsemixer":
        return _sparsemixer(logits.float(), routing.jitter_eps)
    scores = routing.scores(logits)
    choice = scores if routing.bias is None else scores + routing.bias.to(scores.device, torch.float32)
    n = logits.shape[-1]
    if routing.grouping != "none" and routing.n_group > 1:
        groups = choice.unflatten(-1, (routing.n_group, n // routing.n_group))
        if routing.grouping == "top2-sum":
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = groups.max(dim=-1).values
        chosen = torch.topk(group_scores, routing.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, chosen, True)
        mask = mask.unsqueeze(-1).expand_as(groups).flatten(-2)
        # DeepSeek-V3 / GLM mask the biased scores with -inf, DeepSeek-V2 its scores with 0.
        choice = choice.masked_fill(~mask, float("-inf") if routing.grouping == "top2-sum" else 0.0)
    k = min(routing.top_k, n)
    if routing.scoring == "topk-softmax":
        logits32 = routing.biased(logits)  # with the router's own bias (gpt-oss), when it has one
        indices = torch.topk(logits32 if routing.bias is None else choice_logits(logits32, routing), k, dim=-1).indices
        weights = torch.softmax(logits32.gather(-1, indices), dim=-1)  # already sums to one: no renormalization
        return (weights * routing.scale if routing.scale != 1.0 else weights), indices
    if routing.bias is None and routing.grouping == "none":
        weights, indices = torch.topk(scores, k, dim=-1)
    else:
        indices = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(-1, indices)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + routing.renorm_eps)
    if routing.scale != 1.0:
        weights = weights * routing.scale
    return weights, indices


def choice_logits(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """fp32 logits plus the selection-only bias: what a "topk-softmax" router chooses its top-k on."""
    return logits.float() + routing.bias.to(logits.device, torch.float32)


def _sparsemixer(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `phimoe.sparsemixer` at inference (any leading dims): the best expert, weighted by the softmax
    over the logits within a relative margin 2 * eps of its own (the rest masked out), then the second best (the
    first masked out) weighted the same way, its margin measured from its own logit."""
    top1_val, top1 = scores.max(dim=-1, keepdim=True)
    far = (top1_val - scores) / scores.abs().clamp(min=top1_val) > 2 * eps
    w1 = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, top1)
    rest = scores.scatter(-1, top1, float("-inf"))
    top2_val, top2 = rest.max(dim=-1, keepdim=True)
    far = (top2_val - scores) / scores.abs().clamp(min=top2_val) > 2 * eps
    w2 = torch.softmax(rest.masked_fill(far, float("-inf")), dim=-1).gather(-1, top2)
    return torch.cat((w1, w2), dim=-1), torch.cat((top1, top2), dim=-1)


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None, gate_bias: Bias = None,
                  up_bias: Bias = None) -> torch.Tensor:
    """Intermediate activations act(x W_gate^T + b_gate) * (x W_up^T + b_up) of one expert: (T, I) (the gated
    activation `activations.gated`, e.g. gpt-oss's clamped one).

    `out`, two (T, I) buffers, receives the products: the statistics pass reuses them for every expert, because a
    fresh (T, I) buffer per call is a fresh mmap (the engine keeps freed memory returned to the OS), whose page
    faults are paid again on every call.
    """
    if out is None:
        if gate_bias is None or up_bias is None:
            return gated(act, x @ gate.T, x @ up.T)
        return gated(act, x @ gate.T + gate_bias.to(x.dtype), x @ up.T + up_bias.to(x.dtype))
    g, u = out[0][: x.shape[0]], out[1][: x.shape[0]]
    torch.mm(x, gate.T, out=g)
    torch.mm(x, up.T, out=u)
    if gate_bias is not None and up_bias is not None:
        g.add_(gate_bias.to(x.dtype))
        u.add_(up_bias.to(x.dtype))
    if act is torch.nn.functional.silu:
        return torch.nn.functional.silu(g, inplace=True).mul_(u)
    return g.copy_(gated(act, g, u))


def expert_weights(experts: Experts, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of expert i in `dtype`: the layer stays in its source dtype and only the expert at work is
    converted, so a layer's fp32 working set is one expert, not N."""
    return experts.gate[i].to(dtype), experts.up[i].to(dtype), experts.down[i].to(dtype)


def expert_output(x: torch.Tensor, experts: Experts, i: int, act: Activation) -> torch.Tensor:
    """E_i(x), computed in x's dtype."""
    gate, up, down = expert_weights(experts, i, x.dtype)
    y = expert_hidden(x, gate, up, act, None, *experts.in_bias(i)) @ down.T
    bias = experts.out_bias(i)
    return y if bias is None else y + bias.to(x.dtype)


def moe_output(
    x: torch.Tensor, experts: Experts, router: torch.Tensor, routing: Routing, act: Activation,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The routed part of the MoE block (shared experts excluded): sum over top-k of weight * E_i(x), fp32.

    Computed in x's dtype, one expert at a time, whatever the experts' dtype; with `dtype` (bf16, the fast path of
    a bf16 source, `fastpath.py`) the expert products are computed in it and everything else in fp32."""
    weights, indices = route(x @ router.T.to(x.dtype), routing)
    out = torch.zeros(x.shape[0], experts.down.shape[1], dtype=torch.float32, device=x.device)
    for e in indices.unique().tolist():
        tok, slot = torch.where(indices == e)
        if dtype is None:
            y = expert_output(x[tok], experts, e, act).float()
        else:
            h = hidden_fp32(x[tok], experts.gate[e], experts.up[e], act, dtype, *experts.in_bias(e))
            y = project_fp32(h, experts.down[e], dtype, experts.out_bias(e))
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out
