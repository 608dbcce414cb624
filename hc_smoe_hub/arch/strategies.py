"""The small named strategies a family row refers to: one per kind of variation between MoE families.

Each strategy is plain data read from config.json; `ArchSpec` rows name one of each, so that adding a family is a
row and never a branch on model names. They mirror transformers 5.24's own modules (read from its source):

- `Scoring`: how router logits become the weights the experts are multiplied by, and which experts are chosen
  (softmax or sigmoid scores, a selection-only `e_score_correction_bias`, grouped top-k, `routed_scaling_factor`,
  renormalization). It builds the `routing.Routing` that every `route()` call of the package uses.
- `DenseLayers`: which decoder layers have routed experts (`first_k_dense_replace`, `decoder_sparse_step` with
  `mlp_only_layers`, `mlp_layer_types`).
- `ExtraLayers`: multi-token-prediction layers stored after the last decoder layer (`num_nextn_predict_layers`).
- `ExpertActivation`: how an expert combines its gate and up projections (SwiGLU with `hidden_act`, or gpt-oss's
  clamped GLU with `swiglu_alpha` / `swiglu_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hc_smoe_hub.activations import Activation, ClampedGlu
from hc_smoe_hub.routing import Routing


def _flag(config: dict[str, Any], rule: str) -> bool:
    """`always` / `never`, or a config key whose truth decides."""
    if rule in ("always", "never"):
        return rule == "always"
    return bool(config.get(rule, False))


@dataclass(frozen=True)
class Scoring:
    """Router scoring of one family.

    `scores`: "softmax" (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2, ERNIE-4.5, Hunyuan), "sigmoid" (DeepSeek-V3, Kimi K2,
    GLM-4.5, MiniMax-M2), "topk-softmax" (Granite MoE, gpt-oss: top-k on the logits, then the softmax over the k
    chosen; set `renormalize` "always", which it is in exact arithmetic) or "sparsemixer" (Phi-3.5-MoE: always two
    experts, each weighted by a softmax over the logits within `jitter_key`'s relative margin of it,
    `routing.route`).
    `renormalize`: "always", "never" or the config key that decides (`norm_topk_prob`); DeepSeek-V2's transformers
    router never renormalizes, whatever its config says, and the rows follow the module, not the config.
    `bias`: the router tensor (relative to the MoE block on disk) added to the scores for the choice only.
    `grouping`: "none"; "top2-sum" (a group's score is the sum of its two best biased scores, DeepSeek-V3 / GLM);
    or "max" (its best score, DeepSeek-V2's `group_limited_greedy`), active only when `group_when` holds.
    `scores` "topk-softmax" (gpt-oss: the top-k logits, then a softmax over those k) with `logit_bias`, the router
    tensor (relative to the MoE block on disk) added to the logits themselves (gpt-oss's `router.bias`).
    """

    scores: str = "softmax"
    renormalize: str = "norm_topk_prob"
    bias: str | None = None
    grouping: str = "none"
    group_when: tuple[str, str] | None = None  # (config key, value) that switches grouping on, e.g. topk_method
    scaling_key: str | None = None  # routed_scaling_factor
    logit_bias: str | None = None  # router.bias (gpt-oss)
    jitter_key: str | None = None  # sparsemixer's margin (router_jitter_noise)

    def grouped(self, config: dict[str, Any]) -> bool:
        if self.grouping == "none":
            return False
        if self.group_when is not None and config.get(self.group_when[0]) != self.group_when[1]:
            return False
        return int(config.get("n_group") or 1) > 1

    def routing(self, config: dict[str, Any], top_k: int, bias: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None) -> Routing:
        grouped = self.grouped(config)
        scale = float(config.get(self.scaling_key) or 1.0) if self.scaling_key else 1.0
        return Routing(
            top_k=top_k,
            renormalize=_flag(config, self.renormalize),
            scoring=self.scores,
            bias=bias,
            grouping=self.grouping if grouped else "none",
            n_group=int(config.get("n_group") or 1) if grouped else 1,
            topk_group=int(config.get("topk_group") or 1) if grouped else 1,
            scale=scale,
            # The sigmoid routers add 1e-20 to the denominator; the softmax ones divide by the plain sum.
            renorm_eps=1e-20 if self.scores == "sigmoid" else 0.0,
            logit_bias=logit_bias,
            jitter_eps=float(config.get(self.jitter_key) or 0.0) if self.jitter_key else 0.0,
        )

    @property
    def min_keep(self) -> int:
        """The fewest experts the reduced model can route: sparsemixer always picks two."""
        return 2 if self.scores == "sparsemixer" else 1

    def valid_keeps(self, config: dict[str, Any], n_experts: int, top_k: int) -> list[int] | None:
        """Every K the reduced model can route with `n_group` kept (None: any K from 1 to N).

        The reduced config keeps `n_group` and `topk_group`, so its router splits the K experts into n_group groups
        of K / n_group; a "top2-sum" group score takes the two best of each group, so a group needs at least two
        experts; and the top-min(k, K) choice must fit in the `topk_group` chosen groups, or the router would pick
        masked-out experts.
        """
        if not self.grouped(config):
            return None
        g, tg = int(config["n_group"]), int(config.get("topk_group") or 1)
        least = 2 if self.grouping == "top2-sum" else 1
        return [k for k in range(g, n_experts + 1, g)
                if k // g >= least and tg * (k // g) >= min(top_k, k)]


@dataclass(frozen=True)
class DenseLayers:
    """Which decoder layers hold routed experts, as the transformers decoder layer decides.

    "all"; "sparse-step" (Qwen-MoE: `(i + 1) % decoder_sparse_step == 0` and i not in `mlp_only_layers`);
    "first-k" (DeepSeek, GLM: i >= `first_k_dense_replace`); "layer-types" (`mlp_layer_types[i] == "sparse"`);
    "interval" (ERNIE-4.5: `(i + 1) % moe_layer_interval == 0` and `moe_layer_start_index` <= i <=
    `moe_layer_end_index`, -1 meaning the last layer).
    """

    rule: str = "all"

    def moe_layers(self, config: dict[str, Any], num_layers: int) -> list[int]:
        if self.rule == "all":
            return list(range(num_layers))
        if self.rule == "sparse-step":
            step = int(config.get("decoder_sparse_step") or 1)
            only = set(config.get("mlp_only_layers") or [])
            return [i for i in range(num_layers) if (i + 1) % step == 0 and i not in only]
        if self.rule == "first-k":
            return list(range(int(config.get("first_k_dense_replace") or 0), num_layers))
        if self.rule == "layer-types":
            types = config.get("mlp_layer_types") or (["dense"] + ["sparse"] * (num_layers - 1))
            return [i for i in range(num_layers) if types[i] == "sparse"]
        if self.rule == "interval":
            step = int(config.get("moe_layer_interval") or 1)
            start = int(config.get("moe_layer_start_index") or 0)
            end = int(config.get("moe_layer_end_index", -1))
            end = num_layers - 1 if end == -1 else end
            return [i for i in range(num_layers) if (i + 1) % step == 0 and start <= i <= end]
        raise ValueError(f"unknown dense-layer rule {self.rule}")


@dataclass(frozen=True)
class ExtraLayers:
    """Layers stored after the last decoder layer that the transformers class does not build (DeepSeek-V3 and
    GLM-4.5's multi-token-prediction layers `model.layers.{num_hidden_layers + i}.*`), or under their own
    `key_prefixes` (Qwen3.5's and Qwen3-Next's `mtp.*`).

    They are dropped from the output and every `count_keys` entry set to 0, so the reduced config says what the
    checkpoint holds; the provenance records it. Reducing them too would need the MTP head, which transformers
    does not run: nothing could check the result.
    """

    count_keys: tuple[str, ...] = ()
    key_prefixes: tuple[str, ...] = ()

    def holds(self, key: str) -> bool:
        """Whether an on-disk key belongs to extra layers stored under their own prefix."""
        return bool(self.key_prefixes) and key.startswith(self.key_prefixes)

    def count(self, config: dict[str, Any]) -> int:
        return max((int(config.get(k) or 0) for k in self.count_keys), default=0)

    def reduced(self, config: dict[str, Any]) -> dict[str, Any]:
        return {k: 0 for k in self.count_keys if k in config}


@dataclass(frozen=True)
class ExpertActivation:
    """How an expert turns its gate and up products into its intermediate activations.

    "silu-glu": act(gate) * up with the config's `hidden_act` (silu for every family so far); "clamped-glu":
    gpt-oss's `GptOssExperts._apply_gate`, with alpha and limit read from the config keys named here.
    """

    kind: str = "silu-glu"
    alpha_key: str = "swiglu_alpha"
    limit_key: str = "swiglu_limit"

    def build(self, config: dict[str, Any]) -> Activation | ClampedGlu:
        if self.kind == "clamped-glu":
            return ClampedGlu(alpha=float(config.get(self.alpha_key, 1.702)),
                              limit=float(config.get(self.limit_key, 7.0)))
        if self.kind != "silu-glu":
            raise ValueError(f"unknown expert activation {self.kind}")
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act == "silu":
            # F.silu computes what transformers' SiLUActivation does, and lets the statistics pass run it in place.
            return torch.nn.functional.silu
        from transformers.activations import ACT2FN

        return ACT2FN[hidden_act]
