"""How much memory and disk a merge and an evaluation of a MoE model need, from its config.json alone.

Pure functions of a config dict (a multimodal config's nested `text_config` is read when present), so that a
machine can be sized before anything is downloaded. Parameter counts follow the standard transformers layouts:
grouped-query attention with optional q/k/v biases and q/k norms, or multi-head latent attention when the config
has `kv_lora_rank` (DeepSeek-V3); routed experts, a shared expert (Qwen's `shared_expert_intermediate_size` with
its one-row gate, or DeepSeek's `n_shared_experts`), dense layers (`first_k_dense_replace`, `mlp_only_layers`,
`decoder_sparse_step`). Byte counts use the checkpoint's dtype (`dtype` / `torch_dtype`, bf16 when absent); an
FP8-block source (`quantization_config` fp8) is 1 byte per weight on disk (its default output too: the merged
experts are re-quantized) and 2 in the merge's memory (its weights are dequantized to bf16 on a GPU).

The merge figure (`merge_peak_bytes`) is a formula of the streaming engine's buffers, checked against its
measured peak at real layer shapes (benchmarks/real_shapes.py, benchmarks/RESULTS.md); it does not grow with depth.
"""

from __future__ import annotations

from typing import Any

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # ERNIE: the last
# Default calibration of `hc-smoe-push`: 32 blocks of 2048 tokens (the paper's).
DEFAULT_CALIBRATION_TOKENS = 32 * 2048
# Fixed process overhead measured beside the merge (interpreter, torch, transformers, the model skeleton, tokenizer).
PROCESS_BYTES = 7 * GIB // 8
# fp32 (T, H) buffers alive per calibration token at the peak: the hidden states carried between layers, the MoE
# block's input, the original and the merged routed outputs, and one transient batch.
HIDDEN_COPIES = 5
# O-prune's per-token Gram matrices are scored on this many tokens (baselines.O_PRUNE_TOKENS), in fp64, beside a
# block of expert outputs bounded at 256 MiB.
O_PRUNE_TOKENS = 2048
O_PRUNE_BLOCK = 256 << 20
# Families whose attention normalizes queries and keys: per head (one head_dim vector each for q and k) or over
# the whole projection (one vector of the projection's width each).
QK_NORMS = {"qwen3_moe": "head", "olmoe": "projection"}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: `text_config` of a multimodal config, else the config itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _quant_method(config: dict[str, Any]) -> str | None:
    found = config.get("quantization_config") or text_config(config).get("quantization_config") or {}
    return found.get("quant_method")


def source_dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes per weight of the checkpoint as stored (its `dtype`/`torch_dtype`; bf16 when absent; 1 for FP8).

    FP8 counts every weight at 1 byte: the embeddings, head, norms and routers such a checkpoint keeps in bf16 and
    its float32 block scales are left out, about 0.3% of DeepSeek-V3 (by arithmetic from its shapes)."""
    if _quant_method(config) == "fp8":
        return 1
    cfg = text_config(config)
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
               or "bfloat16")
    return DTYPE_BYTES.get(name.removeprefix("torch."), 2)


def num_routed_experts(config: dict[str, Any]) -> int:
    cfg = text_config(config)
    for key in EXPERT_COUNT_KEYS:
        if cfg.get(key):
            return int(cfg[key])
    raise ValueError(f"config.json has none of {EXPERT_COUNT_KEYS}: not a Mixture-of-Experts model")


def _expert_intermediate(cfg: dict[str, Any]) -> int:
    return int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def attention_params(config: dict[str, Any]) -> int:
    """Weights of one decoder layer's attention and its two norms."""
    cfg = text_config(config)
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    norms = 2 * h
    if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3)
        q_rank, kv_rank = int(cfg.get("q_lora_rank") or 0), int(cfg["kv_lora_rank"])
        nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
        q = h * q_rank + q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        kv = h * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v)
        return q + kv + heads * v * h + norms
    kv_heads, hd = int(cfg.get("num_key_value_heads") or heads), _head_dim(cfg)
    proj = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h
    bias = (heads * hd + 2 * kv_heads * hd) if cfg.get("attention_bias", cfg.get("qkv_bias", False)) else 0
    qk_norm = {"head": 2 * hd, "projection": (heads + kv_heads) * hd}.get(QK_NORMS.get(cfg.get("model_type", "")), 0)
    return proj + bias + qk_norm + norms


def expert_params(config: dict[str, Any]) -> int:
    """Weights of one routed expert (gate, up and down projections)."""
    cfg = text_config(config)
    return 3 * int(cfg["hidden_size"]) * _expert_intermediate(cfg)


def moe_block_params(config: dict[str, Any]) -> int:
    """Weights of one MoE block: routed experts, router (and its score bias), shared expert and its gate."""
    cfg = text_config(config)
    h, n = int(cfg["hidden_size"]), num_routed_experts(cfg)
    total = n * expert_params(cfg) + n * h
    if cfg.get("topk_method") == "noaux_tc" or cfg.get("n_group"):  # DeepSeek's e_score_correction_bias
        total += n
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one shared expert with a one-row gate
        total += 3 * h * int(cfg["shared_expert_intermediate_size"]) + h
    if cfg.get("n_shared_experts"):  # DeepSeek: shared experts of the routed experts' width
        total += int(cfg["n_shared_experts"]) * expert_params(cfg)
    return total


