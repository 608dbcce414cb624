"""Qwen3.5-MoE: a tiny vision-language checkpoint in the Hub's layout (fused experts, `model.language_model.*`,
`model.visual.*`, `mtp.*`), built with the real transformers classes, merged through the CLI and loaded back with
stock `AutoModelForCausalLM.from_pretrained` (and the vision-language class).

Also, for the hybrid families (Gated DeltaNet / Mamba-2 layers between attention layers): the MoE inputs the
engine computes layer by layer are the ones the stock model computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_families import IDS, _sorted_choice, calibration_ids, run_cli
from test_granite import load
from transformers import AutoModelForImageTextToText

from hc_smoe_hub import streaming
from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.routing import route
from hc_smoe_hub.synthetic import build_tiny_moe
from hc_smoe_hub.synthetic_layouts import build_tiny_qwen3_5_moe

KEEP = 4  # of 8


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory) -> Path:
    return build_tiny_qwen3_5_moe(tmp_path_factory.mktemp("qwen3_5_moe") / "src")


def test_keeping_every_expert_reproduces_the_source(qwen35, merge_args, tmp_path):
    out = tmp_path / "out"
    prov = run_cli(qwen35, out, 8, merge_args)
    model, info = load(out)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, load(qwen35)[0](IDS).logits)
    a, b = SourceCheckpoint(qwen35), SourceCheckpoint(out)
    kept = {k for k in a.tensors if not k.startswith("mtp.")}
    assert kept != set(a.tensors) and set(b.tensors) == kept  # the MTP weights, and only they, are dropped
    assert any(k.startswith("model.visual.") for k in kept)  # the vision tower is copied, byte for byte
    assert all(b"".join(a.copy_raw(k)) == b"".join(b.copy_raw(k)) for k in kept)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["text_config"]["mtp_num_hidden_layers"] == 0
    assert prov["architecture"]["mtp_layers"] == {"count": 1, "action": "dropped",
                                                  "config": {"mtp_num_hidden_layers": 0}, "keys": ["mtp.*"]}
    vl, vl_info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(vl_info.values()), vl_info  # the vision-language class loads it too


@pytest.mark.parametrize("paper", [False, True], ids=["default", "paper"])
def test_reduced_checkpoint_stays_fused_loads_and_routes_as_planned(paper, qwen35, merge_args, calib_file, tmp_path):
    out = tmp_path / "out"
    prov = run_cli(qwen35, out, KEEP, merge_args, *(["--paper"] if paper else []))
    model, info = load(out)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_experts"] == KEEP
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == KEEP
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    spec = spec_for(json.loads((qwen35 / "config.json").read_text()))
    a, b = SourceCheckpoint(qwen35), SourceCheckpoint(out)
    for key in b.tensors:
        if key.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight")):
            assert b.tensors[key].shape == (KEEP, *a.tensors[key].shape[1:]), key
        else:
            assert b"".join(a.copy_raw(key)) == b"".join(b.copy_raw(key)), key
    ids = calibration_ids(qwen35, calib_file)
    for layer in prov["layers"]:
        li, clusters = layer["layer"], layer["clusters"]
        assert len(clusters) == KEEP and sorted(i for c in clusters for i in c) == list(range(8))
        router = b.read([spec.router_key(li)])[spec.router_key(li)]
        gate = model.model.layers[li].mlp.gate
        seen: dict[str, torch.Tensor] = {}
        handle = gate.register_forward_hook(lambda _m, args, output, seen=seen: seen.update(
            x=args[0], w=output[1], i=output[2]))
        try:
            with torch.no_grad():
                model(ids)
        finally:
            handle.remove()
        ours_w, ours_i = route(seen["x"].float() @ router.float().T, spec.routing(config))
        got_i, got_w = _sorted_choice(seen["i"], seen["w"])
        exp_i, exp_w = _sorted_choice(ours_i, ours_w)
        assert torch.equal(got_i, exp_i)
        assert torch.allclose(got_w, exp_w, atol=1e-6)


def test_a_per_expert_source_stays_per_expert(merge_args, tmp_path):
    """A Qwen3.5-MoE saved by transformers 5 (per-expert keys, the row's other storage) is merged in that layout."""
    src = build_tiny_qwen3_5_moe(tmp_path / "src", fused=False)
    assert "model.language_model.layers.0.mlp.experts.7.up_proj.weight" in SourceCheckpoint(src)
    for keep in (8, KEEP):
        out = tmp_path / f"out{keep}"
        run_cli(src, out, keep, merge_args)
        model, info = load(out)
        assert not any(info.values()), info
        a, b = SourceCheckpoint(src), SourceCheckpoint(out)
        experts = {k for k in b.tensors if ".mlp.experts." in k}
        assert experts == {k for k in a.tensors if ".mlp.experts." in k and not k.startswith("mtp.")
                           and int(k.split(".experts.")[1].split(".")[0]) < keep}
        with torch.no_grad():
            logits = model(IDS).logits
            assert torch.equal(logits, load(src)[0](IDS).logits) if keep == 8 else torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["qwen3_5_moe", "granitemoehybrid"])
def test_the_engine_sees_the_moe_inputs_the_model_computes(family, merge_args, tmp_path, monkeypatch):
    """Keeping every expert, sequentially: every MoE layer's input as the engine computed it (attention or
    linear-attention layers run with layer 0's keyword arguments, the previous layers finished by the engine)
    equals the stock model's on the same calibration blocks."""
    src = (build_tiny_qwen3_5_moe(tmp_path / "src") if family == "qwen3_5_moe"
           else build_tiny_moe(tmp_path / "src", family))
    seen: dict[str, list[torch.Tensor]] = {"x": [], "blocks": []}
    collect, embed = streaming.collect, streaming.StreamingMerger._embed

    def spy_collect(x, *args, **kwargs):
        seen["x"].append(x.clone())
        return collect(x, *args, **kwargs)

    def spy_embed(self, model, blocks):
        seen["blocks"].append(blocks.clone())
        return embed(self, model, blocks)

    monkeypatch.setattr(streaming, "collect", spy_collect)
    monkeypatch.setattr(streaming.StreamingMerger, "_embed", spy_embed)
    run_cli(src, tmp_path / "out", 8, merge_args)
    model = load(src)[0]
    layers = model.model.layers
    moe_name = spec_for(json.loads((src / "config.json").read_text())).moe_module
    inputs: list[torch.Tensor] = []
    handles = [layer.get_submodule(moe_name).register_forward_pre_hook(
        lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]))) for layer in layers]
    try:
        with torch.no_grad():
            model(seen["blocks"][0])
    finally:
        for h in handles:
            h.remove()
    assert len(seen["x"]) == len(inputs) == len(layers)
    for ours, theirs in zip(seen["x"], inputs, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
