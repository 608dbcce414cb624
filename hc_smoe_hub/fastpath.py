"""The fast paths of the least-squares refits: how many tokens a fit samples, and the dtype of its activations.

The refits (fix-dom alignment with its per-group fit, the joint re-routed fit) cost several passes of the merged
experts over their tokens. Two rules keep that near one statistics pass (benchmarks/RESULTS.md, engine section):

- A fit of an expert's down projection solves for I coefficients per output feature; past a few times I rows more
  tokens barely move the solution, so each fit samples at most `fit_tokens(I)` of them (never fewer than 4096, so
  that small experts still see a statistically broad sample).
- A bf16 source is evaluated with bf16 matmuls (accumulated in fp32, the activation function and everything after
  it in fp32) where the hardware has fast bf16 kernels (CUDA; CPUs with AVX512-BF16 or AMX): that is what the
  bf16 model computes when it runs, and 4x faster than fp32 on this project's CPU. Normal equations, Cholesky
  factors and residuals stay fp32.
"""

from __future__ import annotations

from functools import cache

import torch

from hc_smoe_hub.routing import Activation

FIT_ROWS_PER_INPUT = 4
MIN_FIT_TOKENS = 4096


def fit_tokens(inter: int) -> int:
    """The most tokens one least-squares fit of an expert with intermediate size `inter` samples."""
    return max(MIN_FIT_TOKENS, FIT_ROWS_PER_INPUT * inter)


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


def hidden_fp32(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """act(x W_gate^T) * (x W_up^T) as fp32 (T, I), with the two products computed in `dtype`."""
    if dtype == torch.float32:
        return act(x.float() @ gate.float().T).mul_(x.float() @ up.float().T)
    xd = x.to(dtype)
    return act((xd @ gate.to(dtype).T).float()).mul_((xd @ up.to(dtype).T).float())


def project_fp32(h: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """h W_down^T as fp32 (T, H), the product computed in `dtype`."""
    if dtype == torch.float32:
        return h.float() @ down.float().T
    return (h.to(dtype) @ down.to(dtype).T).float()
