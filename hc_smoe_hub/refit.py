"""Least-squares refits of merged experts' down projections: per group, and jointly as the reduced layer routes.

Both are ridge regressions of a (T, I) design matrix A (a merged expert's activations on T tokens, I its
intermediate size) onto a (T, H) target. They are solved in whichever form is smaller: the primal (I, I) system
A^T A + lam I when T >= I, or the dual (T, T) system A A^T + lam I when T < I (at Mixtral's intermediate 14336 an
expert sees a few thousand sample tokens, and the dual is then several times cheaper in time and memory). Both give
the same solution (push-through identity); both are factored by Cholesky in place, never with an identity matrix
built. Experts with biases (gpt-oss) fit their down bias too: the design gets a column of ones (times the row's
weight), and the solution's last column is the bias. All arithmetic is fp32; each merged expert is cast back to the
source dtype as soon as it is done, so the fp32 working set is one expert's.
"""

from __future__ import annotations

import torch

from hc_smoe_hub.fastpath import activation_dtype, hidden_fp32, matmul_fp32, project_fp32
from hc_smoe_hub.host_memory import free_bytes
from hc_smoe_hub.merged_rows import MergedRows
from hc_smoe_hub.merging import chunks, closest_to_centroid, fix_dom_group, group_weights
from hc_smoe_hub.routing import Activation, Experts, Routing, route

GRAM_BLOCKS = 4
# The joint refit adds its correction to each down projection this many bytes of fp32 rows at a time.
_ASSEMBLY_BYTES = 64 << 20
MIN_REFIT_CACHE = 1 << 30


