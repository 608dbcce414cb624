"""sizing.py against the real thing: parameter and byte counts of stock transformers models of every family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hc_smoe_hub import sizing
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.synthetic import FAMILY_CONFIGS, MODERN_FAMILY_CONFIGS, build_tiny_moe, tiny_config

FAMILIES = (*FAMILY_CONFIGS, *MODERN_FAMILY_CONFIGS)  # every family synthetic.py builds with its transformers class


def _meta_model(family: str, **overrides):
    config = tiny_config(family, num_layers=3, hidden=32, **overrides)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_the_model_class(family: str) -> None:
    """Every weight the checkpoint holds (parameters and persistent buffers such as DeepSeek's score bias; the
    multi-token-prediction layers some families declare are not built by transformers and not merged)."""
    config, model = _meta_model(family)
    cfg = config.to_dict()
    state = model.state_dict()
    assert sizing._total_params(cfg) == sum(t.numel() for t in state.values())
    moe = sizing.moe_layers(cfg)
    assert moe == [i for i, layer in enumerate(model.model.layers) if _has_experts(layer)]
    per_layer = [sum(t.numel() for k, t in state.items() if k.startswith(f"model.layers.{i}.")) for i in moe]
    assert sizing.layer_weight_bytes(cfg) == max(per_layer) * 2


def test_qwen3_5_language_model_counts_match_the_model_class() -> None:
    """A vision-language config: its nested text_config is what is sized, against the language model's weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from hc_smoe_hub.synthetic_layouts import QWEN3_5_TEXT, QWEN3_5_VISION

    config = AutoConfig.for_model("qwen3_5_moe", text_config=QWEN3_5_TEXT, vision_config=QWEN3_5_VISION,
                                  tie_word_embeddings=False)
    with torch.device("meta"):
        state = AutoModelForImageTextToText.from_config(config).state_dict()
    language = {k: t for k, t in state.items() if not k.startswith("model.visual.")}
    cfg = config.to_dict()
    assert sizing._total_params(cfg) == sum(t.numel() for t in language.values())
    per_layer = [sum(t.numel() for k, t in language.items() if k.startswith(f"model.language_model.layers.{i}."))
                 for i in sizing.moe_layers(cfg)]
    assert len(per_layer) == 3 and sizing.layer_weight_bytes(cfg) == max(per_layer) * 2


def _has_experts(layer) -> bool:
    return any(name.endswith("experts") for name, _ in layer.named_modules())


def test_qwen_attention_bias_and_dense_layers_count() -> None:
    config, model = _meta_model("qwen2_moe", qkv_bias=True, mlp_only_layers=[0, 2])
    cfg = config.to_dict()
    assert sizing.moe_layers(cfg) == [1]
    assert sizing._total_params(cfg) == sum(p.numel() for p in model.parameters())


def test_checkpoint_and_disk_bytes_match_files_on_disk(tmp_path) -> None:
    src = build_tiny_moe(tmp_path / "m", "mixtral", dtype=torch.bfloat16)
    cfg = json.loads((src / "config.json").read_text())
    assert sizing.source_dtype_bytes(cfg) == 2
    assert sizing.checkpoint_bytes(cfg) == SourceCheckpoint(src).total_bytes()
    _, reduced = _meta_model("mixtral", num_local_experts=5)
    removed = 3 * sizing.expert_params(cfg) * 3 * 2 + 3 * 3 * 32 * 2  # 3 layers x 3 experts, router rows
    assert sizing.checkpoint_bytes(cfg, keep=5) == sizing.checkpoint_bytes(cfg) - removed
    assert sizing.disk_bytes(cfg, keep=5) == 2 * sizing.checkpoint_bytes(cfg) - removed
    assert sum(p.numel() for p in reduced.parameters()) * 2 == sizing.checkpoint_bytes(cfg, keep=5)


def test_nested_text_config_and_fp32() -> None:
    cfg = tiny_config("mixtral").to_dict()
    wrapped = {"model_type": "some_vlm", "text_config": {**cfg, "dtype": "float32"}}
    assert sizing.layer_weight_bytes(wrapped) == 2 * sizing.layer_weight_bytes(cfg)
    assert sizing.merge_peak_bytes(wrapped) > sizing.merge_peak_bytes(cfg)
    assert sizing.eval_peak_bytes(wrapped, 4) - sizing.eval_peak_bytes(cfg, 2) == sizing.checkpoint_bytes(cfg, 2)


def test_fp8_source_is_one_byte_on_disk_and_bf16_in_the_merge(tmp_path) -> None:
    cfg = tiny_config("deepseek_v3").to_dict()
    fp8 = {**cfg, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert sizing.source_dtype_bytes(cfg) == 2 and sizing.source_dtype_bytes(fp8) == 1
    assert 2 * sizing.disk_bytes(fp8, 8, sizing.source_dtype_bytes(fp8)) == sizing.disk_bytes(cfg, 8)
    assert sizing.layer_weight_bytes(fp8) == sizing.layer_weight_bytes(cfg)  # dequantized to bf16 while merged
    assert sizing.merge_peak_bytes(fp8) == sizing.merge_peak_bytes(cfg)
    # the decoder projections of a real FP8 checkpoint are 1 byte each, beside their float32 block scales
    src = build_tiny_moe(tmp_path / "fp8", "deepseek_v3", dtype=torch.bfloat16, fp8=True)
    tensors = SourceCheckpoint(src).tensors
    experts = [t for k, t in tensors.items() if ".mlp.experts." in k and k.endswith("_proj.weight")]
    assert sum(t.nbytes for t in experts) == len(experts) * sizing.expert_params(cfg) // 3


def test_published_models() -> None:
    """Published parameter counts (model cards): Mixtral-8x7B 46.7B, Qwen1.5-MoE-A2.7B 14.3B, DeepSeek-V3 671B."""
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8}
    dsv3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_hidden_layers": 61,
            "first_k_dense_replace": 3, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
            "n_group": 8}
    assert round(sizing._total_params(mixtral) / 1e9, 1) == 46.7
    assert round(sizing._total_params(dsv3) / 1e9) == 671
    # Mixtral: 8 experts x 3 x 4096 x 14336 bf16 = 2.82 GB of the layer's 2.90 GB
    assert 2.8e9 < sizing.layer_weight_bytes(mixtral) < 3.0e9


def test_dense_config_is_refused() -> None:
    with pytest.raises(ValueError, match="not a Mixture-of-Experts"):
        sizing.layer_weight_bytes({"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2})
