"""Survivor search for pruning: the K-subset of experts whose re-routed output best reconstructs the layer's.

Pure tensor math on a `SubsetProblem`, no I/O; every tensor lives on the problem's device (CPU or GPU).

The objective of a kept subset A, on S sampled tokens, is the squared Frobenius distance between the layer's
original routed output y_s and the output of the pruned layer, which routes as the pruned model does: softmax over
A's original logits, top-min(k, K), renormalized when the model renormalizes. In Gram form, with Y_i(s) expert i's
output on token s, M_s[i, j] = <Y_i(s), Y_j(s)>, c_s[i] = <Y_i(s), y_s> and p_s[i] = exp(logit_si - max_j logit_sj),
a token whose pruned top set is T with unnormalized weights u = p_s[T] costs

    Q / D^2 - 2 L / D + ||y_s||^2,   Q = u^T M_s[T, T] u,   L = u . c_s[T],

with D = sum(u) when the model renormalizes and D = sum of p_s over all of A when it does not. Because the
softmax preserves the logit order, T is the first min(k, K) members of A in the token's fixed logit order; so
removing a member r of T lets the next member of A in that order enter, and adding an expert a lets it enter
exactly where it outranks T's last member (or, with r removed, A's next member). Every single removal and every
1-for-1 swap therefore changes each token's T by at most one expert, and its loss has a closed form in Q, L and D
of T: `_Search` scores all of them at once as tensors, exactly (the same objective `subset_losses` computes).

`search` runs greedy elimination with a small beam (from all N experts, drop one expert at a time, keeping the
`beam` cheapest distinct subsets at every step, until K remain), then best-improvement swap descent from every beam
subset and from any given starts, and returns the best local optimum. Greedy alone (beam 1) missed the exhaustive
optimum on one demo-model layer (Mixtral demo, 8 -> 4); beam 2 and up found it on all of them.
`exhaustive` scores every subset; `sampled` is the former uniform sampling, kept for comparison.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from hc_smoe_hub.routing import Routing, route

_SCORE_BUDGET = 1 << 24  # elements per scoring batch of `subset_losses`, to bound memory
_SWAP_BUDGET = 1 << 22  # elements per token chunk of the dense (tokens, kept, removed) swap scores
_REL_TOL = 1e-12  # a move must improve the objective by this fraction of ||y||^2, so rounding cannot cycle


@dataclass
class SubsetProblem:
    """One layer's subset objective on S sampled tokens (fp64 except the logits)."""

    gram: torch.Tensor  # (S, N, N) <Y_i(s), Y_j(s)>
    cross: torch.Tensor  # (S, N) <Y_i(s), y_s>, y_s the original routed output
    ref: float  # sum_s ||y_s||^2
    logits: torch.Tensor  # (S, N) fp32 original router logits, the router's own bias (if any) added
    routing: Routing  # the pruned model's routing: top-min(k, K), the model's renormalization
    keep: int

    @property
    def experts(self) -> int:
        return self.gram.shape[1]


def problem_from_outputs(outputs: torch.Tensor, logits: torch.Tensor, routing: Routing, keep: int) -> SubsetProblem:
    """The problem from every expert's output on the sampled tokens, (N, S, H), and the original routing."""
    y = outputs.double()
    gram = torch.einsum("ish,jsh->sij", y, y)
    return problem_from_gram(gram, logits, routing, keep)


def problem_from_gram(gram: torch.Tensor, logits: torch.Tensor, routing: Routing, keep: int) -> SubsetProblem:
    """The problem from the per-token Gram matrices (S, N, N) fp64 and the original routing (model's top-k)."""
    s, n = logits.shape
    # The router's own bias (gpt-oss) is a constant per expert added to its logit: folded into the logits, it is
    # indexed with them per subset, and a top-k-then-softmax router is then plain softmax for the closed forms.
    logits = routing.biased(logits).to(gram.device)
    routing = replace(routing, logit_bias=None)
    w0, i0 = route(logits, routing)
    g0 = torch.zeros(s, n, dtype=torch.float64, device=gram.device).scatter_(1, i0, w0.double())
    cross = torch.einsum("sij,sj->si", gram, g0)
    ref = float((g0 * cross).sum())
    # The original routing with top-k clamped; its bias (if any) stays whole and is indexed per subset.
    return SubsetProblem(gram, cross, ref, logits, replace(routing, top_k=min(routing.top_k, keep)), keep)


