"""Merging models whose vocabularies differ: `tokenizer_source: base | union | <model>`, or
mergekit's `tokenizer:` block (the same `source`, per-token `tokens:`, `pad_to_multiple_of`).

The output vocabulary is built as mergekit 0.1.5 builds it:

- `base`: the base model's tokenizer (the first model's without a base);
- a model path: that model's tokenizer;
- `union`: the base's tokenizer, then every other model's ordinary tokens it lacks (models in
  recipe order, each in id order: mergekit takes them in the order of a hash map, which can
  change from run to run), then every added token not yet present, each with the next id.

Every input's embedding and head rows are mapped onto that vocabulary by token text, and the
method merges the mapped rows. A token some input lacks gets, in that input, mergekit's default
row: the one model that has it gives its row; no model: zeros; several, the base among them:
the base's row; several without the base: their mean. The output has one row per token of the
vocabulary (rows past a tokenizer's last token are dropped, as mergekit does), and config.json's
`vocab_size` says so. Only the tokenizer is loaded here, from the model folders; no tensor data.

The `tokenizer:` block, as mergekit 0.1.5's `PermutedVocabulary`: every token of `tokens:` the
vocabulary lacks is added to it (a plain added token, in the block's order). A listed token
replaces the default above: its `source` gives the row of each model that lacks the token (a
model: that model's row of the token; `zero`; `model_token`: a model's row of another token, by
text or index), and with `force` of every model; a listed token every model has, without
`force`, keeps each model's own row. `pad_to_multiple_of` pads the rows to a multiple, each
padding row the mean of that input's mapped rows, and `vocab_size` counts the padding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint, resolve_model_path
from neuroloc_cli.recipe.schema import TokenEmbedding, TokenRow, ZeroRow

# Tensors indexed by token along their first axis (embeddings and output heads).
_VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|lm_head|embed_out|output)\.weight$")
KEYWORDS = ("base", "union")
_ROW_BLOCK = 1024  # rows summed at a time for a padding row (`mean_row`)


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary and how each input's rows map onto it.

    `maps[i][t]` is input i's row of output token t, or -1 when input i lacks the token; inputs
    are in plan order (the base first, when there is one). `fill[t]` says where a token some
    input lacks comes from: ("model", i), ("zero",), ("mean",), ("row", i, r) (input i's row r);
    None when every input has it. `forced[t]`: every input takes the fill (`force`). `rows`: the
    row count, `size` and the padding (`pad_to_multiple_of`).
    """

    source: str
    tokenizer: Any
    tokenizer_dir: Path | None
    """A folder whose tokenizer files the output takes as they are (`base`, a model), or None
    when the tokenizer is written out (`union`)."""
    size: int
    tensors: frozenset[str]
    maps: list[torch.Tensor]
    fill: list[tuple | None]
    forced: torch.Tensor
    rows: int

    def mapped(self, readers: list[RowReader], owners: list[int], row_shape: tuple[int, ...], dtype: torch.dtype) -> list[MappedRows]:
        """Each input's tensor with its rows on the output vocabulary, read a block of rows at a
        time (see `MappedRows`).

        Args:
            readers: one per input: `reader(a, b)` gives rows `[a, b)` of the input's tensor,
                its first axis the input's own vocabulary, in `dtype`.
            row_shape: the shape of one row (the tensor's trailing dimensions).
            owners: the input whose vocabulary each tensor follows (a tensor a model lacks
                stands in from the base, with the base's rows).
        """
        sources = {o: _Rows(r) for o, r in zip(owners, readers)}
        defaults = self._defaults(sources, torch.Size(row_shape), dtype)
        out = [MappedRows(self, owner, reader, defaults) for reader, owner in zip(readers, owners)]
        if self.rows > self.size:  # padding: the input's mean row, as mergekit pads
            for m in out:
                m.pad = mean_row(m, self.size, dtype)
        return out

    @cached_property
    def filled_tokens(self) -> torch.Tensor:
        """The output tokens some input lacks (or that are forced), ascending: those `fill`
        gives a row (each input's row of them is a default)."""
        return torch.tensor([token for token, how in enumerate(self.fill) if how is not None], dtype=torch.long)

    @cached_property
    def _kept_rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per input, (output rows, its own rows) of the tokens it has and that are not forced."""
        out = []
        filled = torch.zeros(self.size, dtype=torch.bool)
        filled[self.filled_tokens] = True
        for rows in self.maps:
            have = (rows >= 0) & ~self.forced
            assert bool((have | filled).all()), "a token neither copied nor filled"
            dst = have.nonzero().reshape(-1)
            out.append((dst, rows[dst]))
        return out

    def _defaults(self, sources: dict[int, _Rows], row_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The rows of `filled_tokens`, in that order."""
        tokens = self.filled_tokens.tolist()
        default = torch.zeros((len(tokens), *row_shape), dtype=dtype)
        for k, token in enumerate(tokens):
            how = self.fill[token]
            assert how is not None
            if how[0] == "zero":
                continue
            if how[0] == "model":
                default[k] = sources[how[1]][int(self.maps[how[1]][token])]
                continue
            if how[0] == "row":
                default[k] = sources[how[1]][how[2]]
                continue
            present = [i for i in sorted(sources) if self.maps[i][token] >= 0]
            acc = torch.zeros(row_shape, dtype=dtype)
            for i in present:  # in input order, one add at a time, as mergekit sums them
                acc = acc + sources[i][int(self.maps[i][token])]
            default[k] = acc / len(present)
        return default


