"""Train the small MoE demo models shipped in `hc_smoe_hub/demo/` and build their data, from Python docs.

The text is the reStructuredText source of the Python 3.11 documentation as packaged by Debian
(`apt-get install python3.11-doc`, PSF License Agreement), cleaned to prose. Documents (one per .rst file) are
split deterministically into train / calibration / held-out, so held-out text is never seen in training. One
byte-level BPE tokenizer is trained on the train split and saved into each model directory. Then two MoE
models are trained from scratch on one CPU thread (the other core of the build machine is someone else's):

* `mixtral-demo`  -- MixtralConfig, 8 experts, top-2.
* `qwen-moe-demo` -- Qwen2MoeConfig, 16 experts, top-4, a shared expert, `norm_topk_prob=False`
  (as Qwen1.5-MoE).
* `qwen15-moe-demo` -- Qwen2MoeConfig with Qwen1.5-MoE-A2.7B's expert layout: 60 small routed experts, top-4,
  a shared expert with its sigmoid gate, `norm_topk_prob=False`.

All three use a router load-balancing loss, applied per layer, so every expert of every layer is trained. The final
models are saved in bfloat16 and evaluated (held-out next-token loss, expert usage, the lm-eval demo tasks);
numbers go to `demo/metrics.json`.

Usage (from the repository root; the whole run is seeded):

    python scripts/train_demo.py                     # data + tokenizer + all models + evaluation
    python scripts/train_demo.py --data-only         # rebuild only the data files and the tokenizer
    python scripts/train_demo.py --models mixtral    # one model
    python scripts/train_demo.py --models qwen15-moe # only the 60-expert model (the others stay as shipped)

Data files and the tokenizer are rewritten only when their content changes, so training one model leaves the
shipped data of the others byte-identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

log = logging.getLogger("train_demo")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "hc_smoe_hub" / "demo"
DATA = DEMO / "data"
SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
SOURCE_PACKAGE = "Debian package python3.11-doc (Python 3.11 documentation, reStructuredText sources)"
TEXT_SOURCE = (
    "text from the Python 3.11 documentation (Debian package python3.11-doc, "
    "/usr/share/doc/python3.11/html/_sources), Copyright (c) 2001-2023 Python Software Foundation, "
    "used under the PSF License Agreement (https://docs.python.org/3/license.html)."
)
LICENCE_LINE = (  # the NOTICE of each model directory
    f"Trained on {TEXT_SOURCE} "
    "The model weights and tokenizer are released under the hc-smoe-hub project licence (Apache-2.0)."
)
DATA_NOTICE = (  # the NOTICE of the data directory: its files are lightly cleaned excerpts of the docs
    f"The files in this directory are excerpts of {TEXT_SOURCE} The reStructuredText markup was stripped and "
    "code examples removed by scripts/train_demo.py; heldout_mc.jsonl recombines sentence halves into "
    "multiple-choice items. Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved."
)

SEED = 1234
VOCAB_SIZE = 4096
SEQ_LEN = 256
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
HELDOUT_CHARS = 400_000  # about 100k tokens: enough for a stable perplexity, small enough to evaluate fast
CALIB_CHARS = 700_000  # about 170k tokens: > 32 blocks x 256 tokens, with room to sample different blocks
MC_ITEMS = 400

# ------------------------------------------------------------------------------------------------------------
# reStructuredText -> prose
# ------------------------------------------------------------------------------------------------------------

# Directives that document an API object: drop the signature (and its continuation lines), keep the body.
SIGNATURE = {
    "function", "method", "class", "data", "attribute", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "describe",
    "object", "opcode", "cmdoption", "option", "envvar", "pdbcommand", "c:function", "c:member", "c:type",
    "c:var", "c:macro", "c:struct", "c:data",
}
# Remarks whose body (possibly starting right under the directive) is prose.
ADMONITION = {
    "note", "warning", "seealso", "important", "caution", "attention", "tip", "hint", "impl-detail",
    "availability", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
}
VERSION_PREFIX = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
UNDERLINE = re.compile(r"^([=\-~^*+#\"'`.:_])\1{2,}\s*$")
SIMPLE_TABLE = re.compile(r"^=+(\s+=+)+$")
BULLET = re.compile(r"^(\*|-|\+|#\.|\d+\.|\(\d+\))\s+")
ROLE = re.compile(r":[\w:.+-]+:`([^`]+)`")
LITERAL = re.compile(r"``(.+?)``")
LINK = re.compile(r"`([^`<]+?)\s*(<[^>]*>)?`__?")
STRONG = re.compile(r"\*\*([^*\s](?:[^*]*?[^*\s])?)\*\*")
EMPH = re.compile(r"(?<![\w*])\*([^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])")
FOOTNOTE = re.compile(r"\s*\[(#\w*|\d+|\*)\]_")
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]][.!?])\s+(?=[A-Z])")


def _role_text(match: re.Match[str]) -> str:
    """`:func:`~a.b.c`` -> c, `:ref:`Title <label>`` -> Title, `:keyword:`!if`` -> if."""
    body = match.group(1).strip()
    titled = re.match(r"^(.*?)\s*<[^>]*>$", body, re.S)
    if titled and titled.group(1):
        return titled.group(1)
    body = body.lstrip("!")
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    return body


def clean_inline(text: str) -> str:
    text = FOOTNOTE.sub("", text)
    text = ROLE.sub(_role_text, text)
    text = LITERAL.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    text = STRONG.sub(r"\1", text)
    text = EMPH.sub(r"\1", text)
    text = re.sub(r"\|(\w+)\|", r"\1", text)
    text = text.replace("\\ ", "").replace("\\*", "*").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_prose(par: str) -> bool:
    """A paragraph worth keeping: a few words, mostly letters, not a code line or a table row."""
    if len(par.split()) < 6 or par.startswith((">>>", "...", "$ ", "%", "#")):
        return False
    letters = sum(c.isalpha() for c in par)
    return letters >= 0.6 * len(par.replace(" ", "")) and any(c.islower() for c in par)


def rst_to_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of one .rst file: directives, code, tables and titles dropped, inline markup removed.

    A light line-based pass, not a full rst parser: what it gets wrong is a little markup or code left in,
    which is harmless for a demo language model.
    """
    lines = [line.rstrip() for line in source.expandtabs(8).splitlines()]
    paragraphs: list[str] = []
    current: list[str] = []
    current_indent = 0
    skip_deeper_than: int | None = None  # drop lines indented deeper than this (a code block, a comment body)
    literal_indent: int | None = None  # the last paragraph ended with "::": a deeper block after it is code

    def flush() -> None:
        nonlocal literal_indent
        if not current:
            return
        par = " ".join(current)
        current.clear()
        if par.endswith("::"):
            literal_indent = current_indent
            # "text::" -> "text:", "text ::" -> "text"
            par = par[:-1] if not par.endswith(" ::") else par[:-3]
        par = clean_inline(par)
        if _is_prose(par):
            paragraphs.append(par)

    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if skip_deeper_than is not None:
            if not line or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not line:
            flush()
            continue
        indent, stripped = _indent(line), line.strip()
        if literal_indent is not None:
            block_is_code = indent > literal_indent and not current
            literal_indent = None
            if block_is_code:
                skip_deeper_than = indent - 1
                continue
        if UNDERLINE.match(stripped):
            flush()  # a title's under/overline, or a transition
            continue
        underlined = i < len(lines) and UNDERLINE.match(lines[i].strip())
        if underlined and len(lines[i].strip()) >= len(stripped) - 2:
            flush()  # this line is underlined: a title, not prose
            continue
        if SIMPLE_TABLE.match(stripped):
            flush()  # a simple table: skip to its bottom border (a border followed by a blank line)
            while i < len(lines) and not (SIMPLE_TABLE.match(lines[i].strip())
                                          and (i + 1 == len(lines) or not lines[i + 1].strip())):
                i += 1
            i += 1
            continue
        if stripped.startswith(("+-", "+=", "|", ">>>")):
            flush()  # a grid table or a doctest block: skip to the next blank line
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        directive = DIRECTIVE.match(line)
        if directive:
            flush()
            name, arg = directive.group(2), directive.group(3).strip()
            if name in SIGNATURE:
                while i < len(lines) and lines[i].strip():  # signature continuation lines and options
                    i += 1
                continue
            if name in ADMONITION:
                while i < len(lines) and lines[i].strip().startswith(":"):  # options
                    i += 1
                if name in VERSION_PREFIX and arg:
                    version, _, rest = arg.partition(" ")
                    prefix = VERSION_PREFIX[name].format(version.rstrip(","))
                    current.append(f"{prefix} {rest}" if rest else prefix)
                elif arg and name != "availability":
                    current.append(arg)
                current_indent = indent
                continue
            skip_deeper_than = indent  # code-block, toctree, index, productionlist, ...: drop the body
            continue
        if stripped.startswith(".."):
            flush()  # a comment or a link target, with its indented continuation
            skip_deeper_than = indent
            continue
        if BULLET.match(stripped):
            flush()
            stripped = BULLET.sub("", stripped)
        if not current:
            current_indent = indent
        current.append(stripped)
    flush()
    return paragraphs


