"""The Space's checks before any compute, and the job it builds from its form.

Everything here runs before a merge starts: the form's values, the source model's config and size (read from the
Hub without downloading the weights), a memory estimate against what the machine has, the ZeroGPU duration, and the
token the job pushes with (the signed-in user's, never the Space owner's). Each refusal is one HcSmoeError line.
`space_app/app.py` is the page around it; this module is imported only there (it needs gradio).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from hc_smoe_hub import hub
from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.calibration import DEFAULT_CALIBRATION, CalibrationSpec
from hc_smoe_hub.checkpoint import parse_size
from hc_smoe_hub.cli import reproduce_command
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.evaluation import EvalSettings
from hc_smoe_hub.host_memory import available_ram
from hc_smoe_hub.merge import REPO_ID, MergeRequest, parse_keep, read_config
from hc_smoe_hub.methods import MethodOptions
from hc_smoe_hub.pipeline import STAGES, JobRequest, default_repo_name

log = logging.getLogger("hc_smoe_space")

# The access token gradio's local login mock puts in the session (gradio/oauth.py, `_get_mocked_oauth_info`).
MOCK_OAUTH_TOKEN = "mock-oauth-token-for-local-dev"
# The OAuth scope a push needs at least: write-repos (creating a new repo also takes manage-repos, which the
# Space's README asks for; an existing target needs only write-repos, so only that one is required here).
PUSH_SCOPES = ("write-repos",)
# A ZeroGPU "large" slice is half an H200; CUDA is invisible outside @spaces.GPU there, so it cannot be measured.
ZERO_GPU_MEMORY = 70 * 10**9


def on_space() -> bool:
    """Gradio's own test (SYSTEM=spaces and SPACE_ID): where it serves real OAuth rather than its local mock."""
    return gr.utils.get_space() is not None


def on_zero_gpu() -> bool:
    return gr.utils.is_zero_gpu_space()


@dataclass
class SourceFacts:
    config: dict[str, Any]
    weight_bytes: int


