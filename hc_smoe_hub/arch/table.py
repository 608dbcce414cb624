"""The family table: one `ArchSpec` row per supported MoE family, and the refusal for every other model.

The README's supported-models table (`supported_table()`), the refusal message (`supported_families()`) and the
Space's introduction all read these rows.
"""

from __future__ import annotations

from typing import Any

from hc_smoe_hub.arch.spec import ArchSpec
from hc_smoe_hub.arch.storage import Fused, PerExpert
from hc_smoe_hub.arch.strategies import DenseLayers, ExpertActivation, ExtraLayers, Scoring
from hc_smoe_hub.errors import UnsupportedModelError

# DeepSeek-V3's router: sigmoid scores, a selection-only bias, grouped top-k, renormalized, scaled.
_SIGMOID_GROUPED = Scoring(scores="sigmoid", renormalize="norm_topk_prob", bias="gate.e_score_correction_bias",
                           grouping="top2-sum", scaling_key="routed_scaling_factor")
_MTP = ExtraLayers(count_keys=("num_nextn_predict_layers", "num_mtp_layers"))
_SHARED = "shared_experts copied unchanged"
_NEW_TESTED = ("tiny checkpoint (tests/test_families_per_expert.py): default and --paper, keep N identical, stock "
               "load, reduced router routes as planned, route() against the transformers router")
