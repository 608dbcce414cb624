"""Pure functions that turn groups of experts into single experts, and N router rows into K.

All arithmetic is done in fp32 and cast back to the source dtype as each merged expert is finished; the layer stays
in its source dtype and only the member at work is converted. The least-squares refits live in `refit.py`.
"""

from __future__ import annotations

import logging

import torch

from hc_smoe_hub.fastpath import activation_dtype, hidden_fp32, project_fp32
from hc_smoe_hub.routing import Activation, Experts, Routing

log = logging.getLogger(__name__)

MERGE_MODES = ("freq", "average", "fix-dom", "dominant", "freq-lsq", "fix-dom-lsq", "dominant-lsq",
               "fix-dom-rr")
ROUTER_MODES = ("fit", "mean", "dominant")

MERGE_DESCRIPTIONS = {
    "freq": "frequency-weighted average of the members' weights (the paper's default)",
    "average": "plain average of the members' weights",
    "fix-dom": "members' neurons aligned to the dominant member's by activation correlation, then averaged",
    "dominant": "the cluster's most-used member kept unchanged",
    "freq-lsq": "frequency-weighted average, then the down projection re-fitted by least squares to reproduce the "
    "cluster's probability-weighted output on the calibration tokens (hc-smoe-hub's extension)",
    "fix-dom-lsq": "fix-dom alignment, then the down projection re-fitted by least squares (hc-smoe-hub's extension)",
    "dominant-lsq": "the most-used member, its down projection re-fitted by least squares to reproduce the whole "
    "cluster (hc-smoe-hub's extension)",
    "fix-dom-rr": "fix-dom-lsq, then all down projections re-fitted jointly by least squares so that the layer, "
    "routed by its new router rows as the reduced model routes, reproduces the original routed output on the "
    "calibration tokens (hc-smoe-hub's extension)",
}
ROUTER_DESCRIPTIONS = {
    "fit": "one row per cluster fitted on the calibration tokens so that the softmax over the new rows (each row's "
    "sigmoid, for sigmoid routers) matches each cluster's summed member probability (the paper's N-row routing, in "
    "K rows)",
    "mean": "frequency-weighted mean of the members' router rows",
    "dominant": "the most-used member's router row",
}


def _weights(group: list[int], coeffs: torch.Tensor | None) -> torch.Tensor:
    w = torch.ones(len(group)) if coeffs is None else coeffs[group].detach().float().cpu()
    if float(w.sum()) <= 0:
        w = torch.ones(len(group))  # never-routed cluster: plain mean, never a zero expert
    return w / w.sum()


def most_used(group: list[int], coeffs: torch.Tensor) -> int:
    """The member with the largest coefficient; ties go to the lowest id."""
    c = coeffs[group].detach().float().cpu()
    return group[int(torch.argmax(c))]


def weighted_merge(experts: Experts, groups: list[list[int]], coeffs: torch.Tensor | None) -> Experts:
    """W_g = sum_i c_i W_i / sum_i c_i per group (c = frequencies for `freq`, None for `average`).

    Accumulated in fp32 one member matrix at a time, so the layer is never converted whole. The experts' biases,
    when they have them, are merged with the same weights as their matrices.
    """
    mats = experts.tensors()
    out = [torch.empty(len(groups), *m.shape[1:], dtype=m.dtype, device=m.device) for m in mats]
    for k, g in enumerate(groups):
        w = _weights(g, coeffs).tolist()
        for mat, dst in zip(mats, out, strict=True):
            acc = torch.zeros(mat.shape[1:], dtype=torch.float32, device=mat.device)
            for wi, i in zip(w, g, strict=True):
                acc.add_(mat[i].float(), alpha=wi)  # one member's matrix in fp32 at a time
            dst[k] = acc
    return Experts.of(out)


def dominant_merge(experts: Experts, groups: list[list[int]], coeffs: torch.Tensor) -> Experts:
    """Each group is represented by its most-used member, unchanged."""
    return experts.select([most_used(g, coeffs) for g in groups])


def closest_to_centroid(group: list[int], features: torch.Tensor) -> int:
    f = features[group].float()
    return group[int(torch.argmin((f - f.mean(0)).norm(dim=-1)))]


def fix_dom_merge(
    experts: Experts, groups: list[list[int]], features: torch.Tensor, x_per_group: list[torch.Tensor],
    act: Activation,
) -> Experts:
    """Neuron-aligned merging (the paper's fix-dom): align each member's neurons to the dominant expert's.

    The dominant member is the one whose feature is closest to the group mean. Neuron b of member j maps to the
    dominant neuron a with the highest correlation of intermediate activations on the group's tokens; merged
    neuron a is the mean of the dominant neuron and all neurons mapped to it (gate/up rows and down columns
    move together).
    """
    dtype = experts.gate.dtype
    merged = [tuple(m.to(dtype) for m in fix_dom_group(experts, g, closest_to_centroid(g, features), x.float(),
                                                        act)[0])
              for g, x in zip(groups, x_per_group, strict=True)]
    return Experts.of([torch.stack([m[j] for m in merged]) for j in range(len(merged[0]))])