def moe_layers(config: dict[str, Any]) -> list[int]:
    """Indices of the decoder layers that carry routed experts."""
    cfg = text_config(config)
    layers = int(cfg["num_hidden_layers"])
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step") or 1)
    first = int(cfg.get("first_k_dense_replace") or 0)
    return [i for i in range(layers) if i not in dense and (i + 1) % step == 0 and i >= first]


def held_dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes per weight of a layer as the merge holds it: as stored, except that a quantized source's weights are
    dequantized, to bf16 on a GPU (fp32 on a CPU, twice this)."""
    return 2 if _quant_method(config) else source_dtype_bytes(config)


def layer_weight_bytes(config: dict[str, Any]) -> int:
    """Bytes of one MoE decoder layer's weights as the merge holds them (`held_dtype_bytes`): attention, norms,
    router, routed and shared experts."""
    return (attention_params(config) + moe_block_params(config)) * held_dtype_bytes(config)


def _total_params(config: dict[str, Any], keep: int | None = None) -> int:
    cfg = text_config(config)
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    reduced = dict(cfg)
    if keep is not None:
        reduced.update({k: keep for k in EXPERT_COUNT_KEYS if cfg.get(k)})
    moe = moe_layers(cfg)
    dense_mlp = 3 * h * int(cfg.get("intermediate_size") or 4 * _expert_intermediate(cfg))
    layers = int(cfg["num_hidden_layers"])
    body = layers * attention_params(cfg) + len(moe) * moe_block_params(reduced) \
        + (layers - len(moe)) * dense_mlp
    head = 0 if cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)) else vocab * h
    return vocab * h + head + h + body


def checkpoint_bytes(config: dict[str, Any], dtype_bytes: int = 2, *, keep: int | None = None) -> int:
    """Bytes of the whole model's weights at `dtype_bytes` per weight; with `keep`, of the reduced model with
    `keep` routed experts per MoE layer (what the merge writes)."""
    return _total_params(config, keep) * dtype_bytes


def disk_bytes(config: dict[str, Any], keep: int, dtype_bytes: int = 2) -> int:
    """Disk a merge needs: the source checkpoint plus the reduced one it writes."""
    return checkpoint_bytes(config, dtype_bytes) + checkpoint_bytes(config, dtype_bytes, keep=keep)


def merge_peak_bytes(config: dict[str, Any], *, tokens: int = DEFAULT_CALIBRATION_TOKENS,
                     keep: int | None = None) -> int:
    """Peak resident memory of a streaming merge, on CPU (or on one GPU, the device share of it).

    With L one MoE decoder layer's weight bytes as held (as stored; bf16 for a quantized source), E the routed
    experts' share of it, N and K the expert counts, I and H the expert's intermediate and hidden sizes, T the
    calibration tokens:

        P + L + (K / N) E + 2 x 12 I H + 4 I^2 + 5 x 4 T H + 8 x 2048 N^2 + 256 MiB

    the layer as read, the merged experts awaiting their write (in the source dtype), the fp32 working set of one
    merged expert and the member being aligned into it, the (I, I) neuron-correlation or least-squares system,
    the fp32 hidden-state buffers, and O-prune's fp64 Gram matrices with their scoring block; P is the
    process itself (0.875 GiB). It does not depend on the depth. It is the default method's peak (the heaviest);
    `--paper` needs less. `keep` defaults to N (the worst case). Checked against benchmarks/real_shapes.py
    (benchmarks/RESULTS.md, real-shapes section): 3-8% above the measured peak of the default for the Mixtral-8x7B,
    Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B layer shapes.
    """
    cfg = text_config(config)
    hidden, inter, n = int(cfg["hidden_size"]), _expert_intermediate(cfg), num_routed_experts(cfg)
    keep = n if keep is None else keep
    layer = layer_weight_bytes(config)
    experts = n * expert_params(cfg) * held_dtype_bytes(config)
    working = 2 * 12 * inter * hidden + 4 * inter * inter
    search = 8 * O_PRUNE_TOKENS * n * n + O_PRUNE_BLOCK
    return int(PROCESS_BYTES + layer + keep * experts / n + working + HIDDEN_COPIES * 4 * tokens * hidden + search)


def eval_peak_bytes(config: dict[str, Any], dtype_bytes: int = 2, *, batch_tokens: int = 8 * 2048) -> int:
    """Memory an evaluation needs: the whole model's weights at `dtype_bytes`, plus the activations of one batch of
    `batch_tokens` tokens (fp32 logits over the vocabulary, a few hidden-size and expert-width buffers) and
    PROCESS_BYTES. An estimate from the shapes, not a measurement."""
    cfg = text_config(config)
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    per_token = 4 * vocab + 8 * 4 * h + 2 * 4 * top_k * _expert_intermediate(cfg)
    return checkpoint_bytes(config, dtype_bytes) + batch_tokens * per_token + PROCESS_BYTES