_OLD_TESTED = "tiny checkpoint (tests/test_engine.py, tests/test_baselines.py): keep N identical, stock load, methods"
# Granite MoE: fused `input_linear` (E, 2I, H) / `output_linear` (E, H, I) experts, router `router.layer`, top-k on
# the logits then softmax over the k chosen, and `residual_multiplier` scaling the MoE (plus shared MLP) output.
_GRANITE = dict(
    expert_count_keys=("num_local_experts",),
    moe_disk="block_sparse_moe",
    moe_module="block_sparse_moe",
    router="router.layer.weight",
    router_memory="router.weight",
    storage=Fused(gate_up="input_linear.weight", down="output_linear.weight"),
    scoring=Scoring(scores="topk-softmax", renormalize="always"),
    residual_scale_key="residual_multiplier",
)
_GRANITE_TESTED = ("tiny checkpoint in the Hub's fused layout (tests/test_granite.py): default and --paper, keep N "
                   "identical, stock load, reduced router routes as planned")

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="Mixtral",
        model_types=("mixtral",),
        expert_count_keys=("num_local_experts",),
        hub_example="mistralai/Mixtral-8x7B-v0.1",
        tested=_OLD_TESTED,
        moe_disk="block_sparse_moe",
        storage=PerExpert("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
        scoring=Scoring(renormalize="always"),
        shared_expert_note="`block_sparse_moe` on disk",
    ),
    ArchSpec(
        family="Qwen2-MoE / Qwen1.5-MoE",
        model_types=("qwen2_moe",),
        expert_count_keys=("num_experts",),
        hub_example="Qwen/Qwen1.5-MoE-A2.7B",
        tested=_OLD_TESTED + "; the qwen15-moe demo model end to end",
        dense=DenseLayers("sparse-step"),
        shared_expert_note="shared_expert and shared_expert_gate and dense `mlp_only_layers` copied unchanged; "
        "`norm_topk_prob=False` honoured",
    ),
    ArchSpec(
        family="Qwen3-MoE",
        model_types=("qwen3_moe",),
        # Qwen3MoeConfig declares num_experts but serializes num_local_experts: write both.
        expert_count_keys=("num_experts", "num_local_experts"),
        hub_example="Qwen/Qwen3-30B-A3B",
        tested=_OLD_TESTED,
        dense=DenseLayers("sparse-step"),
    ),
    ArchSpec(
        family="OLMoE",
        model_types=("olmoe",),
        expert_count_keys=("num_experts",),
        hub_example="allenai/OLMoE-1B-7B-0924",
        tested=_OLD_TESTED,
    ),
    ArchSpec(
        family="DeepSeek-V3 / R1",
        model_types=("deepseek_v3",),
        expert_count_keys=("n_routed_experts",),
        hub_example="deepseek-ai/DeepSeek-V3",
        tested="tiny checkpoint with an MTP layer (tests/test_families.py): default and --paper, keep N identical, "
        "stock load, reduced router routes as planned; FP8-block like the Hub repos (tests/test_quant_merge.py): "
        "default and --paper re-quantized, keep N byte-identical, --dtype bfloat16 dequantized, stock CPU load, "
        "resume",
        scoring=_SIGMOID_GROUPED,
        dense=DenseLayers("first-k"),
        extra_layers=_MTP,
        shared_expert_note=f"{_SHARED}; dense `first_k_dense_replace` layers copied; MTP layers dropped "
        "(`num_nextn_predict_layers` set to 0)",
    ),
    ArchSpec(
        family="Kimi K2",
        model_types=("kimi_k2",),
        expert_count_keys=("n_routed_experts",),
        hub_example="moonshotai/Kimi-K2-Instruct",
        tested="tiny DeepSeek-V3 checkpoint whose config says kimi_k2 (tests/test_families.py): default method, keep "
        "N identical, stock load; FP8 is read as for DeepSeek-V3 (not tested on a kimi_k2 config); the Hub repos' "
        "tokenizer needs remote code",
        scoring=_SIGMOID_GROUPED,
        dense=DenseLayers("first-k"),
        extra_layers=_MTP,
        # transformers 5.24 has no kimi_k2 class; the architecture is DeepSeek-V3's, so it is built and written as
        # deepseek_v3 (auto_map dropped), which stock transformers loads.
        load_as="deepseek_v3",
        shared_expert_note=f"{_SHARED}; built and written as `deepseek_v3` (transformers has no `kimi_k2` class)",
    ),
    ArchSpec(
        family="GLM-4.5 / 4.6 / 4.7",
        model_types=("glm4_moe",),
        expert_count_keys=("n_routed_experts",),
        hub_example="zai-org/GLM-4.5-Air",
        tested="tiny checkpoint with an MTP layer (tests/test_families.py): default and --paper, keep N identical, "
        "stock load, reduced router routes as planned; FP8-block (tests/test_quant_merge.py): default and --paper "
        "re-quantized, keep N byte-identical, stock CPU load",
        scoring=_SIGMOID_GROUPED,
        dense=DenseLayers("first-k"),
        extra_layers=_MTP,
        shared_expert_note=f"{_SHARED}; dense `first_k_dense_replace` layers copied; MTP layers dropped",
    ),
    ArchSpec(
        family="GLM-4.7-Flash (GLM-4-MoE-Lite)",
        model_types=("glm4_moe_lite",),
        expert_count_keys=("n_routed_experts",),
        hub_example="zai-org/GLM-4.7-Flash",
        tested="tiny checkpoint with an MTP layer (tests/test_families.py): default method, keep N identical, stock "
        "load, reduced router routes as planned",
        scoring=_SIGMOID_GROUPED,
        dense=DenseLayers("layer-types"),
        extra_layers=_MTP,
        shared_expert_note=f"{_SHARED}; dense `mlp_layer_types` layers copied; MTP layers dropped",
    ),
    ArchSpec(
        family="DeepSeek-V2 / V2-Lite",
        model_types=("deepseek_v2",),
        expert_count_keys=("n_routed_experts",),
        hub_example="deepseek-ai/DeepSeek-V2-Lite",
        tested="tiny checkpoints, greedy and group_limited_greedy (tests/test_families.py): default method (and "
        "--paper, grouped), keep N identical, stock load, reduced router routes as planned",
        # transformers' DeepSeek-V2 router: softmax, never renormalized (norm_topk_prob is ignored), grouped only
        # with topk_method group_limited_greedy (a group scores its best expert), routed_scaling_factor applied.
        scoring=Scoring(scores="softmax", renormalize="never", grouping="max",
                        group_when=("topk_method", "group_limited_greedy"), scaling_key="routed_scaling_factor"),
        dense=DenseLayers("first-k"),
        shared_expert_note=f"{_SHARED}; dense `first_k_dense_replace` layers copied",
    ),
    ArchSpec(
        family="Qwen3.5 / Qwen3.6 MoE",
        model_types=("qwen3_5_moe",),
        expert_count_keys=("num_experts",),
        hub_example="Qwen/Qwen3.5-397B-A17B",
        tested="tiny vision-language checkpoint in the Hub's layout, fused experts and `mtp.*` weights "
        "(tests/test_qwen3_5_moe.py): default and --paper, keep N identical, stock load, reduced router routes as "
        "planned",
        # The Hub repos are vision-language checkpoints (`text_config`, `model.language_model.*`); the engine runs
        # the text-only class AutoModelForCausalLM builds for them (`model.layers`), which loads the output too.
        text_config="text_config",
        layers_prefix="model.language_model.layers.",
        embed_disk="model.language_model.embed_tokens",
        storage=Fused(),
        other_storages=(PerExpert(),),  # as transformers 5's save_pretrained writes it
        scoring=Scoring(renormalize="always"),
        extra_layers=ExtraLayers(count_keys=("mtp_num_hidden_layers",), key_prefixes=("mtp.",)),
        shared_expert_note="fused experts, written back fused; shared_expert and its gate, the Gated DeltaNet "
        "layers and the vision tower (`model.visual.*`) copied unchanged; MTP weights (`mtp.*`) dropped "
        "(`mtp_num_hidden_layers` set to 0)",
    ),
    ArchSpec(
        family="Granite MoE (3.0 / 3.1)",
        model_types=("granitemoe",),
        hub_example="ibm-granite/granite-3.1-3b-a800m-instruct",
        tested=_GRANITE_TESTED,
        shared_expert_note="fused experts on disk, written back fused; top-k then softmax router",
        **_GRANITE,
    ),
    ArchSpec(
        family="Granite MoE with shared experts",
        model_types=("granitemoeshared",),
        hub_example="ibm-research/moe-7b-1b-active-shared-experts",
        tested=_GRANITE_TESTED,
        moe_siblings=("shared_mlp",),
        shared_expert_note="fused experts, written back fused; `shared_mlp` copied unchanged",
        **_GRANITE,
    ),
    ArchSpec(
        family="Granite 4.0 hybrid (Mamba-2 + attention, MoE)",
        model_types=("granitemoehybrid",),
        hub_example="ibm-granite/granite-4.0-h-tiny",
        tested=_GRANITE_TESTED,
        moe_siblings=("shared_mlp",),
        shared_expert_note="fused experts, written back fused; `shared_mlp` and the Mamba-2 mixers copied unchanged",
        **_GRANITE,
    ),
    ArchSpec(
        family="gpt-oss",
        model_types=("gpt_oss",),
        expert_count_keys=("num_local_experts",),
        hub_example="openai/gpt-oss-20b",
        tested="tiny checkpoints in the Hub's fused layout, BF16-style and MXFP4 (tests/test_gptoss.py): default and "
        "--paper, keep N identical, stock load, reduced router routes as planned; expert math against "
        "transformers' GptOssMLP (tests/test_gptoss_math.py)",
        # Fused (E, H, 2I) experts, gate and up interleaved, with per-expert biases; a router bias on the logits,
        # top-k then softmax; the clamped GLU (swiglu_alpha, swiglu_limit); attention sinks need eager attention.
        top_k_aliases=("experts_per_token",),  # the Hub config.json repeats num_experts_per_tok under this name
        router="router.weight",
        storage=Fused(gate_up="experts.gate_up_proj", down="experts.down_proj", transposed=True, interleaved=True,
                      gate_up_bias="experts.gate_up_proj_bias", down_bias="experts.down_proj_bias"),
        scoring=Scoring(scores="topk-softmax", renormalize="always", logit_bias="router.bias"),
        activation=ExpertActivation("clamped-glu"),
        attn_implementation="eager",
        shared_expert_note="fused experts with biases, written back fused (MXFP4 sources re-quantized, or "
        "`--dtype bfloat16`); router bias reduced with the router rows",
    ),
    ArchSpec(
        family="Qwen3-Next",
        model_types=("qwen3_next",),
        expert_count_keys=("num_experts",),
        hub_example="Qwen/Qwen3-Next-80B-A3B-Instruct",
        tested=_NEW_TESTED + "; linear- and full-attention layers",
        dense=DenseLayers("sparse-step"),
        extra_layers=ExtraLayers(count_keys=("mtp_num_hidden_layers",), key_prefixes=("mtp.",)),
        shared_expert_note="linear-attention and full-attention layers, each run with its own mask; shared_expert "
        "and shared_expert_gate copied unchanged; `mtp.*` layers dropped (`mtp_num_hidden_layers` set to 0)",
    ),
    ArchSpec(
        family="MiniMax-M2",
        model_types=("minimax_m2",),
        expert_count_keys=("num_local_experts",),
        hub_example="MiniMaxAI/MiniMax-M2",
        tested=_NEW_TESTED + "; block FP8 too, as the Hub repo is (tests/test_quant_merge.py: re-quantized output, "
        "stock load)",
        moe_disk="block_sparse_moe",
        storage=PerExpert("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
        # transformers' MiniMaxM2TopKRouter: sigmoid, the block's e_score_correction_bias for the choice only, always
        # renormalized, no groups, no scaling.
        scoring=Scoring(scores="sigmoid", renormalize="always", bias="e_score_correction_bias"),
        shared_expert_note="`block_sparse_moe` on disk; sigmoid router with `e_score_correction_bias` (reduced with "
        "the router rows)",
    ),
    ArchSpec(
        family="ERNIE-4.5-MoE",
        model_types=("ernie4_5_moe",),
        expert_count_keys=("moe_num_experts",),
        hub_example="baidu/ERNIE-4.5-21B-A3B-PT",
        tested=_NEW_TESTED + "; MTP layer keys",
        top_k_key="moe_k",
        # Ernie4_5_MoeTopKRouter: softmax in fp32, the (1, N) bias in `moe_statics` added for the choice only,
        # renormalized (its clamp at moe_norm_min, 1e-12, cannot bind: the top-k of a softmax over N sum to >= 1/N).
        scoring=Scoring(scores="softmax", renormalize="always", bias="moe_statics.e_score_correction_bias"),
        dense=DenseLayers("interval"),
        extra_layers=ExtraLayers(count_keys=("num_nextn_predict_layers", "num_mtp_layers"),
                                 key_prefixes=("model.mtp_",)),
        memory_renames=(("mlp.moe_statics.", "mlp.gate.moe_statics."),),
        shared_expert_note=f"{_SHARED}; selection bias `moe_statics.e_score_correction_bias` reduced with the router "
        "rows; dense layers outside `moe_layer_start_index`..`moe_layer_end_index` / `moe_layer_interval` copied; "
        "`model.mtp_*` layers dropped",
    ),
    ArchSpec(
        family="Hunyuan-A13B",
        model_types=("hunyuan_v1_moe",),
        expert_count_keys=("num_experts",),
        hub_example="tencent/Hunyuan-A13B-Instruct",
        tested=_NEW_TESTED,
        top_k_key="moe_topk",
        router="gate.wg.weight",
        scoring=Scoring(renormalize="always"),
        shared_expert_note="shared_mlp copied unchanged; a per-layer `moe_topk` list is accepted when its entries are "
        "equal; the on-disk layout is transformers' (per-expert `gate_proj`/`up_proj`/`down_proj`)",
    ),
    ArchSpec(
        family="Phi-3.5-MoE",
        model_types=("phimoe",),
        expert_count_keys=("num_local_experts",),
        hub_example="microsoft/Phi-3.5-MoE-instruct",
        tested=_NEW_TESTED,
        moe_disk="block_sparse_moe",
        storage=PerExpert("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
        scoring=Scoring(scores="sparsemixer", renormalize="never", jitter_key="router_jitter_noise"),
        memory_renames=(("mlp.gate.", "mlp.router."),),  # transformers' PhimoeSparseMoeBlock calls it `router`
        shared_expert_note="`block_sparse_moe` on disk; sparsemixer routing (two experts, `router_jitter_noise` "
        "margin) reproduced by `route()`; `--keep` must be at least 2",
    ),
)


# MoE families that are known and refused on purpose: model_type -> why, in one line (shown to the user).
NOT_SUPPORTED: dict[str, str] = {
    "llama4": "Llama 4 (llama4) is not supported: its router's top-1 sigmoid score multiplies each expert's INPUT "
    "(E(s*x), not s*E(x)), and the merge statistics, the merging methods and their refits all assume output "
    "weighting, so a merged Llama 4 would be wrong; its fused transposed experts (E, H, 2I) could be read "
    "(arch/storage.Fused(transposed=True)) but the routing math is not done",
}
NOT_SUPPORTED["llama4_text"] = NOT_SUPPORTED["llama4"]


def supported_families() -> str:
    return ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in SPECS)


