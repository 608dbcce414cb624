"""The demo assets shipped in `hc_smoe_hub/demo/` are present, small, really trained and usable by lm-eval.

These guard the data that merge-quality checks rely on: if a model were untrained (or re-saved at random), the
held-out loss bar below would catch it, and a random model of the same config is shown to fail that bar.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hc_smoe_hub.demo import CALIBRATION_TEXT, DEMO_MODELS, DEMO_TASKS, HELDOUT_MC, HELDOUT_TEXT, task_dir

MAX_DIR_BYTES = 15 * 1024 * 1024
SEQ_LEN = 256
EXPECTED = {
    # name: (model_type, config key of the expert count, experts, top-k)
    "mixtral": ("mixtral", "num_local_experts", 8, 2),
    "qwen-moe": ("qwen2_moe", "num_experts", 16, 4),
    "qwen15-moe": ("qwen2_moe", "num_experts", 60, 4),  # Qwen1.5-MoE-A2.7B's expert layout
}
METRICS = json.loads((DEMO_MODELS["mixtral"].parent / "metrics.json").read_text())


def _heldout_blocks(tokenizer, n_blocks: int = 6) -> torch.Tensor:
    """The first `n_blocks` x 256 tokens of the held-out documents, each document preceded by </s>."""
    ids: list[int] = []
    with open(HELDOUT_TEXT) as f:
        for line in f:
            ids.append(tokenizer.eos_token_id)
            ids.extend(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
            if len(ids) >= n_blocks * SEQ_LEN:
                break
    return torch.tensor(ids[: n_blocks * SEQ_LEN]).view(n_blocks, SEQ_LEN)


@torch.no_grad()
def _mean_loss(model, blocks: torch.Tensor) -> float:
    return float(model(input_ids=blocks, labels=blocks).loss)


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_model_config_and_size(name):
    model_type, count_key, experts, top_k = EXPECTED[name]
    directory = DEMO_MODELS[name]
    config = AutoConfig.from_pretrained(directory)
    assert config.model_type == model_type
    assert getattr(config, count_key) == experts
    assert config.num_experts_per_tok == top_k
    if model_type == "qwen2_moe":  # Qwen1.5-MoE style: a shared expert in every layer, no top-k renormalising
        assert config.shared_expert_intermediate_size > 0
        assert config.norm_topk_prob is False
        assert config.decoder_sparse_step == 1 and not config.mlp_only_layers
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert size <= MAX_DIR_BYTES, f"{directory} is {size} bytes"
    assert (directory / "NOTICE").read_text().strip()


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_model_is_trained(name):
    directory = DEMO_MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()  # no trust_remote_code: stock classes
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    assert len(tokenizer) == model.config.vocab_size
    assert next(model.parameters()).dtype == torch.bfloat16
    blocks = _heldout_blocks(tokenizer)
    bar = 0.8 * math.log(model.config.vocab_size)
    loss = _mean_loss(model, blocks)
    assert loss < bar, f"{name}: held-out loss {loss:.3f} is not below {bar:.3f}"

    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config).eval()
    assert _mean_loss(untrained, blocks) > bar  # the bar is one that an untrained model fails


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_model_routes_as_recorded(name):
    """The shipped weights route the held-out text as metrics.json (and TRAINING.md) record, every expert used."""
    directory = DEMO_MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    config = model.config
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    counts = torch.zeros(len(METRICS[name]["expert_usage"]), n_experts)
    with torch.no_grad():
        for chunk in _heldout_blocks(tokenizer, 64).split(16):
            logits = model(input_ids=chunk, output_router_logits=True).router_logits
            for layer, layer_logits in enumerate(logits):
                idx = layer_logits.float().topk(config.num_experts_per_tok, dim=-1).indices
                counts[layer] += torch.bincount(idx.flatten(), minlength=n_experts).float()
    usage = counts / counts.sum(dim=1, keepdim=True)
    recorded = torch.tensor(METRICS[name]["expert_usage"])
    assert torch.allclose(usage, recorded, atol=2e-3), (usage - recorded).abs().max()
    assert float(usage.min()) > 0.1 / n_experts  # the per-layer balancing loss left no expert idle
    assert METRICS[name]["config"]["num_experts_per_tok"] == config.num_experts_per_tok


def test_calibration_text_is_long_enough():
    assert CALIBRATION_TEXT.stat().st_size < 3 * 1024 * 1024
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODELS["mixtral"])
    n_tokens = len(tokenizer(CALIBRATION_TEXT.read_text(), add_special_tokens=False)["input_ids"])
    assert n_tokens >= 32 * SEQ_LEN
    assert "\n\n" in CALIBRATION_TEXT.read_text()  # documents separated by blank lines


def test_heldout_mc_items_are_well_formed():
    items = [json.loads(line) for line in HELDOUT_MC.read_text().splitlines()]
    assert 300 <= len(items) <= 500
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert 0 <= item["label"] < 4 and item["context"].strip()


def test_demo_tasks_load_with_lm_eval():
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    manager = lm_eval_tasks.TaskManager(include_path=str(task_dir()), include_defaults=False)
    assert set(DEMO_TASKS) <= set(manager.all_tasks)
    tasks = manager.load(DEMO_TASKS)["tasks"]
    mc, ppl = tasks["demo_mc"], tasks["demo_ppl"]
    assert mc.OUTPUT_TYPE == "multiple_choice" and ppl.OUTPUT_TYPE == "loglikelihood_rolling"
    docs = list(mc.test_docs())
    assert len(docs) == len(HELDOUT_MC.read_text().splitlines())
    assert len(mc.doc_to_choice(docs[0])) == 4
    assert len(list(ppl.test_docs())) == len(HELDOUT_TEXT.read_text().splitlines())
