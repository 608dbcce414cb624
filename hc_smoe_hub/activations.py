"""Gated expert activations: how an expert combines its gate and up projections into its intermediate activations.

Most families compute act(gate) * up (SwiGLU with `hidden_act`, usually silu): any plain elementwise function is
such an activation. gpt-oss clamps both halves and adds one to up (`GptOssExperts._apply_gate` in transformers):
that needs the two halves together, so it is a `ClampedGlu` object with a `glu(gate, up)` method. Every expert
computation of the package goes through `gated`, so both kinds are computed exactly as the model does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClampedGlu:
    """gpt-oss's gated activation: gate clamped above at `limit`, up clamped to [-limit, limit],
    out = (up + 1) * gate * sigmoid(alpha * gate)."""

    alpha: float = 1.702
    limit: float = 7.0

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:
        raise TypeError("ClampedGlu needs the up projection too: call activations.gated(act, gate, up)")


def gated(act: Activation | ClampedGlu, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The intermediate activations from the gate and up products (both (T, I), same dtype); `gate` may be
    overwritten (the plain path multiplies act(gate) by up in place, as it always has)."""
    if isinstance(act, ClampedGlu):
        return act.glu(gate, up)
    return act(gate).mul_(up)
