"""Gradio app (a Hugging Face Space): shrink a Mixture-of-Experts model with HC-SMoE and push it to your account.

The user signs in with Hugging Face, names a source model and how many experts to keep per layer, and presses
"Merge and push". The job (`hc_smoe_hub.pipeline.run_job`) streams its log and a progress bar per stage into the
page and ends with a link to the pushed repository and the lm-eval table (original vs merged).

    python space_app/app.py          # locally: needs `pip install -e ".[space]"` and `hf auth login` / HF_TOKEN

On a Space the job pushes with the signed-in user's OAuth token, never with the Space owner's HF_TOKEN. Outside a
Space gradio mocks "Sign in with Hugging Face" with the account this machine is logged in with (it calls `whoami`
at start-up), so locally the job pushes with that account's token and local paths are accepted for the source
model, the calibration text and an lm-eval task folder. Tests mount `build_demo()`.

Settings for the operator (environment variables):
    HC_SMOE_MEMORY_LIMIT  memory a job may use, e.g. "70GB" (default: the free GPU memory, 70 GB on ZeroGPU, or
                          the available RAM without a GPU); a larger model is refused before anything is downloaded
    HC_SMOE_WORKDIR       where merged checkpoints are written before the push (default: the system temp dir)
    HC_SMOE_SPACE_KEEP_GB disk the merged checkpoints of failed pushes may keep for "Retry the push", all together
                          (default 20; 0 keeps none); the oldest kept ones are evicted first, a larger one is
                          deleted at once and the page says so (hc_smoe_hub/space_keep.py)
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    # ZeroGPU's package, preinstalled on Spaces: imported before torch so it can patch it (its decorator is a no-op
    # off ZeroGPU). Elsewhere it is usually absent and the job runs in process.
    import spaces
except ImportError:
    spaces = None

try:
    import hc_smoe_hub  # noqa: F401
except ModuleNotFoundError:
    # `python space_app/app.py` from a checkout that was not pip-installed: use the package next to this folder.
    # On a Space the package folder is uploaded beside app.py (see README.md), where Python finds it anyway.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr

from hc_smoe_hub import hub, jobs_panel, retry_panel, space_keep
from hc_smoe_hub.architectures import SPECS
from hc_smoe_hub.calibration import DEFAULT_CALIBRATION
from hc_smoe_hub.clustering import LINKAGES
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.evaluation import PAPER_TASKS, headline
from hc_smoe_hub.merging import MERGE_MODES, ROUTER_MODES
from hc_smoe_hub.methods import METHODS, MethodOptions
from hc_smoe_hub.pipeline import UnfinishedJob, default_repo_name, run_job
from hc_smoe_hub.space_jobs import (
    JobPlan,
    on_space,
    prepare_job,
    resolve_user_token,
)

log = logging.getLogger("hc_smoe_space")

PACKAGE_LOGGER = "hc_smoe_hub"
LOG_LINES = 400
RESULT_HEADERS = ["task", "metric", "original", "merged", "change"]

# ("log", line) | ("stage", name) | ("done", summary dict) | ("error", message) | ("unfinished", dict): a stage
# after the merge failed (stage, folder of the complete checkpoint, repo_id, reason)
Event = tuple[str, Any]
ENDINGS = ("done", "error", "unfinished")


def repo_link(repo_id: str) -> str:
    """The repository's page on the Hub this process talks to (`HF_ENDPOINT` when set)."""
    return f"{hub.hub_endpoint()}/{repo_id}"


# ---------------------------------------------------------------------------- the job


