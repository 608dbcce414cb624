"""Each decoder layer runs with its own keyword arguments: a model whose sliding-window and full-attention layers
get different masks (Qwen2-MoE with `use_sliding_window`, a window shorter than the calibration blocks) is run
layer by layer by the engine exactly as the stock model runs it.

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


@pytest.fixture(scope="module")
def sliding_src(tmp_path_factory) -> Path:
    # Layers 0 and 2 sliding-window, layer 1 full attention (Qwen2MoeConfig: (i + 1) % 2 and i < max_window_layers).
    return build_tiny_moe(tmp_path_factory.mktemp("sliding") / "qwen2_moe", "qwen2_moe", use_sliding_window=True,
                          sliding_window=WINDOW, max_window_layers=3, mlp_only_layers=[])


def test_sliding_and_full_layers_get_their_own_masks(sliding_src, merge_args, tmp_path, monkeypatch):
    config = json.loads((sliding_src / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    blocks: list[torch.Tensor] = []
    after: dict[int, list[torch.Tensor]] = {}
    embed, process = StreamingMerger._embed, StreamingMerger._process_layer

    def record_blocks(self, model, b):
        blocks.append(b)
        return embed(self, model, b)

    def record_layer(self, layers, layer_idx, hidden, kwargs, writer):
        out = process(self, layers, layer_idx, hidden, kwargs, writer)
        after[layer_idx] = [h.clone() for h in hidden]
        return out

    monkeypatch.setattr(StreamingMerger, "_embed", record_blocks)
    monkeypatch.setattr(StreamingMerger, "_process_layer", record_layer)
    out = tmp_path / "out"
    run_cli(sliding_src, out, config["num_experts"], merge_args, "--one-shot")

    source = load(sliding_src)[0]
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
