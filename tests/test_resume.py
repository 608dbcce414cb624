"""--resume: an interrupted merge continues after its last finished layer, with the uninterrupted run's result.

The crash is real: an interrupt raised right after layer 2 is recorded (in process), or a subprocess that
SIGKILLs itself at that moment. Run with `.venv/bin/python -m pytest -q tests/test_resume.py`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hc_smoe_hub import resume
from hc_smoe_hub.calibration import CalibrationSpec
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.merge import MergeRequest, PartialMergeError, merge_checkpoint, partial_dir_for
from hc_smoe_hub.methods import METHODS
from hc_smoe_hub.synthetic import build_tiny_moe

LAYERS = 4
CRASH_AFTER = 2  # layers 0 and 1 are finished and recorded when the run dies


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_tiny_moe(tmp_path_factory.mktemp("tiny4") / "mixtral", "mixtral", num_layers=LAYERS)


def request(src: Path, out: Path, calib: Path, **changes) -> MergeRequest:
    fields = dict(source=str(src), keep="5", output_dir=out, calibration=CalibrationSpec(str(calib), 4, 64),
                  device="cpu")
    fields.update(changes)
    return MergeRequest(**fields)


@pytest.fixture(scope="module")
def calib(calib_file) -> Path:
    return calib_file


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory) -> Path:
    """A family with a dense decoder layer (layer 1) among the MoE ones, and a shared expert."""
    return build_tiny_moe(tmp_path_factory.mktemp("tiny4q") / "qwen2_moe", "qwen2_moe", num_layers=LAYERS)


@pytest.fixture(scope="module")
def reference(src, qwen_src, calib, tmp_path_factory) -> dict:
    """Uninterrupted runs by `sequential` (True, False) or ("qwen2_moe", sequential), made on first use."""
    root = tmp_path_factory.mktemp("reference")

    class Lazy(dict):
        def __missing__(self, key) -> Path:
            source, sequential = (qwen_src, key[1]) if isinstance(key, tuple) else (src, key)
            out = root / f"{source.name}-sequential-{sequential}"
            merge_checkpoint(request(source, out, calib, sequential=sequential))
            self[key] = out
            return out

    return Lazy()


def crash_after_layer(monkeypatch, req: MergeRequest) -> Path:
    """Run `req` and interrupt it right after layer CRASH_AFTER - 1 is recorded; returns the kept partial dir."""
    original = resume.PartialRun.layer_done

    def interrupt(self, next_layer, records, hidden):
        original(self, next_layer, records, hidden)
        if next_layer == CRASH_AFTER:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(resume.PartialRun, "layer_done", interrupt)
        with pytest.raises(KeyboardInterrupt):
            merge_checkpoint(req)
    partial = partial_dir_for(req.output_dir)
    assert not Path(req.output_dir).exists() and partial.is_dir()
    assert json.loads((partial / resume.STATE_NAME).read_text())["next_layer"] == CRASH_AFTER
    return partial


def count_method_calls(monkeypatch, method: str = "takeover") -> list[int]:
    """The layers the method is run on from now on."""
    calls: list[int] = []
    inner = METHODS[method]

    def counted(ctx, opts):
        calls.append(ctx.layer)
        return inner(ctx, opts)

    monkeypatch.setitem(METHODS, method, counted)
    return calls


def without_timings(provenance: dict) -> dict:
    prov = {k: v for k, v in provenance.items() if k not in ("timings_s", "created_at")}
    prov["layers"] = [{k: v for k, v in layer.items() if k != "seconds"} for layer in prov["layers"]]
    return prov


def assert_identical(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ca, cb = SourceCheckpoint(a), SourceCheckpoint(b)
    assert ca.keys() == cb.keys()
    ta, tb = ca.read(ca.keys()), cb.read(cb.keys())
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert without_timings(json.loads((a / "hc_smoe.json").read_text())) == \
        without_timings(json.loads((b / "hc_smoe.json").read_text()))
    for name in ("config.json", "model.safetensors.index.json"):
        if (a / name).exists():
            assert (a / name).read_text() == (b / name).read_text()


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one-shot"])
def test_interrupted_merge_resumes_to_the_uninterrupted_result(sequential, src, calib, reference, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "out"
    crash_after_layer(monkeypatch, request(src, out, calib, sequential=sequential))
    calls = count_method_calls(monkeypatch)
    merge_checkpoint(request(src, out, calib, sequential=sequential, resume=True))
    assert calls == list(range(CRASH_AFTER, LAYERS))  # layers 0 and 1 were not merged again
    assert_identical(out, reference[sequential])
    assert not partial_dir_for(out).exists()


def test_resume_after_a_dense_layer(qwen_src, calib, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after_layer(monkeypatch, request(qwen_src, out, calib))  # layer 0 MoE, layer 1 dense: both finished
    calls = count_method_calls(monkeypatch)
    merge_checkpoint(request(qwen_src, out, calib, resume=True))
    assert calls == [2, 3]
    assert_identical(out, reference[("qwen2_moe", True)])


def test_sigkilled_merge_resumes_to_the_uninterrupted_result(src, calib, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from hc_smoe_hub import resume
        from hc_smoe_hub.calibration import CalibrationSpec
        from hc_smoe_hub.merge import MergeRequest, merge_checkpoint

        original = resume.PartialRun.layer_done

        def die(self, next_layer, records, hidden):
            original(self, next_layer, records, hidden)
            if next_layer == {CRASH_AFTER}:
                os.kill(os.getpid(), signal.SIGKILL)

        resume.PartialRun.layer_done = die
        merge_checkpoint(MergeRequest(source={str(src)!r}, keep="5", output_dir=Path({str(out)!r}),
                                      calibration=CalibrationSpec({str(calib)!r}, 4, 64), device="cpu"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = partial_dir_for(out)
    assert json.loads((partial / resume.STATE_NAME).read_text())["next_layer"] == CRASH_AFTER

    with pytest.raises(PartialMergeError) as refused:  # the dead run's lock went with it; the work did not
        merge_checkpoint(request(src, out, calib))
    assert refused.value.partial_dir == partial and "--resume" in str(refused.value)
    calls = count_method_calls(monkeypatch)
    merge_checkpoint(request(src, out, calib, resume=True))
    assert calls == list(range(CRASH_AFTER, LAYERS))
    assert_identical(out, reference[True])


def test_partial_dir_is_refused_without_resume(src, calib, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = crash_after_layer(monkeypatch, request(src, out, calib))
    before = {p.name: p.stat().st_mtime_ns for p in partial.iterdir()}
    with pytest.raises(PartialMergeError) as refused:
        merge_checkpoint(request(src, out, calib))
    message = str(refused.value)
    assert "\n" not in message and str(partial) in message
    assert "--resume" in message and "--overwrite" in message and "2 decoder layers finished" in message
    assert refused.value.partial_dir == partial == partial_dir_for(out) and refused.value.kind == "exists"
    assert {p.name: p.stat().st_mtime_ns for p in partial.iterdir()} == before  # left exactly as it was


@pytest.mark.parametrize(("change", "expected"), [
    ({"keep": "4"}, "keep 5 (this command: 4)"),
    ({"sequential": False}, "sequential True (this command: False)"),
    ({"max_shard_size": "1MB"}, "max_shard_bytes"),
    ({"calibration_seed": 7}, "calibration.seed 42 (this command: 7)"),
])
def test_resume_with_other_settings_is_refused(change, expected, src, calib, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = crash_after_layer(monkeypatch, request(src, out, calib))
    if "calibration_seed" in change:
        change = {"calibration": CalibrationSpec(str(calib), 4, 64, seed=change["calibration_seed"])}
    with pytest.raises(PartialMergeError) as refused:
        merge_checkpoint(request(src, out, calib, resume=True, **change))
    message = str(refused.value)
    assert "\n" not in message and expected in message and str(partial) in message, message
    assert "--overwrite" in message and refused.value.kind == "mismatch"
    assert json.loads((partial / resume.STATE_NAME).read_text())["next_layer"] == CRASH_AFTER


def test_overwrite_discards_the_partial_dir(src, calib, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after_layer(monkeypatch, request(src, out, calib))
    calls = count_method_calls(monkeypatch)
    merge_checkpoint(request(src, out, calib, overwrite=True))
    assert calls == list(range(LAYERS))  # started again from the first layer
    assert_identical(out, reference[True])
    assert not partial_dir_for(out).exists()


def test_resume_without_a_partial_dir_just_starts(src, calib, reference, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="hc_smoe_hub"):
        merge_checkpoint(request(src, out, calib, resume=True))
    assert "no partial merge" in caplog.text
    assert_identical(out, reference[True])


def test_failure_before_any_finished_layer_leaves_nothing(src, calib, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def fail(ctx, opts):
        raise RuntimeError("boom")

    monkeypatch.setitem(METHODS, "takeover", fail)
    with pytest.raises(RuntimeError, match="boom"):
        merge_checkpoint(request(src, out, calib))
    assert not out.exists() and not partial_dir_for(out).exists()


def test_a_partial_dir_in_use_by_a_live_run_is_left_alone(src, calib, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = crash_after_layer(monkeypatch, request(src, out, calib))
    fd = os.open(partial / resume.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a live run holds while it merges
        for changes in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(PartialMergeError) as refused:
                merge_checkpoint(request(src, out, calib, **changes))
            assert refused.value.kind == "busy" and "right now" in str(refused.value)
    finally:
        os.close(fd)
    assert json.loads((partial / resume.STATE_NAME).read_text())["next_layer"] == CRASH_AFTER


def test_resume_after_the_calibration_text_changed_is_refused(src, calib, tmp_path, monkeypatch):
    out, text = tmp_path / "out", tmp_path / "calib.txt"
    text.write_text(calib.read_text())
    crash_after_layer(monkeypatch, request(src, out, text))
    text.write_text(calib.read_text().replace("experts", "layers"))  # same name and settings, other tokens
    with pytest.raises(PartialMergeError, match="calibration tokens differ") as refused:
        merge_checkpoint(request(src, out, text, resume=True))
    assert refused.value.kind == "mismatch"
