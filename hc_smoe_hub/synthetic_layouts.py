"""Tiny checkpoints in Hub layouts that transformers' `save_pretrained` does not write itself.

Qwen3.5-MoE: the model is built with the real transformers class (`Qwen3_5MoeForConditionalGeneration`, vision
tower included), saved, then rewritten as the Hub's BF16 repos store it: the experts of each layer fused into
`mlp.experts.gate_up_proj` (E, 2I, H, gate rows then up rows) and `mlp.experts.down_proj` (E, H, I) (transformers
5 saves them per expert; vLLM's Qwen3.5 loader reads the fused form), and multi-token-prediction weights under
`mtp.*`, which no transformers class builds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageTextToText

from hc_smoe_hub.synthetic import build_tokenizer

QWEN3_5_TEXT: dict[str, Any] = {
    "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2,
    "layer_types": ["linear_attention", "full_attention", "linear_attention"], "max_position_embeddings": 512,
    "mtp_num_hidden_layers": 1, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
}
QWEN3_5_VISION: dict[str, Any] = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                                  "out_hidden_size": 32, "num_position_embeddings": 16, "patch_size": 4}
_PER_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")


def build_tiny_qwen3_5_moe(directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, fused: bool = True,
                           **text_overrides: Any) -> Path:
    """A tiny Qwen3.5-MoE vision-language checkpoint (and tokenizer) in the Hub's layout, one shard per layer;
    `fused=False` keeps the per-expert keys transformers 5 saves (a fine-tune saved with `save_pretrained`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = {**QWEN3_5_TEXT, **text_overrides}
    config = AutoConfig.for_model("qwen3_5_moe", text_config=text, vision_config=QWEN3_5_VISION,
                                  tie_word_embeddings=False)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # wider than the default init, so experts differ visibly and routing is not uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open is no dict)
        path.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    tensors = _fuse_experts(tensors) if fused else tensors
    tensors |= _mtp_tensors(text, dtype)
    _save_by_layer(directory, tensors)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = text["mtp_num_hidden_layers"]  # as the Hub configs say
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    build_tokenizer(directory)
    return directory


def _fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _PER_EXPERT.match(key)
        if m is None:
            out[key] = value
            continue
        experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = value
    for prefix, mats in experts.items():
        n = len(mats["gate"])
        gate, up, down = (torch.stack([mats[p][e] for e in range(n)]) for p in ("gate", "up", "down"))
        out[prefix + "gate_up_proj"] = torch.cat((gate, up), dim=1).contiguous()
        out[prefix + "down_proj"] = down.contiguous()
    return out


def _mtp_tensors(text: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A few MTP weights named as the Hub stores them (their values do not matter: they are dropped)."""
    h, n, inter = text["hidden_size"], text["num_experts"], text["moe_intermediate_size"]
    g = torch.Generator().manual_seed(7)
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.layers.0.mlp.gate.weight": (n, h),
              "mtp.layers.0.mlp.experts.gate_up_proj": (n, 2 * inter, h),
              "mtp.layers.0.mlp.experts.down_proj": (n, h, inter)}
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in shapes.items()}


def _save_by_layer(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(r"^model\.language_model\.layers\.(\d+)\.", key)
        group = f"layer-{int(m[1]):03d}" if m else ("mtp" if key.startswith("mtp.") else "rest")
        groups.setdefault(group, {})[key] = value
    weight_map, total = {}, 0
    names = sorted(groups)
    for i, group in enumerate(names):
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(groups[group], str(directory / shard), metadata={"format": "pt"})
        weight_map |= {k: shard for k in groups[group]}
        total += sum(t.nbytes for t in groups[group].values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
