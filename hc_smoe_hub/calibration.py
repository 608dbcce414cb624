"""Calibration text -> packed token blocks, as the HC-SMoE paper builds them.

Documents are shuffled with the seed, tokenized with the model's tokenizer (its default special tokens),
concatenated and cut into `seq_len` blocks; the first `num_samples` blocks are kept. Only as many documents as
needed are tokenized, which gives the same blocks as tokenizing the whole shuffled set first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hc_smoe_hub.errors import CalibrationError

log = logging.getLogger(__name__)

# The paper's calibration shard: C4 English, first training file.
C4_DATASET = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"
DEFAULT_CALIBRATION = "c4"


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = DEFAULT_CALIBRATION  # "c4", a Hub dataset id, or a local .txt/.jsonl/.json/.json.gz path
    num_samples: int = 32
    seq_len: int = 2048
    seed: int = 42
    text_field: str = "text"
    split: str = "train"

    def describe(self) -> str:
        return f"{self.source} ({self.num_samples} x {self.seq_len} tokens, seed {self.seed})"


def _load_documents(spec: CalibrationSpec, token: str | bool | None = None) -> list[str]:
    path = Path(spec.source).expanduser()
    if path.suffix == ".txt" or (path.exists() and path.is_file() and path.suffix not in {".json", ".jsonl", ".gz"}):
        if not path.exists():
            raise CalibrationError(f"calibration file {path} does not exist: check --calibration")
        # Blank-line separated paragraphs are the documents of a plain text file.
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        return _shuffled(docs, spec.seed)
    import datasets  # deferred: importing datasets costs seconds and is only needed here

    try:
        if path.suffixes[-2:] in ([".json", ".gz"], [".jsonl", ".gz"]) or path.suffix in {".json", ".jsonl"}:
            if not path.exists():
                raise CalibrationError(f"calibration file {path} does not exist: check --calibration")
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        elif spec.source == DEFAULT_CALIBRATION:
            ds = datasets.load_dataset(C4_DATASET, data_files=C4_FILE, split="train", token=token)
        else:
            ds = datasets.load_dataset(spec.source, split=spec.split, token=token)
    except CalibrationError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for "cannot reach / cannot find"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(
            f"cannot load calibration dataset '{spec.source}' ({first[:200]}): check the id and your network, "
            "or pass a local .txt/.jsonl/.json.gz file with --calibration"
        ) from exc
    if spec.text_field not in ds.column_names:
        raise CalibrationError(
            f"calibration dataset '{spec.source}' has no '{spec.text_field}' column (columns: {ds.column_names})"
        )
    ds = ds.shuffle(seed=spec.seed)
    return ds  # a datasets.Dataset indexes like a list; rows are fetched lazily


def _shuffled(docs: list[str], seed: int) -> list[str]:
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [docs[i] for i in order]


def build_blocks(tokenizer, spec: CalibrationSpec, token: str | bool | None = None) -> torch.Tensor:
    """(num_samples, seq_len) int64 token ids."""
    if spec.num_samples < 1 or spec.seq_len < 2:
        raise CalibrationError("--num-samples must be >= 1 and --seq-len >= 2")
    docs = _load_documents(spec, token)
    need = spec.num_samples * spec.seq_len
    ids: list[int] = []
    with tqdm(total=need, desc="calibration tokens", unit="tok", leave=False) as bar:
        for i in range(len(docs)):
            doc = docs[i]
            text = doc[spec.text_field] if isinstance(doc, dict) else doc
            if not text:
                continue
            # verbose=False: whole documents are longer than the model context on purpose; blocks are cut below.
            new = tokenizer(text, verbose=False)["input_ids"]
            bar.update(min(len(new), need - len(ids)))
            ids.extend(new)
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise CalibrationError(
            f"calibration text '{spec.source}' gives {len(ids)} tokens, fewer than {spec.num_samples} blocks of "
            f"{spec.seq_len} ({need}): give more text or lower --num-samples / --seq-len"
        )
    blocks = torch.tensor(ids[:need], dtype=torch.long).view(spec.num_samples, spec.seq_len)
    log.info("calibration: %d blocks of %d tokens from %s", spec.num_samples, spec.seq_len, spec.source)
    return blocks
