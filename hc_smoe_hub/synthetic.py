"""Random MoE checkpoints of every supported family, saved in several shards, for tests and benchmarks.

Built from configs with stock transformers (no download), with a small byte-level BPE tokenizer trained on the
spot, so that a checkpoint directory looks exactly like one pulled from the Hub. `write_random_checkpoint` writes
one of any size (real layer shapes) shard by shard, one decoder layer at a time, never whole in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from hc_smoe_hub.architectures import ArchSpec, spec_for

SAMPLE_TEXT = (
    "Mixture-of-experts models route every token to a few experts. Merging experts that behave alike makes the "
    "model smaller while it keeps most of what it knew. Hierarchical clustering groups experts by their outputs "
    "on calibration text, and each group becomes a single expert. "
)

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                "intermediate_size": 48},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 4, "norm_topk_prob": False,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1]},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                  "moe_intermediate_size": 32, "intermediate_size": 64, "head_dim": 16},
    "olmoe": {"model_type": "olmoe", "num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32},
}

# Multi-head latent attention (DeepSeek, GLM-4-MoE-Lite): keys and values have every query head.
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 8}
_GRANITE = {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32, "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5, "attention_multiplier": 0.25, "logits_scaling": 2.0}
# The families with sigmoid / grouped routers, shared experts, dense first layers and MTP layers. Kept apart from
# FAMILY_CONFIGS, which every engine test runs over; tests/test_families.py runs these. `written_as` is the
# model_type written into config.json when it differs from the transformers class that builds the model.
MODERN_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"model_type": "deepseek_v3", "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                    "num_experts_per_tok": 4, "n_shared_experts": 1, "moe_intermediate_size": 16,
                    "intermediate_size": 48, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True, "num_nextn_predict_layers": 1, **_MLA},
    "kimi_k2": {"model_type": "deepseek_v3", "written_as": "kimi_k2", "n_routed_experts": 12, "n_group": 1,
                "topk_group": 1, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 16,
                "intermediate_size": 48, "first_k_dense_replace": 1, "routed_scaling_factor": 2.827,
                "norm_topk_prob": True, "num_nextn_predict_layers": 0, **_MLA},
    "glm4_moe": {"model_type": "glm4_moe", "n_routed_experts": 8, "n_group": 1, "topk_group": 1,
                 "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 16,
                 "intermediate_size": 48, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
                 "norm_topk_prob": True, "num_nextn_predict_layers": 1, "head_dim": 8, "use_qk_norm": True},
    "glm4_moe_lite": {"model_type": "glm4_moe_lite", "n_routed_experts": 8, "n_group": 1, "topk_group": 1,
                      "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 16,
                      "intermediate_size": 48, "routed_scaling_factor": 1.8, "norm_topk_prob": True,
                      "num_nextn_predict_layers": 1, **_MLA},
    "deepseek_v2": {"model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts_per_tok": 2,
                    "n_shared_experts": 2, "moe_intermediate_size": 16, "intermediate_size": 48,
                    "first_k_dense_replace": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0,
                    "norm_topk_prob": False, **_MLA},
    # Granite: every layer MoE; multipliers other than 1 so that a missed one shows.
    "granitemoe": {"model_type": "granitemoe", **_GRANITE},
    "granitemoeshared": {"model_type": "granitemoeshared", **_GRANITE, "shared_intermediate_size": 24},
    # Mamba-2 and attention layers (layer_types), no position embeddings, as the Granite 4.0 hybrids.
    "granitemoehybrid": {"model_type": "granitemoehybrid", **_GRANITE, "shared_intermediate_size": 24,
                         "layer_types": ["linear_attention", "full_attention", "linear_attention"],
                         # The Hub's configs name them as transformers 4 did; transformers 5 remaps them on load.
                         "hub_fields": {"layer_types": ["mamba", "attention", "mamba"]},
                         "position_embedding_type": "nope",
                         "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 16},
    # gpt-oss: fused, interleaved gate/up experts with biases, a router bias, sliding-window and full attention
    # layers with sinks. Dims are multiples of 32, so that the experts can be stored in MXFP4 (`quantize_mxfp4`).
    # The Hub's config.json repeats top-k as `experts_per_token`.
    "gpt_oss": {"model_type": "gpt_oss", "num_local_experts": 8, "num_experts_per_tok": 2, "experts_per_token": 2,
                "intermediate_size": 32, "head_dim": 8, "sliding_window": 8, "max_position_embeddings": 4096,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128},
                # openai/gpt-oss-* config.json: rope_scaling and rope_theta as transformers 4 wrote them
                "hub_fields": {"rope_parameters": None, "rope_theta": 150000.0,
                               "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 128}}},
    # Families with per-expert keys on disk (tests/test_families_per_expert.py). `mtp_keys` lays out an MTP layer
    # stored under its own prefix, as the Hub checkpoints do: a copy of the last decoder layer under `block`, plus
    # the projection and norms named there.
    "qwen3_next": {"model_type": "qwen3_next", "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                   "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "intermediate_size": 48,
                   "head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4, "mlp_only_layers": [0], "mtp_num_hidden_layers": 1,
                   "layer_types": ["full_attention", "linear_attention", "full_attention"],
                   "mtp_keys": {"block": "mtp.layers.0.", "matrices": ["mtp.fc.weight"],
                                "norms": ["mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight",
                                          "mtp.pre_fc_norm_hidden.weight"]}},
    "minimax_m2": {"model_type": "minimax_m2", "num_local_experts": 8, "num_experts_per_tok": 2,
                   "intermediate_size": 16, "head_dim": 8, "use_qk_norm": True},
    "ernie4_5_moe": {"model_type": "ernie4_5_moe", "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 16,
                     "intermediate_size": 48, "moe_num_shared_experts": 1, "moe_layer_start_index": 1,
                     "num_nextn_predict_layers": 1,
                     "mtp_keys": {"block": "model.mtp_block.0.", "matrices": ["model.mtp_linear_proj.0.weight"],
                                  "norms": ["model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight"]}},
    "hunyuan_v1_moe": {"model_type": "hunyuan_v1_moe", "num_experts": 8, "moe_topk": [2, 2, 2],
                       "intermediate_size": 16, "head_dim": 8},
    "phimoe": {"model_type": "phimoe", "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16,
               "router_jitter_noise": 0.01},
}


def build_tokenizer(directory: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(directory)
    return fast


def tiny_config(family: str, num_layers: int = 3, hidden: int = 32, **overrides: Any):
    fields = dict(FAMILY_CONFIGS.get(family) or MODERN_FAMILY_CONFIGS[family])
    model_type = fields.pop("model_type")
    fields.pop("written_as", None)
    fields.pop("mtp_keys", None)
    fields.pop("hub_fields", None)
    fields = {**dict(vocab_size=320, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                     pad_token_id=1, tie_word_embeddings=False), **fields, **overrides}
    return AutoConfig.for_model(model_type, **fields)


def build_tiny_moe(directory: Path, family: str = "mixtral", *, num_layers: int = 3, hidden: int = 32,
                   seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "40KB",
                   fp8: bool = False, mxfp4: bool = False, **overrides: Any) -> Path:
    """Save a randomly initialised tiny MoE (and tokenizer) of `family` into `directory`, in several shards;
    with `fp8`, its decoder projections block-quantized as the Hub's FP8 releases store them (`quantize_fp8`);
    with `mxfp4` (gpt-oss), its experts in MXFP4 as openai/gpt-oss-* store them (`quantize_mxfp4`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_config(family, num_layers, hidden, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the default init, so experts differ visibly and routing is not uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 0.2)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):  # zeros by default: a bias that changes the choice
                b.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
    mtp = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    mtp_keys = (MODERN_FAMILY_CONFIGS.get(family) or {}).get("mtp_keys")
    if mtp_keys:
        _add_prefixed_mtp(directory, mtp_keys, num_layers, hidden, seed, dtype)
    elif mtp:
        _add_mtp_layers(directory, family, num_layers, mtp, hidden, seed, dtype, overrides)
    hub_fields = (MODERN_FAMILY_CONFIGS.get(family) or {}).get("hub_fields")
    if hub_fields:  # config.json as the Hub's checkpoints hold it (older field names, which transformers 5 reads)
        cfg_path = directory / "config.json"
        data = {**json.loads(cfg_path.read_text()), **hub_fields}
        cfg_path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}, indent=2))  # None: removed
    written_as = (MODERN_FAMILY_CONFIGS.get(family) or {}).get("written_as")
    if written_as:  # e.g. Kimi K2: a DeepSeek-V3 whose config names its own model_type and remote code
        cfg_path = directory / "config.json"
        data = json.loads(cfg_path.read_text())
        data["model_type"] = written_as
        data["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
        cfg_path.write_text(json.dumps(data, indent=2))
    if fp8:
        quantize_fp8(directory)
    if mxfp4:
        quantize_mxfp4(directory)
    build_tokenizer(directory)
    return directory


def quantize_fp8(directory: Path, block: tuple[int, int] = (128, 128)) -> None:
    """Rewrite a saved checkpoint as DeepSeek-V3's FP8 releases are: every 2-D ``*_proj.weight`` (or expert
    ``w1``/``w2``/``w3``, MiniMax-M2) of the decoder layers (routed and shared experts per expert, attention, dense
    MLPs) as float8_e4m3fn plus a float32 ``weight_scale_inv`` in the same shard; norms, routers, embeddings and the
    head unchanged; `quantization_config` added to config.json. Dims should be multiples of 128 or below it
    (transformers' CPU dequantizer mishandles ragged blocks, see hc_smoe_hub/quant)."""
    from hc_smoe_hub.quant import Fp8BlockFormat

    def chosen(key: str, value: torch.Tensor) -> bool:
        return key.startswith("model.layers.") and value.ndim == 2 and \
            key.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))

    _rewrite_quantized(directory, Fp8BlockFormat(block=block), chosen, {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block)})