RowReader = Callable[[int, int], torch.Tensor]
"""`reader(a, b)`: rows `[a, b)` of one input's token-indexed tensor, on its own vocabulary."""


class _Rows:
    """One row of an input by index (`rows[r]`), read through its `RowReader`."""

    def __init__(self, reader: RowReader):
        self.reader = reader

    def __getitem__(self, r: int) -> torch.Tensor:
        return self.reader(r, r + 1)[0]


class MappedRows:
    """One input's token-indexed tensor on the output vocabulary: `mapped(a, b)` gives output
    rows `[a, b)`, read a block at a time, so that no whole copy of the tensor is made.

    The rows of tokens the input has are read through its `RowReader`, a run of consecutive
    rows at a time; the rows of tokens it lacks (or that are forced) are the vocabulary's
    defaults, worked out once from the rows they name; padding rows are the input's mean row.
    """

    def __init__(self, vocab: Vocabulary, owner: int, reader: RowReader, defaults: torch.Tensor):
        self.vocab, self.reader, self.defaults = vocab, reader, defaults
        self.dst, self.src = vocab._kept_rows[owner]
        self.pad: torch.Tensor | None = None

    def __call__(self, a: int, b: int) -> torch.Tensor:
        vocab = self.vocab
        out = self.defaults.new_empty((b - a, *self.defaults.shape[1:]))
        span = torch.tensor([a, min(b, vocab.size)])
        filled = vocab.filled_tokens  # first: a token this input has keeps its own row, below
        lo, hi = (int(i) for i in torch.searchsorted(filled, span))
        if hi > lo:
            out[filled[lo:hi] - a] = self.defaults[lo:hi]
        lo, hi = (int(i) for i in torch.searchsorted(self.dst, span))
        dst, src = self.dst[lo:hi], self.src[lo:hi]
        if dst.numel():  # runs of rows consecutive in both vocabularies, one read each
            breaks = ((dst[1:] - dst[:-1]) != 1) | ((src[1:] - src[:-1]) != 1)
            edges = [0, *(breaks.nonzero().reshape(-1) + 1).tolist(), dst.numel()]
            for i, j in zip(edges[:-1], edges[1:]):
                first, length = int(src[i]), j - i
                out[int(dst[i]) - a : int(dst[i]) - a + length] = self.reader(first, first + length)
        if b > vocab.size:
            assert self.pad is not None, "padding rows are read before the mean row is known"
            out[max(a, vocab.size) - a :] = self.pad
        return out