def inspect_source(source: str, token: str | None) -> SourceFacts | None:
    """config.json and safetensors size of the source, without downloading the weights.

    None when the Hub cannot tell (network, gated, missing repo): `run_job` then reports that with its own
    message, so nothing is refused here on a guess.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None
        return SourceFacts(read_config(path), sum(f.stat().st_size for f in path.glob("*.safetensors")))
    if not REPO_ID.match(source):
        return None
    try:
        config, size = hub.source_summary(source, revision=None, token=token)
    except HcSmoeError as exc:  # reported, with its own message, by the download stage of run_job
        log.info("could not inspect %s before the job (%s); the download stage will tell", source, exc)
        return None
    return SourceFacts(config, size)


def compute_on_gpu() -> bool:
    return on_zero_gpu() or torch.cuda.is_available()


def memory_budget() -> tuple[int, str] | None:
    """Memory the job may fill and where that figure comes from; None when there is nothing to check against."""
    configured = os.environ.get("HC_SMOE_MEMORY_LIMIT", "").strip()
    if configured:
        try:
            return parse_size(configured), "the limit configured for this app (HC_SMOE_MEMORY_LIMIT)"
        except ValueError:
            log.warning("ignoring HC_SMOE_MEMORY_LIMIT=%r: not a size like 70GB", configured)
    if on_zero_gpu():
        return ZERO_GPU_MEMORY, "a ZeroGPU slice"
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return free, "the free GPU memory"
    available = available_ram()
    return (available, "the available memory of this machine (no GPU)") if available else None


def memory_needed(facts: SourceFacts, evaluate: bool, num_samples: int, seq_len: int, on_gpu: bool) -> int:
    """A coarse estimate of the job's peak memory on its device.

    The merge streams one decoder layer at a time (about two layers' weights plus the calibration hidden states in
    fp32), but lm-eval loads the whole model, the original and then the merged one. A CPU computes in fp32, which
    doubles 16-bit weights.
    """
    dtype = str(facts.config.get("dtype") or facts.config.get("torch_dtype") or "")
    widen = 2 if not on_gpu and dtype in ("bfloat16", "float16") else 1
    if evaluate:
        return int(facts.weight_bytes * widen * 1.15)
    layers = int(facts.config.get("num_hidden_layers") or 1)
    hidden = int(facts.config.get("hidden_size") or 0)
    return int(2 * widen * facts.weight_bytes / layers + 2 * num_samples * seq_len * hidden * 4)


def gpu_seconds(weight_bytes: int, num_tasks: int, limit: int | None) -> int:
    """A ZeroGPU duration for the job: download, merge and lm-eval on both models, from the weights' size.

    Coarse on purpose: reading every weight a few times at a few GB/s, and for lm-eval about 4,000 examples per
    paper task (their average) at a per-example cost that grows with the model.
    """
    gb = weight_bytes / 1e9
    seconds = 60 + 8 * gb
    if num_tasks:
        examples = limit if limit is not None else 4000
        seconds += 2 * num_tasks * examples * (0.02 + 0.0005 * gb)
    return int(seconds)


@dataclass
class JobPlan:
    job: JobRequest
    workdir: Path
    stages: tuple[str, ...]
    gpu_seconds: int


def resolve_user_token(oauth_token: gr.OAuthToken | None) -> str:
    """The token the job pushes with: the signed-in user's, never the Space owner's HF_TOKEN."""
    if oauth_token is None or not oauth_token.token:
        raise HcSmoeError("sign in with Hugging Face first (button at the top): the merged model is pushed to your "
                          "account")
    if oauth_token.token == MOCK_OAUTH_TOKEN and not on_space():
        # Gradio's local login mock stands for the account this machine is logged in with: push with its token.
        token = hub.resolve_token(None)
        if not token:
            raise HcSmoeError(hub.NO_TOKEN_MESSAGE)
        return token
    if on_space() and oauth_token.token != MOCK_OAUTH_TOKEN:
        # whoami says nothing of what an OAuth token may do, so the Hub would refuse only at the very end.
        missing = [scope for scope in PUSH_SCOPES if scope not in (oauth_token.scope or "").split()]
        if missing:
            raise HcSmoeError(f"signing in to this Space does not grant write access to your repos (its OAuth "
                              f"scopes lack {' and '.join(missing)}): the Space's owner must add them to "
                              "hf_oauth_scopes in its README")
    return oauth_token.token


def _looks_local(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()


def _positive_int(value: float | int | None, label: str) -> int:
    if value is None or float(value) < 1 or not float(value).is_integer():
        raise HcSmoeError(f"{label} must be a whole number of at least 1, got {value}")
    return int(value)


def prepare_job(source: str, keep: str, calibration: str, repo_id: str, method: str, linkage: str, merge: str,
                router: str, num_samples: float, seq_len: float, tasks: list[str] | None, limit: float | None,
                include_path: str, private: bool, overwrite: bool, token: str) -> JobPlan:
    """Check the form and the source model (raising HcSmoeError with one line) and build the job."""
    source, keep, calibration = (source or "").strip(), str(keep or "").strip(), (calibration or "").strip()
    repo_id, include_path = (repo_id or "").strip(), (include_path or "").strip()
    if not source:
        raise HcSmoeError("enter a source model: a Hub repo id such as mistralai/Mixtral-8x7B-v0.1")
    if not keep:
        raise HcSmoeError("enter the experts to keep per layer: a count such as 6, or a fraction such as 0.75")
    calibration = calibration or DEFAULT_CALIBRATION
    if on_space():
        # The Space's own files are not the user's to merge or calibrate on.
        if _looks_local(source) or not REPO_ID.match(source):
            raise HcSmoeError(f"'{source}' is not a Hub model id (org/name): this Space only reads models from the "
                              "Hub")
        if _looks_local(calibration):
            raise HcSmoeError("local calibration files are read only when the app runs on your machine: use c4 "
                              "or a Hub dataset id")
        include_path = ""
    samples = _positive_int(num_samples, "Calibration samples")
    block = _positive_int(seq_len, "Block length")
    task_list = [t.strip() for t in tasks or [] if t and t.strip()]
    eval_limit = None
    if limit is not None and float(limit) > 0:
        eval_limit = _positive_int(limit, "Examples per task")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise HcSmoeError(f"task folder {include_path} does not exist")

    facts = inspect_source(source, token)
    if facts is not None:
        spec = spec_for(facts.config)  # a dense or unsupported model is refused here, before any download
        experts = spec.num_experts(facts.config)
        try:
            parse_keep(keep, experts)
        except HcSmoeError:
            raise HcSmoeError(f"Experts to keep must be a whole count from 1 to {experts} or a fraction in (0, 1): "
                              f"{source} has {experts} experts per MoE layer, got '{keep}'") from None
        spec.check_keep(facts.config, parse_keep(keep, experts))  # grouped routing: only some counts route
        budget = memory_budget()
        need = memory_needed(facts, bool(task_list), samples, block, compute_on_gpu())
        if budget is not None and need > budget[0]:
            what = "evaluating it (lm-eval loads the whole model)" if task_list else "merging it"
            hint = ": clear the evaluation tasks, choose a smaller model" if task_list else ": choose a smaller model"
            raise HcSmoeError(
                f"{source} is too large for this machine: {what} needs about {need / 1e9:.1f} GB but "
                f"{budget[1]} is {budget[0] / 1e9:.1f} GB{hint}, or run hc-smoe-push on a bigger machine"
            )

    root = os.environ.get("HC_SMOE_WORKDIR") or None
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="hc-smoe-space-", dir=root))
    name = default_repo_name(source, method, keep)
    evaluation = None
    if task_list:
        evaluation = EvalSettings(tasks=task_list, limit=eval_limit,
                                  include_path=str(Path(include_path).expanduser()) if include_path else None)
    argv = [source, "--keep", keep, "--calibration", calibration, "--num-samples", str(samples),
            "--seq-len", str(block), "--method", method, "--linkage", linkage, "--merge", merge, "--router", router]
    argv += ["--repo-id", repo_id] if repo_id else []
    argv += ["--private"] if private else []
    argv += ["--overwrite"] if overwrite else []
    argv += (["--tasks", ",".join(task_list)] + (["--limit", str(eval_limit)] if eval_limit else [])
             + (["--include-path", include_path] if include_path else [])) if task_list else ["--skip-eval"]
    job = JobRequest(
        merge=MergeRequest(
            source=source,
            keep=keep,
            output_dir=workdir / name,
            calibration=CalibrationSpec(calibration, samples, block),
            options=MethodOptions(method=method, linkage=linkage, merge=merge, router=router),
            overwrite=overwrite,
            token=token,
        ),
        push=True,
        repo_id=repo_id or None,
        private=private,
        evaluation=evaluation,
        command=reproduce_command(argv),
    )
    stages = tuple(s for s in STAGES if task_list or not s.startswith("evaluate"))
    seconds = gpu_seconds(facts.weight_bytes if facts else 0, len(task_list), eval_limit)
    return JobPlan(job, workdir, stages, seconds)
