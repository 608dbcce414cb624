"""Merged checkpoints the Space keeps after a failed push, within the operator's disk budget, for a retry.

A job's work folder (`hc-smoe-space-*` under HC_SMOE_WORKDIR or the temp dir) holds the merged checkpoint. When
the push fails, the app keeps that folder, marked with a small JSON record (target repo, visibility), so the page
can offer "Retry the push"; otherwise the folder is deleted as before. Kept folders together stay within
HC_SMOE_SPACE_KEEP_GB (default 20; 0 keeps nothing): keeping a new one evicts the oldest kept ones first, and a
checkpoint larger than the whole budget is deleted at once, which the page then says. A kept folder goes when its
push succeeds, when the page's session ends (gradio drops a closed page's state after an hour), when it is
evicted, or when the app restarts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("hc_smoe_space")

KEEP_ENV = "HC_SMOE_SPACE_KEEP_GB"
DEFAULT_KEEP_GB = 20.0
WORKDIR_PREFIX = "hc-smoe-space-"
MARKER = ".hc-smoe-kept.json"


@dataclass
class Kept:
    workdir: str  # the job's work folder, deleted as a whole on release
    folder: str  # the merged checkpoint inside it
    repo_id: str  # the push target, fully qualified
    private: bool
    overwrite: bool
    size: int  # bytes of the work folder
    kept_at: float


def keep_budget() -> int:
    """Bytes the kept folders may fill together, from HC_SMOE_SPACE_KEEP_GB (a bad value: the default)."""
    raw = os.environ.get(KEEP_ENV, "").strip()
    gb = DEFAULT_KEEP_GB
    if raw:
        try:
            gb = float(raw)
            if gb < 0 or gb != gb:  # negative or NaN
                raise ValueError(raw)
        except ValueError:
            log.warning("ignoring %s=%r: not a number of GB >= 0; keeping up to %g GB", KEEP_ENV, raw,
                        DEFAULT_KEEP_GB)
            gb = DEFAULT_KEEP_GB
    return int(gb * 1e9)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def load(workdir: str | Path | None) -> Kept | None:
    """The record of a kept work folder, or None when it is gone (evicted, pushed, never kept)."""
    if not workdir:
        return None
    marker = Path(workdir) / MARKER
    try:
        kept = Kept(**json.loads(marker.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return kept if Path(kept.folder).is_dir() else None


def kept_under(root: Path) -> list[Kept]:
    """Every kept folder under `root`, oldest first."""
    found = [load(d) for d in Path(root).glob(WORKDIR_PREFIX + "*") if (d / MARKER).is_file()]
    return sorted((k for k in found if k is not None), key=lambda k: k.kept_at)


def keep(workdir: Path, folder: Path, repo_id: str, *, private: bool, overwrite: bool) -> Kept | None:
    """Keep `workdir` for a retry of its push, evicting older kept folders to fit; None (and deleted) if it can't."""
    workdir = Path(workdir)
    size, budget = dir_bytes(workdir), keep_budget()
    if size > budget:
        log.info("not keeping %s: %.2f GB is over the %.2f GB kept for retries (%s)", workdir, size / 1e9,
                 budget / 1e9, KEEP_ENV)
        release(workdir)
        return None
    others = [k for k in kept_under(workdir.parent) if Path(k.workdir) != workdir]
    total = sum(k.size for k in others)
    for old in others:  # oldest first
        if total + size <= budget:
            break
        log.info("evicting the kept %s (%.2f GB, push target %s) to make room", old.workdir, old.size / 1e9,
                 old.repo_id)
        release(old.workdir)
        total -= old.size
    kept = Kept(str(workdir), str(folder), repo_id, private, overwrite, size, time.time())
    (workdir / MARKER).write_text(json.dumps(asdict(kept)))
    log.info("kept %s (%.2f GB) for a retry of the push to %s", workdir, size / 1e9, repo_id)
    return kept


def release(workdir: str | Path | None) -> None:
    """Delete a job's work folder (only ever a `hc-smoe-space-*` folder); also gradio's State delete callback."""
    if not workdir:
        return
    path = Path(workdir)
    if not path.name.startswith(WORKDIR_PREFIX):
        log.warning("not deleting %s: not a work folder of this app", path)
        return
    shutil.rmtree(path, ignore_errors=True)


def release_all(root: Path) -> int:
    """Delete the kept folders under `root` (at start-up: no page of an earlier run can retry them)."""
    kept = kept_under(root)
    for k in kept:
        release(k.workdir)
    return len(kept)


def work_root() -> Path:
    """Where the app's work folders go: HC_SMOE_WORKDIR, or the system temp dir (as `tempfile` picks it)."""
    import tempfile

    return Path(os.environ.get("HC_SMOE_WORKDIR") or tempfile.gettempdir())
