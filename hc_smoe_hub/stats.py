"""Per-layer calibration statistics: every expert's mean output, routing frequencies, router mass, saliency.

Every expert runs on every calibration token once (HC-SMoE's feature is the mean output over ALL tokens, not
only the routed ones); the same pass yields the REAP saliency of the routed tokens, so no second pass is needed.
Sums are accumulated in fp32 whatever the compute dtype.

The expert products run on the fast path of `fastpath.py` (bf16 products for a bf16 source on hardware with fast
bf16 matmuls, the activation function and every sum in fp32), like the refits: that is what the bf16 model computes
when it runs, and this pass is the one full pass of every expert over every calibration token, the largest cost of
a merge. The router logits stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hc_smoe_hub.activations import gated
from hc_smoe_hub.fastpath import product_dtype
from hc_smoe_hub.routing import Activation, Bias, Experts, Routing, expert_hidden, expert_weights, route


@dataclass
class LayerStats:
    features: torch.Tensor  # (N, H) fp32: mean over all tokens of E_i(x)
    counts: torch.Tensor  # (N,) tokens whose top-k (frequency top-k) includes i
    prob_mass: torch.Tensor  # (N,) summed router score (softmax or sigmoid, unbiased) over tokens
    saliency: torch.Tensor  # (N,) REAP: mean over routed tokens of gate weight * ||E_i(x)||
    router_logits: torch.Tensor  # (T, N) fp32, x @ W^T without the router's own bias (`Routing.biased` adds it)
    tokens: int
    routed_output: torch.Tensor  # (T, H) fp32: the original routed block output on every calibration token
    sample_rows: torch.Tensor | None = None  # (S,) the calibration tokens on which merge errors are measured

    @property
    def sampled_output(self) -> torch.Tensor | None:
        """(S, H) the routed block output on the sampled rows: the reference for the merge error."""
        return None if self.sample_rows is None else self.routed_output[self.sample_rows]

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
    sample_rows: torch.Tensor | None = None,
) -> LayerStats:
    """Statistics of one MoE layer on its input hidden states x (T, H), with fp32 sums.

    The experts may be in any dtype (the source's): each is converted to the product dtype only while it runs. The
    products are computed in x's dtype, except for fp32 x and bf16 experts on hardware with fast bf16 matmuls: then
    in bf16, the fast path (module docstring).

    The original routed block output on every token is assembled from the same expert outputs (free, since every
    expert already runs on every token): one-shot calibration carries it to the next layer without running the
    block again, the re-routed refit fits to it, and its rows `sample_rows` are the reference for the merge error.
    """
    n = experts.count
    logits = (x @ router.T.to(x.dtype)).float()  # without the router's own bias: `route` adds it
    weights, indices = route(logits, routing)
    freq_indices = (indices if freq_top_k in (None, routing.top_k)
                    else torch.topk(routing.biased(logits), freq_top_k, -1).indices)
    counts = torch.bincount(freq_indices.flatten(), minlength=n).float()
    prob_mass = routing.scores(logits).sum(0)
    # Gate weight of expert i on each token (0 where not routed), for the saliency.
    gate_w = torch.zeros(logits.shape, dtype=torch.float32, device=x.device).scatter_(1, indices, weights)
    hidden_sum = torch.zeros(n, experts.gate.shape[1], dtype=torch.float32, device=x.device)
    saliency = torch.zeros(n, dtype=torch.float32, device=x.device)
    routed = (gate_w > 0).sum(0).float()
    full = torch.zeros(x.shape[0], experts.down.shape[1], dtype=torch.float32, device=x.device)
    rows_per_chunk = min(chunk, x.shape[0])
    # Products in `dt` (the fast path); fp32 x with fp32 experts, or any other x dtype, computes in x's dtype.
    dt = product_dtype(experts.gate.dtype, x)
    # Reused for every expert: a fresh (T, I) buffer per call is a fresh mmap whose page faults are paid again.
    buffers = tuple(torch.empty(rows_per_chunk, experts.gate.shape[1], dtype=d, device=x.device)
                    for d in ((x.dtype, x.dtype) if dt == x.dtype else (torch.float32, dt)))
    features = torch.empty(n, experts.down.shape[1], dtype=torch.float32, device=x.device)
    for i in range(n):
        gate, up, down = expert_weights(experts, i, dt)  # one expert converted at a time
        out_bias = experts.out_bias(i)
        for s in range(0, x.shape[0], chunk):
            if dt == x.dtype:
                h = expert_hidden(x[s : s + chunk], gate, up, act, buffers, *experts.in_bias(i))
            else:
                h = _fast_hidden(x[s : s + chunk].to(dt), gate, up, act, buffers, *experts.in_bias(i))
            hidden_sum[i] += h.sum(0, dtype=torch.float32)
            # The down projection is linear, so the mean output needs it only once, on the mean activation;
            # per-token outputs are computed only on the tokens routed to the expert.
            w = gate_w[s : s + chunk, i]
            rows = torch.nonzero(w > 0).squeeze(1)
            if rows.numel() == 0:
                continue
            y = (h[rows].to(dt) @ down.T).float()
            if out_bias is not None:
                y += out_bias.float()
            saliency[i] += (w[rows] * y.norm(dim=-1)).sum()
            full.index_add_(0, rows + s, y * w[rows, None])
        features[i] = down.float() @ (hidden_sum[i] / x.shape[0])
        if out_bias is not None:
            features[i] += out_bias.float()
    saliency = torch.where(routed > 0, saliency / routed.clamp(min=1), torch.zeros_like(saliency))
    return LayerStats(features, counts, prob_mass, saliency, logits, x.shape[0], full, sample_rows)


def _fast_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation,
                 buffers: tuple[torch.Tensor, ...], gate_bias: Bias = None, up_bias: Bias = None,
                 rows: int = 1024) -> torch.Tensor:
    """`fastpath.hidden_fp32` into reused buffers: the two products in x's (low) dtype, into buffers[1], the
    activation in fp32, into buffers[0] ((T, I) fp32, returned). One low-precision buffer serves both products;
    the up product is converted to fp32 `rows` rows at a time (an fp32 tensor multiplied in place by a bf16 one
    is several times slower than converting first, and a whole fp32 copy would be one more (T, I) buffer)."""
    t = x.shape[0]
    hid, prod = buffers[0][:t], buffers[1][:t]
    g = hid.copy_(torch.mm(x, gate.T, out=prod))
    u = torch.mm(x, up.T, out=prod)
    if gate_bias is None and act is torch.nn.functional.silu:
        torch.nn.functional.silu(g, inplace=True)
        for s in range(0, t, rows):
            g[s : s + rows].mul_(u[s : s + rows].float())
        return g
    u = u.float()
    if gate_bias is not None and up_bias is not None:
        g, u = g.add_(gate_bias.float()), u.add_(up_bias.float())
    return hid.copy_(gated(act, g, u))
