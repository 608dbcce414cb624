"""The fast paths of the least-squares refits: how many tokens a fit samples, and the dtype of its activations.

The refits (fix-dom alignment with its per-group fit, the joint re-routed fit) cost several passes of the merged
experts over their tokens. Two rules keep that near one statistics pass (benchmarks/RESULTS.md, engine section):

- A fit of an expert's down projection solves for I coefficients per output feature; past a few times I rows more
  tokens barely move the solution, so each fit samples a bounded number of them. The per-group fit (a weak ridge
  pull, 1e-3) samples at most `group_fit_tokens(I)` = max(8192, 8 I); the joint re-routed fit, pulled strongly
  towards its start (ridge 1.0), at most `joint_fit_tokens(I)` = max(4096, 4 I) per merged expert. On the demo
  models a per-group cap of 4096 cost 0.016 nats at 4 of 8 experts (benchmarks/RESULTS.md); 8192 never binds
  there. At Mixtral-8x7B's I = 14336 neither binds at the default calibration (65,536 tokens).
- A bf16 source is evaluated with bf16 matmuls (inputs rounded to bf16; the activation function and everything
  after it in fp32) where the hardware has fast bf16 kernels (CUDA; CPUs with AVX512-BF16 or AMX): that is what
  the bf16 model computes when it runs, and about 3x faster than fp32 on this project's CPU. It serves the
  statistics pass (every expert over every calibration token: the clustering features, the routed output the
  refits fit to), O-prune's expert outputs, the fix-dom alignment, the refits' design rows and their products with
  residuals, the merged block's output that sequential calibration carries to the next layer, and the recorded
  per-layer error (merged and original block both computed this way). Sums, normal equations, Cholesky factors
  and residuals stay fp32. On the demo models the quality table moved by at most 0.003 nats with the refits' fast
  path; with the statistics pass and O-prune's outputs added, the default moved by at most 0.003 nats more, the
  paper's configuration and the pruning baselines by at most 0.0004 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from hc_smoe_hub.activations import gated

Activation = Callable[[torch.Tensor], torch.Tensor]

MIN_GROUP_FIT_TOKENS = 8192
MIN_JOINT_FIT_TOKENS = 4096


def group_fit_tokens(inter: int) -> int:
    """The most tokens the per-group fit (and fix-dom alignment) of a group samples, at intermediate size `inter`."""
    return max(MIN_GROUP_FIT_TOKENS, 8 * inter)


def joint_fit_tokens(inter: int) -> int:
    """The most tokens the joint re-routed fit samples per merged expert, at intermediate size `inter`."""
    return max(MIN_JOINT_FIT_TOKENS, 4 * inter)


@cache
def _cpu_has_fast_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def activation_dtype(weight_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """bf16 for bf16 weights on hardware with fast bf16 matmuls, else fp32."""
    if weight_dtype != torch.bfloat16:
        return torch.float32
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.device(device).type == "cpu" and _cpu_has_fast_bf16() else torch.float32


def product_dtype(weight_dtype: torch.dtype, x: torch.Tensor) -> torch.dtype:
    """The dtype an expert's products run in on inputs x: the fast path (`activation_dtype`) for fp32 x, else x's
    own dtype (a caller that chose fp64, say)."""
    return activation_dtype(weight_dtype, x.device) if x.dtype == torch.float32 else x.dtype


def hidden_fp32(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation,
                dtype: torch.dtype = torch.float32, gate_bias: torch.Tensor | None = None,
                up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """act(x W_gate^T + b_gate) * (x W_up^T + b_up) as fp32 (T, I) (`activations.gated`), with the two products
    computed in `dtype` and the biases, when the experts have them, added in fp32."""
    if dtype == torch.float32:
        g, u = x.float() @ gate.float().T, x.float() @ up.float().T
    else:
        xd = x.to(dtype)
        g, u = (xd @ gate.to(dtype).T).float(), xd @ up.to(dtype).T
    if gate_bias is not None and up_bias is not None:
        g, u = g.add_(gate_bias.float()), u.float().add_(up_bias.float())
    u = u.float()  # converted first: an fp32 tensor multiplied in place by a bf16 one is several times slower
    if act is torch.nn.functional.silu:
        return torch.nn.functional.silu(g, inplace=True).mul_(u)
    return gated(act, g, u)


def project_fp32(h: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float32,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """h W_down^T (+ b_down) as fp32 (T, H), the product computed in `dtype`."""
    out = matmul_fp32(h, down.T, dtype)
    return out if bias is None else out.add_(bias.float())


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b as fp32, the product computed in `dtype` (its inputs rounded to it)."""
    if dtype == torch.float32:
        return a.float() @ b.float()
    return (a.to(dtype) @ b.to(dtype)).float()