def supported_table() -> str:
    """The README's supported-models table, rendered from the rows (tests check the README holds it)."""
    lines = ["| family | `model_type` | example on the Hub | expert count key(s) | notes | tested |",
             "|---|---|---|---|---|---|"]
    for s in SPECS:
        types = ", ".join(f"`{t}`" for t in s.model_types)
        keys = ", ".join(f"`{k}`" for k in s.expert_count_keys)
        lines.append(f"| {s.family} | {types} | `{s.hub_example}` | {keys} | {s.shared_expert_note} | {s.tested} |")
    return "\n".join(lines)


def spec_for(config: dict[str, Any]) -> ArchSpec:
    """The spec of a config.json, or a one-line refusal naming the supported families."""
    model_type = config.get("model_type", "<missing>")
    if model_type in NOT_SUPPORTED:
        raise UnsupportedModelError(f"{NOT_SUPPORTED[model_type]}; supported: {supported_families()}")
    for spec in SPECS:
        if model_type in spec.model_types:
            if not any(spec.cfg(config).get(k) for k in spec.expert_count_keys):
                raise UnsupportedModelError(
                    f"this {model_type} config has no routed experts (dense model): nothing to merge; "
                    f"supported MoE families: {supported_families()}"
                )
            return spec
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not a supported Mixture-of-Experts family "
        f"(dense or not yet supported); supported: {supported_families()}"
    )
