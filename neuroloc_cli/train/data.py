"""The training mixture: every configured corpus cut into rows (with a held-out share), and
the sampler that mixes them; for LANDeRMT, translation directions and a sampler that gives
every step one direction.

Reading, tokenizing, framing and packing are `runtime.data`'s (the one way text becomes rows);
here the last `eval_share` of each corpus's rows is held out for perplexity, and batches are
drawn by `MixtureSampler`: for every sequence slot, a corpus is chosen with probability
proportional to its weight, and within a corpus sequences come in a fresh seeded permutation
each pass. The sampler's whole state is a few counters, saved in checkpoints, so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.runtime.data import IGNORE, Framing, pack, pad_rows, read_documents, tokenize
from neuroloc_cli.runtime.prompts import Pair, PairRows, pair_rows, read_pairs
from neuroloc_cli.train.config import DataSource
from neuroloc_cli.train.rng import derive_seed


@dataclass
class Corpus:
    """One corpus of the mixture, cut into rows (`IGNORE` where a padded row holds no token)."""

    path: Path
    weight: float
    train: torch.Tensor  # [n, seq_len] int64
    held_out: torch.Tensor  # [m, seq_len] int64
    tokens: int  # tokens of the framed documents, before they are cut into rows
    sha256: str
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "weight": self.weight,
            "tokens": self.tokens,
            "train_sequences": len(self.train),
            "held_out_sequences": len(self.held_out),
        }


def load_corpora(sources: list[DataSource], tokenizer: Any, framing: Framing, seq_len: int, eval_share: float) -> list[Corpus]:
    """Read, tokenize and cut every corpus into rows.

    Args:
        sources: the configured corpora.
        tokenizer: the model's tokenizer.
        framing: how documents become rows (see `framing_of`).
        seq_len: tokens per row.
        eval_share: share of each corpus's rows held out for perplexity.

    Raises:
        InputError: a file is missing, of an unknown kind, empty, malformed, or yields no row.
    """
    corpora = []
    for src in sources:
        path = Path(src.path)
        docs = read_documents(path, src.field, framing.txt_docs)
        ids = tokenize(docs.texts, tokenizer, framing)
        tokens = sum(map(len, ids))
        rows = pack(ids, seq_len) if framing.packing == "packed" else pad_rows(ids, seq_len)
        if len(rows) == 0 and framing.packing == "packed":
            raise InputError(
                f"{path}: corpus has {tokens} tokens, shorter than one sequence of {seq_len} tokens", hint="add text or lower --seq-len"
            )
        if len(rows) == 0:
            raise InputError(f"{path}: corpus has {tokens} tokens and no document of two tokens or more", hint="add text")
        held = int(len(rows) * eval_share) if len(rows) > 1 else 0
        if eval_share > 0 and held == 0 and len(rows) > 1:
            held = 1  # a held-out share was asked for: give it at least one sequence
        train, held_out = rows[: len(rows) - held], rows[len(rows) - held :]
        weight = src.weight if src.weight is not None else float(tokens)
        corpora.append(Corpus(path, weight, train, held_out, tokens, docs.sha256, docs.warnings))
    return corpora


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
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step))
        choice = torch.multinomial(self._probs, size, replacement=True, generator=gen).tolist()
        return torch.stack([self._take(c) for c in choice])

    def _take(self, c: int) -> torch.Tensor:
        train = self.corpora[c].train
        epoch, pos = divmod(self.counters[c], len(train))
        self.counters[c] += 1
        return train[_pass_order(self._perms, self.seed, c, epoch, len(train))[pos]]


@dataclass
class PairCorpus:
    """One translation direction's examples (LANDeRMT): rows with labels on the target only,
    the last `eval_share` held out."""

    rows: PairRows
    train: slice
    held_out: slice
    sha256: str

    @property
    def name(self) -> str:
        return self.rows.pair.name

    def describe(self) -> dict[str, Any]:
        return {
            **self.rows.describe(),
            "sha256": self.sha256,
            "train_examples": self.train.stop - self.train.start,
            "held_out_examples": self.held_out.stop - self.held_out.start,
        }


def load_pair_corpora(pairs: list[Pair], tokenizer: Any, template: str, seq_len: int, eval_share: float) -> list[PairCorpus]:
    """Read and tokenize every direction (see `runtime.prompts.pair_rows`).

    Raises:
        InputError: a missing or malformed file, or one whose every example is truncated
            before its target.
    """
    out = []
    for pair in pairs:
        sentences = read_pairs(pair.path)
        rows = pair_rows(pair, sentences, tokenizer, template, seq_len)
        if not bool((rows.labels != IGNORE).any()):
            raise InputError(f"{pair.path}: no target token fits in --seq-len {seq_len}", hint="raise --seq-len")
        n = len(rows.input_ids)
        held = int(n * eval_share) if n > 1 else 0
        if eval_share > 0 and held == 0 and n > 1:
            held = 1
        out.append(PairCorpus(rows, slice(0, n - held), slice(n - held, n), hashlib.sha256(pair.path.read_bytes()).hexdigest()))
    return out


@dataclass
class PairSampler:
    """LANDeRMT's batches: every optimizer step draws ONE direction (in proportion to its
    training examples) and all its examples from that direction, in a fresh seeded
    permutation per pass. The state is `counters` (examples drawn per direction)."""

    corpora: list[PairCorpus]
    seed: int
    counters: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counters:
            self.counters = [0] * len(self.corpora)
        sizes = torch.tensor([c.train.stop - c.train.start for c in self.corpora], dtype=torch.float64)
        self._probs = sizes / sizes.sum()
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def next_batch(self, step: int, size: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(direction index, input ids, labels, attention mask — each [size, seq_len]) of step `step`."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step))
        c = int(torch.multinomial(self._probs, 1, generator=gen))
        corpus = self.corpora[c]
        n = corpus.train.stop - corpus.train.start
        picks = []
        for _ in range(size):
            epoch, pos = divmod(self.counters[c], n)
            self.counters[c] += 1
            picks.append(corpus.train.start + int(_pass_order(self._perms, self.seed, c, epoch, n)[pos]))
        index = torch.tensor(picks)
        return c, corpus.rows.input_ids[index], corpus.rows.labels[index], corpus.rows.attention_mask[index]


def _pass_order(cache: dict[tuple[int, int], torch.Tensor], seed: int, c: int, epoch: int, n: int) -> torch.Tensor:
    """The order of source `c`'s `n` rows in pass `epoch`: a permutation seeded by (seed, c,
    epoch) alone, so a resumed run draws the same. `cache` keeps the current pass per source."""
    if (c, epoch) not in cache:
        for key in [k for k in cache if k[0] == c]:
            del cache[key]  # one pass per source at a time
        cache[(c, epoch)] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 1_000_003 * (c + 1) + epoch)))
    return cache[(c, epoch)]
