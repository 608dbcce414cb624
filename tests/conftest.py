"""Shared fixtures: tiny random MoE checkpoints of every supported family (several shards), calibration text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hc_smoe_hub.synthetic import FAMILY_CONFIGS, build_tiny_moe, calibration_text

FAMILIES = sorted(FAMILY_CONFIGS)
# The merges the engine tests run go to this device (benchmarks/gpu_check.sh sets cuda); the CPU by default.
TEST_DEVICE = os.environ.get("HC_SMOE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny_moe(root / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    return calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture()
def merge_args(calib_file):
    """CLI arguments for a fast offline merge."""
    return ["--no-push", "--skip-eval", "--calibration", str(calib_file), "--num-samples", "4", "--seq-len", "64", "-q",
            "--device", TEST_DEVICE]
