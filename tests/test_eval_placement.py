"""Tests of hc_smoe_hub.placement: --max-memory parsing, dtype choice, and evaluation of a model that does not fit.

On CPU: the shipped demo Mixtral (8 experts, 4 layers, 12 MB bf16, 24 MB as float32) is evaluated on the shipped
demo tasks whole, and again under a CPU budget smaller than the model so that accelerate offloads its decoder
layers to disk; the scores must agree. Run: pytest tests/test_eval_placement.py
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

import torch  # noqa: E402

from hc_smoe_hub import placement  # noqa: E402
from hc_smoe_hub.demo import DEMO_MODELS, DEMO_TASKS, task_dir  # noqa: E402
from hc_smoe_hub.errors import HcSmoeError  # noqa: E402
from hc_smoe_hub.evaluation import EvalSettings, evaluate  # noqa: E402
from hc_smoe_hub.placement import eval_dtype, load_for_eval, offloaded_modules, parse_max_memory  # noqa: E402

DEMO = DEMO_MODELS["mixtral"]
CPU = torch.device("cpu")
# Below the model's 24 MB in float32: the embeddings (tied with the head, 3 MB) fit, the decoder layers do not.
SMALL_CPU_BUDGET = {"cpu": 8 * 2**20}


def test_parse_max_memory():
    assert parse_max_memory("0=70GiB,cpu=100GiB") == {0: 70 * 2**30, "cpu": 100 * 2**30}
    assert parse_max_memory(" 1 = 1.5GB , CPU=512MiB,mps=2TB") == {1: 1_500_000_000, "cpu": 512 * 2**20,
                                                                   "mps": 2 * 10**12}
    for bad in ["", "0=70", "gpu=1GiB", "0:70GiB", "0=70GiB,", "cpu=-1GiB", "0=1GiB,0=2GiB", "disk=1GB"]:
        with pytest.raises(HcSmoeError) as info:
            parse_max_memory(bad)
        message = str(info.value)
        assert message.startswith("--max-memory") and "\n" not in message
        assert "e.g. 0=70GiB,cpu=100GiB" in message


def test_eval_dtype(tmp_path):
    config = tmp_path / "config.json"
    for stored, on_gpu in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.bfloat16),
                           (None, torch.bfloat16)]:
        config.write_text(json.dumps({"dtype": stored} if stored else {}))
        assert eval_dtype(tmp_path, torch.device("cuda")) is on_gpu
        assert eval_dtype(tmp_path, CPU) is torch.float32
    config.write_text(json.dumps({"torch_dtype": "float16"}))  # the transformers 4 spelling
    assert eval_dtype(tmp_path, torch.device("cuda:1")) is torch.float16


def test_budget():
    assert placement._budget(CPU, None) is None
    assert placement._budget(CPU, {0: 5, "cpu": 7}) == {"cpu": 7}  # GPU entries mean nothing on CPU
    assert placement._budget(CPU, {0: 5}) is None
    assert placement._budget(torch.device("cuda"), None) is None  # transformers' defaults over every GPU
    if torch.cuda.device_count() == 0:
        with pytest.raises(HcSmoeError, match="names GPU 0, which is not visible here"):
            placement._budget(torch.device("cuda"), {0: 2**30})


def demo_settings() -> EvalSettings:
    return EvalSettings(tasks=list(DEMO_TASKS), include_path=str(task_dir()), limit=6, batch_size=4)


@pytest.fixture(scope="module")
def whole_scores() -> dict:
    model, tokenizer = load_for_eval(DEMO, CPU, None, None)
    assert not getattr(model, "hf_device_map", None)
    assert next(model.parameters()).dtype is torch.float32 and not model.training
    return evaluate(model, tokenizer, demo_settings())


def test_offloaded_model_scores_as_whole(tmp_path, whole_scores):
    offload = tmp_path / "offload"
    model, tokenizer = load_for_eval(DEMO, CPU, SMALL_CPU_BUDGET, offload)
    device_map = model.hf_device_map
    assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
    assert "model.layers" in offloaded_modules(model) or any(
        name.startswith("model.layers") for name in offloaded_modules(model))
    assert any(offload.iterdir())  # the offloaded weights live there
    on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    assert on_meta  # offloaded weights are only loaded while their layer runs
    scores = evaluate(model, tokenizer, demo_settings())
    # evaluate() must not have moved the dispatched model as a whole
    assert model.hf_device_map == device_map
    assert [name for name, p in model.named_parameters() if p.device.type == "meta"] == on_meta
    assert set(scores) == set(whole_scores) == set(DEMO_TASKS)
    for task, metrics in whole_scores.items():
        assert set(scores[task]) == set(metrics)
        for metric, value in metrics.items():
            assert scores[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)


def test_own_offload_folder_removed_with_the_model(monkeypatch, tmp_path):
    made: list[Path] = []
    real_mkdtemp = placement.tempfile.mkdtemp

    def recording_mkdtemp(**kwargs):
        made.append(Path(real_mkdtemp(dir=tmp_path, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(placement.tempfile, "mkdtemp", recording_mkdtemp)
    model, _ = load_for_eval(DEMO, CPU, SMALL_CPU_BUDGET, None)
    assert len(made) == 1 and made[0].is_dir()
    del model
    gc.collect()
    assert not made[0].exists()


@pytest.mark.parametrize("budget", [None, SMALL_CPU_BUDGET], ids=["whole", "offloaded"])
def test_no_reference_survives_evaluation(tmp_path, budget):
    """The original model is freed before the merged one is loaded: nothing lm-eval keeps holds it."""
    model, tokenizer = load_for_eval(DEMO, CPU, budget, tmp_path / "offload")
    settings = EvalSettings(tasks=["demo_mc"], include_path=str(task_dir()), limit=2, batch_size=2)
    evaluate(model, tokenizer, settings)
    ref = weakref.ref(model)
    del model, tokenizer
    gc.collect()
    assert ref() is None
