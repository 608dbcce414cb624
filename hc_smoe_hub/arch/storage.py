"""How a layer's routed experts are stored on disk: one named strategy per layout, which family rows refer to.

- `PerExpert`: one 2-D tensor per expert and projection, key templates with `{e}` (Mixtral's `w1/w3/w2`, the
  `gate_proj/up_proj/down_proj` of Qwen-MoE, OLMoE, DeepSeek, GLM).
- `Fused`: one 3-D tensor for gate+up and one for down per layer, experts along dim 0: `gate_up` (E, 2I, H) with
  the gate rows first, then the up rows, and `down` (E, H, I) (Granite's `input_linear` / `output_linear`,
  Qwen3.5-MoE's `experts.gate_up_proj` / `experts.down_proj`); `transposed` for the (E, H, 2I) / (E, I, H)
  layout of Llama 4 and gpt-oss; `interleaved` for gate/up alternating along the 2I axis (gpt-oss); with
  `gate_up_bias` / `down_bias` keys, per-expert biases (E, 2I) / (E, H) laid out like the gate/up axis (gpt-oss).

Every strategy names the on-disk keys that hold a layer's experts, reads ONE expert at a time (a fused tensor is
sliced along dim 0 with `SourceCheckpoint.read(keys, device, index=e)`, never read whole), plans the output
tensors of K experts, and writes K merged experts back in the source's own layout (a fused source stays fused),
one expert at a time (`ShardedWriter.write_rows`).
All keys are relative to `base`, the layer's MoE block prefix on disk (`model.layers.3.mlp.`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from hc_smoe_hub.errors import SourceError

if TYPE_CHECKING:
    from hc_smoe_hub.checkpoint import ShardedWriter, SourceCheckpoint
    from hc_smoe_hub.routing import Experts

Shape = tuple[int, ...]
# gate (I, H), up (I, H), down (H, I); then, for experts with biases, gate bias (I,), up bias (I,), down bias (H,)
ExpertWeights = tuple[torch.Tensor, ...]


class ExpertStorage(Protocol):
    """The interface `streaming.py` uses; it never looks at a layout itself."""

    def keys(self, base: str, n: int) -> list[str]:
        """Every on-disk key that holds the layer's n routed experts."""
        ...

    def check(self, src: SourceCheckpoint, base: str, n: int) -> None:
        """One-line SourceError when a key is missing or does not hold n experts."""
        ...

    def read_expert(self, src: SourceCheckpoint, base: str, e: int, device: str | torch.device) -> ExpertWeights:
        """Expert e's (gate, up, down) in the source dtype, possibly as views of one read."""
        ...

    def output_shapes(self, base: str, n: int, keep: int, shapes: dict[str, Shape]) -> dict[str, Shape]:
        """The output keys of K experts with their shapes (`shapes`: the source's); absent keys are dropped."""
        ...

    def write(self, writer: ShardedWriter, base: str, experts: Experts) -> None:
        """Write the K merged experts (gate/up (K, I, H), down (K, H, I)) into the planned output keys."""
        ...

    def disk_shapes(self, base: str, n: int, inter: int, hidden: int) -> dict[str, Shape]:
        """The on-disk keys and shapes of n experts of width `inter` (synthetic checkpoints in the Hub layout)."""
        ...


def _missing(key: str) -> SourceError:
    return SourceError(f"tensor {key} is missing from the checkpoint: it is incomplete or not in the standard "
                       "transformers layout; download it again")


@dataclass(frozen=True)
class PerExpert:
    """One (I, H) gate, one (I, H) up and one (H, I) down tensor per expert; `{e}` is the expert index."""

    gate: str = "experts.{e}.gate_proj.weight"
    up: str = "experts.{e}.up_proj.weight"
    down: str = "experts.{e}.down_proj.weight"

    def expert_keys(self, base: str, e: int) -> tuple[str, str, str]:
        return tuple(base + t.format(e=e) for t in (self.gate, self.up, self.down))  # type: ignore[return-value]

    def keys(self, base: str, n: int) -> list[str]:
        return [k for e in range(n) for k in self.expert_keys(base, e)]

    def check(self, src: SourceCheckpoint, base: str, n: int) -> None:
        for key in self.keys(base, n):
            if key not in src:
                raise _missing(key)

    def read_expert(self, src: SourceCheckpoint, base: str, e: int, device: str | torch.device) -> ExpertWeights:
        keys = self.expert_keys(base, e)
        got = src.read(keys, device)
        return got[keys[0]], got[keys[1]], got[keys[2]]

    def output_shapes(self, base: str, n: int, keep: int, shapes: dict[str, Shape]) -> dict[str, Shape]:
        return {k: shapes[k] for e in range(keep) for k in self.expert_keys(base, e)}

    def disk_shapes(self, base: str, n: int, inter: int, hidden: int) -> dict[str, Shape]:
        out: dict[str, Shape] = {}
        for e in range(n):
            gate, up, down = self.expert_keys(base, e)
            out |= {gate: (inter, hidden), up: (inter, hidden), down: (hidden, inter)}
        return out

    def write(self, writer: ShardedWriter, base: str, experts: Experts) -> None:
        for e in range(experts.count):
            mats = (experts.gate[e], experts.up[e], experts.down[e])
            for key, mat in zip(self.expert_keys(base, e), mats, strict=True):
                writer.write(key, mat)


