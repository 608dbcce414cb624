"""Granite MoE, Granite MoE with shared experts and the Granite 4.0 hybrids: fused experts on disk.

Tiny checkpoints are built with the real transformers classes and saved by `save_pretrained`, which writes the
Hub's layout (`block_sparse_moe.input_linear.weight` (E, 2I, H), `output_linear.weight` (E, H, I),
`router.layer.weight`); they are merged through the CLI and loaded back with stock `from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from router_probe import router_io
from test_families import IDS, _sorted_choice, calibration_ids, run_cli
from transformers import AutoConfig, AutoModelForCausalLM

from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.routing import route
from hc_smoe_hub.synthetic import build_tiny_moe

FAMILIES = ["granitemoe", "granitemoeshared", "granitemoehybrid"]
KEEP = 4  # of 8


@pytest.fixture(scope="module")
def granite_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("granite")
    return {fam: build_tiny_moe(root / fam, fam) for fam in FAMILIES}


def load(directory: Path):
    """The model loaded by stock transformers, its parameters copied out of the mmapped shards: CPU kernels take
    other code paths on differently aligned buffers, which changes the last bit of some logits, and where a
    tensor lands in a shard is no part of what the merge must preserve."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model.eval(), info


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_expert_reproduces_the_source(family, granite_models, merge_args, tmp_path):
    src = granite_models[family]
    out = tmp_path / "out"
    run_cli(src, out, 8, merge_args)
    model, info = load(out)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, load(src)[0](IDS).logits)
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    assert set(a.tensors) == set(b.tensors)
    assert all(b"".join(a.copy_raw(k)) == b"".join(b.copy_raw(k)) for k in a.tensors)


PLANNED = [(f, False) for f in FAMILIES] + [(f, True) for f in FAMILIES]


@pytest.mark.parametrize(("family", "paper"), PLANNED,
                         ids=[f"{f}-{'paper' if p else 'default'}" for f, p in PLANNED])
def test_reduced_checkpoint_stays_fused_loads_and_routes_as_planned(family, paper, granite_models, merge_args,
                                                                   calib_file, tmp_path):
    src = granite_models[family]
    out = tmp_path / "out"
    prov = run_cli(src, out, KEEP, merge_args, *(["--paper"] if paper else []))
    model, info = load(out)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == KEEP and config["num_experts_per_tok"] == 2
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    spec = spec_for(json.loads((src / "config.json").read_text()))
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    assert set(a.tensors) == set(b.tensors)  # a fused source stays fused: same keys, K rows
    for key, info_a in a.tensors.items():
        fused = key.endswith(("input_linear.weight", "output_linear.weight")) and "block_sparse_moe" in key
        router = key.endswith("router.layer.weight")
        expected = (KEEP, *info_a.shape[1:]) if fused or router else info_a.shape
        assert b.tensors[key].shape == expected, key
        if not (fused or router):
            assert b"".join(a.copy_raw(key)) == b"".join(b.copy_raw(key)), key  # shared_mlp, mamba, attention
    ids = calibration_ids(src, calib_file)
    for layer in prov["layers"]:
        li, clusters = layer["layer"], layer["clusters"]
        assert len(clusters) == KEEP and sorted(i for c in clusters for i in c) == list(range(8))
        weight = b.read([spec.router_key(li)])[spec.router_key(li)]
        # The stock router of the reduced model chooses exactly what route() says for the written router.
        x, idx, w = router_io(model, li, "block_sparse_moe.router", ids)
        ours_w, ours_i = route(x.float() @ weight.float().T, spec.routing(config))
        got_i, got_w = _sorted_choice(idx, w)
        exp_i, exp_w = _sorted_choice(ours_i, ours_w)
        assert torch.equal(got_i, exp_i)
        assert torch.allclose(got_w, exp_w, atol=1e-6)
    if paper:  # HC-SMoE's frequency-weighted merge of a singleton cluster is the member itself, row for row
        first = prov["layers"][0]
        solo = [(k, c[0]) for k, c in enumerate(first["clusters"]) if len(c) == 1]
        key = f"{spec.experts_base(first['layer'])}input_linear.weight"
        for k, e in solo:
            assert torch.equal(b.read([key], index=k)[key], a.read([key], index=e)[key])


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_matches_the_granite_router(top_k):
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter

    config = AutoConfig.for_model("granitemoe", hidden_size=32, num_local_experts=8, num_experts_per_tok=top_k)
    router = GraniteMoeTopKRouter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
    x = torch.randn(300, 32, generator=g)
    _, w, idx = router(x)
    spec = spec_for({"model_type": "granitemoe", **config.to_dict()})
    routing = spec.routing(config.to_dict())
    assert routing.scoring == "topk-softmax" and routing.plain_softmax
    ours_w, ours_i = route(x @ router.weight.T, routing)
    assert torch.equal(ours_i, idx)
    assert torch.equal(ours_w, w)  # the same fp32 softmax over the same k logits, bit for bit


def test_hybrid_layers_get_the_same_masks_without_padding(granite_models):
    """The engine gives every decoder layer the keyword arguments layer 0 received. In the hybrids, Mamba-2 and
    attention layers get different masks (`causal_mask_mapping[layer_types[i]]`); without padding (the engine's
    calibration batches have none) both are None, which is what makes the hybrid merge exact today."""
    model = AutoModelForCausalLM.from_pretrained(granite_models["granitemoehybrid"], attn_implementation="sdpa")
    seen: dict[int, object] = {}
    handles = [layer.register_forward_pre_hook(lambda _m, _a, kw, i=i: seen.setdefault(i, kw.get("attention_mask")),
                                               with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        for h in handles:
            h.remove()
    assert model.config.layer_types[:2] == ["linear_attention", "full_attention"]
    assert seen == {0: None, 1: None, 2: None}
