"""Tests of hc_smoe_hub.evaluation with the real lm-eval on a tiny random Mixtral and local task YAMLs.

Everything is offline: the tokenizer is byte-level and built here, the tasks read JSONL files in tmp_path.
Run: pytest tests/test_evaluation.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HF backend needs it

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast  # noqa: E402

from hc_smoe_hub import evaluation  # noqa: E402
from hc_smoe_hub.errors import HcSmoeError  # noqa: E402
from hc_smoe_hub.eval_cache import cache_path, cached_evaluate  # noqa: E402
from hc_smoe_hub.evaluation import EvalSettings, evaluate, headline  # noqa: E402

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus an end-of-text token: encodes any text, needs no files."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def tiny_mixtral(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config).eval()


MC_TEMPLATE = """task: {name}
tag: tiny_tag
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}{suffix}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PPL_TEMPLATE = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

GROUP_YAML = """group: tiny_group
task:
  - tiny_mc
  - tiny_mc2
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    mc = root / "mc.jsonl"
    with mc.open("w") as handle:
        for i in range(12):
            doc = {"question": f"Question {i}: what comes after {i}?",
                   "choices": [str(i + 1), "blue", "a cat"], "label": 0}
            handle.write(json.dumps(doc) + "\n")
    ppl = root / "ppl.jsonl"
    with ppl.open("w") as handle:
        for i in range(4):
            text = f"The quick brown fox number {i} jumps over the lazy dog."
            handle.write(json.dumps({"text": text}) + "\n")
    (root / "tiny_mc.yaml").write_text(MC_TEMPLATE.format(name="tiny_mc", data=mc, suffix="\\nAnswer:"))
    (root / "tiny_mc2.yaml").write_text(MC_TEMPLATE.format(name="tiny_mc2", data=mc, suffix=" A:"))
    (root / "tiny_ppl.yaml").write_text(PPL_TEMPLATE.format(data=ppl))
    (root / "tiny_group.yaml").write_text(GROUP_YAML)
    return root


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model_a() -> torch.nn.Module:
    return tiny_mixtral(0)


@pytest.fixture(scope="module")
def model_b() -> torch.nn.Module:
    return tiny_mixtral(1)


def settings_for(task_dir: Path, tasks: list[str], **kw) -> EvalSettings:
    return EvalSettings(tasks=tasks, include_path=str(task_dir), **({"batch_size": 4} | kw))


def test_metrics_present_and_in_range(task_dir, tokenizer, model_a):
    results = evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_mc", "tiny_ppl"]))
    assert set(results) == {"tiny_mc", "tiny_ppl"}
    mc, ppl = results["tiny_mc"], results["tiny_ppl"]
    assert set(mc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0 and mc["acc_stderr"] >= 0.0
    # Accuracy over 12 documents is a multiple of 1/12.
    assert math.isclose(mc["acc"] * 12, round(mc["acc"] * 12), abs_tol=1e-9)
    # Stderrs lm-eval cannot compute ("N/A") are dropped, the perplexities kept.
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert ppl["word_perplexity"] > 1.0 and ppl["byte_perplexity"] > 1.0
    # A random model over 257 tokens is near uniform: about 8 bits per byte, perplexity about 257 per byte.
    assert 6.0 < ppl["bits_per_byte"] < 10.0
    assert math.isclose(ppl["bits_per_byte"], math.log2(ppl["byte_perplexity"]), rel_tol=1e-6)
    assert all(isinstance(v, float) for m in results.values() for v in m.values())
    assert headline(results) == mc["acc"]


def test_deterministic_and_models_differ(task_dir, tokenizer, model_a, model_b):
    settings = settings_for(task_dir, ["tiny_ppl", "tiny_mc"])
    first = evaluate(model_a, tokenizer, settings)
    again = evaluate(model_a, tokenizer, settings)
    other = evaluate(model_b, tokenizer, settings)
    assert first == again
    assert first["tiny_ppl"]["word_perplexity"] != other["tiny_ppl"]["word_perplexity"]
    assert first != other


def test_group_keeps_aggregate_and_tag_expands(task_dir, tokenizer, model_a):
    results = evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_group"]))
    assert list(results) == ["tiny_group"]  # the aggregate only, not its subtasks
    assert 0.0 <= results["tiny_group"]["acc"] <= 1.0
    tagged = evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_tag"]))
    assert sorted(tagged) == ["tiny_mc", "tiny_mc2"]
    # The group's aggregate is the size-weighted mean of its two equally sized members.
    mean = (tagged["tiny_mc"]["acc"] + tagged["tiny_mc2"]["acc"]) / 2
    assert math.isclose(results["tiny_group"]["acc"], mean, rel_tol=1e-9)
    assert math.isclose(headline(tagged), mean, rel_tol=1e-9)


def test_evaluate_leaves_caller_state_alone(task_dir, tokenizer, model_a):
    assert tokenizer.pad_token is None
    torch.manual_seed(123)
    state = torch.get_rng_state()
    evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_mc"], limit=3))
    assert tokenizer.pad_token is None  # lm-eval set one on its own copy
    assert torch.equal(torch.get_rng_state(), state)  # simple_evaluate reseeds; we restore
    assert not model_a.training


def test_limit(task_dir, tokenizer, model_a):
    results = evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_mc"], limit=3))
    assert math.isclose(results["tiny_mc"]["acc"] * 3, round(results["tiny_mc"]["acc"] * 3), abs_tol=1e-9)


def test_cache_avoids_second_evaluation(tmp_path, task_dir, tokenizer, model_a, model_b, monkeypatch):
    calls: list[str] = []

    def loader_a():
        calls.append("a")
        return model_a, tokenizer

    evaluations: list[list[str]] = []
    real_evaluate = evaluation.evaluate

    def counting_evaluate(model, tok, settings):
        evaluations.append(settings.tasks)
        return real_evaluate(model, tok, settings)

    monkeypatch.setattr(evaluation, "evaluate", counting_evaluate)
    identity = {"source": "test/tiny-mixtral", "revision": "abc123"}
    settings = settings_for(task_dir, ["tiny_mc", "tiny_ppl"])
    first = cached_evaluate(tmp_path, identity, loader_a, settings)
    second = cached_evaluate(tmp_path, identity, loader_a, settings)
    assert calls == ["a"] and len(evaluations) == 1
    assert first == second
    assert first == real_evaluate(model_a, tokenizer, settings)

    # Batch size and device do not change what is measured: same cache entry.
    reordered = settings_for(task_dir, ["tiny_ppl", "tiny_mc"], batch_size=2)
    cached_evaluate(tmp_path, identity, loader_a, reordered)
    assert calls == ["a"]

    # Another revision or other settings are another measurement.
    cached_evaluate(tmp_path, {**identity, "revision": "def456"}, loader_a, settings)
    cached_evaluate(tmp_path, identity, loader_a, settings_for(task_dir, ["tiny_mc", "tiny_ppl"], limit=4))
    assert calls == ["a", "a", "a"]

    # A corrupt cache entry is ignored and rewritten, not fatal.
    path = cache_path(tmp_path, identity, settings)
    path.write_text("{not json")
    assert cached_evaluate(tmp_path, identity, loader_a, settings) == first
    assert len(calls) == 4
    assert json.loads(path.read_text())["results"] == first


def test_settings_key_follows_task_content(tmp_path, task_dir):
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for f in task_dir.iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    a = settings_for(task_dir, ["tiny_mc"])
    b = settings_for(copy_dir, ["tiny_mc"])
    assert a.key() == b.key()  # same content elsewhere: same key
    (copy_dir / "tiny_mc.yaml").write_text((copy_dir / "tiny_mc.yaml").read_text() + "# edited\n")
    assert a.key() != b.key()
    assert a.key() != settings_for(task_dir, ["tiny_mc"], num_fewshot=5).key()


def test_unknown_task(task_dir, tokenizer, model_a):
    with pytest.raises(HcSmoeError) as info:
        evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_mc", "no_such_task", "nor_this"]))
    message = str(info.value)
    assert "no_such_task" in message and "nor_this" in message and "tiny_mc," not in message
    assert "\n" not in message
    with pytest.raises(HcSmoeError, match="does not exist"):
        evaluate(model_a, tokenizer, settings_for(task_dir / "missing", ["tiny_mc"]))


def test_missing_lm_eval(monkeypatch, tokenizer, model_a, task_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(HcSmoeError, match=r"pip install 'hc-smoe-hub\[eval\]'"):
        evaluate(model_a, tokenizer, settings_for(task_dir, ["tiny_mc"]))


def test_headline():
    assert headline(None) is None
    assert headline({"ppl": {"word_perplexity": 3.0}}) is None
    mixed = {"a": {"acc": 0.5, "acc_norm": 0.9}, "b": {"acc": 0.7}, "c": {"word_perplexity": 9.0}}
    assert headline(mixed) == pytest.approx(0.6)
