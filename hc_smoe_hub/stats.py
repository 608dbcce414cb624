"""Per-layer calibration statistics: every expert's mean output, routing frequencies, router mass, saliency.

Every expert runs on every calibration token once (HC-SMoE's feature is the mean output over ALL tokens, not
only the routed ones); the same pass yields the REAP saliency of the routed tokens, so no second pass is needed.
Sums are accumulated in fp32 whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hc_smoe_hub.routing import Activation, Experts, Routing, expert_hidden, route


@dataclass
class LayerStats:
    features: torch.Tensor  # (N, H) fp32: mean over all tokens of E_i(x)
    counts: torch.Tensor  # (N,) tokens whose top-k (frequency top-k) includes i
    prob_mass: torch.Tensor  # (N,) summed router probability over tokens
    saliency: torch.Tensor  # (N,) REAP: mean over routed tokens of gate weight * ||E_i(x)||
    router_logits: torch.Tensor  # (T, N) fp32
    tokens: int

    @property
    def frequencies(self) -> torch.Tensor:
        total = self.counts.sum()
        return self.counts / total if total > 0 else self.counts


def collect(
    x: torch.Tensor,
    experts: Experts,
    router: torch.Tensor,
    routing: Routing,
    act: Activation,
    freq_top_k: int | None = None,
    chunk: int = 8192,
) -> LayerStats:
    """Statistics of one MoE layer on its input hidden states x (T, H), in x's dtype with fp32 sums."""
    n = experts.count
    logits = (x @ router.T.to(x.dtype)).float()
    weights, indices = route(logits, routing)
    freq_indices = indices if freq_top_k in (None, routing.top_k) else torch.topk(logits, freq_top_k, -1).indices
    counts = torch.bincount(freq_indices.flatten(), minlength=n).float()
    prob_mass = torch.softmax(logits, -1).sum(0)
    # Gate weight of expert i on each token (0 where not routed), for the saliency.
    gate_w = torch.zeros(logits.shape, dtype=torch.float32, device=x.device).scatter_(1, indices, weights)
    features = torch.zeros(n, experts.down.shape[1], dtype=torch.float32, device=x.device)
    saliency = torch.zeros(n, dtype=torch.float32, device=x.device)
    routed = (gate_w > 0).sum(0).float()
    for i in range(n):
        for s in range(0, x.shape[0], chunk):
            xs = x[s : s + chunk]
            y = expert_hidden(xs, experts.gate[i], experts.up[i], act) @ experts.down[i].T
            y32 = y.float()
            features[i] += y32.sum(0)
            saliency[i] += (gate_w[s : s + chunk, i] * y32.norm(dim=-1)).sum()
    features /= x.shape[0]
    saliency = torch.where(routed > 0, saliency / routed.clamp(min=1), torch.zeros_like(saliency))
    return LayerStats(features, counts, prob_mass, saliency, logits, x.shape[0])
