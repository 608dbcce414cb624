"""Stock CPU `from_pretrained` of tiny FP8-block and MXFP4 checkpoints written with this package's quantizers.

What transformers 5.24 does on a machine without a GPU is what the package docstring states; these tests keep it
true: both formats load dequantized and equal to `dequantize` here, and the cases where the CPU path does not
(fused 3-D FP8 experts, FP8 dims with more than one block and a ragged edge) are pinned so the docstring changes
when transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, GptOssConfig, GptOssForCausalLM

from hc_smoe_hub.quant import Fp8BlockFormat, Mxfp4Format

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])
FP8_QCFG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _load(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    return model.eval(), info


def _deepseek_v3(**overrides) -> tuple[DeepseekV3Config, dict[str, torch.Tensor]]:
    # Every projection dim a multiple of 128, as in the real DeepSeek-V3/R1 and Kimi K2 checkpoints
    kwargs = dict(
        vocab_size=128, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=128,
        qk_nope_head_dim=64, v_head_dim=64, n_shared_experts=1,
    )
    kwargs.update(overrides)
    cfg = DeepseekV3Config(**kwargs)
    torch.manual_seed(0)
    state = {k: v.detach().clone().contiguous() for k, v in DeepseekV3ForCausalLM(cfg).state_dict().items()}
    return cfg, state


def _per_expert_disk_keys(state: dict[str, torch.Tensor], inter: int) -> dict[str, torch.Tensor]:
    """The in-memory fused experts split back into the Hub's ``experts.{e}.gate_proj.weight`` keys."""
    disk: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            for e in range(value.shape[0]):
                disk[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter].contiguous()
                disk[f"{prefix}{e}.up_proj.weight"] = value[e, inter:].contiguous()
        elif key.endswith("experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for e in range(value.shape[0]):
                disk[f"{prefix}{e}.down_proj.weight"] = value[e].contiguous()
        else:
            disk[key] = value
    return disk


def _fp8_quantize_projections(disk: dict[str, torch.Tensor], fmt: Fp8BlockFormat) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in disk.items():
        # DeepSeek-V3 quantizes every linear of the decoder; norms, router and embeddings stay bf16
        out.update(fmt.quantize(value, key) if "_proj" in key and value.ndim >= 2 else {key: value})
    return out


def test_fp8_per_expert_checkpoint_loads_on_cpu_dequantized(tmp_path):
    cfg, state = _deepseek_v3()
    fmt = Fp8BlockFormat()
    disk = _fp8_quantize_projections(_per_expert_disk_keys(state, cfg.moe_intermediate_size), fmt)
    assert disk["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    folder = _save(tmp_path / "dsv3", disk, {**cfg.to_dict(), "quantization_config": FP8_QCFG})
    model, info = _load(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    params = dict(model.named_parameters())
    fused = params["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.dtype == torch.bfloat16
    for e in range(cfg.n_routed_experts):
        gate = fmt.dequantize(disk, f"model.layers.1.mlp.experts.{e}.gate_proj.weight")
        up = fmt.dequantize(disk, f"model.layers.1.mlp.experts.{e}.up_proj.weight")
        assert torch.equal(fused[e], torch.cat([gate, up]))
    q_proj = fmt.dequantize(disk, "model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(params["model.layers.1.self_attn.q_proj.weight"], q_proj)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_fp8_fused_3d_experts_are_not_dequantized_by_the_cpu_path(tmp_path):
    # transformers' Fp8Quantize names a fused weight's scales "<key>_scale_inv", but its CPU dequantizer only
    # pairs "weight" with "weight_scale_inv": the scales are reported unexpected and the raw e4m3 values loaded.
    cfg, state = _deepseek_v3()
    disk = _fp8_quantize_projections(state, Fp8BlockFormat())
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in disk
    _, info = _load(_save(tmp_path / "fused", disk, {**cfg.to_dict(), "quantization_config": FP8_QCFG}))
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in info["unexpected_keys"]


def test_fp8_ragged_blocks_on_the_cpu_path(tmp_path):
    # transformers' CPU dequantizer takes the block size as weight dim / scale grid dim instead of 128: one ragged
    # block (96 rows) comes out right, 160 rows (grid 2 -> blocks of 80) silently wrong, 320 (grid 3) refused.
    fmt = Fp8BlockFormat()
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    loaded = {}
    for inter in (96, 160, 320):
        cfg, state = _deepseek_v3(moe_intermediate_size=inter)
        disk = _fp8_quantize_projections(_per_expert_disk_keys(state, inter), fmt)
        ours = fmt.dequantize(disk, key, dtype=torch.float32)
        assert (ours - state["model.layers.1.mlp.experts.gate_up_proj"][0, :inter]).abs().max() < 0.01
        folder = _save(tmp_path / str(inter), disk, {**cfg.to_dict(), "quantization_config": FP8_QCFG})
        if inter == 320:
            with pytest.raises(RuntimeError, match="conversion"):
                _load(folder)
            continue
        gate_up = dict(_load(folder)[0].named_parameters())["model.layers.1.mlp.experts.gate_up_proj"]
        loaded[inter] = torch.equal(gate_up[0, :inter], ours.to(torch.bfloat16))
    assert loaded == {96: True, 160: False}


def _gpt_oss() -> tuple[GptOssConfig, dict[str, torch.Tensor]]:
    cfg = GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    state = {k: v.detach().clone().contiguous() for k, v in GptOssForCausalLM(cfg).state_dict().items()}
    return cfg, state


def test_mxfp4_gpt_oss_checkpoint_loads_on_cpu_dequantized(tmp_path):
    cfg, state = _gpt_oss()
    fmt = Mxfp4Format()
    disk: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        fused = key.endswith(("experts.gate_up_proj", "experts.down_proj"))
        disk.update(fmt.quantize(value, key) if fused else {key: value})
    assert disk["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 128, 2, 16)
    qcfg = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"]}
    model, info = _load(_save(tmp_path / "gptoss", disk, {**cfg.to_dict(), "quantization_config": qcfg}))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    params = dict(model.named_parameters())
    for layer in range(cfg.num_hidden_layers):
        for proj in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            assert params[key].dtype == torch.bfloat16
            assert torch.equal(params[key], fmt.dequantize(disk, key))
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
