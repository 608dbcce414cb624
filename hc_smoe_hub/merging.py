"""Pure functions that turn groups of experts into single experts, and N router rows into K.

All arithmetic is done in fp32 and cast back to the source dtype at the end.
"""

from __future__ import annotations

import logging

import torch

from hc_smoe_hub.routing import Activation, Experts, expert_hidden

log = logging.getLogger(__name__)

MERGE_MODES = ("freq", "average", "fix-dom", "dominant", "freq-lsq", "fix-dom-lsq", "dominant-lsq")
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
}
ROUTER_DESCRIPTIONS = {
    "fit": "one row per cluster fitted on the calibration tokens so that the softmax over the new rows matches "
    "each cluster's summed member probability (the paper's N-row routing, in K rows)",
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

    All groups are merged at once as one (K, N) @ (N, -1) product in fp32.
    """
    n = experts.count
    mix = torch.zeros(len(groups), n, dtype=torch.float32)
    for k, g in enumerate(groups):
        mix[k, g] = _weights(g, coeffs)
    out = []
    for mat in (experts.gate, experts.up, experts.down):
        merged = mix.to(mat.device) @ mat.reshape(n, -1).float()
        out.append(merged.reshape(len(groups), *mat.shape[1:]).to(mat.dtype))
    return Experts(*out)


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
    gates, ups, downs = [], [], []
    for g, x in zip(groups, x_per_group, strict=True):
        dom = closest_to_centroid(g, features)
        gate = experts.gate[dom].float().clone()
        up = experts.up[dom].float().clone()
        down = experts.down[dom].float().clone()
        hits = torch.ones(gate.shape[0], device=gate.device)
        others = [j for j in g if j != dom]
        if others:
            xf = x.float()
            a_dom = _standardize(expert_hidden(xf, gate, up, act))
            for j in others:
                a_j = _standardize(expert_hidden(xf, experts.gate[j].float(), experts.up[j].float(), act))
                corr = a_dom.T @ a_j / max(xf.shape[0], 1)  # (I_dom, I_j)
                target = corr.argmax(dim=0)  # dominant neuron for each neuron of j
                gate.index_add_(0, target, experts.gate[j].float())
                up.index_add_(0, target, experts.up[j].float())
                down.index_add_(1, target, experts.down[j].float())
                hits.index_add_(0, target, torch.ones_like(target, dtype=hits.dtype))
        gates.append(gate / hits[:, None])
        ups.append(up / hits[:, None])
        downs.append(down / hits[None, :])
    dt = experts.gate.dtype
    return Experts(torch.stack(gates).to(dt), torch.stack(ups).to(dt), torch.stack(downs).to(dt))


def _standardize(a: torch.Tensor) -> torch.Tensor:
    return (a - a.mean(0)) / a.std(0).clamp(min=1e-6)


def router_rows(
    router: torch.Tensor,
    groups: list[list[int]],
    strategy: str,
    freqs: torch.Tensor,
    x: torch.Tensor | None = None,
    fit_steps: int = 30,
    max_fit_tokens: int = 4096,
) -> torch.Tensor:
    """K router rows for K groups.

    `dominant`: the most-used member's row. `mean`: frequency-weighted mean of member rows. `fit`: rows fitted on
    the calibration tokens so that softmax over the K new logits matches the summed probability of each group's
    members under the original router (the paper's N-row semantics), by minimizing the cross-entropy, a convex
    problem, with L-BFGS from the `mean` rows.
    """
    if strategy == "dominant":
        return router[[most_used(g, freqs) for g in groups]].clone()
    mean = torch.stack([
        torch.einsum("g,gh->h", _weights(g, freqs).to(router.device), router[g].float()) for g in groups
    ])
    if strategy == "mean":
        return mean.to(router.dtype)
    if strategy != "fit":
        raise ValueError(f"router strategy must be one of {ROUTER_MODES}")
    if x is None:
        raise ValueError("the fitted router needs the calibration hidden states")
    if all(len(g) == 1 for g in groups):
        return router[[g[0] for g in groups]].clone()
    xs = x[:: max(1, x.shape[0] // max_fit_tokens)].float()
    with torch.no_grad():
        probs = torch.softmax(xs @ router.float().T, dim=-1)
        target = torch.stack([probs[:, g].sum(-1) for g in groups], dim=-1)
    w = mean.detach().float().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=fit_steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -(target * torch.log_softmax(xs @ w.T, dim=-1)).sum(-1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().to(router.dtype)


def refit_down(
    experts: Experts,
    base: Experts,
    groups: list[list[int]],
    x_per_group: list[torch.Tensor],
    router: torch.Tensor,
    act: Activation,
    ridge: float = 1e-3,
) -> Experts:
    """Re-fit each merged expert's down projection by least squares so that it reproduces its whole group.

    The target for a token is what the group computed in the original model, the members' outputs weighted by
    their router probabilities (sum_i p_i E_i(x) / sum_i p_i), on the tokens routed to the group; tokens are
    weighted by the group's probability mass. Gate and up stay as in `base` (their neurons are kept), only the
    linear down projection is solved, in closed form with a small ridge term towards stability. Singletons keep
    their weights unchanged.
    """
    downs = []
    for c, (g, x) in enumerate(zip(groups, x_per_group, strict=True)):
        if len(g) == 1 or x.shape[0] == 0:
            downs.append(base.down[c].float())
            continue
        xf = x.float()
        probs = torch.softmax(xf @ router.float().T, dim=-1)[:, g]  # (T, |g|)
        mass = probs.sum(-1, keepdim=True).clamp(min=1e-12)
        target = torch.zeros(xf.shape[0], experts.down.shape[1], device=xf.device)
        for j, i in enumerate(g):
            y = expert_hidden(xf, experts.gate[i].float(), experts.up[i].float(), act) @ experts.down[i].float().T
            target += probs[:, j, None] / mass * y
        h = expert_hidden(xf, base.gate[c].float(), base.up[c].float(), act)  # (T, I)
        w = mass  # important tokens (where the group carries much probability) count more
        gram = (h * w).T @ h
        lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
        rhs = (h * w).T @ target  # (I, H)
        sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], device=gram.device), rhs)
        downs.append(sol.T)
    return Experts(base.gate, base.up, torch.stack(downs).to(base.down.dtype))
