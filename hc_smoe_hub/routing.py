"""Pure tensor functions for one MoE block: routing, one expert's output, the routed block output.

They mirror transformers 5's fused modules (softmax in fp32, top-k, optional renormalization) so that the
statistics and the candidate scoring see exactly what the loaded model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Experts:
    """The routed experts of one layer, one row per expert: gate/up (N, I, H), down (N, H, I)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def count(self) -> int:
        return self.gate.shape[0]

    def select(self, ids: list[int]) -> Experts:
        idx = torch.tensor(ids, device=self.gate.device)
        return Experts(self.gate[idx], self.up[idx], self.down[idx])

    def to(self, **kwargs) -> Experts:
        return Experts(self.gate.to(**kwargs), self.up.to(**kwargs), self.down.to(**kwargs))


@dataclass(frozen=True)
class Routing:
    top_k: int
    renormalize: bool


def route(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices), each (T, top_k), as the transformers routers compute them."""
    probs = torch.softmax(logits.float(), dim=-1)
    k = min(routing.top_k, logits.shape[-1])
    weights, indices = torch.topk(probs, k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Intermediate activations act(x W_gate^T) * (x W_up^T) of one expert: (T, I).

    `out`, two (T, I) buffers, receives the products: the statistics pass reuses them for every expert, because a
    fresh (T, I) buffer per call is a fresh mmap (the engine keeps freed memory returned to the OS), whose page
    faults are paid again on every call.
    """
    if out is None:
        return act(x @ gate.T).mul_(x @ up.T)
    g, u = out[0][: x.shape[0]], out[1][: x.shape[0]]
    torch.mm(x, gate.T, out=g)
    torch.mm(x, up.T, out=u)
    if act is torch.nn.functional.silu:
        return torch.nn.functional.silu(g, inplace=True).mul_(u)
    return g.copy_(act(g)).mul_(u)


def expert_weights(experts: Experts, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of expert i in `dtype`: the layer stays in its source dtype and only the expert at work is
    converted, so a layer's fp32 working set is one expert, not N."""
    return experts.gate[i].to(dtype), experts.up[i].to(dtype), experts.down[i].to(dtype)


def expert_output(x: torch.Tensor, experts: Experts, i: int, act: Activation) -> torch.Tensor:
    """E_i(x), computed in x's dtype."""
    gate, up, down = expert_weights(experts, i, x.dtype)
    return expert_hidden(x, gate, up, act) @ down.T


def moe_output(
    x: torch.Tensor, experts: Experts, router: torch.Tensor, routing: Routing, act: Activation
) -> torch.Tensor:
    """The routed part of the MoE block (shared experts excluded): sum over top-k of weight * E_i(x), fp32.

    Computed in x's dtype, one expert at a time, whatever the experts' dtype."""
    weights, indices = route(x @ router.T.to(x.dtype), routing)
    out = torch.zeros(x.shape[0], experts.down.shape[1], dtype=torch.float32, device=x.device)
    for e in indices.unique().tolist():
        tok, slot = torch.where(indices == e)
        y = expert_output(x[tok], experts, e, act).float()
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out