@dataclass
class Document:
    name: str  # path of the .rst file, relative to the docs root
    text: str  # paragraphs separated by blank lines


def load_documents(root: Path = SOURCE) -> list[Document]:
    if not root.is_dir():
        raise SystemExit(f"{root} is missing: run `apt-get install -y python3.11-doc` first")
    docs = []
    for path in sorted(root.rglob("*.rst.txt")):
        name = str(path.relative_to(root)).removesuffix(".rst.txt")
        paragraphs = rst_to_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        text = "\n\n".join(paragraphs)
        if len(text) >= 300:  # index pages and stubs carry no prose
            docs.append(Document(name, text))
    return docs


def split_documents(docs: list[Document], seed: int = SEED) -> dict[str, list[Document]]:
    """Whole documents go to one split each: shuffled with `seed`; held-out and calibration fill first."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    splits: dict[str, list[Document]] = {"heldout": [], "calibration": [], "train": []}
    sizes = {"heldout": 0, "calibration": 0}
    for doc in order:
        if sizes["heldout"] < HELDOUT_CHARS and len(doc.text) < HELDOUT_CHARS // 3:
            target = "heldout"
        elif sizes["calibration"] < CALIB_CHARS and len(doc.text) < CALIB_CHARS // 3:
            target = "calibration"
        else:
            target = "train"
        splits[target].append(doc)
        sizes[target] = sizes.get(target, 0) + len(doc.text)
    return splits


# ------------------------------------------------------------------------------------------------------------
# Held-out multiple-choice task
# ------------------------------------------------------------------------------------------------------------


def _sentences(text: str) -> list[list[str]]:
    """Sentences of each paragraph, as lists of sentences (kept per paragraph so a context can look back)."""
    return [SENTENCE_END.split(par) for par in text.split("\n\n")]


def build_mc_items(heldout: list[Document], n_items: int = MC_ITEMS,
                   seed: int = SEED) -> list[dict[str, Any]]:
    """Sentence-completion items: the true end of a held-out sentence against 3 ends of other sentences.

    The context is the previous sentence of the same paragraph (when there is one) plus the first half of the
    sentence, so the model has enough to go on; distractor endings have a similar length to the true one so
    that the raw log-likelihood (metric acc) is not decided by length alone.
    """
    rng = random.Random(seed)
    candidates: list[tuple[str, str]] = []  # (context, true ending)
    for doc in heldout:
        for par in _sentences(doc.text):
            for j, sent in enumerate(par):
                words = sent.split()
                if not 10 <= len(words) <= 40 or not sent.endswith((".", "!", "?")):
                    continue
                if sum(c.isalpha() for c in sent) < 0.7 * len(sent.replace(" ", "")):
                    continue
                cut = len(words) // 2
                prefix = " ".join(words[:cut])
                context = f"{par[j - 1]} {prefix}" if j > 0 and len(par[j - 1].split()) <= 60 else prefix
                candidates.append((context, " ".join(words[cut:])))
    rng.shuffle(candidates)
    items = []
    endings = [end for _, end in candidates]
    for context, true_end in candidates:
        if len(items) == n_items:
            break
        similar = [e for e in endings
                   if e != true_end and abs(len(e) - len(true_end)) <= 0.25 * len(true_end)]
        if len(set(similar)) < 3:
            continue
        choices = rng.sample(sorted(set(similar)), 3) + [true_end]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true_end)})
    return items


def write_if_changed(path: Path, text: str) -> None:
    """Write `text` to `path` unless the file already holds exactly it (so shipped files keep their bytes)."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    log.warning("%s changed: rewriting it", path.relative_to(REPO))
    path.write_text(text, encoding="utf-8")


