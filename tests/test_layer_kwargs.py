"""Each decoder layer runs with its own keyword arguments: a model whose sliding-window and full-attention layers
get different masks (Qwen2-MoE with `use_sliding_window`, a window shorter than the calibration blocks), and
Qwen3-Next's linear- and full-attention layers, are run layer by layer by the engine exactly as the stock model
runs them.

With layer 0's mask reused for every layer, the full-attention layer would see the sliding-window mask and the
hidden states the engine calibrates on would differ from the model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_families import IDS, load, run_cli

from hc_smoe_hub.streaming import StreamingMerger
from hc_smoe_hub.synthetic import build_tiny_moe

WINDOW = 8  # shorter than the calibration blocks (64 tokens) and IDS (24 tokens)


# name -> (builder family, config overrides, the layer types config.json must list)
CASES = {
    # Layers 0 and 2 sliding-window, layer 1 full attention (Qwen2MoeConfig: (i + 1) % 2 and i < max_window_layers).
    "qwen2_moe_sliding": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3,
                                        "mlp_only_layers": []},
                          ["sliding_attention", "full_attention", "sliding_attention"]),
    # Qwen3-Next: a linear-attention (gated delta net) MoE layer between full-attention ones.
    "qwen3_next": ("qwen3_next", {}, ["full_attention", "linear_attention", "full_attention"]),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layer_kwargs")
    return {name: build_tiny_moe(root / name, fam, **over) for name, (fam, over, _) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_layer_runs_with_its_own_mask(name, sources, merge_args, tmp_path, monkeypatch):
    src = sources[name]
    config = json.loads((src / "config.json").read_text())
    types = config["layer_types"]
    assert types == CASES[name][2]
    blocks: list[torch.Tensor] = []
    after: dict[int, list[torch.Tensor]] = {}
    embed, process = StreamingMerger._embed, StreamingMerger._process_layer

    caught: list[list[dict]] = []

    def record_blocks(self, model, b):
        blocks.append(b)
        hidden, kwargs = embed(self, model, b)
        caught.extend(kwargs)
        return hidden, kwargs

    def record_layer(self, layers, layer_idx, hidden, kwargs, writer):
        out = process(self, layers, layer_idx, hidden, kwargs, writer)
        after[layer_idx] = [h.clone() for h in hidden]
        return out

    monkeypatch.setattr(StreamingMerger, "_embed", record_blocks)
    monkeypatch.setattr(StreamingMerger, "_process_layer", record_layer)
    out = tmp_path / "out"
    run_cli(src, out, config["num_experts"], merge_args, "--one-shot")

    # Per batch, the layers share the model's tensors: one mask per layer type, one rotary pair.
    for per_layer in caught:
        assert per_layer[0]["attention_mask"] is per_layer[2]["attention_mask"]
        assert all(kw["position_embeddings"] is per_layer[0]["position_embeddings"] for kw in per_layer)
        if name == "qwen2_moe_sliding":  # the sliding-window mask is a tensor, the full-attention one another
            assert per_layer[0]["attention_mask"] is not None
            assert per_layer[1]["attention_mask"] is not per_layer[0]["attention_mask"]

    source = load(src)[0]
    reduced = load(out)[0]
    with torch.no_grad():
        assert torch.equal(reduced(IDS).logits, source(IDS).logits)
        # The stock model's decoder-layer outputs on the calibration blocks, against the engine's.
        outputs: dict[int, torch.Tensor] = {}
        handles = [layer.register_forward_hook(lambda _m, _a, o, i=i: outputs.__setitem__(i, o))
                   for i, layer in enumerate(source.model.layers)]
        try:
            source(blocks[0])
        finally:
            for h in handles:
                h.remove()
    for i in range(config["num_hidden_layers"]):
        got = torch.cat(after[i]).reshape(outputs[i].shape)
        assert torch.allclose(got, outputs[i], atol=1e-4, rtol=1e-4), (i, float((got - outputs[i]).abs().max()))
