"""Every decoder layer's own inputs, caught in one embedding pass of the model's forward.

Families whose layers differ (sliding-window and full-attention layers of `layer_types`, Qwen3-Next's linear- and
full-attention layers) get different masks from the model's `causal_mask_mapping`, so layer 0's keyword arguments
cannot stand in for the others'. The model's own forward computes them; each decoder layer's `forward` is replaced
for the pass by a recorder that returns its input unchanged (masks and rotary embeddings do not depend on the
hidden states), and the last one stops the forward before the final norm, whose weights are not loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hc_smoe_hub.errors import SourceError


class _LastLayer(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers runs."""


def catch_layer_inputs(base: nn.Module, layers: Sequence[nn.Module], input_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run `base` (the decoder stack's parent model) on one batch; returns the hidden states entering the first
    layer and one kwargs dict per layer. The dicts hold the very tensors the model built, so a mask or rotary pair
    that many layers share is stored once, not copied."""
    seen: list[dict[str, Any]] = []
    first: list[torch.Tensor] = []

    def recorder(index: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            h = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first.append(h)
            seen.append(kwargs)
            if index == len(layers) - 1:
                raise _LastLayer
            return h

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: nn.Module.__call__ calls it, hooks stay as they are
    try:
        with torch.no_grad(), contextlib.suppress(_LastLayer):
            base(input_ids=input_ids, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    if len(seen) != len(layers) or not first:
        raise SourceError(f"the model ran {len(seen)} of its {len(layers)} decoder layers in its forward: the engine "
                          "cannot catch each layer's arguments for this model class")
    return first[0], seen