# fix-dom forms its neuron correlations this many bytes of fp32 columns at a time.
_CORR_BLOCK_BYTES = 64 << 20


def chunks(n: int, size: int = 4096) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _scores(logits: torch.Tensor, routing: Routing | None) -> torch.Tensor:
    """The router's scores (softmax unless `routing` says sigmoid), fp32."""
    return torch.softmax(logits.float(), dim=-1) if routing is None else routing.scores(logits)


def group_weights(x: torch.Tensor, router: torch.Tensor, g: list[int],
                  routing: Routing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's share of the group's router probability per token (T, |g|), and the group's mass (T, 1)."""
    probs = _scores(x @ router.float().T, routing)[:, g]
    mass = probs.sum(-1, keepdim=True).clamp(min=1e-12)
    return probs / mass, mass


def fix_dom_group(
    experts: Experts, g: list[int], dom: int, x: torch.Tensor, act: Activation, share: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Fix-dom merge of one group on its tokens x (fp32). With `share` (T, |g|), the same pass also returns the
    group's target for the least-squares refit, sum_j share_j E_j(x) (T, H): every member's activations are then
    computed once for both, and only one member's (T, I) activations are held at a time besides the dominant's.
    The activations' products run in `fastpath.activation_dtype` (bf16 for a bf16 source on fast hardware).

    With biases (gpt-oss), a neuron's gate and up bias entries move with its rows, and the down bias (one entry per
    output, not per neuron) is the members' plain mean, as the merged expert is the members' plain mean.
    Returns (gate, up, down) or, with biases, (gate, up, down, gate_bias, up_bias, down_bias), fp32.
    """
    dt = activation_dtype(experts.gate.dtype, x.device)
    gate, up, down = (m[dom].to(torch.float32, copy=True) for m in (experts.gate, experts.up, experts.down))
    biased = experts.has_bias
    if biased:
        assert experts.gate_bias is not None and experts.up_bias is not None and experts.down_bias is not None
        gate_b, up_b = experts.gate_bias[dom].float().clone(), experts.up_bias[dom].float().clone()
        down_b = torch.stack([experts.down_bias[j].float() for j in g]).mean(0)
    hits = torch.ones(gate.shape[0], device=gate.device)
    target = None
    a_dom = hidden_fp32(x, experts.gate[dom], experts.up[dom], act, dt, *experts.in_bias(dom))
    if share is not None:
        target = project_fp32(a_dom, experts.down[dom], dt, experts.out_bias(dom)) * share[:, g.index(dom), None]
    # Standardized dominant activations: the correlation with member j's neuron b is then a_dom^T h_j[:, b] up to
    # a positive factor of b alone (centring h_j changes nothing, a_dom's columns sum to zero), so the argmax
    # over dominant neurons needs neither member statistics nor a second pass.
    a_dom = _standardize(a_dom).to(dt)
    token_chunks = chunks(x.shape[0])
    # The (I, I) correlations are formed a block of j's neurons at a time (an (I, I) product and its fp32 copy are
    # 1.2 GiB at Mixtral-8x7B); with one chunk of tokens each block's argmax is final and no (I, I) matrix is kept.
    columns = chunks(experts.gate.shape[1], max(1, _CORR_BLOCK_BYTES // (4 * gate.shape[0])))
    for j in (j for j in g if j != dom):
        mapped = torch.empty(experts.gate.shape[1], dtype=torch.long, device=x.device)  # j's neuron -> dominant's
        corr = torch.zeros(gate.shape[0], experts.gate.shape[1], device=x.device) if len(token_chunks) > 1 else None
        for c in token_chunks:
            h = hidden_fp32(x[c], experts.gate[j], experts.up[j], act, dt, *experts.in_bias(j))
            h_dt = h.to(dt)
            for cols in columns:
                block = a_dom[c].T @ h_dt[:, cols]  # only the argmax over dominant neurons is used
                if corr is None:
                    mapped[cols] = block.argmax(dim=0)
                else:
                    corr[:, cols] += block.float()
                del block
            del h_dt
            if target is not None:
                target[c] += project_fp32(h, experts.down[j], dt, experts.out_bias(j)) * share[c, g.index(j), None]
        if corr is not None:
            mapped = corr.argmax(dim=0)
            del corr
        # One member matrix in fp32 at a time (0.2 GiB at Mixtral-8x7B's shape, where the three are 0.7 GiB).
        gate.index_add_(0, mapped, experts.gate[j].float())
        up.index_add_(0, mapped, experts.up[j].float())
        down.index_add_(1, mapped, experts.down[j].float())
        hits.index_add_(0, mapped, torch.ones_like(mapped, dtype=hits.dtype))
        if biased:
            gate_b.index_add_(0, mapped, experts.gate_bias[j].float())  # type: ignore[index]
            up_b.index_add_(0, mapped, experts.up_bias[j].float())  # type: ignore[index]
    mats = (gate.div_(hits[:, None]), up.div_(hits[:, None]), down.div_(hits[None, :]))  # in place: 0.7 GiB fp32
    if biased:
        return (*mats, gate_b / hits, up_b / hits, down_b), target
    return mats, target


def _standardize(a: torch.Tensor) -> torch.Tensor:
    """Columns to zero mean and unit deviation, in place: a is a (T, I) buffer as large as the layer's refit."""
    std = a.std(0).clamp(min=1e-6)
    return a.sub_(a.mean(0)).div_(std)


def reduce_router(
    router: torch.Tensor,
    groups: list[list[int]],
    strategy: str,
    freqs: torch.Tensor,
    x: torch.Tensor | None = None,
    fit_steps: int = 30,
    max_fit_tokens: int = 4096,
    routing: Routing | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K router rows for K groups and, when `routing` has a router bias added to the logits (gpt-oss's
    `router.bias`), its K entries reduced by the same rule (else None).

    `dominant`: the most-used member's row (and bias entry). `mean`: frequency-weighted mean of member rows (a
    singleton keeps its own). `fit`: rows fitted on the calibration tokens so that softmax over the K new logits
    matches the summed probability of each group's members under the original router (the paper's N-row semantics),
    by minimizing the cross-entropy, a convex problem, with L-BFGS from the `mean` rows; the bias is the weight of a
    constant input feature, so the same problem fits both. With sigmoid scores (`routing.scoring`), each new row's
    sigmoid is fitted to its group's summed member score, capped at 1, by binary cross-entropy (also convex).
    """
    logit_bias = None if routing is None else routing.logit_bias
    if strategy == "dominant":
        ids = [most_used(g, freqs) for g in groups]
        return router[ids].clone(), None if logit_bias is None else logit_bias[ids].clone()
    mean = torch.stack([
        torch.einsum("g,gh->h", _weights(g, freqs).to(router.device), router[g].float()) for g in groups
    ])
    mean_bias = router_bias(logit_bias, groups, "mean", freqs)
    if strategy == "mean":
        return mean.to(router.dtype), mean_bias
    if strategy != "fit":
        raise ValueError(f"router strategy must be one of {ROUTER_MODES}")
    if x is None:
        raise ValueError("the fitted router needs the calibration hidden states")
    if all(len(g) == 1 for g in groups):
        ids = [g[0] for g in groups]
        return router[ids].clone(), None if logit_bias is None else logit_bias[ids].clone()
    xs = x[:: max(1, x.shape[0] // max_fit_tokens)].float()
    with torch.no_grad():
        probs = _scores(xs @ router.float().T, routing)
        target = torch.stack([probs[:, g].sum(-1) for g in groups], dim=-1)
    sigmoid = routing is not None and routing.scoring == "sigmoid"
    if sigmoid:
        target = target.clamp(max=1.0)
    start = mean.detach().float()
    if mean_bias is not None:  # the bias is fitted as the row entry of a constant feature 1
        xs = torch.cat([xs, torch.ones(xs.shape[0], 1, device=xs.device)], dim=1)
        start = torch.cat([start, mean_bias.float().reshape(-1, 1).to(start.device)], dim=1)
    w = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=fit_steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        if sigmoid:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w.T, target, reduction="none")
            loss = loss.sum(-1).mean()
        else:
            loss = -(target * torch.log_softmax(xs @ w.T, dim=-1)).sum(-1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()
    if mean_bias is None:
        return w.to(router.dtype), None
    assert logit_bias is not None
    return w[:, :-1].to(router.dtype).contiguous(), w[:, -1].to(logit_bias.dtype).contiguous()


def router_bias(bias: torch.Tensor | None, groups: list[list[int]], strategy: str,
                freqs: torch.Tensor) -> torch.Tensor | None:
    """K entries of a per-expert router tensor (the selection bias), reduced by the rule of the router rows.

    `dominant`: the most-used member's entry, as its row is; `mean` and `fit`: the frequency-weighted mean of the
    members' entries, as the `mean` rows are (`fit` starts from those rows and fits the rows only, the bias being
    selection-only). A singleton keeps its own entry under every rule, so pruning keeps the bias bit-identical.
    """
    if bias is None:
        return None
    if strategy == "dominant":
        return bias[[most_used(g, freqs) for g in groups]].clone()
    return torch.stack([(_weights(g, freqs).to(bias.device) * bias[g].float()).sum() if len(g) > 1
                        else bias[g[0]].float() for g in groups]).to(bias.dtype)
