"""Per-family MoE specs, as data: where the router and experts live on disk and in memory, and config keys.

Adding a family is a new row in `SPECS` (plus, at most, a small routing hook in `routing.py`). Nothing else in the
package branches on model names: it reads these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hc_smoe_hub.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """How one MoE family stores its experts and router.

    Disk templates are relative to the decoder layer prefix (`layers_prefix` + layer index + "."); `{e}` is the
    expert index. `moe_disk` is the MoE block's name on disk and `moe_module` its attribute on the decoder layer in
    transformers 5 (they differ for Mixtral: `block_sparse_moe` on disk, `mlp` in memory).
    """

    family: str
    model_types: tuple[str, ...]
    expert_count_keys: tuple[str, ...]  # every key is written; the first present one is read
    moe_disk: str = "mlp"
    moe_module: str = "mlp"
    moe_norm_module: str = "post_attention_layernorm"  # the norm whose output feeds the MoE block
    experts_module: str = "experts"  # the routed experts inside the MoE block, called (hidden, top_k_index, weights)
    router: str = "gate.weight"
    expert_gate: str = "experts.{e}.gate_proj.weight"
    expert_up: str = "experts.{e}.up_proj.weight"
    expert_down: str = "experts.{e}.down_proj.weight"
    top_k_key: str = "num_experts_per_tok"
    # Routing after the softmax: "always" renormalizes the top-k weights (Mixtral); a config key name means
    # renormalize when that key is true (Qwen-MoE, OLMoE use `norm_topk_prob`).
    renormalize: str = "norm_topk_prob"
    layers_prefix: str = "model.layers."
    rotary_module: str = "model.rotary_emb"
    embed_module: str = "model.embed_tokens"
    layers_module: str = "model.layers"
    shared_expert_note: str = ""

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}{layer}."

    def router_key(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_disk}.{self.router}"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """On-disk keys of (gate, up, down) of one expert."""
        base = f"{self.layer_prefix(layer)}{self.moe_disk}."
        return tuple(base + t.format(e=expert) for t in (self.expert_gate, self.expert_up, self.expert_down))

    def num_experts(self, config: dict[str, Any]) -> int:
        for key in self.expert_count_keys:
            if config.get(key):
                return int(config[key])
        raise UnsupportedModelError(f"config.json has none of {self.expert_count_keys}: not a {self.family} MoE")

    def top_k(self, config: dict[str, Any]) -> int:
        return int(config[self.top_k_key])

    def renormalizes(self, config: dict[str, Any]) -> bool:
        return True if self.renormalize == "always" else bool(config.get(self.renormalize, False))

    def reduced_config(self, config: dict[str, Any], keep: int) -> dict[str, Any]:
        """The source config with the expert count set to `keep` and top-k clamped; all else unchanged."""
        out = dict(config)
        for key in self.expert_count_keys:
            out[key] = keep
        out[self.top_k_key] = min(self.top_k(config), keep)
        return out


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="Mixtral",
        model_types=("mixtral",),
        expert_count_keys=("num_local_experts",),
        moe_disk="block_sparse_moe",
        expert_gate="experts.{e}.w1.weight",
        expert_up="experts.{e}.w3.weight",
        expert_down="experts.{e}.w2.weight",
        renormalize="always",
    ),
    ArchSpec(
        family="Qwen2-MoE / Qwen1.5-MoE",
        model_types=("qwen2_moe",),
        expert_count_keys=("num_experts",),
        shared_expert_note="shared_expert and shared_expert_gate are copied unchanged",
    ),
    ArchSpec(
        family="Qwen3-MoE",
        model_types=("qwen3_moe",),
        # Qwen3MoeConfig declares num_experts but serializes num_local_experts: write both.
        expert_count_keys=("num_experts", "num_local_experts"),
    ),
    ArchSpec(
        family="OLMoE",
        model_types=("olmoe",),
        expert_count_keys=("num_experts",),
    ),
)


def supported_families() -> str:
    return ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in SPECS)


def spec_for(config: dict[str, Any]) -> ArchSpec:
    """The spec of a config.json, or a one-line refusal naming the supported families."""
    model_type = config.get("model_type", "<missing>")
    for spec in SPECS:
        if model_type in spec.model_types:
            if not any(config.get(k) for k in spec.expert_count_keys):
                raise UnsupportedModelError(
                    f"this {model_type} config has no routed experts (dense model): nothing to merge; "
                    f"supported MoE families: {supported_families()}"
                )
            return spec
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not a supported Mixture-of-Experts family "
        f"(dense or not yet supported); supported: {supported_families()}"
    )
