"""What the CLI knows about a run while it goes, and the one line it prints when the run fails.

A failure is never a traceback on the terminal: `failure_line` turns any exception into one line that says what
failed, what to do (the exact command that finishes or resumes the job) and where the log is; the traceback goes
to `run.log`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.runlog import RunLog


class RunState:
    """The stage the run is in, its output directory and log; fed by the pipeline's callbacks."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args, self.argv = args, argv
        self.stage = "checks"
        self.log: RunLog | None = None
        self.output_dir: Path | None = None
        self.checkpoint: Path | None = None
        self.push = False
        self.tasks: list[str] | None = None
        self.include_path: str | None = None
        self._log_in_output = False
        self._failed_early = False

    def open_log(self, path: Path, *, into_dir: bool) -> None:
        self.log = RunLog(path, verbose=self.args.verbose, quiet=self.args.quiet)
        self._log_in_output = into_dir

    def on_stage(self, name: str) -> None:
        self.stage = name

    def checkpoint_ready(self, directory: Path) -> None:
        self.checkpoint = Path(directory)
        if self.log is not None:
            self.log.move_into(directory)
            self._log_in_output = True

    def failed_early(self) -> None:
        self._failed_early = True

    def close(self) -> None:
        if self.log is None:
            return
        if self._failed_early and not self._log_in_output:
            self.log.discard()
        else:
            self.log.close()

    # ------------------------------------------------------------------ commands to print
    def resume_command(self) -> str:
        words = without_token(self.argv)
        words = [w for w in words if w != "--overwrite"]
        if "--resume" not in words:
            words.append("--resume")
        return shlex.join(["hc-smoe-push", *words])

    def finish_command(self, stage: str, output_dir: Path, repo_id: str | None) -> str:
        a = self.args
        if stage == "push":
            words = ["--push-only", str(output_dir)] + (["--repo-id", repo_id] if repo_id else [])
            return shlex.join(["hc-smoe-push", *words, *(["--private"] if a.private else [])])
        words = ["--eval-only", str(output_dir)]
        if a.skip_eval:
            words.append("--skip-eval")
        else:
            tasks = self.tasks or (a.tasks.split(",") if a.tasks else None)
            include = self.include_path or a.include_path
            words += ["--tasks", ",".join(tasks)] if tasks else []
            words += ["--include-path", str(include)] if include else []
            words += ["--num-fewshot", str(a.num_fewshot)] if a.num_fewshot else []
            words += ["--limit", _number(a.limit)] if a.limit is not None else []
            words += ["--eval-batch-size", a.eval_batch_size] if a.eval_batch_size != "8" else []
            words += ["--max-memory", a.max_memory] if a.max_memory else []
        words += ["--device", a.device] if a.device else []
        if self.push and repo_id:
            words += ["--repo-id", repo_id] + (["--private"] if a.private else [])
        return shlex.join(["hc-smoe-push", *words])

    def log_hint(self) -> str:
        return f"the log is {self.log.path}" if self.log is not None else "run again with --verbose"


def failure_line(exc: BaseException, state: RunState) -> tuple[int, str]:
    """(exit status, message) for any exception that ended the run."""
    from hc_smoe_hub.pipeline import UnfinishedJob

    if isinstance(exc, UnfinishedJob):
        cause = exc.cause
        code = 130 if isinstance(cause, KeyboardInterrupt) else 2 if isinstance(cause, HcSmoeError) else 1
        extra = "" if isinstance(cause, HcSmoeError) else f" ({_hint(cause, exc.stage)}; {state.log_hint()})"
        return code, (f"{exc}{extra}; finish with: "
                      f"{state.finish_command(exc.stage, exc.output_dir, exc.repo_id)}")
    partial = _partial_dir(state) if state.stage == "merge" else None
    resume = (f"; the finished layers are kept in {partial}: resume with `{state.resume_command()}` "
              "(or --overwrite to start again)") if partial is not None else ""
    if isinstance(exc, KeyboardInterrupt):
        if partial is None:
            return 130, f"interrupted during {state.stage}; no output directory was written"
        return 130, f"interrupted during the merge{resume}"
    kind = getattr(exc, "kind", None)  # merge.PartialMergeError: only "exists" is fixed by this command + --resume
    if kind is not None:
        state.failed_early()
        resume = f": `{state.resume_command()}`" if kind == "exists" else ""
        return 2, f"{exc}{resume}"
    if isinstance(exc, HcSmoeError):
        if partial is None:  # refused before any work worth resuming: the line says it all, no log is left
            state.failed_early()
        return 2, f"{exc}{resume}"
    return 1, (f"{state.stage} failed unexpectedly ({type(exc).__name__}: {_short(exc)}); {_hint(exc, state.stage)}; "
               f"{state.log_hint()}{resume}")


def _hint(exc: BaseException, stage: str) -> str:
    """The likely fix for an exception no check foresaw."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        if stage.startswith("evaluat"):
            return "the GPU ran out of memory: lower --eval-batch-size or cap it with --max-memory"
        return "the GPU ran out of memory: use fewer --num-samples or a shorter --seq-len, or --device cpu"
    if isinstance(exc, MemoryError):
        return "the machine ran out of RAM: use fewer --num-samples or a shorter --seq-len, or a bigger machine"
    if isinstance(exc, OSError):
        return "check free disk space, permissions and the files named"
    return "this looks like a bug in hc-smoe-hub: please report it with the log"


def _partial_dir(state: RunState) -> Path | None:
    if state.output_dir is None:
        return None
    from hc_smoe_hub import merge

    finder = getattr(merge, "partial_dir_for", None)
    if finder is None:
        return None
    path = Path(finder(state.output_dir))
    return path if path.exists() else None


def without_token(argv: list[str]) -> list[str]:
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--token":
            skip = True
        elif not word.startswith("--token="):
            words.append(word)
    return words


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