def write_data(splits: dict[str, list[Document]]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    write_if_changed(DATA / "NOTICE", DATA_NOTICE + "\n")
    write_if_changed(DATA / "calibration.txt", "\n\n".join(d.text for d in splits["calibration"]) + "\n")
    write_if_changed(DATA / "heldout.jsonl", "".join(
        json.dumps({"text": doc.text, "source": doc.name}) + "\n" for doc in splits["heldout"]))
    write_if_changed(DATA / "heldout_mc.jsonl", "".join(
        json.dumps(item) + "\n" for item in build_mc_items(splits["heldout"])))
    split_names = {k: [d.name for d in v] for k, v in splits.items()}
    write_if_changed(DATA / "splits.json", json.dumps(split_names, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and models
# ------------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # No BOS is added on encode: training text is a stream of documents separated by </s>, which is also the
    # prefix token lm-eval puts in front of a rolling-loglikelihood document.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=SEQ_LEN, clean_up_tokenization_spaces=False)


COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, max_position_embeddings=SEQ_LEN, tie_word_embeddings=True, bos_token_id=BOS_ID,
    eos_token_id=EOS_ID, pad_token_id=PAD_ID, rms_norm_eps=1e-5, rope_theta=10_000.0, initializer_range=0.02,
    router_aux_loss_coef=0.01,
)
MODEL_CONFIGS: dict[str, PretrainedConfig] = {
    "mixtral": MixtralConfig(
        hidden_size=192, intermediate_size=256, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=None, **COMMON,
    ),
    "qwen-moe": Qwen2MoeConfig(
        hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, **COMMON,
    ),
    # Qwen1.5-MoE-A2.7B's expert layout (60 routed experts, top-4, one gated shared expert), scaled down so the
    # directory stays the size of the others: the experts are narrow (32), not few.
    "qwen15-moe": Qwen2MoeConfig(
        hidden_size=192, intermediate_size=512, moe_intermediate_size=32,
        shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, **COMMON,
    ),
}
MODEL_DIRS = {"mixtral": DEMO / "mixtral-demo", "qwen-moe": DEMO / "qwen-moe-demo",
              "qwen15-moe": DEMO / "qwen15-moe-demo"}


@dataclass
class TrainArgs:
    steps: int = 1100
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = SEED


def encode_stream(tok: PreTrainedTokenizerFast, docs: list[Document]) -> torch.Tensor:
    """Documents as one token stream, each preceded by </s> (the separator lm-eval also uses as prefix)."""
    ids: list[int] = []
    for doc in docs:
        ids.append(EOS_ID)
        ids.extend(tok(doc.text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int,
                           top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed for each layer separately, then averaged.

    transformers' own `aux_loss` pools the router logits of all layers before balancing, so it is satisfied
    when expert e is busy in one layer and idle in another: a first run with it left some experts of a layer
    with < 0.1% of the tokens. Balancing each layer keeps every expert of every layer in use, as in real MoEs.
    """
    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def train_model(config: PretrainedConfig, stream: torch.Tensor, args: TrainArgs) -> tuple[Any, float]:
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM parameters, %d steps of %d x %d tokens", config.model_type, n_params / 1e6,
             args.steps, args.batch_size, SEQ_LEN)
    start = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                    batch[:, 1:].flatten())
        aux = per_layer_balance_loss(out.router_logits, num_experts, config.num_experts_per_tok)
        (lm_loss + config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            log.info("step %5d  lm loss %.4f  balance %.4f  lr %.2e  %.0fs", step, lm_loss.item(), aux.item(),
                     lr_at(step, args), time.time() - start)
    return model, time.time() - start


@torch.no_grad()
def heldout_loss(model: Any, stream: torch.Tensor, max_blocks: int | None = None) -> float:
    """Mean next-token cross-entropy over non-overlapping SEQ_LEN blocks of the held-out token stream."""
    model.eval()
    n_blocks = len(stream) // SEQ_LEN if max_blocks is None else min(max_blocks, len(stream) // SEQ_LEN)
    blocks = stream[: n_blocks * SEQ_LEN].view(n_blocks, SEQ_LEN)
    total, count = 0.0, 0
    for chunk in blocks.split(16):
        logits = model(input_ids=chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return total / count


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Cross-entropy on the held-out stream of an add-one unigram model of the train stream (bar to beat)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout].mean())


@torch.no_grad()
def expert_usage(model: Any, stream: torch.Tensor, n_blocks: int = 64) -> list[list[float]]:
    """Fraction of routed (token, slot) assignments each expert receives, per layer, on held-out text."""
    blocks = stream[: n_blocks * SEQ_LEN].view(n_blocks, SEQ_LEN)
    top_k = model.config.num_experts_per_tok
    counts: list[Counter[int]] = []
    for chunk in blocks.split(16):
        out = model(input_ids=chunk, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            if len(counts) <= layer:
                counts.append(Counter())
            counts[layer].update(logits.float().topk(top_k, dim=-1).indices.flatten().tolist())
    num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    return [[round(c[e] / sum(c.values()), 4) for e in range(num_experts)] for c in counts]


def run_lm_eval(model_dir: Path) -> dict[str, float]:
    """Scores of the shipped lm-eval demo tasks, exactly as a user of `hc_smoe_hub.demo` would run them."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hc_smoe_hub.demo import DEMO_TASKS, task_dir

    lm = HFLM(pretrained=str(model_dir), tokenizer=str(model_dir), batch_size=8, device="cpu")
    task_manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=DEMO_TASKS, task_manager=task_manager)
    mc, ppl = res["results"]["demo_mc"], res["results"]["demo_ppl"]
    return {"acc": mc["acc,none"], "acc_stderr": mc["acc_stderr,none"], "acc_norm": mc["acc_norm,none"],
            "acc_norm_stderr": mc["acc_norm_stderr,none"], "word_perplexity": ppl["word_perplexity,none"],
            "byte_perplexity": ppl["byte_perplexity,none"], "bits_per_byte": ppl["bits_per_byte,none"]}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--steps", type=int, default=TrainArgs.steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("--no-lm-eval", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    docs = load_documents()
    splits = split_documents(docs)
    for name, part in splits.items():
        log.info("%s: %d documents, %d chars", name, len(part), sum(len(d.text) for d in part))
    write_data(splits)
    tok = train_tokenizer([d.text for d in splits["train"]])
    streams = {name: encode_stream(tok, part) for name, part in splits.items()}
    for name, stream in streams.items():
        log.info("%s: %d tokens", name, len(stream))
    unigram = unigram_loss(streams["train"], streams["heldout"], VOCAB_SIZE)
    log.info("unigram held-out loss %.4f, uniform %.4f", unigram, math.log(VOCAB_SIZE))

    metrics_path = DEMO / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["data"] = {
        "source": SOURCE_PACKAGE, "licence": "PSF License Agreement", "seed": SEED,
        "documents": {k: len(v) for k, v in splits.items()},
        "tokens": {k: len(v) for k, v in streams.items()},
        "unigram_heldout_loss": round(unigram, 4), "uniform_loss": round(math.log(VOCAB_SIZE), 4),
    }
    if args.data_only:
        metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
        return

    for name in args.models:
        out_dir = MODEL_DIRS[name]
        train_args = TrainArgs(steps=args.steps)
        model, wall = train_model(MODEL_CONFIGS[name], streams["train"], train_args)
        fp32_loss = heldout_loss(model, streams["heldout"])
        # Save next to the target first, so a crash never leaves a half-written model in the package.
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "NOTICE").write_text(LICENCE_LINE + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
        saved = AutoModelForCausalLM.from_pretrained(out_dir)  # the shipped bf16 weights, as users load them
        entry: dict[str, Any] = {
            "dir": str(out_dir.relative_to(REPO)),
            "config": {k: v for k, v in saved.config.to_diff_dict().items() if k != "transformers_version"},
            "train": {**vars(train_args), "seq_len": SEQ_LEN, "threads": args.threads,
                      "tokens_seen": train_args.steps * train_args.batch_size * SEQ_LEN},
            "train_wall_s": round(wall, 1),
            "parameters": sum(p.numel() for p in saved.parameters()),
            "heldout_loss_fp32": round(fp32_loss, 4),
            "heldout_loss_bf16": round(heldout_loss(saved, streams["heldout"]), 4),
            "expert_usage": expert_usage(saved, streams["heldout"]),
            "size_bytes": dir_size(out_dir),
        }
        log.info("%s: held-out loss %.4f (bf16), %.4f (fp32), %d bytes, %.0f s", name,
                 entry["heldout_loss_bf16"], fp32_loss, entry["size_bytes"], wall)
        if not args.no_lm_eval:
            entry["lm_eval"] = run_lm_eval(out_dir)
            log.info("%s: lm-eval %s", name, entry["lm_eval"])
        metrics[name] = entry
        metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")


if __name__ == "__main__":
    main()