def subset_losses(prob: SubsetProblem, subsets: torch.Tensor) -> torch.Tensor:
    """(B,) the objective of each subset (B, K) of expert ids, routed exactly as the pruned model routes."""
    s, n = prob.logits.shape
    k_keep, kr = subsets.shape[1], prob.routing.top_k
    batch = max(1, _SCORE_BUDGET // (s * max(k_keep, kr * kr)))
    losses = torch.empty(len(subsets), dtype=torch.float64, device=prob.gram.device)
    flat = prob.gram.view(s, 1, n * n)
    for b0 in range(0, len(subsets), batch):
        sub = subsets[b0 : b0 + batch].to(prob.gram.device)  # (B, K)
        nb = sub.shape[0]
        w, loc = route(prob.logits[:, sub], prob.routing.columns(sub))  # (S, B, kr)
        w = w.double()
        ids = torch.gather(sub.expand(s, nb, k_keep), 2, loc)  # original expert ids
        lin = (w * torch.gather(prob.cross[:, None, :].expand(s, nb, n), 2, ids)).sum((0, 2))
        pair = (ids[..., :, None] * n + ids[..., None, :]).reshape(s, nb, kr * kr)
        quad = torch.gather(flat.expand(s, nb, n * n), 2, pair).view(s, nb, kr, kr)
        losses[b0 : b0 + nb] = (torch.matmul(quad, w[..., None]).squeeze(-1) * w).sum((0, 2)) - 2 * lin + prob.ref
    return losses


def exhaustive(prob: SubsetProblem) -> tuple[list[int], float, int]:
    """(best subset, its loss, subsets scored) over all C(N, K) subsets; ties go to the lexicographically first."""
    n, k = prob.experts, prob.keep
    total = math.comb(n, k)
    cands = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(total, k)
    losses = subset_losses(prob, torch.from_numpy(cands))
    best = int(torch.argmin(losses))
    return cands[best].tolist(), float(losses[best]), total


def sampled(prob: SubsetProblem, count: int, seed: list[int], extra: list[list[int]]) -> tuple[list[int], float, int]:
    """The former search, for comparison: the best of `count` uniform subsets (numpy generator seeded by `seed`,
    drawn as before) and the `extra` subsets, which come first and win ties."""
    n, k = prob.experts, prob.keep
    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.random((min(8192, count - i), n)).argsort(axis=1)[:, :k], axis=1)
             for i in range(0, count, 8192)]
    cands = np.concatenate([np.array(extra, dtype=np.int64).reshape(-1, k), *draws])
    losses = subset_losses(prob, torch.from_numpy(cands))
    best = int(torch.argmin(losses))
    return cands[best].tolist(), float(losses[best]), len(cands)


