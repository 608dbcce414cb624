"""Pure functions that turn groups of experts into single experts, and N router rows into K.

All arithmetic is done in fp32 and cast back to the source dtype at the end.
"""

from __future__ import annotations

import logging

import torch

from hc_smoe_hub.routing import Activation, Experts, Routing, expert_hidden, route

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
    merged = [_fix_dom_group(experts, g, closest_to_centroid(g, features), x.float(), act)[0]
              for g, x in zip(groups, x_per_group, strict=True)]
    return _stack(merged, experts.gate.dtype)


def _stack(mats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> Experts:
    return Experts(*(torch.stack([m[j] for m in mats]).to(dtype) for j in range(3)))


def _chunks(n: int, size: int = 4096) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _scores(logits: torch.Tensor, routing: Routing | None) -> torch.Tensor:
    """The router's scores (softmax unless `routing` says sigmoid), fp32."""
    return torch.softmax(logits.float(), dim=-1) if routing is None else routing.scores(logits)


def _group_weights(x: torch.Tensor, router: torch.Tensor, g: list[int],
                   routing: Routing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's share of the group's router probability per token (T, |g|), and the group's mass (T, 1)."""
    probs = _scores(x @ router.float().T, routing)[:, g]
    mass = probs.sum(-1, keepdim=True).clamp(min=1e-12)
    return probs / mass, mass


def _fix_dom_group(
    experts: Experts, g: list[int], dom: int, x: torch.Tensor, act: Activation, share: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Fix-dom merge of one group on its tokens x (fp32). With `share` (T, |g|), the same pass also returns the
    group's target for the least-squares refit, sum_j share_j E_j(x) (T, H): every member's activations are then
    computed once for both, and only one member's (T, I) activations are held at a time besides the dominant's.
    """
    gate, up, down = (m[dom].float().clone() for m in (experts.gate, experts.up, experts.down))
    hits = torch.ones(gate.shape[0], device=gate.device)
    target = None
    a_dom = expert_hidden(x, gate, up, act)
    if share is not None:
        target = (a_dom @ down.T) * share[:, g.index(dom), None]
    # Standardized dominant activations: the correlation with member j's neuron b is then a_dom^T h_j[:, b] up to
    # a positive factor of b alone (centring h_j changes nothing, a_dom's columns sum to zero), so the argmax
    # over dominant neurons needs neither member statistics nor a second pass.
    a_dom = _standardize(a_dom)
    for j in (j for j in g if j != dom):
        corr = torch.zeros(gate.shape[0], experts.gate.shape[1], device=x.device)
        for c in _chunks(x.shape[0]):
            h = expert_hidden(x[c], experts.gate[j].float(), experts.up[j].float(), act)
            corr += a_dom[c].T @ h
            if target is not None:
                target[c] += (h @ experts.down[j].float().T) * share[c, g.index(j), None]
        mapped = corr.argmax(dim=0)  # dominant neuron for each neuron of j
        gate.index_add_(0, mapped, experts.gate[j].float())
        up.index_add_(0, mapped, experts.up[j].float())
        down.index_add_(1, mapped, experts.down[j].float())
        hits.index_add_(0, mapped, torch.ones_like(mapped, dtype=hits.dtype))
    return (gate / hits[:, None], up / hits[:, None], down / hits[None, :]), target


def _standardize(a: torch.Tensor) -> torch.Tensor:
    return (a - a.mean(0)) / a.std(0).clamp(min=1e-6)


def _group_target(experts: Experts, g: list[int], x: torch.Tensor, share: torch.Tensor,
                  act: Activation) -> torch.Tensor:
    """sum_j share_j E_j(x) over the group's members: what the group computed in the original model (T, H)."""
    target = torch.zeros(x.shape[0], experts.down.shape[1], device=x.device)
    for j, i in enumerate(g):
        for c in _chunks(x.shape[0]):
            y = expert_hidden(x[c], experts.gate[i].float(), experts.up[i].float(), act) @ experts.down[i].float().T
            target[c] += share[c, j, None] * y
    return target


def router_rows(
    router: torch.Tensor,
    groups: list[list[int]],
    strategy: str,
    freqs: torch.Tensor,
    x: torch.Tensor | None = None,
    fit_steps: int = 30,
    max_fit_tokens: int = 4096,
    routing: Routing | None = None,
) -> torch.Tensor:
    """K router rows for K groups.

    `dominant`: the most-used member's row. `mean`: frequency-weighted mean of member rows. `fit`: rows fitted on
    the calibration tokens so that softmax over the K new logits matches the summed probability of each group's
    members under the original router (the paper's N-row semantics), by minimizing the cross-entropy, a convex
    problem, with L-BFGS from the `mean` rows. With sigmoid scores (`routing.scoring`), each new row's sigmoid is
    fitted to its group's summed member score, capped at 1, by binary cross-entropy (also convex).
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
        probs = _scores(xs @ router.float().T, routing)
        target = torch.stack([probs[:, g].sum(-1) for g in groups], dim=-1)
    sigmoid = routing is not None and routing.scoring == "sigmoid"
    if sigmoid:
        target = target.clamp(max=1.0)
    w = mean.detach().float().clone().requires_grad_(True)
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
    return w.detach().to(router.dtype)


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


def refit_down(
    experts: Experts,
    base: Experts,
    groups: list[list[int]],
    x_per_group: list[torch.Tensor],
    router: torch.Tensor,
    act: Activation,
    ridge: float = 1e-3,
    targets: list[torch.Tensor | None] | None = None,
    routing: Routing | None = None,
) -> Experts:
    """Re-fit each merged expert's down projection by least squares so that it reproduces its whole group.

    The target for a token is what the group computed in the original model, the members' outputs weighted by
    their router probabilities (sum_i p_i E_i(x) / sum_i p_i), on the tokens routed to the group; tokens are
    weighted by the group's probability mass. Gate and up stay as in `base` (their neurons are kept), only the
    linear down projection is solved, in closed form with a small ridge term towards stability. Singletons keep
    their weights unchanged. `targets` may hold targets already computed (by `fix_dom_refit`'s shared pass).
    """
    downs = []
    for c, (g, x) in enumerate(zip(groups, x_per_group, strict=True)):
        if len(g) == 1 or x.shape[0] == 0:
            downs.append(base.down[c].float())
            continue
        xf = x.float()
        share, mass = _group_weights(xf, router, g, routing)
        target = targets[c] if targets is not None and targets[c] is not None else \
            _group_target(experts, g, xf, share, act)
        downs.append(_solve_down(base.gate[c].float(), base.up[c].float(), xf, target, mass, act, ridge))
    return Experts(base.gate, base.up, torch.stack(downs).to(base.down.dtype))


def _solve_down(gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                act: Activation, ridge: float) -> torch.Tensor:
    """argmin_D sum_t weight_t ||h(x_t) D^T - target_t||^2 + ridge term, accumulated over token chunks."""
    inter = gate.shape[0]
    gram = torch.zeros(inter, inter, device=x.device)
    rhs = torch.zeros(inter, target.shape[1], device=x.device)
    for c in _chunks(x.shape[0]):
        h = expert_hidden(x[c], gate, up, act)
        hw = h * weight[c]  # important tokens (where the group carries much probability) count more
        gram += hw.T @ h
        rhs += hw.T @ target[c]
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.solve(gram + lam * torch.eye(inter, device=gram.device), rhs).T


def fix_dom_refit(
    experts: Experts, groups: list[list[int]], features: torch.Tensor, x_per_group: list[torch.Tensor],
    router: torch.Tensor, act: Activation, ridge: float = 1e-3, routing: Routing | None = None,
) -> Experts:
    """`fix_dom_merge` followed by `refit_down`, sharing one pass over the members' activations per group."""
    merged, targets = [], []
    for g, x in zip(groups, x_per_group, strict=True):
        xf = x.float()
        share = _group_weights(xf, router, g, routing)[0] if len(g) > 1 and x.shape[0] else None
        mats, target = _fix_dom_group(experts, g, closest_to_centroid(g, features), xf, act, share)
        merged.append(mats)
        targets.append(target)
    base = _stack(merged, experts.gate.dtype)
    return refit_down(experts, base, groups, x_per_group, router, act, ridge, targets, routing)


def refit_down_rerouted(
    experts: Experts,
    base: Experts,
    router: torch.Tensor,
    new_router: torch.Tensor,
    x: torch.Tensor,
    routing: Routing,
    act: Activation,
    sweeps: int = 2,
    ridge: float = 1.0,
    max_tokens: int = 16384,
    chunk: int = 2048,
    routed: torch.Tensor | None = None,
    cache_bytes: int = 2 << 30,
    new_bias: torch.Tensor | None = None,
) -> Experts:
    """Re-fit the K down projections jointly, for the layer as the reduced model will route it.

    `refit_down` fits each merged expert to its own group's output, blind to the new routing. Here the K merged
    experts (gate/up from `base`) are routed by `new_router` (and `new_bias`) exactly as the reduced model routes:
    `routing` over the K new logits, top-min(k, K), weights w'_tk. The down projections D_k
    are fitted so that sum_k w'_tk h'_k(x_t) D_k^T approximates the original routed output
    y_t = sum_i w_ti E_i(x_t) (shared experts cancel) on a strided sample of at most `max_tokens` tokens of `x`.

    Block-coordinate least squares: for each k in turn, over the tokens routed to k, the design row is
    w'_tk h'_k(x_t) and the target the residual r_t = y_t - sum_{j != k} w'_tj h'_j(x_t) D_j^T; D_k solves the
    ridge problem min ||A D^T - r||^2 + lam ||D - D0_k||^2, pulled towards its starting value D0_k (`base`) with
    lam = `ridge` * mean diagonal of A^T A. The pull must be strong: with `ridge` 1e-3 the joint fit overfits (on the
    demo models, fitted on half the calibration tokens, its error on the other half ends above its start), while
    0.3-3 gave the lowest error on the other half in every layer; 1.0 is that choice. Each block step minimizes the
    total regularized objective, whose value at the start is the plain routed-output error, so the squared
    calibration error never ends above where it began (up to rounding). `routed`, the original routed output on
    every row of `x` when the caller has it (the statistics pass assembles it), saves recomputing y. Memory is
    O(T H + T_k I + I^2 + I H), plus the cached design rows of every merged expert when they fit in `cache_bytes`.
    Experts routed no sample token keep their down projection. Arithmetic in fp32; the result has `base`'s dtype.
    """
    rows = torch.arange(0, x.shape[0], max(1, -(-x.shape[0] // max_tokens)), device=x.device)
    xs = x[rows].float()
    if routed is not None:
        resid = routed[rows].float().clone()  # the original routed output y, for now
    else:
        resid = torch.zeros(xs.shape[0], experts.down.shape[1], device=xs.device)
        w0, i0 = route(xs @ router.float().T, routing)
        for e in i0.unique().tolist():
            tok, slot = torch.where(i0 == e)
            g, u, d = (m[e].float() for m in (experts.gate, experts.up, experts.down))  # one expert at a time
            for s in range(0, tok.shape[0], chunk):
                t = tok[s : s + chunk]
                resid.index_add_(0, t, expert_hidden(xs[t], g, u, act) @ d.T * w0[t, slot[s : s + chunk], None])
    k_new = base.count
    weights, indices = route(xs @ new_router.float().T, routing.reduced(k_new, new_bias))
    downs = [base.down[k].float().clone() for k in range(k_new)]
    per_expert = []
    for k in range(k_new):
        tok, slot = torch.where(indices == k)
        per_expert.append((tok, weights[tok, slot]))
    inter = base.gate.shape[1]
    # The design rows do not change between sweeps: computed once and kept when they fit in `cache_bytes`
    # (every merged expert's gate/up pass then runs once), else recomputed for each use.
    keep = indices.numel() * inter * 4 <= cache_bytes
    cache: dict[int, torch.Tensor] = {}

    def design(k: int) -> torch.Tensor:
        """Design rows w'_tk h'_k(x_t) over the tokens routed to k: (T_k, I)."""
        if k in cache:
            return cache[k]
        tok, w = per_expert[k]
        a = torch.cat([expert_hidden(xs[tok[s : s + chunk]], base.gate[k].float(), base.up[k].float(), act)
                       for s in range(0, tok.shape[0], chunk)] or [xs.new_zeros(0, inter)]) * w[:, None]
        if keep:
            cache[k] = a
        return a

    grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    keep_grams = k_new * inter * inter * 4 <= cache_bytes
    # From here on, resid = y - current prediction, kept up to date after every block step.
    for k in range(k_new):
        resid.index_add_(0, per_expert[k][0], -(design(k) @ downs[k].T))
    for _ in range(sweeps):
        for k in range(k_new):
            tok = per_expert[k][0]
            if tok.shape[0] == 0:
                continue
            a = design(k)
            if k not in grams:
                gram = a.T @ a
                lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
                # (A^T A + lam I) is the same in every sweep: factored once, kept while the factors fit.
                gram.diagonal().add_(lam)  # in place: no (I, I) identity or second Gram-sized matrix
                factors = (torch.linalg.cholesky(gram), lam)
                if keep_grams:
                    grams[k] = factors
            else:
                factors = grams[k]
            chol, lam = factors
            # A^T (y - prediction without k) + lam D0, where resid = y - prediction: k's own share A^T A D is added
            # back from the factors, (L L^T - lam) D, instead of from the (T_k, I) rows.
            d_t = downs[k].T
            rhs = a.T @ resid[tok] + chol @ (chol.T @ d_t) - lam * d_t + lam * base.down[k].float().T
            new = torch.cholesky_solve(rhs, chol).T
            resid.index_add_(0, tok, -(a @ (new - downs[k]).T))
            downs[k] = new
    return Experts(base.gate, base.up, torch.stack([d.to(base.down.dtype) for d in downs]))
