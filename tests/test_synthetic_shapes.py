"""The shard-by-shard random checkpoint writer that the real-shape benchmark uses: Hub layout, stock-loadable."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.synthetic import FAMILY_CONFIGS, build_tiny_moe, disk_layout, tiny_config, write_random_checkpoint


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_disk_layout_is_what_save_pretrained_writes(tmp_path, family):
    saved = build_tiny_moe(tmp_path / "ref", family, num_layers=2)
    on_disk = {k: tuple(v.shape) for k, v in SourceCheckpoint(saved).tensors.items()}
    config = tiny_config(family, 2)
    assert disk_layout(config, spec_for(json.loads((saved / "config.json").read_text()))) == on_disk


def test_random_checkpoint_has_one_shard_per_layer_and_loads_stock(tmp_path):
    fields = {"model_type": "qwen2_moe", **{k: v for k, v in FAMILY_CONFIGS["qwen2_moe"].items()
                                            if k != "model_type"},
              "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    out = write_random_checkpoint(tmp_path / "ck", fields, dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # embeddings/head + one per decoder layer
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert all(torch.equal(state[k], torch.ones_like(state[k])) for k in state if k.endswith("layernorm.weight"))
    assert float(state["model.layers.0.mlp.experts.down_proj"].float().std()) == pytest.approx(0.02, rel=0.2)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