class _Search:
    """Closed-form scores of every removal and every swap from one kept set (see the module docstring)."""

    def __init__(self, prob: SubsetProblem):
        self.prob = prob
        dev = prob.gram.device
        lg = prob.logits.double()
        s, n = lg.shape
        # Fixed logit order per token, ties to the lower id (a stable sort); rank[s, j] = j's position in it.
        self.order = torch.sort(lg, dim=1, descending=True, stable=True).indices
        self.rank = torch.empty_like(self.order).scatter_(1, self.order, torch.arange(n, device=dev).expand(s, n))
        self.p = torch.exp(lg - lg.max(dim=1, keepdim=True).values)  # softmax numerators, shift-invariant
        self.diag = prob.gram.diagonal(dim1=1, dim2=2)
        self.flat = prob.gram.reshape(s, n * n)
        self.kr = prob.routing.top_k
        self.renorm = prob.routing.renormalize
        self.evaluated = 0

    def _state(self, mask: torch.Tensor) -> None:
        """Each token's pruned top set T (its first kr kept experts in logit order), the next kept expert, and
        Q, L, U = sum(u), Z = sum of p over the kept set."""
        s, kr = self.order.shape[0], self.kr
        kept_sorted = mask[self.order]
        cs = kept_sorted.cumsum(1)
        pos = (kept_sorted & (cs <= kr)).nonzero()[:, 1].view(s, kr)  # ascending rank: T's last is weakest
        self.top = self.order.gather(1, pos)
        self.last_rank = pos[:, -1]
        self.has_next = int(mask.sum()) > kr
        if self.has_next:
            npos = (kept_sorted & (cs == kr + 1)).nonzero()[:, 1]
            self.next_rank, self.next = npos, self.order.gather(1, npos[:, None])
        self.u = self.p.gather(1, self.top)
        g_tt = self._gram_rows(self.top)  # (S, kr, kr)
        self.w_top = (g_tt @ self.u[..., None]).squeeze(-1)  # (M u)_j for j in T
        self.q = (self.w_top * self.u).sum(1)
        self.lin = (self.prob.cross.gather(1, self.top) * self.u).sum(1)
        self.usum = self.u.sum(1)
        self.z = (self.p * mask).sum(1)
        d = self.usum if self.renorm else self.z
        self.loss = float((self.q / d**2 - 2 * self.lin / d).sum()) + self.prob.ref

    def _gram_rows(self, cols: torch.Tensor) -> torch.Tensor:
        """(S, C, kr): M_s[x, T_i] for each token's experts x = cols[s, c]."""
        n = self.order.shape[1]
        s, c = cols.shape
        idx = (cols[:, :, None] * n + self.top[:, None, :]).reshape(s, c * self.kr)
        return self.flat.gather(1, idx).view(s, c, self.kr)

    def _replace(self, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, L, U (each (S, kr, C)) of T with member i replaced by expert cols[s, c]."""
        u, top = self.u, self.top
        g = self._gram_rows(cols)  # (S, C, kr)
        w_x = (g @ u[..., None]).squeeze(-1)  # (S, C): (M u)_x
        w_r = self.w_top  # (S, kr)
        m_rr = self.diag.gather(1, top)
        q_b = self.q[:, None] - 2 * u * w_r + u**2 * m_rr  # (S, kr): Q of T - T_i
        l_b = self.lin[:, None] - u * self.prob.cross.gather(1, top)
        u_b = self.usum[:, None] - u
        p_x, m_xx, c_x = self.p.gather(1, cols), self.diag.gather(1, cols), self.prob.cross.gather(1, cols)
        v = w_x[:, None, :] - u[:, :, None] * g.transpose(1, 2)  # (S, kr, C): (M u_{T - T_i})_x
        q = q_b[..., None] + 2 * p_x[:, None, :] * v + (p_x**2 * m_xx)[:, None, :]
        return q, l_b[..., None] + (p_x * c_x)[:, None, :], u_b[..., None] + p_x[:, None, :]

    def removal_losses(self, mask: torch.Tensor) -> torch.Tensor:
        """(N,) the objective after removing each kept expert (inf for the others); needs > kr kept."""
        s, n = self.p.shape
        q_c, l_c, u_c = (t[..., 0] for t in self._replace(self.next))  # T_i replaced by the next kept expert
        q = self.q[:, None].expand(s, n).clone().scatter_(1, self.top, q_c)
        lin = self.lin[:, None].expand(s, n).clone().scatter_(1, self.top, l_c)
        if self.renorm:
            d = self.usum[:, None].expand(s, n).clone().scatter_(1, self.top, u_c)
        else:
            d = self.z[:, None] - self.p
        tot = (q / d**2 - 2 * lin / d).sum(0) + self.prob.ref
        self.evaluated += int(mask.sum())
        return torch.where(mask, tot, torch.full_like(tot, math.inf))

    def swap_losses(self, kept: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """(K, R): the objective after swapping kept[i] out and removed[j] in."""
        s, n = self.p.shape
        nk, nr = len(kept), len(removed)
        cols = removed.expand(s, nr)
        q_f, l_f, u_f = self._replace(cols)  # (S, kr, R): T_i replaced by a
        # r outside T: a enters only where it outranks T's last member, which it then pushes out.
        beats_last = self.rank[:, removed] < self.last_rank[:, None]
        qa = torch.where(beats_last, q_f[:, -1], self.q[:, None])
        la = torch.where(beats_last, l_f[:, -1], self.lin[:, None])
        ua = torch.where(beats_last, u_f[:, -1], self.usum[:, None])
        # r = T_i: a takes its place where it outranks the next kept expert, else the next kept expert does.
        if self.has_next:
            q_n, l_n, u_n = self._replace(self.next)  # (S, kr, 1)
            beats_next = (self.rank[:, removed] < self.next_rank[:, None])[:, None, :]
            qc, lc, uc = (torch.where(beats_next, f, nx) for f, nx in ((q_f, q_n), (l_f, l_n), (u_f, u_n)))
        else:  # K = kr: every kept expert is in T, a always takes r's place
            qc, lc, uc = q_f, l_f, u_f
        p_a = self.p[:, removed]
        if self.renorm:  # D depends on T only: the r-outside-T loss does not depend on r
            loss_a = qa / ua**2 - 2 * la / ua
            base = loss_a.sum(0)[None, :].expand(nk, nr).clone()
            corr = (qc / uc**2 - 2 * lc / uc) - loss_a[:, None, :]
        else:  # D = Z - p_r + p_a over the whole kept set: dense in (token, r, a)
            base = torch.zeros(nk, nr, dtype=self.p.dtype, device=self.p.device)
            p_k = self.p[:, kept]
            step = max(1, _SWAP_BUDGET // max(1, nk * nr))
            for c in range(0, s, step):
                inv = 1.0 / (self.z[c : c + step, None, None] - p_k[c : c + step, :, None]
                             + p_a[c : c + step, None, :])
                base += ((qa[c : c + step, None, :] * inv - 2 * la[c : c + step, None, :]) * inv).sum(0)
            d_c = self.z[:, None, None] - self.p.gather(1, self.top)[..., None] + p_a[:, None, :]
            corr = (qc - qa[:, None, :]) / d_c**2 - 2 * (lc - la[:, None, :]) / d_c
        local = torch.full((n,), -1, dtype=torch.long, device=self.p.device)
        local[kept] = torch.arange(nk, device=self.p.device)
        base.index_add_(0, local[self.top].reshape(-1), corr.reshape(s * self.kr, nr))
        self.evaluated += nk * nr
        return base + self.prob.ref


@dataclass
class SearchResult:
    kept: list[int]
    loss: float
    evaluated: int  # candidate subsets scored (removals and swaps, all starts)
    swaps: int  # improving swaps applied on the way to the returned subset


def search(prob: SubsetProblem, starts: list[list[int]] | tuple = (), beam: int = 4) -> SearchResult:
    """Greedy elimination keeping the `beam` best subsets per step, then best-improvement swap descent from each
    of them and of `starts` until no 1-for-1 exchange of a kept and a removed expert improves; the best local
    optimum (ties to the earlier start). Deterministic: ties in a step go to the lower (loss, beam, expert)."""
    n, k = prob.experts, prob.keep
    dev = prob.gram.device
    srch = _Search(prob)
    beam_masks = [torch.ones(n, dtype=torch.bool, device=dev)]
    for _ in range(n - k):
        scored: list[tuple[float, int, int]] = []
        for b, m in enumerate(beam_masks):
            srch._state(m)
            losses = srch.removal_losses(m)
            top = torch.topk(-losses, min(beam, int(m.sum()))).indices.tolist()
            scored += [(float(losses[r]), b, r) for r in top]
        nxt, keys = [], set()
        for _loss, b, r in sorted(scored):
            m = beam_masks[b].clone()
            m[r] = False
            key = tuple(m.nonzero().flatten().tolist())
            if key not in keys and len(nxt) < beam:
                keys.add(key)
                nxt.append(m)
        beam_masks = nxt
    inits, seen = list(beam_masks), {tuple(m.nonzero().flatten().tolist()) for m in beam_masks}
    for st in starts:
        if tuple(sorted(st)) not in seen:
            seen.add(tuple(sorted(st)))
            m = torch.zeros(n, dtype=torch.bool, device=dev)
            m[torch.tensor(st, device=dev)] = True
            inits.append(m)
    best: SearchResult | None = None
    tol = _REL_TOL * prob.ref
    for m in inits:
        swaps = 0
        srch._state(m)
        while k < n and prob.ref > 0:
            kept, removed = m.nonzero().flatten(), (~m).nonzero().flatten()
            tot = srch.swap_losses(kept, removed)
            flat = int(torch.argmin(tot))
            if not float(tot.view(-1)[flat]) < srch.loss - tol:
                break
            m[kept[flat // len(removed)]], m[removed[flat % len(removed)]] = False, True
            swaps += 1
            srch._state(m)
        if best is None or srch.loss < best.loss - tol:
            best = SearchResult(m.nonzero().flatten().tolist(), srch.loss, 0, swaps)
    assert best is not None
    best.evaluated = srch.evaluated
    return best


def greedy(prob: SubsetProblem, starts: list[list[int]] | tuple = ()) -> SearchResult:
    """Greedy elimination scored by `subset_losses` (any routing: sigmoid scores, a selection bias, grouped top-k,
    a scaling factor), the best of it and the given starts. The closed forms of `search` assume plain softmax
    routing; this exact but slower path (every removal of every step is routed in full) serves the others."""
    n, k = prob.experts, prob.keep
    kept = list(range(n))
    evaluated = 0
    while len(kept) > k:
        cands = torch.tensor([kept[:i] + kept[i + 1 :] for i in range(len(kept))])
        losses = subset_losses(prob, cands)
        evaluated += len(cands)
        kept = cands[int(torch.argmin(losses))].tolist()
    best, best_loss = kept, float(subset_losses(prob, torch.tensor([kept]))[0])
    for start in starts:
        loss = float(subset_losses(prob, torch.tensor([sorted(start)]))[0])
        evaluated += 1
        if loss < best_loss:
            best, best_loss = sorted(start), loss
    return SearchResult(best, best_loss, evaluated, 0)
