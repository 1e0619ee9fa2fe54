"""Text into model inputs: corpora read into documents, tokenized, framed, cut into rows, and
batches tagged with the source they came from.

Every command that runs a model on text uses this module (`train`'s mixture, the data
locators' per-language batches), so that a document means the same rows everywhere.

Each corpus (a file, or a folder of .txt/.jsonl files) is split into documents — a .txt file
at blank lines (`txt_docs="paragraph"`) or at every line (`"line"`), a .jsonl file one record
per line. Each document is tokenized with the model's own tokenizer and its own special-token
rules (`add_special_tokens=True`: a Llama or Mistral tokenizer puts BOS first, as in
pretraining), and followed by EOS unless the tokenizer already ends it with one, so the model
learns where a document stops. `Framing` records what was added.

Documents then become rows of exactly `seq_len` tokens. `packed`: joined into one stream and
cut, the last partial row dropped (no compute spent on padding; a row may span documents).
`padded`: one document per row, right-padded with `IGNORE`, which the loss skips; a document
longer than a row continues in the next rows rather than being truncated, so no text is lost
(see `pad_rows`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io import jsonl
from neuroloc_cli.io.checkpoint import check_tokenizer_files

DEFAULT_SEQ_LEN = 512
"""Tokens per row when a command is not told: the smaller of this and the model's positions."""

SUFFIXES = (".txt", ".jsonl")


def choose_seq_len(seq_len: int | None, positions: int | None) -> int:
    """`--seq-len`, which must fit the model's positions; without it, the smaller of
    DEFAULT_SEQ_LEN and those positions.

    Raises:
        UsageError: it exceeds the model's positions.
    """
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
    if positions is not None and seq_len > positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's {positions} positions", hint=f"use --seq-len {positions} or less")
    return seq_len


IGNORE = -100
"""A padded row's value where it holds no token: the label `torch.nn.functional.cross_entropy`
skips by default, so padding can never be mistaken for a token id."""

# A blank line (or one of whitespace only) separates paragraph-mode documents.
_BLANK_LINE = re.compile(r"\n\s*\n")
# A paragraph-mode .txt file read as a single document of at least this many lines is most
# likely one document per line: the start event warns about it.
_MANY_LINES = 20


@dataclass(frozen=True)
class Documents:
    """The documents of a corpus, the sha256 of its bytes, and what looked wrong in it."""

    texts: list[str]
    sha256: str
    warnings: list[str]


@dataclass(frozen=True)
class Framing:
    """How documents become training rows: logged at the start, shown by `--dry-run`, recorded
    in provenance, and compared on `--resume` (a change of tokenizer rules changes the data)."""

    packing: str  # "packed" or "padded"
    txt_docs: str  # "paragraph" or "line"
    bos_added: bool  # the tokenizer puts BOS before every document
    eos_added: bool  # the tokenizer puts EOS after every document
    eos_appended: bool  # it does not, and has an EOS token: appended after every document here
    pad_token_id: int | None  # the input id of padding positions (padded rows only)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def framing_of(tokenizer: Any, packing: str, txt_docs: str) -> Framing:
    """The framing `tokenizer` gives documents, learnt from what it adds around a probe text.

    Padded rows get `pad_id`'s id.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos_added = bos is not None and framed[:1] == [bos] and plain[:1] != [bos]
    eos_added = eos is not None and framed[-1:] == [eos] and plain[-1:] != [eos]
    pad = pad_id(tokenizer) if packing == "padded" else None
    return Framing(packing, txt_docs, bos_added, eos_added, eos is not None and not eos_added, pad)


def pad_id(tokenizer: Any) -> int:
    """The input id of padding: the pad token, else EOS, else 0. Padding is never attended to
    by a real token nor scored, so any id would do; these are the ones a reader expects."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


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
        raise InputError(
            f"{model}: cannot load the tokenizer ({type(e).__name__}: {reason})",
            hint="copy all of the base model's tokenizer files into the folder",
        ) from None


def read_documents(path: Path, text_field: str = "text", txt_docs: str = "paragraph") -> Documents:
    """The documents of a .txt / .jsonl file or of a folder of them.

    Args:
        text_field: the JSONL field holding the text.
        txt_docs: "paragraph" (a .txt document ends at a blank line) or "line" (at every line).

    Raises:
        InputError: missing, unknown kind, unreadable, malformed JSONL, or no text at all.
    """
    files = _files(path)
    h = hashlib.sha256()
    docs: list[str] = []
    warnings: list[str] = []
    for file in files:
        try:
            raw = file.read_bytes()
            text = raw.decode("utf-8")
        except OSError as e:
            raise InputError(f"{file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{file}: not UTF-8 text (byte {e.start})") from None
        h.update(raw)
        if file.suffix == ".jsonl":
            docs.extend(_jsonl_documents(file, text, text_field))
        else:
            found = _txt_documents(text, txt_docs)
            warnings.extend(_txt_warnings(file, found, txt_docs))
            docs.extend(found)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"{path}: empty corpus (no text)")
    return Documents(docs, h.hexdigest(), warnings)


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