@dataclass(frozen=True)
class Fused:
    """A (E, 2I, H) gate+up tensor and a (E, H, I) down tensor per layer (keys relative to the MoE block).

    `transposed`: stored as (E, H, 2I) and (E, I, H) (Llama 4, gpt-oss: `x @ W`, not `x @ W^T`).
    `interleaved`: gate and up alternate along the 2I axis (gate 0, up 0, gate 1, ...: gpt-oss) instead of the
    gate half followed by the up half. `gate_up_bias` and `down_bias`, when set, name the per-expert bias tensors
    (E, 2I) and (E, H) (gpt-oss's `gate_up_proj_bias`, `down_proj_bias`); the gate/up bias is split like the
    gate/up axis.
    """

    gate_up: str = "experts.gate_up_proj"
    down: str = "experts.down_proj"
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None

    def _bias_keys(self, base: str) -> list[str]:
        return [base + self.gate_up_bias, base + self.down_bias] if self.gate_up_bias and self.down_bias else []

    def keys(self, base: str, n: int) -> list[str]:
        return [base + self.gate_up, base + self.down, *self._bias_keys(base)]

    def check(self, src: SourceCheckpoint, base: str, n: int) -> None:
        for key in self.keys(base, n):
            if key not in src:
                raise _missing(key)
            shape = src.tensors[key].shape
            ndim = 2 if key in self._bias_keys(base) else 3
            if len(shape) != ndim or shape[0] != n:
                raise SourceError(f"tensor {key} has shape {list(shape)}, not ({n}, {', '.join('.' * (ndim - 1))}) "
                                  f"for {n} fused experts: the checkpoint does not match its config.json")

    def _split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) halves of a gate/up tensor along its first dim (the 2I axis)."""
        if self.interleaved:
            return gate_up[0::2], gate_up[1::2]
        i = gate_up.shape[0] // 2
        return gate_up[:i], gate_up[i:]

    def _join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.stack((gate, up), 1).flatten(0, 1) if self.interleaved else torch.cat((gate, up))

    def read_expert(self, src: SourceCheckpoint, base: str, e: int, device: str | torch.device) -> ExpertWeights:
        keys = self.keys(base, 0)
        got = src.read(keys, device, index=e)
        gate_up, down = got[keys[0]], got[keys[1]]
        if self.transposed:  # views: the caller copies them into its (N, ...) buffers
            gate_up, down = gate_up.T, down.T
        if len(keys) == 2:
            return (*self._split(gate_up), down)
        return (*self._split(gate_up), down, *self._split(got[keys[2]]), got[keys[3]])

    def output_shapes(self, base: str, n: int, keep: int, shapes: dict[str, Shape]) -> dict[str, Shape]:
        return {k: (keep, *shapes[k][1:]) for k in self.keys(base, n)}

    def disk_shapes(self, base: str, n: int, inter: int, hidden: int) -> dict[str, Shape]:
        gate_up, down, *biases = self.keys(base, n)
        out = ({gate_up: (n, hidden, 2 * inter), down: (n, inter, hidden)} if self.transposed
               else {gate_up: (n, 2 * inter, hidden), down: (n, hidden, inter)})
        if biases:
            out |= {biases[0]: (n, 2 * inter), biases[1]: (n, hidden)}
        return out

    def write(self, writer: ShardedWriter, base: str, experts: Experts) -> None:
        keys = self.keys(base, 0)
        if (len(keys) == 4) != experts.has_bias:
            raise ValueError(f"{base}: the storage has {'no ' if len(keys) == 2 else ''}bias tensors, the experts "
                             f"{'do' if experts.has_bias else 'do not'}")
        for e in range(experts.count):  # one expert's rows at a time: no second copy of the merged layer
            gate_up = self._join(experts.gate[e], experts.up[e])
            down = experts.down[e]
            if self.transposed:
                gate_up, down = gate_up.T, down.T
            writer.write_rows(keys[0], e, gate_up)
            writer.write_rows(keys[1], e, down)
            if experts.gate_bias is not None and experts.up_bias is not None and experts.down_bias is not None:
                writer.write_rows(keys[2], e, self._join(experts.gate_bias[e], experts.up_bias[e]))
                writer.write_rows(keys[3], e, experts.down_bias[e])