def quantize_mxfp4(directory: Path) -> None:
    """Rewrite a saved gpt-oss checkpoint as openai/gpt-oss-* store it: every layer's fused
    ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` as MXFP4 ``_blocks`` and ``_scales`` in the same
    shard; their biases, the routers, attention, norms, embeddings and head unchanged; `quantization_config` (with
    the Hub's ``modules_to_not_convert``) added to config.json."""
    from hc_smoe_hub.quant import Mxfp4Format

    _rewrite_quantized(directory, Mxfp4Format(),
                       lambda key, _value: key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
                       {"quant_method": "mxfp4", "modules_to_not_convert": [
                           "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                           "lm_head"]})


def _rewrite_quantized(directory: Path, fmt: Any, chosen: Any, quantization_config: dict[str, Any]) -> None:
    """Re-save every shard with the `chosen(key, tensor)` weights in `fmt`'s on-disk tensors, update the index and
    add `quantization_config` to config.json."""
    from safetensors import safe_open

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            out.update(fmt.quantize(value, key) if chosen(key, value) else {key: value})
        save_file(out, str(shard), metadata={"format": "pt"})
        if index is not None:
            for key in tensors.keys() - out.keys():
                index["weight_map"].pop(key, None)
            index["weight_map"].update({k: shard.name for k in out})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    cfg_path = directory / "config.json"
    data = json.loads(cfg_path.read_text())
    data["quantization_config"] = quantization_config
    cfg_path.write_text(json.dumps(data, indent=2))


def _add_mtp_layers(directory: Path, family: str, num_layers: int, count: int, hidden: int, seed: int,
                    dtype: torch.dtype, overrides: dict[str, Any]) -> None:
    """Append multi-token-prediction layers as the Hub checkpoints store them: `model.layers.{L + i}.*`, a full
    decoder layer plus `enorm`, `hnorm`, `eh_proj`, `embed_tokens` and `shared_head`, in one more shard."""
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(seed + 1)
    bigger = AutoModelForCausalLM.from_config(tiny_config(family, num_layers + count, hidden, **overrides))
    extra: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bigger.to(dtype).save_pretrained(tmp)
        for f in Path(tmp).glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                names = h.keys()
                for key in names:
                    layer = key.split(".")[2] if key.startswith("model.layers.") else None
                    if layer is not None and int(layer) >= num_layers:
                        extra[key] = h.get_tensor(key)
    vocab = bigger.config.vocab_size
    for i in range(num_layers, num_layers + count):
        p = f"model.layers.{i}."
        extra |= {p + "enorm.weight": torch.ones(hidden), p + "hnorm.weight": torch.ones(hidden),
                  p + "eh_proj.weight": torch.randn(hidden, 2 * hidden) * 0.1,
                  p + "embed_tokens.weight": torch.randn(vocab, hidden) * 0.1,
                  p + "shared_head.norm.weight": torch.ones(hidden),
                  p + "shared_head.head.weight": torch.randn(vocab, hidden) * 0.1}
    extra = {k: v.to(dtype).contiguous() for k, v in extra.items()}
    name = "model-mtp.safetensors"
    save_file(extra, str(directory / name), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # a single-file checkpoint gets an index naming both files
        single = directory / "model.safetensors"
        with safe_open(single, "pt") as h:
            names = h.keys()
        index = {"metadata": {}, "weight_map": {k: single.name for k in names}}
    index["weight_map"].update({k: name for k in extra})
    index_path.write_text(json.dumps(index, indent=2))


def _add_prefixed_mtp(directory: Path, layout: dict[str, Any], num_layers: int, hidden: int, seed: int,
                      dtype: torch.dtype) -> None:
    """Append an MTP layer stored under its own prefix (Qwen3-Next's `mtp.*`, ERNIE's `model.mtp_*`): the last
    decoder layer's tensors, perturbed, under `layout["block"]`, and the (H, 2H) projection and norms it names."""
    from safetensors import safe_open

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = f"model.layers.{num_layers - 1}."
    g = torch.Generator().manual_seed(seed + 1)
    extra: dict[str, torch.Tensor] = {}
    for key, shard in index["weight_map"].items():
        if key.startswith(last):
            with safe_open(directory / shard, "pt") as h:
                t = h.get_tensor(key).float()
            extra[layout["block"] + key[len(last):]] = t + 0.01 * torch.randn(t.shape, generator=g)
    extra |= {k: torch.randn(hidden, 2 * hidden, generator=g) * 0.1 for k in layout["matrices"]}
    extra |= {k: torch.ones(hidden) for k in layout["norms"]}
    extra = {k: v.to(dtype).contiguous() for k, v in extra.items()}
    name = "model-mtp.safetensors"
    save_file(extra, str(directory / name), metadata={"format": "pt"})
    index["weight_map"].update({k: name for k in extra})
    index_path.write_text(json.dumps(index, indent=2))


def calibration_text(path: Path, paragraphs: int = 200, seed: int = 0) -> Path:
    """A local .txt calibration file of shuffled sentences, blank-line separated."""
    g = torch.Generator().manual_seed(seed)
    words = SAMPLE_TEXT.split()
    paras = []
    for _ in range(paragraphs):
        idx = torch.randint(len(words), (40,), generator=g).tolist()
        paras.append(" ".join(words[i] for i in idx))
    Path(path).write_text("\n\n".join(paras) + "\n")
    return Path(path)


def disk_layout(config: Any, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the checkpoint as stored on the Hub, with its shape, from the model class built on the
    meta device: the in-memory fused experts (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), or gpt-oss's
    (E, H, 2I) / (E, I, H) with biases) become the on-disk keys of `spec`'s expert storage, and the MoE block and its
    router take their on-disk names."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hidden = int(config.get_text_config().hidden_size)  # I from the gate/up size, whichever way it is laid out
    fused = f".{spec.moe_module}.{spec.experts_module}."
    layout: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(spec.layers_prefix):
            layout[name] = tuple(tensor.shape)
            continue
        layer = int(name[len(spec.layers_prefix):].split(".", 1)[0])
        rel = name[len(spec.layer_prefix(layer)):]
        if fused in "." + rel:
            if rel.endswith("gate_up_proj"):
                n = tensor.shape[0]
                layout |= spec.storage.disk_shapes(spec.experts_base(layer), n, tensor[0].numel() // (2 * hidden),
                                                   hidden)
            continue
        if spec.router_memory and rel == f"{spec.moe_module}.{spec.router_memory}":
            rel = f"{spec.moe_disk}.{spec.router}"
        elif rel.startswith(spec.moe_module + "."):
            rel = spec.moe_disk + rel[len(spec.moe_module):]
        layout[spec.layer_prefix(layer) + rel] = tuple(tensor.shape)
    return layout


def write_random_checkpoint(directory: Path, config_fields: dict[str, Any], *, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, std: float = 0.02) -> Path:
    """A random checkpoint of any size in the Hub's on-disk layout: one shard for the embeddings and head, one per
    decoder layer, each generated and written before the next, so memory stays at about one layer.

    `config_fields` must hold `model_type`; the shipped tiny tokenizer is saved beside it (its vocabulary sets the
    embedding size unless `vocab_size` is given: the decoder layers are what a benchmark of the merge measures).
    Norm weights are ones, everything else normal(0, `std`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    fields = dict(config_fields)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(model_type, **fields)
    config.save_pretrained(directory)
    spec = spec_for(json.loads((directory / "config.json").read_text()))
    layout = disk_layout(config, spec)
    groups: dict[str, list[str]] = {}
    for name in layout:
        layer = name[len(spec.layers_prefix):].split(".", 1)[0] if name.startswith(spec.layers_prefix) else None
        groups.setdefault("rest" if layer is None else f"layer-{int(layer):05d}", []).append(name)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (_group, names) in enumerate(sorted(groups.items())):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = layout[name]
            if len(shape) == 1 and "norm" in name:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype) \
                    if len(shape) < 2 or shape[0] * shape[1] < (1 << 24) else _randn_rows(shape, g, std, dtype)
            weight_map[name] = shard
            total += tensors[name].nbytes
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def _randn_rows(shape: tuple[int, ...], g: torch.Generator, std: float, dtype: torch.dtype) -> torch.Tensor:
    """normal(0, std) in `dtype`, generated a block of rows at a time: no fp32 copy of a large matrix."""
    out = torch.empty(shape, dtype=dtype)
    step = max(1, (1 << 22) // max(1, out[0].numel()))
    for s in range(0, shape[0], step):
        out[s : s + step] = torch.randn(out[s : s + step].shape, generator=g) * std
    return out
