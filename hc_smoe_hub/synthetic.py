"""Tiny random MoE checkpoints of every supported family, saved in several shards, for tests and benchmarks.

Built from configs with stock transformers (no download), with a small byte-level BPE tokenizer trained on the
spot, so that a checkpoint directory looks exactly like one pulled from the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SAMPLE_TEXT = (
    "Mixture-of-experts models route every token to a few experts. Merging experts that behave alike makes the "
    "model smaller while it keeps most of what it knew. Hierarchical clustering groups experts by their outputs "
    "on calibration text, and each group becomes a single expert. "
)

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                "intermediate_size": 48},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 4, "norm_topk_prob": False,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1]},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                  "moe_intermediate_size": 32, "intermediate_size": 64, "head_dim": 16},
    "olmoe": {"model_type": "olmoe", "num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32},
}


def build_tokenizer(directory: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(directory)
    return fast


def tiny_config(family: str, num_layers: int = 3, hidden: int = 32, **overrides: Any):
    fields = dict(FAMILY_CONFIGS[family])
    model_type = fields.pop("model_type")
    fields.update(vocab_size=320, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                  pad_token_id=1, tie_word_embeddings=False)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def build_tiny_moe(directory: Path, family: str = "mixtral", *, num_layers: int = 3, hidden: int = 32,
                   seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "40KB",
                   **overrides: Any) -> Path:
    """Save a randomly initialised tiny MoE (and tokenizer) of `family` into `directory`, in several shards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_config(family, num_layers, hidden, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the default init, so experts differ visibly and routing is not uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
    build_tokenizer(directory)
    return directory


def calibration_text(path: Path, paragraphs: int = 200, seed: int = 0) -> Path:
    """A local .txt calibration file of shuffled sentences, blank-line separated."""
    g = torch.Generator().manual_seed(seed)
    words = SAMPLE_TEXT.split()
    paras = []
    for _ in range(paragraphs):
        idx = torch.randint(len(words), (40,), generator=g).tolist()
        paras.append(" ".join(words[i] for i in idx))
    Path(path).write_text("\n\n".join(paras) + "\n")
    return Path(path)
