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

from hc_smoe_hub.fastpath import group_fit_tokens, joint_fit_tokens

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
# block of expert outputs bounded at 256 MiB. The survivor search holds several (S, N)- to (S, N, N)-sized fp64
# buffers besides: at N = 128 the measured peak (H200, benchmarks/RESULTS.md) was 1.3 GiB above the other terms,
# so the search is counted as O_PRUNE_COPIES Gram-sized arrays, fitted to that measurement, not derived.
O_PRUNE_TOKENS = 2048
O_PRUNE_BLOCK = 256 << 20
O_PRUNE_COPIES = 6
# Families whose attention normalizes queries and keys (unless `use_qk_norm` is false): per head (one head_dim
# vector each for q and k) or over the whole projection (one vector of the projection's width each).
QK_NORMS = {"qwen3_moe": "head", "olmoe": "projection", "glm4_moe": "head", "minimax_m2": "projection",
            "hunyuan_v1_moe": "head", "qwen3_next": "head", "qwen3_5_moe_text": "head"}
# What a few families have beyond the common layout, as data (each checked against the transformers class,
# tests/test_sizing.py): LayerNorms with a bias; a query projection twice as wide (its second half gates the
# attention output); a router score bias without DeepSeek's keys; a shared expert as wide as `intermediate_size`;
# gpt-oss' biases (per expert on gate/up and down, on the router and on o_proj) and per-head attention sinks.
NORM_BIAS = frozenset({"phimoe"})
GATED_QUERY = frozenset({"qwen3_next", "qwen3_5_moe_text"})
SCORE_BIAS = frozenset({"minimax_m2", "ernie4_5_moe"})
SHARED_OF_INTERMEDIATE = frozenset({"hunyuan_v1_moe"})
EXPERT_BIASES = frozenset({"gpt_oss"})
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "attention", "sliding_attention"})


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
    kind = cfg.get("model_type", "")
    norms = 2 * _norm_params(cfg)
    if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3)
        q_rank, kv_rank = int(cfg.get("q_lora_rank") or 0), int(cfg["kv_lora_rank"])
        nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
        q = h * q_rank + q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        kv = h * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v)
        return q + kv + heads * v * h + norms
    kv_heads, hd = int(cfg.get("num_key_value_heads") or heads), _head_dim(cfg)
    q_width = heads * hd * (2 if kind in GATED_QUERY else 1)
    proj = h * q_width + 2 * h * kv_heads * hd + heads * hd * h
    bias = (q_width + 2 * kv_heads * hd) if cfg.get("attention_bias", cfg.get("qkv_bias", False)) else 0
    if kind in EXPERT_BIASES:  # gpt-oss: o_proj's bias and one attention sink per head
        bias += (h if cfg.get("attention_bias") else 0) + heads
    qk_norm = 0
    if cfg.get("use_qk_norm", True):
        qk_norm = {"head": 2 * hd, "projection": (heads + kv_heads) * hd}.get(QK_NORMS.get(kind, ""), 0)
    return proj + bias + qk_norm + norms


def _norm_params(cfg: dict[str, Any]) -> int:
    return (2 if cfg.get("model_type", "") in NORM_BIAS else 1) * int(cfg["hidden_size"])


def _linear_mixer_params(cfg: dict[str, Any]) -> int:
    """Weights of a linear-attention layer's token mixer: Granite 4.0 hybrid's Mamba-2 (`mamba_*` keys) or
    Qwen3-Next's gated delta net (`linear_*` keys)."""
    h = int(cfg["hidden_size"])
    if cfg.get("mamba_n_heads"):
        heads, groups, state = int(cfg["mamba_n_heads"]), int(cfg.get("mamba_n_groups") or 1), int(cfg["mamba_d_state"])
        inner = int(float(cfg.get("mamba_expand") or 2) * h)
        conv = inner + 2 * groups * state
        in_proj = 2 * inner + 2 * groups * state + heads
        bias = in_proj + h if cfg.get("mamba_proj_bias") else 0
        conv_bias = conv if cfg.get("mamba_conv_bias", True) else 0
        return h * in_proj + conv * int(cfg.get("mamba_d_conv") or 4) + conv_bias + 3 * heads + inner + inner * h + bias
    key = int(cfg["linear_num_key_heads"]) * int(cfg["linear_key_head_dim"])
    v_heads = int(cfg["linear_num_value_heads"])
    value = v_heads * int(cfg["linear_value_head_dim"])
    kernel = int(cfg.get("linear_conv_kernel_dim") or 4)
    return (h * (2 * key + 2 * value) + h * 2 * v_heads + (2 * key + value) * kernel + 2 * v_heads
            + int(cfg["linear_value_head_dim"]) + value * h)