def lower_gram(a: torch.Tensor) -> torch.Tensor:
    """The lower triangle (diagonal included) of a^T a, (n, n) for a (T, n); the strict upper triangle is left
    unset. Cholesky reads only the lower triangle, and a block column of it costs 1 - j / GRAM_BLOCKS of a full
    one: about 5/8 of the full product's multiply-adds, with the same sums (torch has no symmetric rank-k
    update, so it is built from GEMM block columns)."""
    n = a.shape[1]
    out = torch.empty(n, n, dtype=a.dtype, device=a.device)
    edges = [n * j // GRAM_BLOCKS for j in range(GRAM_BLOCKS + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if hi > lo:
            out[lo:, lo:hi] = a[:, lo:].T @ a[:, lo:hi]
    return out


def _cholesky_shifted(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factor of gram + lam I, computed in gram's own storage (gram is consumed; only its lower
    triangle is read, see `lower_gram`)."""
    gram.diagonal().add_(lam)
    return torch.linalg.cholesky(gram, out=gram)


def ridge_rows(a: torch.Tensor, target: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_D ||a D^T - target||^2 + lam ||D - prior||^2 with lam = ridge * mean diagonal of a^T a; returns D^T.

    `a` (T, I), `target` (T, H), `prior` (H, I) or None (pull towards zero). Primal or dual, whichever is smaller.
    """
    inter = a.shape[1]
    resid = target if prior is None else target - a @ prior.T
    if a.shape[0] >= inter:
        gram = lower_gram(a)
        lam = ridge * float(gram.diagonal().mean().clamp(min=1e-12))
        delta = torch.cholesky_solve(a.T @ resid, _cholesky_shifted(gram, lam))
    else:
        gram = lower_gram(a.T)
        lam = ridge * float(gram.diagonal().sum().clamp(min=1e-12)) / inter  # trace(A A^T) = trace(A^T A)
        delta = a.T @ torch.cholesky_solve(resid, _cholesky_shifted(gram, lam))
    return delta if prior is None else prior.T + delta


def _design(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation, weight: torch.Tensor | None,
            chunk: int = 4096, gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
            ones: bool = False) -> torch.Tensor:
    """weight_t * h(x_t) for every token: (T, I) fp32 (products in the fast-path dtype of gate's dtype); with
    `ones`, (T, I + 1) with weight_t in the last column, so that the solution's last column is a down bias."""
    dt = activation_dtype(gate.dtype, x.device)
    inter = gate.shape[0]
    out = torch.empty(x.shape[0], inter + int(ones), device=x.device)
    for c in chunks(x.shape[0], chunk):
        if ones:
            out[c, :inter] = hidden_fp32(x[c], gate, up, act, dt, gate_bias, up_bias)
        else:
            out[c] = hidden_fp32(x[c], gate, up, act, dt, gate_bias, up_bias)
    if ones:
        out[:, inter] = 1.0
    return out if weight is None else out.mul_(weight.reshape(-1, 1))


def _solve_group(gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, target: torch.Tensor, mass: torch.Tensor,
                 act: Activation, ridge: float, gate_bias: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None, with_bias: bool = False) -> torch.Tensor:
    """argmin_D sum_t mass_t ||h(x_t) D^T - target_t||^2 + ridge term: the rows carry sqrt(mass) so that tokens where
    the group holds much router probability count more. `with_bias`: D is (H, I + 1), its last column the bias."""
    root = mass.reshape(-1, 1).sqrt()
    a = _design(x, gate, up, act, root, gate_bias=gate_bias, up_bias=up_bias, ones=with_bias)
    return ridge_rows(a, target * root, ridge).T


def _group_target(experts: Experts, g: list[int], x: torch.Tensor, share: torch.Tensor,
                  act: Activation) -> torch.Tensor:
    """sum_j share_j E_j(x) over the group's members: what the group computed in the original model (T, H)."""
    dt = activation_dtype(experts.gate.dtype, x.device)
    target = torch.zeros(x.shape[0], experts.down.shape[1], device=x.device)
    for j, i in enumerate(g):
        for c in chunks(x.shape[0]):
            h = hidden_fp32(x[c], experts.gate[i], experts.up[i], act, dt, *experts.in_bias(i))
            target[c] += share[c, j, None] * project_fp32(h, experts.down[i], dt, experts.out_bias(i))
    return target


def _with_downs(base: Experts, downs: list[torch.Tensor]) -> Experts:
    """`base` with its down projections replaced; each of `downs` is (H, I), or (H, I + 1) with the down bias last
    when the experts have biases."""
    if not base.has_bias:
        return Experts(base.gate, base.up, _stacked(downs))
    inter = base.gate.shape[1]
    return Experts(base.gate, base.up, _stacked([d[:, :inter] for d in downs]), base.gate_bias, base.up_bias,
                   _stacked([d[:, inter] for d in downs]))


def _stacked(rows: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack that lets go of each row once it is copied (the list is emptied): the layer's down
    projections are never held twice."""
    out = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, device=rows[0].device)
    for k in range(len(rows)):
        out[k] = rows[k]
        rows[k] = out[k]  # the row's own storage is freed when no one else holds it
    rows.clear()
    return out


def _down_of(experts: Experts, k: int) -> torch.Tensor:
    """Expert k's down projection (H, I), with its bias as an extra last column (H, I + 1) when it has one."""
    bias = experts.out_bias(k)
    return experts.down[k] if bias is None else torch.cat([experts.down[k], bias.reshape(-1, 1)], dim=1)


def refit_down(
    experts: Experts,
    base: Experts,
    groups: list[list[int]],
    x_per_group: list[torch.Tensor],
    router: torch.Tensor,
    act: Activation,
    ridge: float = 1e-3,
    routing: Routing | None = None,
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
            downs.append(_down_of(base, c))
            continue
        xf = x.float()
        share, mass = group_weights(xf, router, g, routing)
        target = _group_target(experts, g, xf, share, act)
        downs.append(_solve_group(base.gate[c], base.up[c], xf, target, mass, act, ridge, *base.in_bias(c),
                                  with_bias=base.has_bias).to(base.down.dtype))
    return _with_downs(base, downs)


def fix_dom_refit(
    experts: Experts, groups: list[list[int]], features: torch.Tensor, x_per_group: list[torch.Tensor],
    router: torch.Tensor, act: Activation, ridge: float = 1e-3, routing: Routing | None = None,
    in_place: bool = False,
) -> Experts:
    """`fix_dom_merge` followed by `refit_down`, group by group, sharing one pass over the members' activations.

    Each group's merged expert is finished (aligned, refitted, cast to the source dtype) before the next starts, so
    only one group's fp32 expert and target are alive at a time. A singleton is its expert, unchanged. With
    `in_place` the merged experts are written into `experts`' own rows, which the caller gives up
    (`merged_rows.MergedRows`): the result is views of them, and the layer is held once.
    """
    dtype = experts.gate.dtype
    out = MergedRows(groups, into=experts if in_place else None)
    for k, (g, x) in enumerate(zip(groups, x_per_group, strict=True)):
        if len(g) == 1:  # nothing to align or refit: the expert as stored (fp32 and back would be the same bits)
            out.put(k, tuple(t[g[0]] for t in experts.tensors()))
            continue
        xf = x.float()
        fit = x.shape[0] > 0
        share, mass = group_weights(xf, router, g, routing) if fit else (None, None)
        merged, target = fix_dom_group(experts, g, closest_to_centroid(g, features), xf, act, share)
        gate, up, down = merged[0].to(dtype), merged[1].to(dtype), merged[2]
        biases = tuple(b.to(dtype) for b in merged[3:])  # gate, up and down bias, when the experts have them
        del merged
        if fit:
            # Solved on the gate/up rows as they will be stored, so the down projection fits what is written.
            down = _solve_group(gate, up, xf, target, mass, act, ridge, *biases[:2], with_bias=bool(biases))
            if biases:
                down, biases = down[:, :-1], (*biases[:2], down[:, -1].to(dtype))
        del target
        out.put(k, (gate, up, down.to(dtype), *biases))
    return out.experts()


class _Block:
    """One merged expert's state in the joint refit: its tokens, rows' weights and current solution.

    Dual form (T_k < I): the solution is D = D0 + C^T A with C (T_k, H), and only the Cholesky factor L of
    A A^T + lam I is kept; the design rows A are needed only to set up and to assemble D at the end. Primal form:
    D (H, I) itself and the factor of A^T A + lam I, with A recomputed (or cached) at every step.
    """

    def __init__(self, tok: torch.Tensor, w: torch.Tensor, inter: int):
        self.tok, self.w = tok, w
        self.dual = tok.shape[0] < inter
        self.chol: torch.Tensor | None = None
        self.lam = 0.0
        self.coef: torch.Tensor | None = None  # dual: C
        self.down: torch.Tensor | None = None  # primal: D (fp32)


def refit_cache_budget(device: torch.device) -> int:
    """Bytes the joint refit may keep across its sweeps on `device`: half of the memory free now, and at least
    `MIN_REFIT_CACHE` (the budget before it followed the free memory). Speed only: nothing kept changes a result."""
    free = free_bytes(device)
    return max(MIN_REFIT_CACHE, (free or 0) // 2)


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
    cache_bytes: int = 1 << 30,
    new_bias: torch.Tensor | None = None,
    new_logit_bias: torch.Tensor | None = None,
    overwrite_base: bool = False,
) -> Experts:
    """Re-fit the K down projections jointly, for the layer as the reduced model will route it.

    `refit_down` fits each merged expert to its own group's output, blind to the new routing. Here the K merged
    experts (gate/up from `base`) are routed by `new_router` (and `new_bias`, `new_logit_bias`) exactly as the
    reduced model routes (`routing.reduced`: its scores over the K new logits, top-min(k, K), its renormalization),
    weights w'_tk. The down projections D_k are fitted so that sum_k w'_tk h'_k(x_t) D_k^T approximates the
    original routed output y_t = sum_i w_ti E_i(x_t) (shared experts cancel) on a strided sample of at most
    `max_tokens` tokens of `x`.

    Block-coordinate least squares: for each k in turn, over the tokens routed to k, the design row is
    w'_tk h'_k(x_t) and the target the residual r_t = y_t - sum_{j != k} w'_tj h'_j(x_t) D_j^T; D_k solves the
    ridge problem min ||A D^T - r||^2 + lam ||D - D0_k||^2, pulled towards its starting value D0_k (`base`) with
    lam = `ridge` * mean diagonal of A^T A. The pull must be strong: with `ridge` 1e-3 the joint fit overfits (on the
    demo models, fitted on half the calibration tokens, its error on the other half ends above its start), while
    0.3-3 gave the lowest error on the other half in every layer; 1.0 is that choice. Each block step minimizes the
    total regularized objective, whose value at the start is the plain routed-output error, so the squared
    calibration error never ends above where it began (up to rounding: the products with the design rows
    run on the fast path of `fastpath.py`, bf16 for a bf16 source). `routed`, the original routed output on
    every row of `x` when the caller has it (the statistics pass assembles it), saves recomputing y.

    Each block is solved in the dual form when it has fewer tokens than I (see the module docstring): then the
    sweeps touch only (T_k, T_k) and (T_k, H) matrices. Memory is O(T H + sum_k T_k (T_k + H)) for dual blocks,
    O(I^2 + I H) per primal block; what the sweeps would rebuild is kept within `cache_bytes` (the design rows of
    every merged expert, then the primal blocks' factors; `refit_cache_budget` sizes it from the free memory).
    Experts routed no sample token keep their down projection. Arithmetic in fp32; the result has `base`'s dtype.
    With `overwrite_base` the new down projections are written into `base`'s own (which the caller no longer needs)
    instead of a copy: one merged layer's down projections less at the peak.
    """
    rows = torch.arange(0, x.shape[0], max(1, -(-x.shape[0] // max_tokens)), device=x.device)
    xs = x[rows].float()
    if routed is not None:
        resid = routed[rows].float()  # the original routed output y, for now (indexing made it a fresh copy)
    else:
        resid = torch.zeros(xs.shape[0], experts.down.shape[1], device=xs.device)
        w0, i0 = route(xs @ router.float().T, routing)
        dt = activation_dtype(experts.gate.dtype, xs.device)
        for e in i0.unique().tolist():
            tok, slot = torch.where(i0 == e)
            for s in range(0, tok.shape[0], chunk):
                t = tok[s : s + chunk]
                h = hidden_fp32(xs[t], experts.gate[e], experts.up[e], act, dt, *experts.in_bias(e))
                y = project_fp32(h, experts.down[e], dt, experts.out_bias(e))
                resid.index_add_(0, t, y * w0[t, slot[s : s + chunk], None])
    # With biases the down bias is one more coefficient per output: the design's last column (see the docstring).
    k_new, inter = base.count, base.gate.shape[1] + int(base.has_bias)
    weights, indices = route(xs @ new_router.float().T, routing.reduced(k_new, new_bias, new_logit_bias))
    blocks = []
    for k in range(k_new):
        tok, slot = torch.where(indices == k)
        blocks.append(_Block(tok, weights[tok, slot], inter))
    # The products with the design rows run in the fast-path dtype (bf16 for a bf16 source, fastpath.py); the rows
    # are rounded to it once, so that every product and the fp32 normal equations see the same rows.
    dt = activation_dtype(base.gate.dtype, xs.device)
    # What the sweeps would otherwise rebuild, kept within `cache_bytes`: the design rows first (recomputing them
    # costs about twice a factor's A^T A at Mixtral-8x7B's shape), then the primal blocks' Cholesky factors.
    design_bytes = indices.numel() * inter * dt.itemsize
    keep = design_bytes <= cache_bytes
    primal = sum(1 for b in blocks if not b.dual and b.tok.shape[0] > 0)
    keep_factors = primal * inter * inter * 4 <= cache_bytes - (design_bytes if keep else 0)
    cache: dict[int, torch.Tensor] = {}

    def design(k: int) -> torch.Tensor:
        """Design rows w'_tk h'_k(x_t) over the tokens routed to k: (T_k, I), in `dt`."""
        if k in cache:
            return cache[k]
        a = _design(xs[blocks[k].tok], base.gate[k], base.up[k], act, blocks[k].w, chunk, *base.in_bias(k),
                    ones=base.has_bias).to(dt)
        if keep:
            cache[k] = a
        return a

    # Set-up: resid = y - current prediction, kept up to date after every block step; each dual block's factor.
    for k, b in enumerate(blocks):
        if b.tok.shape[0] == 0:
            continue
        a, d0 = design(k), _down_of(base, k).float()
        resid.index_add_(0, b.tok, -matmul_fp32(a, d0.T, dt))
        if b.dual:
            af = a.float()  # one fp32 copy of the (T_k, I) rows, not one per operand
            gram = lower_gram(af.T)
            del af
            b.lam = ridge * float(gram.diagonal().sum().clamp(min=1e-12)) / inter
            b.chol = _cholesky_shifted(gram, b.lam)
            b.coef = torch.zeros(b.tok.shape[0], d0.shape[0], device=xs.device)
        else:
            b.down = d0.clone()
    for _ in range(sweeps):
        for k, b in enumerate(blocks):
            if b.tok.shape[0] == 0:
                continue
            if b.dual:
                # With P = A D0^T + G C the block's prediction, the new C solves (G + lam) C' = r + G C, and the
                # prediction changes by G (C' - C) = L L^T dC - lam dC: no design rows needed in the sweeps.
                assert b.chol is not None and b.coef is not None
                g_c = b.chol @ (b.chol.T @ b.coef) - b.lam * b.coef
                new = torch.cholesky_solve(resid[b.tok] + g_c, b.chol)
                step = new - b.coef
                resid.index_add_(0, b.tok, -(b.chol @ (b.chol.T @ step) - b.lam * step))
                b.coef = new
            else:
                assert b.down is not None
                a = design(k)
                if b.chol is None:
                    af = a.float()
                    gram = lower_gram(af)
                    del af
                    b.lam = ridge * float(gram.diagonal().mean().clamp(min=1e-12))
                    chol = _cholesky_shifted(gram, b.lam)
                    if keep_factors:  # else refactored at every sweep
                        b.chol = chol
                else:
                    chol = b.chol
                # A^T (y - prediction without k) + lam D0, where resid = y - prediction: k's own share A^T A D is
                # added back from the factor, (L L^T - lam) D, instead of from the (T_k, I) rows.
                d_t = b.down.T
                rhs = matmul_fp32(a.T, resid[b.tok], dt) + chol @ (chol.T @ d_t) - b.lam * d_t
                rhs += b.lam * _down_of(base, k).float().T
                new = torch.cholesky_solve(rhs, chol).T
                resid.index_add_(0, b.tok, -matmul_fp32(a, (new - b.down).T, dt))
                b.down = new
    # The new down projections are written row block by row block into `out`, so that the layer's merged experts
    # are never held twice and no full (H, I) fp32 temporary is made (the peak of a Mixtral-shaped merge was here).
    out = base if overwrite_base else Experts(base.gate, base.up, base.down.clone(), base.gate_bias, base.up_bias,
                                              None if base.down_bias is None else base.down_bias.clone())
    hidden = base.down.shape[1]
    step = max(1, _ASSEMBLY_BYTES // (4 * inter))
    for k, b in enumerate(blocks):
        if b.dual and b.coef is not None:
            a = design(k)
            for h in range(0, hidden, step):
                rows_h = slice(h, h + step)
                _add_to_down(out, k, rows_h, matmul_fp32(b.coef[:, rows_h].T, a, dt))
        elif b.down is not None:
            _set_down(out, k, b.down)
        cache.pop(k, None)
        b.chol = b.coef = b.down = None
    return out


def _add_to_down(out: Experts, k: int, rows: slice, delta: torch.Tensor) -> None:
    """D += delta on output rows `rows` of expert k, rounded once to the stored dtype; `delta` (r, I), or (r, I + 1)
    with the down bias's column last."""
    inter = out.gate.shape[1]
    d = out.down[k, rows]
    d.copy_(d.float() + delta[:, :inter])
    if out.down_bias is not None:
        bias = out.down_bias[k, rows]
        bias.copy_(bias.float() + delta[:, inter])


def _set_down(out: Experts, k: int, down: torch.Tensor) -> None:
    """Expert k's down projection set to `down` (H, I), or (H, I + 1) with the bias last, in the stored dtype."""
    inter = out.gate.shape[1]
    out.down[k].copy_(down[:, :inter])
    if out.down_bias is not None:
        out.down_bias[k].copy_(down[:, inter])