def _gpu(duration: Callable[..., int]) -> Callable[[Callable], Callable]:
    """`spaces.GPU(duration=...)` where the `spaces` package is installed; it is itself a no-op off ZeroGPU."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


class _QueueLogHandler(logging.Handler):
    def __init__(self, events: queue.Queue[Event]) -> None:
        super().__init__(logging.INFO)
        self.events = events
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.put(("log", self.format(record)))
        except Exception:
            self.handleError(record)


def _summary(result: Any) -> dict[str, Any]:
    """What the page shows of a JobResult, as plain data (on ZeroGPU it crosses a process boundary)."""
    merged = result.merge
    return {
        "repo_id": result.repo_id,
        "family": merged.family if merged else None,
        "experts_before": merged.experts_before if merged else None,
        "experts_after": merged.experts_after if merged else None,
        "results_before": result.results_before,
        "results_after": result.results_after,
    }


@_gpu(duration=lambda plan: plan.gpu_seconds)
def run_plan(plan: JobPlan) -> Iterator[list[Event]]:
    """Run the job in a worker thread and yield its events in batches, the last one ending with done or error.

    A generator on purpose: on ZeroGPU this runs in a forked process and only what it yields reaches the page, so
    log lines and stage names travel as events rather than through the page's own log handler.
    """
    events: queue.Queue[Event] = queue.Queue()
    handler = _QueueLogHandler(events)
    package_log = logging.getLogger(PACKAGE_LOGGER)
    previous_level = package_log.level
    if package_log.getEffectiveLevel() > logging.INFO:
        package_log.setLevel(logging.INFO)
    package_log.addHandler(handler)

    def work() -> None:
        try:
            result = run_job(plan.job, on_stage=lambda name: events.put(("stage", name)))
            events.put(("done", _summary(result)))
        except UnfinishedJob as exc:
            events.put(("unfinished", {"stage": exc.stage, "folder": str(exc.output_dir), "repo_id": exc.repo_id,
                                       "reason": retry_panel.reason(exc.cause)}))
        except HcSmoeError as exc:
            events.put(("error", str(exc)))
        except Exception as exc:  # a bug: the page gets one line, the server log the traceback
            log.exception("job failed")
            events.put(("error", f"internal error ({type(exc).__name__}: {exc}); the app's log has the details"))

    # The copied context carries gradio's progress tracker, so tqdm bars in the job show in the page.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="hc-smoe-job", daemon=True)
    worker.start()
    try:
        while True:
            batch = [events.get()]
            while True:
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if any(kind in ENDINGS for kind, _ in batch):
                break
    finally:
        # Hold the single job slot until the job has really finished, even if the page went away.
        worker.join()
        package_log.removeHandler(handler)
        package_log.setLevel(previous_level)


def _drop_disabled_bars(progress: gr.Progress) -> None:
    """Forget tqdm bars created disabled (huggingface_hub's download bars): gradio tracks them anyway, at 0%.

    A terminal never shows them; in the page they would hang on below the stage bar until the job ends. Removed one
    by one, as the job's thread may be adding a bar meanwhile.
    """
    for tracked in [t for t in progress.iterables if getattr(t._tqdm, "disable", False)]:
        with contextlib.suppress(ValueError):  # closed meanwhile
            progress.iterables.remove(tracked)


def results_rows(before: dict | None, after: dict | None) -> list[list[str]]:
    """Rows task, metric, original, merged, change; every numeric metric but standard errors, `acc` first."""
    if not after:
        return []
    before = before or {}
    rows = []
    for task in sorted(after):
        metrics = sorted((m for m in after[task] if not m.endswith("_stderr")), key=lambda m: (m != "acc", m))
        for metric in metrics:
            new, old = after[task][metric], before.get(task, {}).get(metric)
            rows.append([task, metric, _fmt(old), _fmt(new), f"{new - old:+.4f}" if old is not None else "-"])
    head_before, head_after = headline(before), headline(after)
    if head_after is not None and sum("acc" in m for m in after.values()) > 1:
        change = f"{head_after - head_before:+.4f}" if head_before is not None else "-"
        rows.append(["mean (paper headline)", "acc", _fmt(head_before), _fmt(head_after), change])
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _md_escape(text: str) -> str:
    """Show a message literally in Markdown (repo names and paths hold `_` and `*`)."""
    for ch in "\\`*_{}[]<>()#+!|":
        text = text.replace(ch, "\\" + ch)
    return text


def _finished_markdown(summary: dict[str, Any], seconds: float) -> str:
    repo_id = summary["repo_id"]
    lines = [f"### Pushed to [{repo_id}]({repo_link(repo_id)})"]
    if summary["experts_before"] is not None:
        lines.append(f"{summary['experts_before']} → {summary['experts_after']} experts per MoE layer "
                     f"({summary['family']}), in {seconds:.0f} s.")
    if not summary["results_after"]:
        lines.append("No evaluation was run (no evaluation tasks).")
    return "\n\n".join(lines)


def merge_and_push(source: str, keep: str, calibration: str, repo_id: str, method: str, linkage: str, merge: str,
                   router: str, num_samples: float, seq_len: float, tasks: list[str] | None, limit: float | None,
                   include_path: str, private: bool, overwrite: bool, oauth_token: gr.OAuthToken | None,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> Iterator[tuple]:  # noqa: B008
    """The "Merge and push" handler: yields (status, log, results table, button, retry button, kept folder)."""
    lines: deque[str] = deque(maxlen=LOG_LINES)
    busy, idle = gr.Button(interactive=False), gr.Button(interactive=True)
    no_table = gr.Dataframe(value=None, visible=False)
    try:
        token = resolve_user_token(oauth_token)
        plan = prepare_job(source, keep, calibration, repo_id, method, linkage, merge, router, num_samples, seq_len,
                           tasks, limit, include_path, private, overwrite, token)
    except HcSmoeError as exc:
        yield f"### Cannot start\n\n{_md_escape(str(exc))}", "", no_table, idle, gr.skip(), gr.skip()
        return

    started = time.perf_counter()
    status, stage, outcome = "### Starting…", None, None
    # A persistent bar for the stages, above the tqdm bars of the current stage (gradio stacks them). Gradio's
    # Progress has no public handle on a bar it tracks, so the stage bar is its first tracked iterable.
    progress.tqdm(None, desc="stages", total=len(plan.stages), unit="stage")
    stage_bar = progress.iterables[0] if progress.iterables else None
    # A new job replaces the retry of an earlier failed push (that folder is evicted in time, see space_keep).
    no_retry = gr.Button(visible=False)
    yield status, "", no_table, busy, no_retry, None
    events = run_plan(plan)
    try:
        for batch in events:
            for kind, value in batch:
                if kind == "log":
                    lines.append(value)
                elif kind == "stage":
                    stage = value
                    number = plan.stages.index(value) + 1 if value in plan.stages else 0
                    status = f"### Stage {number} of {len(plan.stages)}: {value}"
                    if stage_bar is not None:
                        stage_bar.index, stage_bar.desc = number - 1, f"stage {number}/{len(plan.stages)}: {value}"
                else:
                    outcome = (kind, value)
            if stage_bar is not None:
                _drop_disabled_bars(progress)
                progress.update(0)  # sends the bars as they are now
            if outcome is None:
                yield status, "\n".join(lines), gr.skip(), busy, gr.skip(), gr.skip()
    except gr.Error as exc:  # e.g. ZeroGPU refusing the GPU slot (quota): already worded for the user
        outcome = ("error", str(exc.message))
    except Exception as exc:
        log.exception("the job stream failed")
        outcome = ("error", f"internal error ({type(exc).__name__}: {exc}); the app's log has the details")
    finally:
        # Closing the event stream waits for the job to end; only then may its files go. Pushed, or failed
        # before or during the merge, the local copy would only fill the disk; a failed push may keep it below.
        events.close()
        if outcome is None or outcome[0] != "unfinished" or outcome[1]["stage"] != "push":
            shutil.rmtree(plan.workdir, ignore_errors=True)
    text = "\n".join(lines)
    if outcome is not None and outcome[0] == "done":
        rows = results_rows(outcome[1]["results_before"], outcome[1]["results_after"])
        table = gr.Dataframe(value=rows, headers=RESULT_HEADERS, visible=bool(rows))
        yield _finished_markdown(outcome[1], time.perf_counter() - started), text, table, idle, no_retry, None
    elif outcome is not None and outcome[0] == "unfinished":
        message, kept = retry_panel.after_unfinished(plan, outcome[1])
        retry = gr.Button(visible=True, interactive=True) if kept else no_retry
        yield message, text, no_table, idle, retry, kept.workdir if kept else None
    else:
        where = f" (stage: {stage})" if stage else ""
        message = outcome[1] if outcome is not None else "the job ended without a result"
        yield f"### Failed{where}\n\n{_md_escape(message)}", text, no_table, idle, no_retry, None


def suggest_repo(source: str, keep: str, method: str, profile: gr.OAuthProfile | None) -> str:
    """The default target repository: <signed-in user>/<source name>-<method>-<K>e."""
    source, keep = (source or "").strip(), str(keep or "").strip()
    if not source or not keep:
        return ""
    name = default_repo_name(source, method or MethodOptions().method, keep)
    return f"{profile.username}/{name}" if profile is not None else name


# ---------------------------------------------------------------------------- the page


INTRO = """
# Shrink a Mixture-of-Experts model with HC-SMoE

Merges the experts of each MoE layer by hierarchical clustering of their outputs on calibration text
([HC-SMoE, arXiv 2410.08589](https://arxiv.org/abs/2410.08589)) into a **physically smaller** checkpoint that plain
`transformers` loads, evaluates the original and merged models with lm-eval, and pushes the result with a model card
to **your** account. Supported families: {families}.
"""


def build_demo() -> gr.Blocks:
    """The page, with its queue: one job at a time."""
    local = not on_space()
    calib_info = "c4 (the paper's C4 English shard) or a Hub dataset id with a text column"
    if local:
        calib_info += ", or a local .txt/.jsonl/.json.gz file"
    with gr.Blocks(title="HC-SMoE: merge MoE experts and push") as demo:
        gr.Markdown(INTRO.format(families=", ".join(spec.family for spec in SPECS)))
        gr.LoginButton()
        with gr.Row():
            source = gr.Textbox(label="Source model", placeholder="mistralai/Mixtral-8x7B-v0.1", scale=3,
                                info="Hub model id" + (" or local model directory" if local else ""))
            keep = gr.Textbox(label="Experts to keep", placeholder="6", scale=1,
                              info="per MoE layer: a count, or a fraction such as 0.75")
        calibration = gr.Textbox(label="Calibration dataset", value=DEFAULT_CALIBRATION, info=calib_info)
        repo_id = gr.Textbox(label="Target repository", placeholder="your-name/Mixtral-8x7B-v0.1-hc-smoe-6e",
                             info="filled in from your account and the source; edit it to push elsewhere")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                method = gr.Dropdown(sorted(METHODS), value=MethodOptions().method, label="Method")
                linkage = gr.Dropdown(list(LINKAGES), value="average", label="Linkage")
                merge = gr.Dropdown(list(MERGE_MODES), value=MethodOptions().merge, label="Expert merge")
                router = gr.Dropdown(list(ROUTER_MODES), value=MethodOptions().router, label="Router strategy")
            with gr.Row():
                num_samples = gr.Number(32, label="Calibration samples", precision=0)
                seq_len = gr.Number(2048, label="Block length (tokens)", precision=0)
            tasks = gr.Dropdown(PAPER_TASKS, value=list(PAPER_TASKS), multiselect=True, allow_custom_value=True,
                                label="Evaluation tasks", info="lm-eval tasks, 0-shot; clear them to skip evaluation",
                                elem_id="tasks")
            with gr.Row():
                limit = gr.Number(0, label="Examples per task", precision=0, info="0: all")
                include_path = gr.Textbox(label="Task folder", visible=local,
                                          info="a directory of extra lm-eval task YAMLs (local runs only)")
            with gr.Row():
                private = gr.Checkbox(False, label="Private repository")
                overwrite = gr.Checkbox(False, label="Replace the files of an existing target repository")
        run_on, job_ref = jobs_panel.add_controls()
        run = gr.Button("Merge and push", variant="primary")
        retry, kept = retry_panel.add_controls()
        status = gr.Markdown(elem_id="status")
        # Where gradio draws the progress bars (stage, then the current stage's tqdm bars), away from the text.
        bars = gr.Markdown(elem_id="progress", min_height=48, container=False)
        log_box = gr.Textbox(label="Log", lines=12, max_lines=20, interactive=False, elem_id="log")
        table = gr.Dataframe(headers=RESULT_HEADERS, label="Evaluation (lm-eval, 0-shot)", interactive=False,
                             visible=False, elem_id="results")

        suggest_inputs = [source, keep, method]
        # After sign-in the page reloads: the load event fills the target from the signed-in user. It is declared
        # first so that it, not one of the change listeners below, gets the public api name.
        demo.load(suggest_repo, suggest_inputs, repo_id, queue=False, show_progress="hidden", api_name="suggest_repo")
        for trigger in (source.change, keep.change, method.change):
            trigger(suggest_repo, suggest_inputs, repo_id, queue=False, show_progress="hidden",
                    trigger_mode="always_last", api_visibility="private")
        # Gradio 6's Textbox does not follow appended text (its autoscroll), so the page scrolls the log itself.
        follow_log = "() => { const t = document.querySelector('#log textarea'); if (t) t.scrollTop = t.scrollHeight; }"
        log_box.change(None, None, None, js=follow_log)
        run.click(
            jobs_panel.routed(merge_and_push, extra_outputs=2),
            [source, keep, calibration, repo_id, method, linkage, merge, router, num_samples, seq_len, tasks, limit,
             include_path, private, overwrite, run_on],
            [status, log_box, table, run, retry, kept, job_ref],
            api_name="merge_and_push",
            concurrency_limit=1,
            concurrency_id="merge",
            show_progress_on=[bars],
        )
        # In the job's slot: a retry never overlaps a job whose failed push could evict the folder it pushes.
        retry.click(retry_panel.retry_push, [kept], [status, retry, kept], api_name="retry_push", concurrency_limit=1,
                    concurrency_id="merge", show_progress="hidden")
        demo.load(jobs_panel.reattach, [job_ref], [status, log_box, job_ref], api_visibility="private")
    return demo.queue(max_size=32)


def launch_kwargs() -> dict[str, Any]:
    """Styling, which Gradio 6 takes in `launch()` rather than in `Blocks()`."""
    css = "#log textarea { font-family: ui-monospace, monospace; font-size: 12px; }"
    return {"theme": gr.themes.Soft(primary_hue="orange"), "css": css}


def main() -> None:
    # The job's own log on the console; other libraries (HTTP clients) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in (PACKAGE_LOGGER, log.name):
        logging.getLogger(name).setLevel(logging.INFO)
    removed = space_keep.release_all(space_keep.work_root())
    if removed:
        log.info("removed %d merged model(s) kept by an earlier run of this app: no page can retry them", removed)
    if not on_space() and hub.resolve_token(None) is None:
        sys.exit("app.py: outside a Space the 'Sign in with Hugging Face' button stands for the account this machine "
                 "is logged in with: run `hf auth login` or set HF_TOKEN first")
    build_demo().launch(**launch_kwargs())


if __name__ == "__main__":
    main()