def mean_row(rows: MappedRows, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of output rows `[0, size)`: summed in float64 a block of rows at a time, in
    order, then divided and rounded to `dtype` (the same floats whichever way the rows are read)."""
    total = None
    for a in range(0, size, _ROW_BLOCK):
        part = rows(a, min(a + _ROW_BLOCK, size)).double().sum(dim=0)
        total = part if total is None else total.add_(part)
    assert total is not None
    return total.div_(size).to(dtype)


def is_vocab_tensor(name: str, shape: tuple[int, ...], rows: int | None) -> bool:
    """Whether a tensor is indexed by token along its first axis."""
    return bool(_VOCAB_TENSOR.search(name)) and len(shape) >= 1 and (rows is None or shape[0] == rows)


class TokenSourceError(InputError):
    """A `tokenizer.tokens.<token>.source` that cannot give a row; the message names the key."""


def plan_vocabulary(
    source: str,
    checkpoints: list[Checkpoint],
    has_base: bool,
    base_dir: Path,
    tokens: dict[str, TokenEmbedding] | None = None,
    pad_to_multiple_of: int | None = None,
) -> Vocabulary:
    """Build the output vocabulary and every input's row map (see the module docstring).

    Args:
        source: `base`, `union` or a model path as the recipe writes it.
        checkpoints: the inputs in plan order (the base first when `has_base`).
        has_base: whether `checkpoints[0]` is the recipe's `base_model`.
        base_dir: the folder model paths are relative to.
        tokens: the `tokenizer:` block's `tokens:`.
        pad_to_multiple_of: the `tokenizer:` block's padding multiple.

    Raises:
        InputError: a tokenizer cannot be loaded, or the named model is not an input.
        TokenSourceError: a token's `source` names no input, a token or row a model lacks.
    """
    tokenizers = [_load(c.path) for c in checkpoints]
    sizes = [_rows(c, tok) for c, tok in zip(checkpoints, tokenizers)]
    vocabs = [{tok: i for tok, i in t.get_vocab().items() if i < n} for t, n in zip(tokenizers, sizes)]
    if len(vocabs[0]) < len(tokenizers[0].get_vocab()):
        raise InputError(
            f"{checkpoints[0].path}: its tokenizer has tokens beyond the {sizes[0]} embedding rows",
            hint="give a tokenizer that fits the embedding",
        )
    tokenizer_dir: Path | None
    if source == "base":
        out, tokenizer_dir = tokenizers[0], checkpoints[0].path
    elif source == "union":
        out, tokenizer_dir = _union(checkpoints[0].path, tokenizers, vocabs), None
    else:
        index = _input(source, checkpoints, base_dir)
        if index is None:
            raise InputError(f"{source}: not one of the recipe's models", hint="name 'base', 'union' or one of the models")
        out, tokenizer_dir = tokenizers[index], checkpoints[index].path
    configured = tokens or {}
    new = [t for t in configured if t not in out.get_vocab()]
    if new:  # mergekit adds them as plain tokens, in the block's order
        if tokenizer_dir is not None:
            out, tokenizer_dir = _load(tokenizer_dir), None  # a fresh copy: the input's stays as loaded
        for text in new:
            out.add_tokens(text)
    vocab = out.get_vocab()
    size = len(vocab)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(size)):
        raise InputError(f"tokenizer_source {source}: the tokenizer's ids are not 0..{size - 1}", hint="give a tokenizer without gaps")
    maps = [torch.tensor([v.get(t, -1) for t in tokens], dtype=torch.long) for v in vocabs]
    fill = _fills(maps, has_base)
    forced = torch.zeros(size, dtype=torch.bool)
    for text, cfg in configured.items():
        token = vocab[text]
        forced[token] = cfg.force
        needed = cfg.force or any(m[token] < 0 for m in maps)
        fill[token] = _configured(text, cfg, token, maps, vocabs, sizes, checkpoints, base_dir) if needed else None
    rows = size
    if pad_to_multiple_of and size % pad_to_multiple_of:
        rows = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    names = frozenset(n for n, info in checkpoints[0].tensors.items() if is_vocab_tensor(n, tuple(info.shape), sizes[0]))
    return Vocabulary(source, out, tokenizer_dir, size, names, maps, fill, forced, rows)


def _input(model: str, checkpoints: list[Checkpoint], base_dir: Path) -> int | None:
    """The index of the input a model path names (the first, if several), or None."""
    path = resolve_model_path(model, base_dir).resolve()
    return next((i for i, c in enumerate(checkpoints) if c.path.resolve() == path), None)


def _configured(
    text: str,
    cfg: TokenEmbedding,
    token: int,
    maps: list[torch.Tensor],
    vocabs: list[dict[str, int]],
    sizes: list[int],
    checkpoints: list[Checkpoint],
    base_dir: Path,
) -> tuple:
    """The fill of a `tokens:` entry: its `source` resolved to an input and a row."""
    key = f"tokenizer.tokens.{text}.source"
    src = cfg.source
    if src is None:
        raise TokenSourceError(
            f"{key}: required, since {'force is set' if cfg.force else 'some model lacks the token'}",
            hint="give a model path, {kind: zero} or {kind: model_token, ...}",
        )
    if isinstance(src, ZeroRow):
        return ("zero",)
    model = src.model if isinstance(src, TokenRow) else src
    i = _input(model, checkpoints, base_dir)
    if i is None:
        raise TokenSourceError(f"{key}: {model} is not one of the recipe's models", hint="name one of the models")
    if isinstance(src, TokenRow):
        if src.token is not None:
            if src.token not in vocabs[i]:
                raise TokenSourceError(f"{key}: {model} has no token {src.token!r}", hint="name a token of that model's vocabulary")
            return ("row", i, vocabs[i][src.token])
        assert src.token_id is not None
        if not 0 <= src.token_id < sizes[i]:
            raise TokenSourceError(f"{key}: token_id {src.token_id} is not a row of {model} (0..{sizes[i] - 1})", hint="give a row index")
        return ("row", i, src.token_id)
    if maps[i][token] < 0:
        raise TokenSourceError(f"{key}: {model} lacks the token {text!r}", hint="name a model that has it, or use model_token")
    return ("model", i)


def _fills(maps: list[torch.Tensor], has_base: bool) -> list[tuple | None]:
    """Each token's default fill (see `Vocabulary.fill`): None where every input has it; the
    one input that has it; zeros where none does; the base where several do, the base among
    them; else their mean."""
    present = torch.stack([m >= 0 for m in maps])
    counts, first = present.sum(dim=0).tolist(), present.int().argmax(dim=0).tolist()
    out: list[tuple | None] = []
    for count, i in zip(counts, first):
        if count == len(maps):
            out.append(None)
        elif count == 1:
            out.append(("model", i))
        elif count == 0:
            out.append(("zero",))
        elif has_base and i == 0:
            out.append(("model", 0))
        else:
            out.append(("mean",))
    return out


def _load(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise InputError(
            f"{path}: cannot load the tokenizer ({type(e).__name__})", hint="tokenizer_source needs every model's tokenizer files"
        ) from None


def _rows(ckpt: Checkpoint, tokenizer: Any) -> int:
    size = (ckpt.config or {}).get("vocab_size")
    return int(size) if isinstance(size, int) else len(tokenizer.get_vocab())


def _union(base_path: Path, tokenizers: list[Any], vocabs: list[dict[str, int]]) -> Any:
    """The base's tokenizer with every other token appended, in mergekit's order."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, vocab in zip(tokenizers, vocabs):
        decoder = tok.added_tokens_decoder
        special = {info.content for info in decoder.values()}
        for text in sorted(vocab, key=vocab.__getitem__):
            if text not in special:
                ordinary.setdefault(text)
        for idx, info in sorted(decoder.items()):
            if info.content in vocab and vocab[info.content] == idx and info.content not in added:
                added[info.content] = info
    out = _load(base_path)  # a fresh copy: the base's own stays as loaded
    base_vocab = tokenizers[0].get_vocab()
    # one call each: the tokenizer rebuilds its added-token matcher per call
    out.add_tokens([text for text in ordinary if text not in added and text not in base_vocab])
    out.add_tokens(list(added.values()))
    return out


def save_tokenizer(vocab: Vocabulary, folder: Path) -> None:
    """Write the output tokenizer's files into `folder` (for `union`)."""
    vocab.tokenizer.save_pretrained(folder)
    config = folder / "tokenizer_config.json"
    if config.is_file():  # the same file on every run: no machine-dependent paths
        doc = json.loads(config.read_text())
        doc.pop("name_or_path", None)
        config.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
