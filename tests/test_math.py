"""The pure parts: clustering, merging, router patching, statistics, the shard writer."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open

from hc_smoe_hub.checkpoint import OutputTensor, ShardedWriter, SourceCheckpoint, parse_size
from hc_smoe_hub.clustering import hierarchical_groups
from hc_smoe_hub.merge import parse_keep
from hc_smoe_hub.merging import fix_dom_merge, reduce_router, weighted_merge
from hc_smoe_hub.routing import Experts, Routing, moe_output
from hc_smoe_hub.stats import collect

ACT = torch.nn.functional.silu


def naive_agglomerative(points: torch.Tensor, k: int, method: str) -> list[list[int]]:
    """Textbook agglomerative clustering by brute force, to check the SciPy-based implementation."""
    clusters = [[i] for i in range(points.shape[0])]
    d = torch.cdist(points.double(), points.double())

    def dist(a, b):
        pair = d[a][:, b]
        if method == "single":
            return pair.min()
        if method == "complete":
            return pair.max()
        return pair.mean()

    while len(clusters) > k:
        i, j = min(itertools.combinations(range(len(clusters)), 2),
                   key=lambda ij: float(dist(clusters[ij[0]], clusters[ij[1]])))
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    return sorted(clusters, key=lambda c: c[0])


@pytest.mark.parametrize("method", ["single", "complete", "average"])
@pytest.mark.parametrize("seed", range(4))
def test_linkages_are_the_textbook_definitions(method, seed):
    pts = torch.randn(12, 5, generator=torch.Generator().manual_seed(seed))
    for k in (2, 5, 9):
        assert hierarchical_groups(pts, k, method) == naive_agglomerative(pts, k, method)


def test_exactly_k_clusters_even_with_ties():
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])  # every neighbour distance ties
    for k in range(1, 7):
        groups = hierarchical_groups(pts, k, "single")
        assert len(groups) == k and sorted(sum(groups, [])) == list(range(6))


def test_cosine_metric_groups_by_direction():
    pts = torch.tensor([[1.0, 0.0], [10.0, 0.1], [0.0, 1.0], [0.1, 10.0]])
    assert hierarchical_groups(pts, 2, "average", "cosine") == [[0, 1], [2, 3]]
    assert hierarchical_groups(pts, 2, "average", "euclidean") != [[0, 1], [2, 3]]


def test_ward_requires_euclidean():
    with pytest.raises(ValueError):
        hierarchical_groups(torch.randn(4, 2), 2, "ward", "cosine")


def random_experts(n=6, inter=8, hidden=4, seed=0, bias=False) -> Experts:
    g = torch.Generator().manual_seed(seed)
    mats = (torch.randn(n, inter, hidden, generator=g), torch.randn(n, inter, hidden, generator=g),
            torch.randn(n, hidden, inter, generator=g))
    if not bias:
        return Experts(*mats)
    return Experts(*mats, torch.randn(n, inter, generator=g), torch.randn(n, inter, generator=g),
                   torch.randn(n, hidden, generator=g))


def test_frequency_merge_and_zero_frequency_fallback():
    ex = random_experts()
    freqs = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0, 0.0])
    merged = weighted_merge(ex, [[0, 1], [2], [3, 4, 5]], freqs)
    assert torch.allclose(merged.gate[0], (2 * ex.gate[0] + ex.gate[1]) / 3, atol=1e-6)
    assert torch.equal(merged.down[1], ex.down[2])
    assert torch.allclose(merged.up[2], ex.up[3:6].mean(0), atol=1e-6)  # never routed: plain mean, not zero
    assert merged.gate.dtype == ex.gate.dtype


# One chunk of tokens (each block of correlations final at once) and three (summed over chunks); the neurons'
# correlations whole, or five columns at a time.
@pytest.mark.parametrize("tokens,block_bytes", [(512, 1 << 26), (512, 4 * 16 * 5), (9000, 4 * 16 * 5)])
def test_fix_dom_recovers_a_neuron_permuted_copy(tokens, block_bytes, monkeypatch):
    from hc_smoe_hub import merging

    monkeypatch.setattr(merging, "_CORR_BLOCK_BYTES", block_bytes)
    ex = random_experts(n=2, inter=16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    ex.gate[1], ex.up[1], ex.down[1] = ex.gate[0][perm], ex.up[0][perm], ex.down[0][:, perm]
    x = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(2))
    features = torch.zeros(2, 4)
    merged = fix_dom_merge(ex, [[0, 1]], features, [x], ACT)
    assert torch.allclose(merged.gate[0], ex.gate[0], atol=1e-5)
    assert torch.allclose(merged.down[0], ex.down[0], atol=1e-5)
    averaged = weighted_merge(ex, [[0, 1]], None)
    assert not torch.allclose(averaged.gate[0], ex.gate[0], atol=1e-2)


@pytest.mark.parametrize("block_bytes", [1 << 26, 4 * 24 * 7])
def test_fix_dom_maps_each_neuron_by_its_correlation_over_every_token_chunk(block_bytes, monkeypatch):
    """Unrelated experts on 9000 tokens (three chunks): each member neuron goes to the dominant neuron it
    correlates with most over all the tokens, as a plain fp64 computation finds it."""
    from hc_smoe_hub import merging
    from hc_smoe_hub.routing import expert_hidden

    monkeypatch.setattr(merging, "_CORR_BLOCK_BYTES", block_bytes)
    ex = random_experts(n=2, inter=24, hidden=4, seed=31)
    x = torch.randn(9000, 4, generator=torch.Generator().manual_seed(32)) * torch.linspace(0.2, 3.0, 9000)[:, None]
    merged = fix_dom_merge(ex, [[0, 1]], torch.tensor([[0.0], [1.0]]), [x], ACT)  # a tie: the dominant is 0
    a_dom, h = (expert_hidden(x.double(), ex.gate[i].double(), ex.up[i].double(), ACT) for i in (0, 1))
    mapped = ((a_dom - a_dom.mean(0)) / a_dom.std(0)).T.matmul(h).argmax(dim=0)
    hits = torch.ones(24, dtype=torch.float64).index_add_(0, mapped, torch.ones(24, dtype=torch.float64))
    gate = ex.gate[0].double().index_add(0, mapped, ex.gate[1].double()) / hits[:, None]
    assert torch.allclose(merged.gate[0].double(), gate, atol=1e-5)


def test_fitted_router_matches_grouped_probabilities_best():
    g = torch.Generator().manual_seed(0)
    router = torch.randn(6, 8, generator=g)
    x = torch.randn(2048, 8, generator=g)
    groups = [[0, 3], [1], [2, 4, 5]]
    freqs = torch.full((6,), 1 / 6)
    probs = torch.softmax(x @ router.T, -1)
    target = torch.stack([probs[:, grp].sum(-1) for grp in groups], -1)

    def xent(rows):
        return float(-(target * torch.log_softmax(x @ rows.T, -1)).sum(-1).mean())

    fitted = reduce_router(router, groups, "fit", freqs, x)[0]
    assert xent(fitted) < xent(reduce_router(router, groups, "mean", freqs)[0]) - 0.01
    assert xent(fitted) < xent(reduce_router(router, groups, "dominant", freqs)[0])
    assert torch.equal(reduce_router(router, [[i] for i in range(6)], "fit", freqs, x)[0], router)


def test_stats_use_the_real_top_k_unless_the_paper_switch_is_on():
    ex = random_experts(n=8)
    router = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(4))
    real = collect(x, ex, router, Routing(4, False), ACT)
    paper = collect(x, ex, router, Routing(4, False), ACT, freq_top_k=2)
    assert real.counts.sum() == 400 and paper.counts.sum() == 200
    expected = torch.stack([((ACT(x @ ex.gate[i].T) * (x @ ex.up[i].T)) @ ex.down[i].T).mean(0) for i in range(8)])
    assert torch.allclose(real.features, expected, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_statistics_pass_assembles_the_routed_block_output(renormalize):
    g = torch.Generator().manual_seed(3)
    ex = Experts(torch.randn(6, 16, 8, generator=g), torch.randn(6, 16, 8, generator=g),
                 torch.randn(6, 8, 16, generator=g))
    x, router = torch.randn(300, 8, generator=g), torch.randn(6, 8, generator=g)
    stats = collect(x, ex, router, Routing(2, renormalize), ACT, chunk=64, sample_rows=torch.arange(0, 300, 7))
    expected = moe_output(x, ex, router, Routing(2, renormalize), ACT)
    assert torch.allclose(stats.routed_output, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(stats.sampled_output, expected[torch.arange(0, 300, 7)], rtol=1e-4, atol=1e-4)
    assert collect(x, ex, router, Routing(2, renormalize), ACT).sampled_output is None


@pytest.mark.parametrize("act", [torch.nn.functional.silu, torch.nn.functional.gelu])
def test_expert_hidden_into_reused_buffers_equals_the_plain_product(act):
    from hc_smoe_hub.routing import expert_hidden

    g = torch.Generator().manual_seed(4)
    x, gate, up = torch.randn(50, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    buffers = (torch.full((64, 16), float("nan")), torch.full((64, 16), float("nan")))
    expected = act(x @ gate.T) * (x @ up.T)
    assert torch.allclose(expert_hidden(x, gate, up, act, out=buffers), expected, atol=1e-6)
    assert torch.allclose(expert_hidden(x[:20], gate, up, act, out=buffers), expected[:20], atol=1e-6)


def test_moe_output_matches_transformers_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg)
    torch.nn.init.normal_(block.experts.gate_up_proj)
    torch.nn.init.normal_(block.experts.down_proj)
    torch.nn.init.normal_(block.gate.weight)
    x = torch.randn(1, 10, 8)
    gu = block.experts.gate_up_proj.detach()
    ex = Experts(gu[:, :16], gu[:, 16:], block.experts.down_proj.detach())
    ours = moe_output(x[0], ex, block.gate.weight.detach(), Routing(2, True), torch.nn.functional.silu)
    with torch.no_grad():
        assert torch.allclose(ours, block(x)[0], atol=1e-4)


def test_keep_parsing():
    assert parse_keep("45", 60) == 45 and parse_keep("0.75", 60) == 45 and parse_keep(8, 8) == 8
    for bad in ("0", "61", "1.5", "x", "", "-3"):
        with pytest.raises(Exception, match="--keep"):
            parse_keep(bad, 60)


def test_writer_round_trip_and_sizes(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20 and parse_size("123") == 123
    data = {f"t{i}": torch.randn(10, 3 + i).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    plan = [OutputTensor(k, "BF16" if v.dtype == torch.bfloat16 else "F32", tuple(v.shape)) for k, v in data.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=300)
    for k in reversed(list(data)):  # any order
        writer.write(k, data[k])
    writer.finish()
    back = SourceCheckpoint(tmp_path)
    assert back.keys() and all(torch.equal(back.read([k])[k], v) for k, v in data.items())
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:  # the safetensors library itself accepts our files
            assert list(fh.keys())


def test_writer_refuses_unwritten_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [OutputTensor("a", "F32", (2,))], 100)
    with pytest.raises(RuntimeError):
        writer.finish()
    with pytest.raises(ValueError):
        writer.write("a", torch.zeros(3))


def test_least_squares_refit_reproduces_the_group_better_than_its_dominant_member():
    from hc_smoe_hub.merging import dominant_merge
    from hc_smoe_hub.refit import refit_down
    from hc_smoe_hub.routing import expert_hidden

    ex = random_experts(n=3, inter=16, hidden=6, seed=5)
    # Member 1 shares member 0's neurons but has another down projection: a refit can absorb it exactly.
    ex.gate[1], ex.up[1] = ex.gate[0].clone(), ex.up[0].clone()
    router = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    x = torch.randn(4000, 6, generator=torch.Generator().manual_seed(7))
    groups, freqs = [[0, 1], [2]], torch.tensor([0.5, 0.3, 0.2])
    base = dominant_merge(ex, groups, freqs)
    fitted = refit_down(ex, base, groups, [x, x], router, ACT)
    probs = torch.softmax(x @ router.T, -1)[:, [0, 1]]
    outs = torch.stack([expert_hidden(x, ex.gate[i], ex.up[i], ACT) @ ex.down[i].T for i in (0, 1)], 1)
    target = (probs[..., None] * outs).sum(1) / probs.sum(-1, keepdim=True)

    def err(e):
        return float((expert_hidden(x, e.gate[0], e.up[0], ACT) @ e.down[0].T - target).norm() / target.norm())

    assert err(fitted) < 0.5 * err(base)
    assert torch.equal(fitted.down[1], ex.down[2]) and torch.equal(fitted.gate[0], ex.gate[0])


def test_anchored_groups_join_the_nearest_anchor():
    from hc_smoe_hub.methods import anchored_groups

    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.5, 0.0], [9.0, 1.0], [0.0, 9.0]])
    assert anchored_groups(features, [1, 0, 4]) == [[0, 2], [1, 3], [4]]
    assert anchored_groups(features, [0, 1, 2, 3, 4]) == [[0], [1], [2], [3], [4]]


@pytest.mark.parametrize("renormalize", [True, False])
def test_rerouted_refit_lowers_the_routed_output_error_from_its_start(renormalize):
    from hc_smoe_hub.merging import fix_dom_merge
    from hc_smoe_hub.refit import refit_down, refit_down_rerouted

    ex = random_experts(n=6, inter=12, hidden=8, seed=8)
    g = torch.Generator().manual_seed(9)
    router = torch.randn(6, 8, generator=g)
    x = torch.randn(3000, 8, generator=g)
    routing = Routing(2, renormalize)
    groups, freqs = [[0, 3], [1, 4], [2, 5]], torch.full((6,), 1 / 6)
    base = refit_down(ex, fix_dom_merge(ex, groups, torch.zeros(6, 8), [x] * 3, ACT), groups, [x] * 3, router, ACT)
    new_router = reduce_router(router, groups, "fit", freqs, x)[0]
    reduced = Routing(2, renormalize)  # min(top_k, K)
    ref = moe_output(x, ex, router, routing, ACT)

    def err(e):
        return float((moe_output(x, e, new_router, reduced, ACT) - ref).norm() / ref.norm())

    fitted = refit_down_rerouted(ex, base, router, new_router, x, routing, ACT, chunk=500)
    assert err(fitted) < err(base) - 1e-3  # strictly better here, never worse by construction
    assert torch.equal(fitted.gate, base.gate) and torch.equal(fitted.up, base.up)
    more = refit_down_rerouted(ex, base, router, new_router, x, routing, ACT, sweeps=3)
    assert err(more) <= err(fitted) + 1e-6
    # Starting again from its own result never makes it worse either.
    assert err(refit_down_rerouted(ex, more, router, new_router, x, routing, ACT, sweeps=1)) <= err(more) + 1e-6


@pytest.mark.parametrize("tokens", [40, 400])  # fewer rows than the 64 columns (dual form) and more (primal)
def test_ridge_rows_is_the_closed_form_ridge_solution_in_both_forms(tokens):
    from hc_smoe_hub.refit import ridge_rows

    g = torch.Generator().manual_seed(21)
    a, target, prior = (torch.randn(tokens, 64, generator=g, dtype=torch.float64),
                        torch.randn(tokens, 5, generator=g, dtype=torch.float64),
                        torch.randn(5, 64, generator=g, dtype=torch.float64))
    for ridge, p in ((0.1, None), (1.0, prior)):
        lam = ridge * (a.T @ a).diagonal().mean()
        start = torch.zeros(5, 64, dtype=torch.float64) if p is None else p
        expected = torch.linalg.solve(a.T @ a + lam * torch.eye(64, dtype=torch.float64),
                                      a.T @ target + lam * start.T)
        assert torch.allclose(ridge_rows(a, target, ridge, p), expected, atol=1e-9)


def _reference_rerouted_refit(ex, base, router, new_router, x, routing, sweeps, ridge=1.0):
    """The joint re-routed refit written plainly: primal normal equations with an explicit identity, fp64."""
    from hc_smoe_hub.routing import expert_hidden, route

    y = moe_output(x.double(), Experts(*(m.double() for m in (ex.gate, ex.up, ex.down))), router.double(),
                   routing, ACT).double()
    w, idx = route(x @ new_router.T, Routing(min(routing.top_k, base.count), routing.renormalize))
    designs, downs = [], [base.down[k].double().clone() for k in range(base.count)]
    for k in range(base.count):
        tok, slot = torch.where(idx == k)
        h = expert_hidden(x[tok].double(), base.gate[k].double(), base.up[k].double(), ACT)
        designs.append((tok, h * w[tok, slot, None].double()))
    for _ in range(sweeps):
        for k, (tok, a) in enumerate(designs):
            pred = torch.zeros_like(y)
            for j, (tj, aj) in enumerate(designs):
                if j != k:
                    pred.index_add_(0, tj, aj @ downs[j].T)
            gram = a.T @ a
            lam = ridge * gram.diagonal().mean()
            eye = torch.eye(gram.shape[0], dtype=torch.float64)
            downs[k] = torch.linalg.solve(gram + lam * eye, a.T @ (y - pred)[tok] + lam * base.down[k].double().T).T
    return torch.stack(downs)


@pytest.mark.parametrize("tokens", [60, 3000])  # every merged expert below its 64 intermediate rows (dual), above
def test_rerouted_refit_equals_the_plain_block_coordinate_solution(tokens):
    from hc_smoe_hub.merging import weighted_merge
    from hc_smoe_hub.refit import refit_down_rerouted

    ex = random_experts(n=6, inter=64, hidden=8, seed=22)
    g = torch.Generator().manual_seed(23)
    router, x = torch.randn(6, 8, generator=g), torch.randn(tokens, 8, generator=g)
    groups = [[0, 3], [1, 4], [2, 5]]
    base = weighted_merge(ex, groups, None)
    new_router = reduce_router(router, groups, "mean", torch.full((6,), 1 / 6))[0]
    routing = Routing(2, True)
    before = base.down.clone()
    fitted = refit_down_rerouted(ex, base, router, new_router, x, routing, ACT, sweeps=2)
    expected = _reference_rerouted_refit(ex, base, router, new_router, x, routing, sweeps=2)
    assert torch.allclose(fitted.down.double(), expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(base.down, before)  # the input is left alone unless told otherwise


@pytest.mark.parametrize("tokens", [60, 3000])
def test_rerouted_refit_in_place_in_row_blocks_equals_the_fresh_result(tokens, monkeypatch):
    from hc_smoe_hub import refit
    from hc_smoe_hub.merging import weighted_merge

    ex = random_experts(n=6, inter=64, hidden=8, seed=24, bias=True)
    g = torch.Generator().manual_seed(25)
    router, x = torch.randn(6, 8, generator=g), torch.randn(tokens, 8, generator=g)
    groups = [[0, 3], [1, 4], [2, 5]]
    new_router = reduce_router(router, groups, "mean", torch.full((6,), 1 / 6))[0]
    routing = Routing(2, True)
    fresh = refit.refit_down_rerouted(ex, weighted_merge(ex, groups, None), router, new_router, x, routing, ACT)
    monkeypatch.setattr(refit, "_ASSEMBLY_BYTES", 3 * 4 * 65)  # three of the 8 output rows (and bias) at a time
    base = weighted_merge(ex, groups, None)
    in_place = refit.refit_down_rerouted(ex, base, router, new_router, x, routing, ACT, overwrite_base=True)
    assert in_place.down is base.down and in_place.down_bias is base.down_bias
    assert torch.allclose(in_place.down, fresh.down, atol=1e-6)
    assert torch.allclose(in_place.down_bias, fresh.down_bias, atol=1e-6)
    start = weighted_merge(ex, groups, None)
    assert not torch.allclose(fresh.down, start.down, atol=1e-3)  # the refit moved both, so the checks bite
    assert not torch.allclose(fresh.down_bias, start.down_bias, atol=1e-3)


def test_rerouted_refit_keeps_what_fits_its_budget_and_the_result_does_not_change(monkeypatch):
    """Primal blocks (3000 tokens, 64 intermediate rows): with no budget every sweep rebuilds each merged expert's
    design rows and factor, with room for both each is built once, with room for the design rows alone the
    factors are rebuilt; the refitted experts are the same every time."""
    from hc_smoe_hub import refit

    ex = random_experts(n=6, inter=64, hidden=8, seed=26)
    g = torch.Generator().manual_seed(27)
    router, x = torch.randn(6, 8, generator=g), torch.randn(3000, 8, generator=g)
    groups = [[0, 3], [1, 4], [2, 5]]
    base = weighted_merge(ex, groups, None)
    new_router = reduce_router(router, groups, "mean", torch.full((6,), 1 / 6))[0]
    calls = {"design": 0, "factor": 0}
    real_design, real_factor = refit._design, refit._cholesky_shifted

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(refit, "_design", counted("design", real_design))
    monkeypatch.setattr(refit, "_cholesky_shifted", counted("factor", real_factor))
    design_bytes = 3000 * 2 * 64 * 4  # every sampled token routed to two merged experts, fp32 rows here
    results = {}
    for budget in (0, design_bytes, 1 << 30):
        calls.update(design=0, factor=0)
        results[budget] = refit.refit_down_rerouted(ex, base, router, new_router, x, Routing(2, True), ACT,
                                                    sweeps=3, cache_bytes=budget)
        results[budget, "calls"] = dict(calls)
    # No budget: design rows at set-up, in each of 3 sweeps and at the end (dual only), factors in each sweep.
    assert results[0, "calls"] == {"design": 3 * 4, "factor": 3 * 3}
    assert results[design_bytes, "calls"] == {"design": 3, "factor": 3 * 3}
    assert results[1 << 30, "calls"] == {"design": 3, "factor": 3}
    for budget in (design_bytes, 1 << 30):
        assert torch.allclose(results[budget].down, results[0].down, atol=1e-5)


def test_refit_cache_budget_follows_the_free_memory():
    from hc_smoe_hub.host_memory import available_ram
    from hc_smoe_hub.refit import MIN_REFIT_CACHE, refit_cache_budget

    budget = refit_cache_budget(torch.device("cpu"))
    free = available_ram()
    assert free is not None and budget >= MIN_REFIT_CACHE
    assert budget == max(MIN_REFIT_CACHE, free // 2) or abs(budget - free // 2) < free // 20  # RAM moves a little
    if torch.cuda.is_available():  # benchmarks/gpu_check.sh runs this file on a GPU
        free_gpu, _ = torch.cuda.mem_get_info()
        assert refit_cache_budget(torch.device("cuda")) >= max(MIN_REFIT_CACHE, free_gpu // 2)
