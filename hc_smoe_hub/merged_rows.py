"""Where a merge puts its K finished experts: fresh (K, ...) rows, or the rows of the source experts they replace.

At Mixtral-8x7B's shape a layer's eight source experts are 2.6 GiB and its six merged ones 2.0 GiB: holding both
was most of a merge's peak. No group reads another group's members, so once a group's merged expert is finished it
may take the row of one of its own members; at the end the K rows are moved to the front, and the layer's experts
are held once (`MergedRows(groups, into=source)`).
"""

from __future__ import annotations

import torch

from hc_smoe_hub.routing import Experts


class MergedRows:
    """The K merged experts of `groups`, written row by row as each is finished.

    Without `into`, in fresh (K, ...) tensors allocated at the first row. With `into` (the source experts, which the
    caller gives up), merged expert k goes into the row of its group's first member, and `experts()` returns views of
    `into`'s first K rows.
    """

    def __init__(self, groups: list[list[int]], into: Experts | None = None):
        self.groups = groups
        self.into = into
        self.fresh: list[torch.Tensor] = []

    def put(self, k: int, parts: tuple[torch.Tensor, ...]) -> None:
        """Merged expert k's tensors (gate, up, down[, gate bias, up bias, down bias]), cast to the rows' dtype."""
        if self.into is not None:
            row = self.groups[k][0]
            for dest, t in zip(self.into.tensors(), parts, strict=True):
                if t.data_ptr() != dest[row].data_ptr():  # a singleton's own row is already in place
                    dest[row] = t
            return
        if not self.fresh:
            self.fresh.extend(torch.empty((len(self.groups), *t.shape), dtype=t.dtype, device=t.device)
                              for t in parts)
        for dest, t in zip(self.fresh, parts, strict=True):
            dest[k] = t

    def experts(self) -> Experts:
        """The K merged experts, in group order."""
        if self.into is None:
            return Experts.of(self.fresh)
        slots = [g[0] for g in self.groups]
        for t in self.into.tensors():
            move_rows(t, slots)
        return Experts.of([t[: len(slots)] for t in self.into.tensors()])


def move_rows(t: torch.Tensor, slots: list[int]) -> None:
    """t[j] = (old) t[slots[j]] for every j < len(slots), in place with one row of scratch; `slots` are distinct.

    The rows past len(slots) end in some order of the rest. Written by hand: torch has no in-place row permutation
    (`t[:] = t[perm]` would copy the whole tensor once more, the memory this module exists to save).
    """
    n = t.shape[0]
    if sorted(set(slots)) != sorted(slots) or any(not 0 <= s < n for s in slots):
        raise ValueError(f"slots must be distinct rows of {n}: {slots}")
    rest = iter(sorted(set(range(n)) - set(slots)))
    perm = [*slots, *rest]  # a whole permutation: new row j = old row perm[j]
    done = [False] * n
    for start in range(n):
        if done[start]:
            continue
        if perm[start] == start:
            done[start] = True
            continue
        scratch = t[start].clone()
        j = start
        while True:
            done[j] = True
            source = perm[j]
            if source == start:
                t[j] = scratch
                break
            t[j] = t[source]
            j = source
