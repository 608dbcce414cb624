"""Where every source tensor goes in the output: the decoder layer a key belongs to, the extra (MTP) layers that
are dropped, the order tensors are written in, and the output plan with K experts (every shape known before the
merge starts, so that the writer can reserve its shards up front)."""

from __future__ import annotations

from dataclasses import dataclass

from hc_smoe_hub.arch.spec import ArchSpec
from hc_smoe_hub.arch.storage import ExpertStorage
from hc_smoe_hub.checkpoint import OutputTensor, SourceCheckpoint


@dataclass(frozen=True)
class OutputLayout:
    spec: ArchSpec
    src: SourceCheckpoint
    storage: ExpertStorage
    moe_layers: tuple[int, ...]
    num_layers: int
    n_experts: int

    def layer_of(self, key: str) -> int | None:
        """The decoder layer an on-disk key belongs to, or None for embeddings, final norm and head."""
        prefix = self.spec.layers_prefix
        return int(key[len(prefix):].split(".", 1)[0]) if key.startswith(prefix) else None

    def is_extra(self, key: str) -> bool:
        """Whether a key belongs to the extra (MTP) layers, which are dropped."""
        layer = self.layer_of(key)
        return (layer is not None and layer >= self.num_layers) or self.spec.extra_layers.holds(key)

    def ordered_keys(self) -> list[str]:
        """Embeddings first, then the decoder layers in order, then the rest (final norm, head)."""
        def order(key: str) -> tuple[int, int, str]:
            layer = self.layer_of(key)
            if layer is not None:
                return (1, layer, key)
            return (0 if "embed" in key else 2, 0, key)

        return sorted(self.src.keys(), key=order)

    def plan(self, keep: int) -> list[OutputTensor]:
        """Every output tensor with its dtype and shape: the storage's K experts, K router rows (and their biases),
        everything else as in the source; dropped experts and extra layers left out."""
        spec, storage = self.spec, self.storage
        expert_keys: set[str] = set()
        expert_shapes: dict[str, tuple[int, ...]] = {}  # the storage's output keys of K experts, with their shapes
        for layer in self.moe_layers:
            keys = storage.keys(spec.experts_base(layer), self.n_experts)
            expert_keys.update(keys)
            expert_shapes.update(storage.output_shapes(spec.experts_base(layer), self.n_experts, keep,
                                                       {k: self.src.tensors[k].shape for k in keys}))
        dropped = expert_keys - set(expert_shapes)
        routers = {spec.router_key(layer) for layer in self.moe_layers}
        routers |= {spec.logit_bias_key(layer) for layer in self.moe_layers if spec.logit_bias_key(layer)}
        biases = {spec.bias_key(layer) for layer in self.moe_layers if spec.bias_key(layer)}
        plan = []
        for key in self.ordered_keys():
            if key in dropped or self.is_extra(key):  # extra (MTP) layers: dropped
                continue
            info = self.src.tensors[key]
            shape = expert_shapes.get(key, info.shape)
            if key in biases:  # the expert axis is the last: ERNIE stores its bias as (1, N)
                shape = (*info.shape[:-1], keep)
            elif key in routers:
                shape = (keep, *info.shape[1:])
            plan.append(OutputTensor(key, info.dtype, shape))
        return plan
