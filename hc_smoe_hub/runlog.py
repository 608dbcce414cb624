"""Where a run's messages go: the terminal shows the tool's own stage lines, `run.log` keeps everything.

The CLI opens a `RunLog` before any work. Every record (the tool's, and the chatter of lm-eval, transformers,
datasets and huggingface_hub, Python warnings, the traceback of an unexpected failure) goes to the log file; the
terminal gets only the tool's own records (every library's with `verbose`). Progress bars are not log records: the
tool's and lm-eval's stay on the terminal, datasets' are switched off unless `verbose`.

Until the merged checkpoint exists the file lives next to the output directory (`.NAME.run.log`); `move_into`
moves it to `NAME/run.log` without closing it, so later records follow it there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

RUN_LOG = "run.log"
TOOL_LOGGER = "hc_smoe_hub"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def pending_log_path(output_dir: Path) -> Path:
    """Where a merge's log is kept until its output directory exists."""
    output_dir = Path(output_dir).resolve()
    return output_dir.with_name(f".{output_dir.name}.{RUN_LOG}")


class _ToolOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == TOOL_LOGGER or record.name.startswith(TOOL_LOGGER + ".")


class RunLog:
    """The run's two destinations; `close()` (or the context manager) detaches both."""

    def __init__(self, path: Path, *, verbose: bool = False, quiet: bool = False) -> None:
        self.path = Path(path).resolve()
        self.verbose = verbose
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._file.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
        self._file.setLevel(logging.DEBUG if verbose else logging.INFO)
        self._console = logging.StreamHandler(sys.stderr)
        self._console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        self._console.setLevel(logging.WARNING if quiet else logging.INFO)
        if not verbose:
            self._console.addFilter(_ToolOnly())
        root = logging.getLogger()
        self._saved_level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self._file)
        root.addHandler(self._console)
        logging.captureWarnings(True)
        _route_library_logs(verbose)

    def move_into(self, directory: Path) -> None:
        """Move the file to `directory/run.log`; the open handler keeps writing to it there."""
        target = Path(directory).resolve() / RUN_LOG
        if target == self.path:
            return
        if target.exists():  # a resumed or re-evaluated run: append, keep one log
            self._file.flush()
            with open(target, "a", encoding="utf-8") as dst, open(self.path, encoding="utf-8") as src:
                dst.write(src.read())
            self._reopen(target)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        else:
            os.replace(self.path, target)
            self._file.baseFilename = str(target)
        self.path = target

    def _reopen(self, target: Path) -> None:
        self._file.acquire()
        try:
            self._file.close()
            self._file.baseFilename = str(target)
            self._file.stream = self._file._open()
        finally:
            self._file.release()

    def discard(self) -> None:
        """Close and delete the file (a run refused before any work needs no log)."""
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in (self._file, self._console):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(self._saved_level)
        logging.captureWarnings(False)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _route_library_logs(verbose: bool) -> None:
    """transformers, datasets and huggingface_hub print through handlers of their own: send them to the root."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    with contextlib.suppress(ImportError):
        import datasets  # imported now: it adds its stderr handler at import time, removed below

        if not verbose:
            datasets.disable_progress_bars()
    # datasets and huggingface_hub give their root logger a stderr handler of their own (and propagate too).
    for name in ("datasets", "huggingface_hub"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
                library.removeHandler(handler)
        library.propagate = True