def mixer_params(config: dict[str, Any], layer: int) -> int:
    """Weights of decoder layer `layer`'s token mixer and its two norms: attention (`attention_params`), or in a
    hybrid model (`layer_types`) linear attention."""
    cfg = text_config(config)
    types = cfg.get("layer_types") or []
    if layer < len(types) and types[layer] not in ATTENTION_LAYER_TYPES:
        return _linear_mixer_params(cfg) + 2 * _norm_params(cfg)
    return attention_params(cfg)


def expert_params(config: dict[str, Any]) -> int:
    """Weights of one routed expert (gate, up and down projections)."""
    cfg = text_config(config)
    return 3 * int(cfg["hidden_size"]) * _expert_intermediate(cfg)


def moe_block_params(config: dict[str, Any]) -> int:
    """Weights of one MoE block: routed experts, router (and its score bias), shared expert and its gate."""
    cfg = text_config(config)
    h, n, kind = int(cfg["hidden_size"]), num_routed_experts(cfg), cfg.get("model_type", "")
    total = n * expert_params(cfg) + n * h
    if cfg.get("topk_method") == "noaux_tc" or cfg.get("n_group") or kind in SCORE_BIAS:  # e_score_correction_bias
        total += n
    if kind in EXPERT_BIASES:  # gate/up and down biases per expert, and the router's
        total += n * (2 * _expert_intermediate(cfg) + h) + n
    if cfg.get("shared_intermediate_size"):  # Granite: one shared expert, fused gate/up
        total += 3 * h * int(cfg["shared_intermediate_size"])
    if cfg.get("moe_num_shared_experts"):  # ERNIE: shared experts of the routed experts' width
        total += int(cfg["moe_num_shared_experts"]) * expert_params(cfg)
    if kind in SHARED_OF_INTERMEDIATE:
        total += 3 * h * int(cfg["intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one shared expert with a one-row gate
        total += 3 * h * int(cfg["shared_expert_intermediate_size"]) + h
    if cfg.get("n_shared_experts"):  # DeepSeek: shared experts of the routed experts' width
        total += int(cfg["n_shared_experts"]) * expert_params(cfg)
    return total


def moe_layers(config: dict[str, Any]) -> list[int]:
    """Indices of the decoder layers that carry routed experts."""
    cfg = text_config(config)
    layers = int(cfg["num_hidden_layers"])
    if cfg.get("mlp_layer_types"):  # GLM-4-MoE-Lite: "dense" or "sparse" per layer
        return [i for i, kind in enumerate(cfg["mlp_layer_types"]) if kind == "sparse"]
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step") or cfg.get("moe_layer_interval") or 1)
    first = int(cfg.get("first_k_dense_replace") or cfg.get("moe_layer_start_index") or 0)
    end = cfg.get("moe_layer_end_index")  # ERNIE's last MoE layer, -1 for the model's last
    last = layers - 1 if end is None or int(end) < 0 else int(end)
    return [i for i in range(layers) if i not in dense and (i + 1) % step == 0 and first <= i <= last]


def held_dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes per weight of a layer as the merge holds it: as stored, except that a quantized source's weights are
    dequantized, to bf16 on a GPU (fp32 on a CPU, twice this)."""
    return 2 if _quant_method(config) else source_dtype_bytes(config)


def layer_weight_bytes(config: dict[str, Any]) -> int:
    """Bytes of one MoE decoder layer's weights as the merge holds them (`held_dtype_bytes`): attention, norms,
    router, routed and shared experts."""
    block = moe_block_params(config)  # first: a dense config is refused here
    mixer = max(mixer_params(config, i) for i in moe_layers(config))  # hybrids: the larger kind of MoE layer
    return (mixer + block) * held_dtype_bytes(config)


def _total_params(config: dict[str, Any], keep: int | None = None) -> int:
    cfg = text_config(config)
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    reduced = dict(cfg)
    if keep is not None:
        reduced.update({k: keep for k in EXPERT_COUNT_KEYS if cfg.get(k)})
    moe = moe_layers(cfg)
    dense_mlp = 3 * h * int(cfg.get("intermediate_size") or 4 * _expert_intermediate(cfg))
    layers = int(cfg["num_hidden_layers"])
    body = sum(mixer_params(cfg, i) for i in range(layers)) + len(moe) * moe_block_params(reduced) \
        + (layers - len(moe)) * dense_mlp
    head = 0 if cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)) else vocab * h
    return vocab * h + head + _norm_params(cfg) + body


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

        P + L + (K / N) E + 2 x 12 I H + 4 I^2 + 5 x 4 T H + 6 x 8 x 2048 N^2 + 256 MiB + R

    the layer as read, the merged experts awaiting their write (in the source dtype; the default's fix-dom merge
    writes them into the source experts' rows, `merged_rows.py`, so for it this term is headroom), the fp32
    working set of one merged expert and the member being aligned into it, the (I, I) neuron-correlation or
    least-squares system, the fp32 hidden-state buffers, O-prune's fp64 Gram matrices with their scoring block and
    the survivor search's buffers, and R the refits' token-dependent working set (`refit_bytes`); P is the process
    itself (0.875 GiB). It does not depend on the depth. It bounds the default method and `--paper` (whose
    frequency merge holds its merged experts beside the source ones). `keep` defaults to N (the worst case).
    Checked against benchmarks/real_shapes.py
    (benchmarks/RESULTS.md, real-shapes sections) at the Mixtral-8x7B, Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B layer
    shapes: above the measured peak of the default on a CPU at 8 x 512 tokens and on an H200 at 8 x 512 and at
    the default 32 x 2048 tokens (6-12% above there; the search term was fitted to the Qwen3 shape's GPU peak).
    """
    cfg = text_config(config)
    hidden, inter, n = int(cfg["hidden_size"]), _expert_intermediate(cfg), num_routed_experts(cfg)
    keep = n if keep is None else keep
    layer = layer_weight_bytes(config)
    experts = n * expert_params(cfg) * held_dtype_bytes(config)
    working = 2 * 12 * inter * hidden + 4 * inter * inter
    search = O_PRUNE_COPIES * 8 * O_PRUNE_TOKENS * n * n + O_PRUNE_BLOCK
    refit = refit_bytes(hidden, inter, n, keep, int(cfg.get("num_experts_per_tok") or 1), tokens)
    return int(PROCESS_BYTES + layer + keep * experts / n + working + HIDDEN_COPIES * 4 * tokens * hidden + search
               + refit)


def refit_bytes(hidden: int, inter: int, n: int, keep: int, top_k: int, tokens: int) -> int:
    """The token-dependent working set of the least-squares refits, the larger of the two (they run one after the
    other): the per-group fit holds a group's tokens (Tg, H) and its fp32 design rows with their fast-path copy,
    4 Tg H + 6 Tg I; the joint re-routed fit its sampled tokens and residuals, 8 Tj H, and one merged expert's
    design rows in the fast-path dtype with one fp32 copy, 6 Tk I. Tg, Tj and Tk follow the token caps of
    fastpath.py and methods.py, with a group or a merged expert taking up to twice its even share of the tokens
    (real routers are unbalanced)."""
    k = max(1, min(top_k, keep))
    t_group = min(tokens, group_fit_tokens(inter), 4 * tokens * top_k // n)
    t_joint = min(tokens, joint_fit_tokens(inter) * keep // k)
    t_expert = min(t_joint, 2 * t_joint * k // keep)
    return max(4 * t_group * hidden + 6 * t_group * inter, 8 * t_joint * hidden + 6 * t_expert * inter)


def eval_peak_bytes(config: dict[str, Any], dtype_bytes: int = 2, *, batch_tokens: int = 8 * 2048) -> int:
    """Memory an evaluation needs: the whole model's weights at `dtype_bytes`, plus the activations of one batch of
    `batch_tokens` tokens (fp32 logits over the vocabulary, a few hidden-size and expert-width buffers) and
    PROCESS_BYTES. An estimate from the shapes, not a measurement."""
    cfg = text_config(config)
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    per_token = 4 * vocab + 8 * 4 * h + 2 * 4 * top_k * _expert_intermediate(cfg)
    return checkpoint_bytes(config, dtype_bytes) + batch_tokens * per_token + PROCESS_BYTES
