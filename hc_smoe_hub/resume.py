"""The partial directory of a merge: where it is written, how a dead run's work is found again and resumed.

A merge writes into `.NAME.partial` next to the output directory `NAME` and renames it into place only when
complete. The directory is kept when the run fails or is interrupted (crash, Ctrl-C, SIGKILL, a lost machine), so
that the same command plus `--resume` continues after the last finished decoder layer. `resume.json` in it holds
the fingerprint of everything that determines the result, the finished layers' records and the name of the file
with the calibration hidden states that enter the next layer (saved after every finished layer, so a resumed
sequential run calibrates the next layer on exactly what an uninterrupted one would). The order of writes makes
every moment of a crash safe: the layer's shard bytes are fsynced, then its hidden states are written to a new
file, then the state file is replaced atomically, and only then is the previous hidden-state file deleted.

A lock (`flock`, released by the kernel even on SIGKILL) keeps two runs from writing into one partial directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open

from hc_smoe_hub.checkpoint import SourceCheckpoint, fsync_dir, write_tensor_file, write_text_atomic
from hc_smoe_hub.errors import OutputError
from hc_smoe_hub.streaming import LayerRecord

log = logging.getLogger(__name__)

STATE_NAME = "resume.json"
LOCK_NAME = ".lock"
# Files that only serve resuming: removed before the directory becomes the output.
_RESUME_ONLY = (STATE_NAME, "hidden-*.safetensors", ".*.tmp", LOCK_NAME)  # .tmp: a write a crash cut short


def partial_dir_for(output_dir: Path | str) -> Path:
    """Where a merge into `output_dir` keeps its work until it is complete (the directory `--resume` continues)."""
    target = Path(output_dir).expanduser().resolve()
    return target.with_name(f".{target.name}.partial")


class PartialMergeError(OutputError):
    """A partial directory stands in the way or cannot be resumed; `partial_dir` says which.

    `kind` is "exists" (resume it with the same command plus --resume, or --overwrite), "mismatch" (it was
    started by another command: the message says what differs), "damaged" (only --overwrite helps) or "busy"
    (another live run holds it).
    """

    def __init__(self, message: str, partial_dir: Path, kind: str):
        super().__init__(message)
        self.partial_dir, self.kind = partial_dir, kind


def weights_digest(source: SourceCheckpoint) -> str:
    """Shard names, sizes, modification times and headers: a changed source checkpoint is not resumed into."""
    digest = hashlib.sha256()
    for path in sorted({t.file for t in source.tensors.values()}):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(n))
    return digest.hexdigest()[:24]


def tokens_digest(blocks: torch.Tensor) -> str:
    """The calibration token blocks themselves: an edited calibration file is caught even under the same name."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:24]


class ResumePoint:
    """What a resumed run starts from: the next decoder layer, the finished records and the hidden states."""

    def __init__(self, next_layer: int, records: list[LayerRecord], hidden: list[torch.Tensor] | None):
        self.next_layer, self.records, self.hidden = next_layer, records, hidden


