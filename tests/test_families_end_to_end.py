"""Every family of the table end to end: each method, evaluation with lm-eval, the model card.

The family tests (test_families*.py, test_granite.py, test_qwen3_5_moe.py, test_gptoss.py) check the routing,
the layouts and keep-N identity with the default method and `--paper`. Here every family's tiny checkpoint goes
through the whole job (merge, lm-eval on the original and the merged model, card), and every method of the
registry runs on one family per routing strategy, its output loaded with stock `from_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import SPECS, spec_for
from hc_smoe_hub.cli import main
from hc_smoe_hub.demo import task_dir
from hc_smoe_hub.methods import METHODS
from hc_smoe_hub.synthetic import FAMILY_CONFIGS, MODERN_FAMILY_CONFIGS, build_tiny_moe
from hc_smoe_hub.synthetic_layouts import build_tiny_qwen3_5_moe

IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(5))
BUILDERS = {name: (lambda d, n=name: build_tiny_moe(d, n)) for name in {**FAMILY_CONFIGS, **MODERN_FAMILY_CONFIGS}}
BUILDERS["qwen3_5_moe"] = build_tiny_qwen3_5_moe
# One family per routing strategy and expert storage: softmax per-expert (Mixtral), sigmoid with a selection bias
# and groups (DeepSeek-V3), a (1, N) bias (ERNIE), sparsemixer (Phi-3.5-MoE), top-k-then-softmax with fused experts
# (Granite), linear attention with a gated shared expert (Qwen3-Next), biased clamped experts (gpt-oss).
STRATEGIES = ["mixtral", "deepseek_v3", "ernie4_5_moe", "phimoe", "granitemoe", "qwen3_next", "gpt_oss"]


def reduced_keep(src: Path) -> int:
    """A K < N that the family's routing accepts (grouped routers take only some; sparsemixer needs two)."""
    config = json.loads((src / "config.json").read_text())
    spec = spec_for(config)
    n = spec.num_experts(config)
    valid = spec.scoring.valid_keeps(spec.cfg(config), n, spec.top_k(config))
    return max(2, n // 2) if valid is None else max(k for k in valid if k < n)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    return {name: build(root / name) for name, build in sorted(BUILDERS.items())}


def test_every_family_of_the_table_has_a_tiny_checkpoint(sources):
    """The builders cover the table: each row's model_type is built here (Llama 4 is refused, not a row)."""
    built = {json.loads((p / "config.json").read_text())["model_type"] for p in sources.values()}
    for spec in SPECS:
        assert set(spec.model_types) & built, f"no tiny checkpoint of {spec.family}"


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_merge_evaluate_and_card(family, sources, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, out = sources[family], tmp_path / "out"
    keep = reduced_keep(src)
    assert main([str(src), "--keep", str(keep), "--output-dir", str(out), "--no-push", "--calibration",
                 str(calib_file), "--num-samples", "4", "--seq-len", "64", "--tasks", "demo_ppl", "--include-path",
                 str(task_dir()), "--limit", "4", "-q"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    for side in ("original", "merged"):
        scores = results[side]["demo_ppl"]
        assert scores and all(math.isfinite(v) for v in scores.values() if isinstance(v, float)), (side, scores)
    card = (out / "README.md").read_text()
    assert "https://arxiv.org/abs/2410.08589" in card and "demo_ppl" in card
    prov = json.loads((out / "hc_smoe.json").read_text())
    assert all(len(layer["clusters"]) == keep for layer in prov["layers"])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", STRATEGIES)
def test_every_method_on_every_routing_strategy(family, method, sources, calib_file, tmp_path):
    src, out = sources[family], tmp_path / "out"
    keep = reduced_keep(src)
    assert main([str(src), "--keep", str(keep), "--output-dir", str(out), "--method", method, "--no-push",
                 "--skip-eval", "--calibration", str(calib_file), "--num-samples", "4", "--seq-len", "64",
                 "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    spec = spec_for(config)
    assert spec.num_experts(config) == keep
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    prov = json.loads((out / "hc_smoe.json").read_text())
    assert prov["method"] == method and prov["experts_after"] == keep
    for layer in prov["layers"]:
        members = [i for g in layer["clusters"] for i in g]
        assert len(layer["clusters"]) == keep and len(members) == len(set(members))  # no expert used twice
