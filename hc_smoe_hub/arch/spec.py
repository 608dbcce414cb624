"""`ArchSpec`: one MoE family's row, as data (key templates, config keys) plus the named strategies it uses.

Disk keys are relative to the decoder layer prefix (`layers_prefix` + layer index + "."); how the routed experts
are stored is the row's `storage` strategy (`storage.py`). Everything the engine does differently per family is
read from these fields, never from the family's name.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hc_smoe_hub.arch.storage import ExpertStorage, PerExpert
from hc_smoe_hub.arch.strategies import DenseLayers, ExpertActivation, ExtraLayers, Scoring
from hc_smoe_hub.errors import HcSmoeError, UnsupportedModelError
from hc_smoe_hub.routing import Routing


@dataclass(frozen=True)
class ArchSpec:
    """How one MoE family stores its experts and router, and which strategies route and lay it out.

    `moe_disk` is the MoE block's name on disk and `moe_module` its attribute on the decoder layer in transformers 5
    (they differ for Mixtral: `block_sparse_moe` on disk, `mlp` in memory). `text_config`, when set, is the key of
    the nested config that holds the language model's fields. `load_as` is the transformers `model_type` the
    family is built and written as, when its own is not one transformers knows (Kimi K2's `kimi_k2` is DeepSeek-V3).
    `router_memory` is the router's name in the MoE block in memory when it differs from `router` on disk
    (Granite: `router.layer.weight` on disk, `router.weight` in memory). `moe_siblings` are decoder-layer modules
    that take the MoE block's input and whose output is added to the block's (Granite's `shared_mlp`), and
    `residual_scale_key` the config key of the factor that sum is multiplied by before the residual is added
    (Granite's `residual_multiplier`). `layers_prefix` is the decoder layers' on-disk prefix, `layers_module`,
    `embed_module` and `rotary_module` their places in the model the engine builds (`embed_disk`: the
    embedding's on-disk name where it differs, as in a vision-language checkpoint read by the text-only class).
    """

    family: str
    model_types: tuple[str, ...]
    expert_count_keys: tuple[str, ...]  # every key is written; the first present one is read
    hub_example: str = ""  # a real Hub model id of the family, for the README table
    tested: str = ""  # what the tests cover, for the README table
    moe_disk: str = "mlp"
    moe_module: str = "mlp"
    moe_norm_module: str = "post_attention_layernorm"  # the norm whose output feeds the MoE block
    experts_module: str = "experts"  # the routed experts inside the MoE block, called (hidden, top_k_index, weights)
    router: str = "gate.weight"
    router_memory: str | None = None
    storage: ExpertStorage = field(default_factory=PerExpert)
    # Other layouts the family is found in (Qwen3.5: fused on the Hub, per expert when saved by transformers 5),
    # used when the first layer's keys of `storage` are absent; the output keeps the layout the source has.
    other_storages: tuple[ExpertStorage, ...] = ()
    moe_siblings: tuple[str, ...] = ()
    residual_scale_key: str | None = None
    top_k_key: str = "num_experts_per_tok"
    top_k_aliases: tuple[str, ...] = ()  # config keys repeating top-k, clamped with it (gpt-oss: experts_per_token)
    scoring: Scoring = field(default_factory=Scoring)
    activation: ExpertActivation = field(default_factory=ExpertActivation)
    dense: DenseLayers = field(default_factory=DenseLayers)
    extra_layers: ExtraLayers = field(default_factory=ExtraLayers)
    text_config: str | None = None
    load_as: str | None = None
    layers_prefix: str = "model.layers."
    rotary_module: str = "model.rotary_emb"
    embed_module: str = "model.embed_tokens"
    embed_disk: str | None = None  # the embedding's on-disk name when it differs (Qwen3.5's model.language_model.)
    layers_module: str = "model.layers"
    shared_expert_note: str = ""
    attn_implementation: str = "sdpa"  # what the streaming skeleton runs; "eager" where sdpa is unsupported
    # (on-disk, in-memory) name prefixes relative to the decoder layer, after the MoE block's own rename: the
    # renames of the family's transformers conversion mapping (Phi-3.5-MoE's `gate` is `router` in memory).
    memory_renames: tuple[tuple[str, str], ...] = ()

    # ---------- config ----------
    def cfg(self, config: dict[str, Any]) -> dict[str, Any]:
        """The language model's fields: the nested `text_config` when the family has one."""
        return config.get(self.text_config, config) if self.text_config else config

    def num_experts(self, config: dict[str, Any]) -> int:
        c = self.cfg(config)
        for key in self.expert_count_keys:
            if c.get(key):
                if isinstance(c[key], list):  # Hunyuan's config may give one count per layer
                    raise UnsupportedModelError(f"{key} is a per-layer list: {self.family} models whose layers "
                                                "have different expert counts are not supported")
                return int(c[key])
        raise UnsupportedModelError(f"config.json has none of {self.expert_count_keys}: not a {self.family} MoE")

    def top_k(self, config: dict[str, Any]) -> int:
        """The routed experts per token; a per-layer list (Hunyuan's `moe_topk`) must hold one value."""
        value = self.cfg(config)[self.top_k_key]
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModelError(
                    f"{self.top_k_key} differs between layers ({sorted(set(value))}): per-layer top-k is not "
                    f"supported; only {self.family} configs with one top-k for every layer can be merged")
            value = value[0]
        return int(value)

    def renormalizes(self, config: dict[str, Any]) -> bool:
        return self.routing(config).renormalize

    def routing(self, config: dict[str, Any], bias: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None) -> Routing:
        """The source model's routing (with one layer's selection bias and router bias, when the family has them)."""
        return self.scoring.routing(self.cfg(config), self.top_k(config), bias, logit_bias)

    def act(self, config: dict[str, Any]):
        """The experts' gated activation (`activations.gated` takes it)."""
        return self.activation.build(self.cfg(config))

    def moe_layer_ids(self, config: dict[str, Any]) -> list[int]:
        c = self.cfg(config)
        return self.dense.moe_layers(c, int(c["num_hidden_layers"]))

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(self.cfg(config)["num_hidden_layers"])

    def check_keep(self, config: dict[str, Any], keep: int) -> None:
        """Refuse a K the reduced model cannot route (grouped top-k), from config.json alone."""
        c = self.cfg(config)
        if keep < self.scoring.min_keep:
            raise HcSmoeError(
                f"--keep {keep} is too few for {self.family}'s {self.scoring.scores} router, which always routes "
                f"each token to {self.scoring.min_keep} experts: use --keep {self.scoring.min_keep} or more")
        valid = self.scoring.valid_keeps(c, self.num_experts(config), self.top_k(config))
        if valid is None or keep in valid:
            return
        shown = ", ".join(map(str, valid)) if valid else "none"
        raise HcSmoeError(
            f"--keep {keep} does not fit {self.family}'s grouped routing (n_group {c['n_group']}, topk_group "
            f"{c.get('topk_group')}, top-k {self.top_k(config)}): the reduced model keeps {c['n_group']} groups of "
            f"K/{c['n_group']} experts each, so K must be a multiple of {c['n_group']} whose groups can hold the "
            f"top-k choice; valid --keep values: {shown}")

    def reduced_fields(self, config: dict[str, Any], keep: int) -> dict[str, Any]:
        """The language-model config fields that change: expert counts, top-k, extra (MTP) layer counts."""
        out: dict[str, Any] = {key: keep for key in self.expert_count_keys}
        top_k = self.cfg(config)[self.top_k_key]
        # A per-layer list stays a list of the same length (every entry is equal, `top_k` checks).
        out[self.top_k_key] = ([min(self.top_k(config), keep)] * len(top_k) if isinstance(top_k, list)
                               else min(self.top_k(config), keep))
        out.update({key: min(self.top_k(config), keep) for key in self.top_k_aliases if key in self.cfg(config)})
        out.update(self.extra_layers.reduced(self.cfg(config)))
        return out

    def reduced_config(self, config: dict[str, Any], keep: int) -> dict[str, Any]:
        """The source config with the expert count set to `keep`, top-k clamped and dropped extra layers zeroed;
        a family loaded as another model_type is written as that one, so stock transformers loads it."""
        out = copy.deepcopy(config)
        self.cfg(out).update(self.reduced_fields(config, keep))
        if self.load_as:
            out["model_type"] = self.load_as
            out.pop("auto_map", None)  # the remote code is not needed: the stock class loads it
        return out

    def hf_config(self, src_dir: str | Path):
        """The transformers config of the source, built as `load_as` when the family's model_type is unknown."""
        from transformers import AutoConfig

        if not self.load_as:
            return AutoConfig.from_pretrained(src_dir)
        import json

        data = json.loads((Path(src_dir) / "config.json").read_text())
        data.pop("auto_map", None)
        data["model_type"] = self.load_as
        return AutoConfig.for_model(self.load_as, **{k: v for k, v in data.items() if k != "model_type"})

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        """What hc_smoe.json records about the family's layout: routing, dense layers, extra layers."""
        r = self.routing(config)
        extra = self.extra_layers.count(self.cfg(config))
        out: dict[str, Any] = {
            "routing": {"scores": r.scoring, "renormalize": r.renormalize, "selection_bias": self.scoring.bias,
                        "grouping": r.grouping, "n_group": r.n_group, "topk_group": r.topk_group,
                        "routed_scaling_factor": r.scale},
            "moe_layers": self.moe_layer_ids(config),
        }
        if self.scoring.logit_bias:
            out["routing"]["router_bias"] = self.scoring.logit_bias
        if self.activation != ExpertActivation():
            out["activation"] = self.activation.kind
        if r.scoring == "sparsemixer":
            out["routing"]["jitter_eps"] = r.jitter_eps
        if extra:
            out["mtp_layers"] = {"count": extra, "action": "dropped",
                                 "config": self.extra_layers.reduced(self.cfg(config))}
            if self.extra_layers.key_prefixes:
                out["mtp_layers"]["keys"] = [f"{p}*" for p in self.extra_layers.key_prefixes]
        if self.load_as:
            out["written_as"] = self.load_as
        return out

    # ---------- keys ----------
    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}{layer}."

    def router_key(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_disk}.{self.router}"

    def bias_key(self, layer: int) -> str | None:
        """On-disk key of the per-expert selection bias of one layer, when the family has one."""
        return f"{self.layer_prefix(layer)}{self.moe_disk}.{self.scoring.bias}" if self.scoring.bias else None

    def logit_bias_key(self, layer: int) -> str | None:
        """On-disk key of the router's own bias (added to the logits) of one layer, when the family has one."""
        name = self.scoring.logit_bias
        return f"{self.layer_prefix(layer)}{self.moe_disk}.{name}" if name else None

    def experts_base(self, layer: int) -> str:
        """The prefix the storage strategy's keys are relative to: the layer's MoE block on disk."""
        return f"{self.layer_prefix(layer)}{self.moe_disk}."

    def storage_in(self, keys: Container[str], layer: int, n: int) -> ExpertStorage:
        """The storage whose keys of `layer` are all in `keys` (the first one when none: its check names what is
        missing)."""
        for storage in (self.storage, *self.other_storages):
            if all(k in keys for k in storage.keys(self.experts_base(layer), n)):
                return storage
        return self.storage

    def memory_name(self, rel: str) -> str:
        """A decoder layer's on-disk tensor name (relative to the layer) as the transformers module names it."""
        if self.router_memory and rel == f"{self.moe_disk}.{self.router}":  # Granite: router.layer -> router
            return f"{self.moe_module}.{self.router_memory}"
        moe_disk = self.moe_disk + "."
        if rel.startswith(moe_disk):
            rel = self.moe_module + "." + rel[len(moe_disk):]
        for disk, memory in self.memory_renames:
            if rel.startswith(disk):
                return memory + rel[len(disk):]
        return rel

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """On-disk keys of (gate, up, down) of one expert, for per-expert storage only."""
        if not isinstance(self.storage, PerExpert):
            raise TypeError(f"{self.family} stores its experts fused: there are no per-expert keys")
        return self.storage.expert_keys(self.experts_base(layer), expert)

    def residual_scale(self, config: dict[str, Any]) -> float | None:
        """The factor the MoE output is scaled by before the residual is added, when the family has one."""
        return float(self.cfg(config).get(self.residual_scale_key, 1.0)) if self.residual_scale_key else None
