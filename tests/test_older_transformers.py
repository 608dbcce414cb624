"""Merged checkpoints load in transformers 4.57 too, as older serving stacks (vLLM and others) run it.

Every tiny family checkpoint whose `model_type` transformers 4.57 knows is merged to fewer experts with the default
method; a subprocess running transformers 4.57 (installed by scripts/dev_setup.sh into .venv/transformers-4.57,
beside the project's own 5.x) loads each merged checkpoint with stock `from_pretrained` and computes logits, which
must equal those of transformers 5 on the same checkpoint. A family that 4.57 does not know is reported by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.cli import main
from hc_smoe_hub.synthetic import FAMILY_CONFIGS, MODERN_FAMILY_CONFIGS, build_tiny_moe

OLD = Path(__file__).resolve().parents[1] / ".venv" / "transformers-4.57"
IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))

LOADER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert transformers.__version__.startswith("4.57"), transformers.__version__
jobs = json.loads(sys.argv[1])
ids = torch.tensor(jobs["ids"])
out = {"known": sorted(CONFIG_MAPPING.keys()), "logits": {}}
for name, path in jobs["models"].items():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out["logits"][name] = model(ids).logits.tolist()
print(json.dumps(out))
"""


def reduced_keep(src: Path) -> int:
    """A K < N that the family's routing accepts (grouped routers take only some)."""
    config = json.loads((src / "config.json").read_text())
    spec = spec_for(config)
    n = spec.num_experts(config)
    valid = spec.scoring.valid_keeps(spec.cfg(config), n, spec.top_k(config))
    return n // 2 if valid is None else max(k for k in valid if k < n)


def old_known_types() -> set[str]:
    run = subprocess.run([sys.executable, "-c", "from transformers.models.auto.configuration_auto import "
                          "CONFIG_MAPPING; print(' '.join(CONFIG_MAPPING.keys()))"],
                         env={**os.environ, "PYTHONPATH": str(OLD)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(run.stdout.split())


@pytest.fixture(scope="module")
def merged(tmp_path_factory, merge_args) -> dict[str, Path]:
    assert (OLD / "transformers").is_dir(), (
        f"transformers 4.57 is not installed in {OLD}: run scripts/dev_setup.sh (it installs it there)")
    known = old_known_types()
    root = tmp_path_factory.mktemp("old")
    out: dict[str, Path] = {}
    for family in sorted({**FAMILY_CONFIGS, **MODERN_FAMILY_CONFIGS}):
        src = build_tiny_moe(root / family, family)
        if json.loads((src / "config.json").read_text())["model_type"] not in known \
                and spec_for(json.loads((src / "config.json").read_text())).load_as not in known:
            continue
        dst = root / f"{family}-merged"
        assert main([str(src), "--keep", str(reduced_keep(src)), "--output-dir", str(dst), *merge_args]) == 0
        out[family] = dst
    return out


@pytest.fixture(scope="module")
def merge_args(tmp_path_factory) -> list[str]:
    from hc_smoe_hub.synthetic import calibration_text

    calib = calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt")
    return ["--no-push", "--skip-eval", "--calibration", str(calib), "--num-samples", "4", "--seq-len", "64", "-q"]


def test_merged_checkpoints_load_in_transformers_4_57(merged):
    # The families of the table that 4.57 knows: Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 at least.
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"} <= set(merged)
    jobs = {"ids": IDS.tolist(), "models": {name: str(path) for name, path in merged.items()}}
    run = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(OLD)}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    old = json.loads(run.stdout.strip().splitlines()[-1])["logits"]
    assert set(old) == set(merged)
    for name, path in merged.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            new = model(IDS).logits
        got = torch.tensor(old[name])
        assert got.shape == new.shape, name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, new, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
