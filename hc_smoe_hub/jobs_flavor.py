"""Which Hugging Face Jobs flavor a merge needs, what it costs and roughly how long it takes, from config.json.

The need comes from hc_smoe_hub/sizing.py: one GPU must hold the streaming merge of one layer
(`merge_peak_bytes`), all GPUs together the evaluation of the original model in bf16 (`eval_peak_bytes`; none
with --skip-eval), and the disk the source and the merged checkpoint (`disk_bytes`). The default flavor is the
cheapest GPU flavor that holds all three (ties: the smaller GPU memory).

The time is a rough estimate, not a measurement: a fixed start-up (image, pip install), the download at an
assumed 200 MB/s, and the merge and evaluation FLOPs at 30% of the GPU's published dense 16-bit peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hc_smoe_hub import sizing
from hc_smoe_hub.hub_jobs import Flavor, JobsError

START_UP_S = 300  # pulling the image and `pip install` of torch, transformers and lm-eval
DOWNLOAD_BYTES_PER_S = 200e6
GPU_EFFICIENCY = 0.3
# Published dense 16-bit tensor TFLOP/s of the GPUs Jobs offers (vendor data sheets); others count as the lowest.
PEAK_TFLOPS = {"T4": 65, "A10G": 70, "L4": 120, "L40S": 360, "A100": 312, "H100": 990, "H200": 990,
               "RTX PRO 6000": 500}
# The paper's eight tasks: ~122k loglikelihood requests (MMLU ~56k, HellaSwag ~40k), ~4,000 examples per task on
# average, each request ~128 tokens.
PAPER_REQUESTS = 122_000
EXAMPLES_PER_TASK = 4_000
TOKENS_PER_REQUEST = 128
# The merge runs every expert over every calibration token once for statistics and about twice more for the
# default method's refits.
MERGE_PASSES = 3


@dataclass(frozen=True)
class Need:
    gpu_each: int  # one GPU: the merge of one layer
    gpu_total: int  # all GPUs: the evaluation of the original (0 with --skip-eval)
    disk: int

    def describe(self) -> str:
        parts = [f"{self.gpu_each / 1e9:.1f} GB on one GPU for the merge"]
        if self.gpu_total:
            parts.append(f"{self.gpu_total / 1e9:.1f} GB of GPU memory for the evaluation")
        parts.append(f"{self.disk / 1e9:.1f} GB of disk")
        return ", ".join(parts)


def need_for(config: dict[str, Any], keep: int, *, evaluate: bool, tokens: int) -> Need:
    return Need(
        gpu_each=sizing.merge_peak_bytes(config, tokens=tokens),
        gpu_total=sizing.eval_peak_bytes(config, 2) if evaluate else 0,
        disk=sizing.disk_bytes(config, keep, sizing.source_dtype_bytes(config)),
    )


def holds(flavor: Flavor, need: Need) -> bool:
    return (flavor.gpus > 0 and flavor.gpu_bytes >= need.gpu_each and flavor.gpu_total_bytes >= need.gpu_total
            and flavor.disk_bytes >= need.disk)


def choose_flavor(flavors: list[Flavor], need: Need, requested: str | None) -> Flavor:
    """`requested` when it exists (it is the user's call whether it holds the job), else the cheapest that holds."""
    if requested:
        for flavor in flavors:
            if flavor.name == requested:
                return flavor
        names = ", ".join(f.name for f in flavors)
        raise JobsError(f"unknown --flavor {requested!r}: Hugging Face Jobs offers {names}")
    fitting = [f for f in flavors if holds(f, need)]
    if not fitting:
        largest = max(flavors, key=lambda f: (f.gpu_total_bytes, f.disk_bytes), default=None)
        most = f" (the largest, {largest.name}, has {largest.gpu_total_bytes / 1e9:.0f} GB of GPU memory and " \
               f"{largest.disk_bytes / 1e9:.0f} GB of disk)" if largest else ""
        raise JobsError(f"no Hugging Face Jobs flavor holds this job: it needs {need.describe()}{most}; run it on "
                        "your own machine (--max-memory offloads the evaluation to CPU and disk) or pass --skip-eval")
    return min(fitting, key=lambda f: (f.usd_per_hour, f.gpu_total_bytes))


def estimate_seconds(config: dict[str, Any], keep: int, flavor: Flavor, *, tokens: int,
                     tasks: int, limit: float | None) -> int:
    """Start-up + download + merge + lm-eval of the original and the merged model, on `flavor` (rough)."""
    peak = PEAK_TFLOPS.get(flavor.gpu_model or "", min(PEAK_TFLOPS.values())) * 1e12 * GPU_EFFICIENCY
    download = sizing.checkpoint_bytes(config, sizing.source_dtype_bytes(config)) / DOWNLOAD_BYTES_PER_S
    experts = sizing.num_routed_experts(config) * sizing.expert_params(config) * len(sizing.moe_layers(config))
    merge = 2 * MERGE_PASSES * tokens * experts / peak
    evaluation = 0.0
    if tasks:
        per_task = limit if limit is not None and limit >= 1 else EXAMPLES_PER_TASK * (limit or 1)
        requests = min(PAPER_REQUESTS, tasks * per_task * 4)  # ~4 choices per example
        active = _active_params(config, keep)
        # Sharded over GPUs with device_map="auto", layers run one GPU after the other: no speed-up from more GPUs.
        evaluation = 2 * requests * TOKENS_PER_REQUEST * (active[0] + active[1]) / peak
    return int(START_UP_S + download + merge + evaluation)


def _active_params(config: dict[str, Any], keep: int) -> tuple[float, float]:
    """Parameters one token runs through in the original and in the merged model (top-k experts, not all)."""
    cfg = sizing.text_config(config)
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    total = sizing.checkpoint_bytes(config, 1)
    routed = sizing.num_routed_experts(config) * sizing.expert_params(config) * len(sizing.moe_layers(config))
    per_expert = routed / sizing.num_routed_experts(config)
    dense = total - routed
    return dense + top_k * per_expert, dense + min(top_k, keep) * per_expert


def default_timeout(estimate_s: int) -> int:
    """Twice the estimate, rounded up to the half hour, at least an hour: a job past it is stopped (and billed)."""
    return max(3600, math.ceil(2 * estimate_s / 1800) * 1800)


def parse_timeout(text: str) -> int:
    """'90m', '2h', '1.5h', '3600' or '3600s' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    factor = units.get(t[-1:])
    number = t[:-1] if factor else t
    try:
        seconds = float(number) * (factor or 1)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise JobsError(f"--timeout must be a duration such as 90m, 2h or 3600 (seconds), got '{text}'")
    return int(seconds)


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"
