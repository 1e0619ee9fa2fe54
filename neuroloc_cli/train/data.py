"""Training data: .txt / .jsonl corpora, tokenized, packed into fixed-length sequences, mixed.

Each corpus (a file, or a folder of .txt/.jsonl files) is split into documents — a .txt file
at blank lines, a .jsonl file one record per line — tokenized with the model's own tokenizer,
joined with the end-of-sequence token between documents (so the model learns where a
document stops) and cut into sequences of exactly `seq_len` tokens; the last, partial
sequence is dropped. The last `eval_share` of each corpus's sequences is held out for
perplexity.

Batches are drawn by `MixtureSampler`: for every sequence slot, a corpus is chosen with
probability proportional to its weight, and within a corpus sequences come in a fresh seeded
permutation each pass. The sampler's whole state is a few counters, saved in checkpoints, so
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.train.config import DataSource

SUFFIXES = (".txt", ".jsonl")

# Files a tokenizer's vocabulary is read from: fast (tokenizer.json), SentencePiece (*.model),
# BPE/WordPiece (vocab.json, vocab.txt) and tiktoken ones.
_VOCABULARY_FILES = ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")


@dataclass
class Corpus:
    """One corpus of the mixture, packed."""

    path: Path
    weight: float
    train: torch.Tensor  # [n, seq_len] int64
    held_out: torch.Tensor  # [m, seq_len] int64
    tokens: int  # tokens before packing
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "weight": self.weight, "tokens": self.tokens,
                "train_sequences": len(self.train), "held_out_sequences": len(self.held_out)}


def load_tokenizer(model: Path) -> Any:
    """The model folder's tokenizer.

    Raises:
        InputError: the folder holds no usable tokenizer.
    """
    check_tokenizer_files(model)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        reason = " ".join(str(e).split())[:300]  # its messages span lines; ours is one
        raise InputError(f"{model}: cannot load the tokenizer ({type(e).__name__}: {reason})",
                         hint="copy all of the base model's tokenizer files into the folder") from None


def check_tokenizer_files(model: Path) -> None:
    """Refuse a model folder without tokenizer files, or with a tokenizer config but no vocabulary,
    before any weights load (transformers' own error for these spans several lines).

    Raises:
        InputError: naming the folder and the files it lacks.
    """
    if not any((model / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise InputError(f"{model}: no tokenizer (tokenizer.json or tokenizer_config.json) in the model folder",
                         hint="copy the base model's tokenizer files into it")
    if not any(any(model.glob(pattern)) for pattern in _VOCABULARY_FILES):
        raise InputError(f"{model}: tokenizer_config.json but no vocabulary (tokenizer.json, tokenizer.model or vocab.json) in the model folder",
                         hint="copy the base model's tokenizer files into it")


def load_corpora(sources: list[DataSource], tokenizer: Any, seq_len: int, eval_share: float) -> list[Corpus]:
    """Read, tokenize and pack every corpus.

    Args:
        sources: the configured corpora.
        tokenizer: the model's tokenizer.
        seq_len: tokens per packed sequence.
        eval_share: share of each corpus's sequences held out for perplexity.

    Raises:
        InputError: a file is missing, of an unknown kind, empty, malformed, or shorter than
            one sequence.
    """
    corpora = []
    for src in sources:
        path = Path(src.path)
        documents, digest = read_documents(path, src.field)
        ids = tokenize(documents, tokenizer)
        if len(ids) < seq_len:
            raise InputError(f"{path}: corpus has {len(ids)} tokens, shorter than one sequence of {seq_len} tokens",
                             hint="add text or lower --seq-len")
        packed = torch.tensor(ids[: len(ids) // seq_len * seq_len], dtype=torch.int64).view(-1, seq_len)
        held = int(len(packed) * eval_share) if len(packed) > 1 else 0
        if eval_share > 0 and held == 0 and len(packed) > 1:
            held = 1  # a held-out share was asked for: give it at least one sequence
        train, held_out = packed[: len(packed) - held], packed[len(packed) - held:]
        weight = src.weight if src.weight is not None else float(len(ids))
        corpora.append(Corpus(path, weight, train, held_out, len(ids), digest))
    return corpora


def read_documents(path: Path, text_field: str = "text") -> tuple[list[str], str]:
    """The documents of a .txt / .jsonl file or of a folder of them, and their sha256.

    Raises:
        InputError: missing, unknown kind, unreadable, malformed JSONL, or no text at all.
    """
    files = _files(path)
    h = hashlib.sha256()
    docs: list[str] = []
    for file in files:
        try:
            raw = file.read_bytes()
            text = raw.decode("utf-8")
        except OSError as e:
            raise InputError(f"{file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{file}: not UTF-8 text (byte {e.start})") from None
        h.update(raw)
        docs.extend(_jsonl_documents(file, text, text_field) if file.suffix == ".jsonl" else _txt_documents(text))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"{path}: empty corpus (no text)")
    return docs, h.hexdigest()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise InputError(f"{path}: no .txt or .jsonl files in this folder")
        return files
    if not path.is_file():
        raise InputError(f"{path}: no such corpus file")
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown corpus kind {path.suffix!r}", hint="use .txt, or .jsonl with a 'text' field")
    return [path]


def _txt_documents(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")  # Windows line ends: blank lines still separate documents
    return [d.strip("\n") for d in text.split("\n\n")]


def _jsonl_documents(file: Path, text: str, text_field: str) -> list[str]:
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InputError(f"{file}: line {n}: invalid JSON ({e})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise InputError(f"{file}: line {n}: no string field {text_field!r}")
        docs.append(value)
    return docs


def tokenize(documents: list[str], tokenizer: Any) -> list[int]:
    """Token ids of the documents, each followed by the end-of-sequence token if there is one."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # The tokenizer's own length limit is meaningless here: documents are packed afterwards.
    for start in range(0, len(documents), 256):
        batch = tokenizer(documents[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]
        for doc in batch:
            ids.extend(doc)
            if eos is not None:
                ids.append(eos)
    return ids


@dataclass
class MixtureSampler:
    """Draws training sequences from the corpora in proportion to their weights.

    Its state (`counters`: sequences drawn so far per corpus) is all a resumed run needs.
    """

    corpora: list[Corpus]
    seed: int
    counters: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counters:
            self.counters = [0] * len(self.corpora)
        weights = torch.tensor([c.weight for c in self.corpora], dtype=torch.float64)
        self._probs = weights / weights.sum()
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def next_batch(self, step: int, size: int) -> torch.Tensor:
        """The `size` sequences of global optimizer step `step`, as [size, seq_len]."""
        gen = torch.Generator().manual_seed(_mix(self.seed, step))
        choice = torch.multinomial(self._probs, size, replacement=True, generator=gen).tolist()
        return torch.stack([self._take(c) for c in choice])

    def _take(self, c: int) -> torch.Tensor:
        train = self.corpora[c].train
        epoch, pos = divmod(self.counters[c], len(train))
        self.counters[c] += 1
        key = (c, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != c}  # keep one pass per corpus
            self._perms[key] = torch.randperm(len(train), generator=torch.Generator().manual_seed(_mix(self.seed, 1_000_003 * (c + 1) + epoch)))
        return train[self._perms[key][pos]]


def _mix(seed: int, n: int) -> int:
    digest = hashlib.sha256(f"{seed}:{n}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