class PartialRun:
    """One merge's partial directory: checked before any compute, created at the start, renamed when done."""

    def __init__(self, output_dir: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool):
        self.target = Path(output_dir).expanduser().resolve()
        self.dir = partial_dir_for(self.target)
        self.fingerprint = dict(fingerprint)
        self.overwrite = overwrite
        self._lock_fd: int | None = None
        self._state: dict[str, Any] | None = None
        self.resuming = False  # an existing partial directory is continued (its shards are reopened)
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())) and not overwrite:
            raise OutputError(f"output directory {self.target} exists and is not empty: remove it or pass "
                              "--overwrite")
        if self.dir.exists():
            self._adopt(resume)
        elif resume:
            log.info("--resume: no partial merge in %s, starting from the first layer", self.dir)

    # ------------------------------------------------------------------ before any compute
    def _adopt(self, resume: bool) -> None:
        """Decide what to do with an existing partial directory: resume it, discard it, or refuse."""
        self._lock()  # only a probe: a live run holds it; the lock is taken for good when the run starts
        self._unlock()
        state = self._read_state()
        finished = state["next_layer"] if state else 0
        if resume:
            if state is None:
                raise PartialMergeError(f"{self.dir} holds no resumable merge state: pass --overwrite to discard "
                                        "it and start again", self.dir, "damaged")
            diff = _differences(state["fingerprint"], self.fingerprint, skip={"calibration_tokens"})
            if diff:
                raise PartialMergeError(f"cannot resume the partial merge in {self.dir}: it was started with "
                                        f"{diff}; resume with the command it was started with, or pass --overwrite "
                                        "to discard it", self.dir, "mismatch")
            self._state, self.resuming = state, True
            log.info("resuming the partial merge in %s after %d finished decoder layers", self.dir, finished)
            return
        leftovers = [p for p in self.dir.iterdir() if p.name != LOCK_NAME]
        if self.overwrite or finished == 0 and (state is not None or not leftovers):
            # --overwrite, or a dead run that finished no layer: nothing worth keeping.
            log.info("discarding the partial merge in %s (%d finished decoder layers)", self.dir, finished)
            shutil.rmtree(self.dir)
        elif state is None:
            raise PartialMergeError(f"{self.dir} is in the way and holds no resumable merge state: pass "
                                    "--overwrite to discard it", self.dir, "damaged")
        else:
            raise PartialMergeError(f"a partial merge of an earlier run ({finished} decoder layers finished) is in "
                                    f"{self.dir}: run the same command with --resume to continue it, or with "
                                    "--overwrite to discard it", self.dir, "exists")

    def check_calibration(self, digest: str) -> None:
        """The calibration tokens must be the ones the partial merge was calibrated on."""
        self.fingerprint["calibration_tokens"] = digest
        if self._state is not None and self._state["fingerprint"].get("calibration_tokens") != digest:
            raise PartialMergeError(f"cannot resume the partial merge in {self.dir}: its calibration tokens "
                                    "differ (the calibration text changed); pass --overwrite to discard it",
                                    self.dir, "mismatch")

    # ------------------------------------------------------------------ the run
    @contextmanager
    def session(self) -> Iterator[Path]:
        """Create (or reuse) the directory and hold its lock; on failure keep it when a layer was finished."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if not self.resuming:
                self._write_state(0, [], None)
            yield self.dir
        except BaseException:
            finished = self._state["next_layer"] if self._state else 0
            if finished == 0:
                shutil.rmtree(self.dir, ignore_errors=True)  # no layer finished: nothing to resume
            else:
                log.info("kept %d finished decoder layers in %s for --resume", finished, self.dir)
            raise
        finally:
            self._unlock()

    def resume_point(self, device: torch.device) -> ResumePoint | None:
        if self._state is None or self._state["next_layer"] == 0:
            return None
        records = [LayerRecord(**r) for r in self._state["records"]]
        name = self._state["hidden"]
        hidden = None
        if name is not None:
            try:
                with safe_open(str(self.dir / name), framework="pt", device=str(device)) as fh:
                    hidden = [fh.get_tensor(f"h.{i}") for i in range(len(fh.keys()))]
            except (OSError, safetensors.SafetensorError) as exc:
                raise PartialMergeError(f"the saved hidden states {self.dir / name} cannot be read ({exc}): pass "
                                        "--overwrite to start again", self.dir, "damaged") from None
        return ResumePoint(self._state["next_layer"], records, hidden)

    def layer_done(self, next_layer: int, records: list[LayerRecord], hidden: list[torch.Tensor]) -> None:
        """Record layers < next_layer as finished (the writer has synced their shard bytes already)."""
        old = self._state["hidden"] if self._state else None
        name = f"hidden-{next_layer:05d}.safetensors"
        write_tensor_file(self.dir / name, {f"h.{i}": h for i, h in enumerate(hidden)})
        self._write_state(next_layer, records, name)
        if old and old != name:
            (self.dir / old).unlink(missing_ok=True)

    def finalize(self) -> None:
        """Remove what only served resuming and rename the directory into place as the output."""
        for pattern in _RESUME_ONLY:  # the state first: it must never point at a removed hidden-state file
            for path in self.dir.glob(pattern):
                path.unlink()
        fsync_dir(self.dir)
        if self.target.exists():
            if self.target.is_dir():
                shutil.rmtree(self.target)
            else:
                self.target.unlink()
        os.replace(self.dir, self.target)
        fsync_dir(self.target.parent)
        self._state = None

    # ------------------------------------------------------------------ helpers
    def _write_state(self, next_layer: int, records: list[LayerRecord], hidden: str | None) -> None:
        state = {"fingerprint": self.fingerprint, "next_layer": next_layer,
                 "records": [asdict(r) for r in records], "hidden": hidden}
        write_text_atomic(self.dir / STATE_NAME, json.dumps(state, indent=1) + "\n")
        self._state = state

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.dir / STATE_NAME).read_text())
            int(state["next_layer"]), state["fingerprint"], state["records"], state["hidden"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PartialMergeError(f"another run is merging into {self.dir} right now: wait for it to finish "
                                    "or stop it first", self.dir, "busy") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def _differences(old: dict[str, Any], new: dict[str, Any], skip: set[str]) -> str:
    """'keep 6 (this command: 4), sequential True (this command: False)' for the fields that differ."""
    parts = []
    for key in sorted((set(old) | set(new)) - skip):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = [f"{key}.{k} {a.get(k)!r} (this command: {b.get(k)!r})" for k in sorted(set(a) | set(b))
                       if a.get(k) != b.get(k)]
                parts.extend(sub)
            elif key == "weights":
                parts.append("other source weights (the checkpoint files changed)")
            else:
                parts.append(f"{key} {a!r} (this command: {b!r})")
    return ", ".join(parts)
