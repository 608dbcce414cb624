"""The Space's "Run on" choice: this Space, or Hugging Face Jobs in the signed-in user's account.

A job sent to Jobs is the CLI's `hc-smoe-push ... --on-jobs` (hc_smoe_hub/jobs_submit.py: the same local checks,
the flavor sized from the model, the user's token as the job's secret), submitted with the signed-in user's token.
A model larger than this Space's memory goes to Jobs even when "this Space" is chosen, and the page says so. The
job's log streams into the page and the pushed repo's link appears at the end. The job's `namespace/id` is kept in
the browser (`gr.BrowserState`), so reloading the page reattaches to a job still running.

    run_on, job_ref = add_controls()     # inside the form, in app.py's build_demo
    run.click(routed(merge_and_push), [*form, run_on], [status, log, table, run, job_ref], ...)
    demo.load(reattach, [job_ref], [status, log, job_ref])
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from hc_smoe_hub import hub_jobs
from hc_smoe_hub.cli import build_parser
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.jobs_cli import describe
from hc_smoe_hub.jobs_submit import plan_on_jobs, repo_url, submit
from hc_smoe_hub.space_jobs import compute_on_gpu, inspect_source, memory_budget, memory_needed, resolve_user_token

log = logging.getLogger("hc_smoe_space")

THIS_SPACE = "this Space"
ON_JOBS = "Hugging Face Jobs (your account)"
LOG_LINES = 400


def add_controls() -> tuple[gr.Radio, gr.BrowserState]:
    run_on = gr.Radio([THIS_SPACE, ON_JOBS], value=THIS_SPACE, label="Run on", elem_id="run-on",
                      info="Jobs runs on a Hugging Face GPU machine billed to your account; a model too large for "
                      "this Space goes there")
    return run_on, gr.BrowserState("", storage_key="hc-smoe-job")


def too_large_here(source: str, token: str, evaluate: bool, num_samples: int, seq_len: int) -> str | None:
    """Why this Space cannot run the job (its memory), or None when it can or cannot tell."""
    facts, budget = inspect_source(source.strip(), token), memory_budget()
    if facts is None or budget is None:
        return None
    need = memory_needed(facts, evaluate, num_samples, seq_len, compute_on_gpu())
    if need <= budget[0]:
        return None
    what = "evaluating it (lm-eval loads the whole model)" if evaluate else "merging it"
    hint = "; clearing the evaluation tasks may let it run here" if evaluate else ""
    return f"{what} needs about {need / 1e9:.1f} GB but {budget[1]} is {budget[0] / 1e9:.1f} GB{hint}"


def job_argv(source: str, keep: str, calibration: str, repo_id: str, method: str, linkage: str, merge: str,
             router: str, num_samples: float, seq_len: float, tasks: list[str] | None, limit: float | None,
             private: bool, overwrite: bool) -> list[str]:
    """The form as `hc-smoe-push` arguments (the job gets them; the token never is one)."""
    argv = [source.strip(), "--keep", str(keep).strip(), "--calibration", calibration.strip() or "c4",
            "--num-samples", str(int(num_samples)), "--seq-len", str(int(seq_len)), "--method", method,
            "--linkage", linkage, "--merge", merge, "--router", router, "--on-jobs", "--yes"]
    argv += ["--repo-id", repo_id.strip()] if repo_id and repo_id.strip() else []
    argv += (["--private"] if private else []) + (["--overwrite"] if overwrite else [])
    chosen = [t.strip() for t in tasks or [] if t and t.strip()]
    argv += ["--tasks", ",".join(chosen)] if chosen else ["--skip-eval"]
    argv += ["--limit", str(int(limit))] if chosen and limit else []
    return argv


def routed(local: Callable[..., Iterator[tuple]], extra_outputs: int = 0) -> Callable[..., Iterator[tuple]]:
    """The "Merge and push" handler with the Run-on choice in front of `local` (app.py's merge_and_push).

    `local` yields (status, log, table, button) and `extra_outputs` more values; the Jobs path leaves those as
    they are. The job reference comes last.
    """
    pad = (gr.skip(),) * extra_outputs

    # run_on comes last, so that API clients that call the endpoint with the form alone keep working.
    def run(source: str, keep: str, calibration: str, repo_id: str, method: str, linkage: str, merge: str,
            router: str, num_samples: float, seq_len: float, tasks: list[str] | None, limit: float | None,
            include_path: str, private: bool, overwrite: bool, run_on: str = THIS_SPACE,
            oauth_token: gr.OAuthToken | None = None,
            progress: gr.Progress = gr.Progress(track_tqdm=True)) -> Iterator[tuple]:  # noqa: B008
        form = (source, keep, calibration, repo_id, method, linkage, merge, router, num_samples, seq_len, tasks,
                limit, include_path, private, overwrite)
        idle, busy = gr.Button(interactive=True), gr.Button(interactive=False)
        note = ""
        try:
            token = resolve_user_token(oauth_token)
            if run_on != ON_JOBS:
                reason = too_large_here(source or "", token, bool(tasks), int(num_samples or 1), int(seq_len or 1))
                if reason is None:
                    for update in local(*form, oauth_token, progress):
                        yield (*update, gr.skip())
                    return
                note = f"Too large for this Space ({reason}): sent to Hugging Face Jobs.\n\n"
            args_list = job_argv(source or "", keep or "", calibration or "", repo_id or "", method, linkage, merge,
                                 router, num_samples, seq_len, tasks, limit, private, overwrite)
            parser = build_parser()
            args = parser.parse_args(args_list)
            args.token = token
            plan = plan_on_jobs(args, args_list, parser)
            job = submit(plan)
        except HcSmoeError as exc:
            yield f"### Cannot start\n\n{_md(note + str(exc))}", "", gr.skip(), idle, *pad, gr.skip()
            return
        ref = f"{plan.namespace}/{job.id}"
        head = f"{note}{describe(plan)}".replace("\n", "\n\n")
        yield f"### Running on Hugging Face Jobs: job {job.id}\n\n{_md(head)}", "", gr.skip(), busy, *pad, ref
        yield from (update + pad + (gr.skip(),) for update in follow(ref, token, busy, idle))

    return run


def reattach(ref: str, oauth_token: gr.OAuthToken | None) -> Iterator[tuple]:
    """On page load: follow the job this browser started, if there is one."""
    if not ref or "/" not in ref:
        yield gr.skip(), gr.skip(), gr.skip()
        return
    try:
        token = resolve_user_token(oauth_token)
    except HcSmoeError:
        yield gr.skip(), gr.skip(), gr.skip()
        return
    for status, text, _table, _button in follow(ref, token, None, None):
        yield status, text, ref


def follow(ref: str, token: str, busy: Any, idle: Any) -> Iterator[tuple]:
    """(status, log, table, button) while job `namespace/id` runs, ending with its outcome."""
    namespace, job_id = ref.split("/", 1)
    lines: deque[str] = deque(maxlen=LOG_LINES)
    try:
        state = hub_jobs.inspect(job_id, namespace, token)
        running = f"### Running on Hugging Face Jobs: job [{job_id}]({state.url})"
        for line in hub_jobs.follow_logs(job_id, namespace, token):
            lines.append(line)
            yield running, "\n".join(lines), gr.skip(), busy or gr.skip()
        state = hub_jobs.inspect(job_id, namespace, token)
    except HcSmoeError as exc:
        yield f"### Lost the job {job_id}\n\n{_md(str(exc))}", "\n".join(lines), gr.skip(), idle or gr.skip()
        return
    repo = state.labels.get("repo", "").replace("--", "/", 1)
    if state.stage == "COMPLETED" and repo:
        status = f"### Pushed to [{repo}]({repo_url(repo)})\n\nby Hugging Face Jobs job [{job_id}]({state.url})"
    else:
        why = f": {state.message}" if state.message else ""
        status = f"### Job {job_id} ended {state.stage}{_md(why)}\n\nIts log: [{state.url}]({state.url})"
    yield status, "\n".join(lines), gr.skip(), idle or gr.skip()


def _md(text: str) -> str:
    for ch in "\\`*_{}[]<>#|":
        text = text.replace(ch, "\\" + ch)
    return text