def _txt_documents(text: str, txt_docs: str) -> list[str]:
    text = text.replace("\r\n", "\n")  # Windows line ends split documents as Unix ones do
    if txt_docs == "line":
        return text.split("\n")
    return [d.strip("\n") for d in _BLANK_LINE.split(text)]


def _txt_warnings(file: Path, docs: list[str], txt_docs: str) -> list[str]:
    """A paragraph-mode file that is one document of many lines is most likely a document per
    line, which paragraph mode would silently train on as one long text."""
    real = [d for d in docs if d.strip()]
    lines = real[0].count("\n") + 1 if len(real) == 1 else 0
    if txt_docs != "paragraph" or lines < _MANY_LINES:
        return []
    return [f"{file}: {lines} lines and no blank line, read as one document (--txt-docs line reads one document per line)"]


def _jsonl_documents(file: Path, text: str, text_field: str) -> list[str]:
    docs = []
    for n, record in jsonl.records(file, text):
        value = record.get(text_field)
        if not isinstance(value, str):
            raise jsonl.record_error(file, n, f"no string field {text_field!r}")
        docs.append(value)
    return docs


def tokenize(documents: list[str], tokenizer: Any, framing: Framing) -> list[list[int]]:
    """Token ids of each document, with the special tokens the tokenizer adds, then EOS where
    `framing` says to append it."""
    eos = [tokenizer.eos_token_id] if framing.eos_appended else []
    ids: list[list[int]] = []
    # The tokenizer's own length limit is meaningless here: documents are cut into rows afterwards.
    for start in range(0, len(documents), 256):
        batch = tokenizer(documents[start : start + 256], add_special_tokens=True, verbose=False)["input_ids"]
        ids.extend(doc + eos for doc in batch)
    return ids


def pack(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """The documents as one stream cut into rows of `seq_len` ([n, seq_len] int64); the last,
    partial row is dropped."""
    stream = [t for doc in documents for t in doc]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def pad_rows(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """One document per row ([n, seq_len] int64), right-padded with `IGNORE`.

    A longer document is split, not truncated: it continues in further rows, each starting
    with the last token of the row before, so that every token after the document's first is
    a scored target exactly once (only its first row starts with BOS). A document of one
    token has no target and yields no row.
    """
    rows = []
    for doc in documents:
        for start in range(0, len(doc) - 1, seq_len - 1):
            piece = doc[start : start + seq_len]
            rows.append(piece + [IGNORE] * (seq_len - len(piece)))
    return torch.tensor(rows, dtype=torch.int64).view(-1, seq_len)


@dataclass(frozen=True)
class TaggedRows:
    """Rows of one source (a language, a corpus, a translation pair), with what they were read from.

    Attributes:
        source: the tag: the name the user gave the data (`--data es=...` gives "es").
        path: the corpus file or folder.
        sha256: of the corpus bytes, for provenance.
        rows: [n, seq_len] int64.
    """

    source: str
    path: Path
    sha256: str
    rows: torch.Tensor

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": str(self.path), "sha256": self.sha256, "rows": len(self.rows), "tokens": self.rows.numel()}


@dataclass(frozen=True)
class TaggedBatch:
    """One batch of rows of a single source, and its position in that source's rows."""

    source: str
    index: int  # the batch's number within its source, from 0
    input_ids: torch.Tensor  # [b, seq_len] int64


def source_rows(
    source: str, path: Path, tokenizer: Any, framing: Framing, *, rows: int, seq_len: int, text_field: str = "text"
) -> TaggedRows:
    """The first `rows` packed rows of a corpus, documents in file order: reproducible from
    the file alone, whatever other sources are read with it.

    Raises:
        InputError: an unreadable corpus, or one that packs into fewer than `rows` rows.
    """
    docs = read_documents(path, text_field, framing.txt_docs)
    packed = pack(tokenize(docs.texts, tokenizer, framing), seq_len)
    if len(packed) < rows:
        raise InputError(
            f"{path}: corpus packs into {len(packed)} rows of {seq_len} tokens, fewer than the {rows} asked for",
            hint="add text, or ask for fewer rows (--samples) or shorter ones (--seq-len)",
        )
    return TaggedRows(source, path, docs.sha256, packed[:rows])


def tagged_batches(sources: Sequence[TaggedRows], batch_size: int, *, rank: int = 0, world: int = 1) -> Iterator[TaggedBatch]:
    """Every source's rows in batches of `batch_size` (the last may be shorter), source by
    source; batch `i` of the whole sequence goes to process `i % world`, so that `world`
    processes together see exactly the batches one process would."""
    i = 0
    for src in sources:
        for index, start in enumerate(range(0, len(src.rows), batch_size)):
            if i % world == rank:
                yield TaggedBatch(src.source, index, src.rows[start : start + batch_size])
            i += 1
