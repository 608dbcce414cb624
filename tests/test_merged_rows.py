"""Merged experts written into the rows of the source experts they replace: the same plan, the layer held once."""

from __future__ import annotations

import pytest
import torch

from hc_smoe_hub.merged_rows import move_rows
from hc_smoe_hub.methods import METHODS, LayerContext, MethodOptions, merge_groups
from hc_smoe_hub.routing import Experts, Routing
from hc_smoe_hub.stats import collect

N, H, INTER, T = 8, 16, 12, 400
ACT = torch.nn.functional.silu


@pytest.mark.parametrize("seed", range(25))
def test_move_rows_puts_the_chosen_rows_first_in_place(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 10, (1,), generator=g))
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    slots = torch.randperm(n, generator=g)[:k].tolist()
    t = torch.randn(n, 3, 2, generator=g)
    old, storage = t.clone(), t.data_ptr()
    move_rows(t, slots)
    assert t.data_ptr() == storage
    assert torch.equal(t[:k], old[slots])
    rest = sorted(set(range(n)) - set(slots))
    assert sorted(tuple(r.flatten().tolist()) for r in t[k:]) == sorted(tuple(old[i].flatten().tolist()) for i in rest)


def test_move_rows_refuses_repeated_or_missing_rows():
    with pytest.raises(ValueError, match="distinct"):
        move_rows(torch.zeros(4, 2), [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        move_rows(torch.zeros(4, 2), [0, 4])


def source(biases: bool) -> Experts:
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(N, INTER, H, generator=g), torch.randn(N, INTER, H, generator=g),
            torch.randn(N, H, INTER, generator=g)]
    if biases:
        mats += [torch.randn(N, INTER, generator=g), torch.randn(N, INTER, generator=g), torch.randn(N, H, generator=g)]
    return Experts.of([(m * 0.5).to(torch.bfloat16) for m in mats])


def context(experts: Experts, expendable: bool, keep: int = 5) -> LayerContext:
    g = torch.Generator().manual_seed(4)
    x, routing = torch.randn(T, H, generator=g), Routing(2, True)
    router = torch.randn(N, H, generator=g).to(torch.bfloat16)
    stats = collect(x, experts, router, routing, ACT, sample_rows=torch.arange(0, T, 4))
    return LayerContext(0, keep, x, experts, router, routing, ACT, stats, experts_expendable=expendable)


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("method", ["takeover", "hc-smoe", "anchored-o"])
def test_merging_into_the_source_rows_gives_the_same_plan_holding_the_layer_once(method, biases):
    """The engine's merge (source experts expendable) writes each merged expert into a member's row: the plan is
    the one a fresh merge makes, bit for bit, and its experts are views of the source's storage."""
    original = source(biases)
    fresh_ctx = context(Experts.of([t.clone() for t in original.tensors()]), expendable=False)
    engine_ctx = context(Experts.of([t.clone() for t in original.tensors()]), expendable=True)
    storages = [t.untyped_storage().data_ptr() for t in engine_ctx.experts.tensors()]
    options = MethodOptions(method=method)  # the default merge, fix-dom-rr
    fresh, in_place = METHODS[method](fresh_ctx, options), METHODS[method](engine_ctx, options)
    assert fresh.groups == in_place.groups and any(len(g) > 1 for g in fresh.groups)
    for a, b in zip(fresh.experts.tensors(), in_place.experts.tensors(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
    assert torch.equal(fresh.router, in_place.router)
    assert [t.untyped_storage().data_ptr() for t in in_place.experts.tensors()] == storages
    assert all(t.is_meta for t in engine_ctx.experts.tensors())  # what is left is shapes only
    assert engine_ctx.experts.gate.shape == original.gate.shape
    for a, b in zip(fresh_ctx.experts.tensors(), original.tensors(), strict=True):
        assert torch.equal(a, b)  # a merge not told it may overwrite leaves the source as it was


@pytest.mark.parametrize("biases", [False, True])
def test_merged_rows_that_move_in_a_cycle_land_in_group_order(biases):
    """Groups whose first members sit in other groups' places: merged expert k is written to row groups[k][0] and
    the rows are moved to the front (0 <- 5 <- ... a cycle through the scratch row)."""
    groups = [[5, 2], [0, 6], [1], [3, 4, 7]]
    original = source(biases)
    options = MethodOptions(merge="fix-dom-rr")
    fresh = merge_groups(context(Experts.of([t.clone() for t in original.tensors()]), False, keep=4), groups, options)
    in_place = merge_groups(context(Experts.of([t.clone() for t in original.tensors()]), True, keep=4), groups, options)
    for a, b in zip(fresh.experts.tensors(), in_place.experts.tensors(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(in_place.experts.gate[2], original.gate[1])  # the singleton, as stored


def test_best_grouping_merges_both_candidates_from_the_intact_source():
    """best-grouping merges twice from the same experts: given expendable ones it must not overwrite them."""
    original = source(False)
    plans = [METHODS["best-grouping"](context(Experts.of([t.clone() for t in original.tensors()]), e),
                                      MethodOptions(method="best-grouping")) for e in (False, True)]
    assert plans[0].groups == plans[1].groups
    assert plans[0].extra["grouping_errors"] == plans[1].extra["grouping_errors"]
    for a, b in zip(plans[0].experts.tensors(), plans[1].experts.tensors(), strict=True):
        assert torch.equal(a, b)


def test_giving_up_the_experts_twice_is_refused():
    ctx = context(source(False), expendable=True)
    ctx.give_up_experts()
    with pytest.raises(RuntimeError, match="still needed"):
        ctx.give_up_experts()
    with pytest.raises(RuntimeError, match="still needed"):
        context(source(False), expendable=False).give_up_experts()
