"""Translation prompts: instruction templates, language names, and parallel sentence pairs as
training rows whose loss falls on the target tokens only.

`eval --translate` fills a template and generates after it; LANDeRMT's locator and training
(`locate awareness`, `train --method landermt`) read the same templates, so a model is
trained on exactly the prompt it is evaluated with.

The templates are FLAN v2's (google-research/FLAN, `flan/v2/templates.py`, the `para_crawl`
and `wmt16_translate` patterns, the WMT ones LANDeRMT samples from), with `{sent1}` →
`{source}`, `{lang1}` → `{src_lang}`, `{lang2}` → `{tgt_lang}`. The target follows the prompt
after one space, and an example ends with EOS, so that a trained model stops by itself; the
templates that end in `{tgt_lang}:` also let generation stop at the end of the line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io import jsonl
from neuroloc_cli.runtime.data import IGNORE, pad_id

TEMPLATES = {
    "flan-following": "Translate the following.\n\n{src_lang}: {source}\n\n{tgt_lang}:",  # para_crawl
    "flan-sentence": "Translate the following sentence to {tgt_lang}:\n{source}\n\n{tgt_lang}:",  # wmt16_translate
    "flan-translate-to": "{source}\n\nTranslate to {tgt_lang}\n\n{tgt_lang}:",  # wmt16_translate
    "flan-to": "Translate to {tgt_lang}:\n\n{source}\n\n{tgt_lang}:",  # wmt16_translate
    "flan-how-is": 'How is "{source}" said in {tgt_lang}?',  # wmt16_translate
}
DEFAULT_TEMPLATE = "flan-following"
SEPARATOR = " "  # between a filled prompt and its target

LANGUAGES = {
    "ar": "Arabic",
    "bn": "Bengali",
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sw": "Swahili",
    "te": "Telugu",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "vi": "Vietnamese",
    "zh": "Chinese",
}

_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # a language code: also a file name part


def resolve_template(template: str) -> str:
    """A template name of TEMPLATES, or the literal template itself (must contain {source}).

    Raises:
        UsageError: neither a name nor a template, or one that cannot be filled.
    """
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{source}" not in template:
        raise UsageError(
            f"--template: {template!r} is neither a template name nor contains {{source}}", hint=f"names: {', '.join(TEMPLATES)}"
        )
    literal = template.replace("\\n", "\n")
    try:
        literal.format(source="", src="", tgt="", src_lang="", tgt_lang="")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(
            f"--template: cannot fill {template!r} ({e!r})", hint="use {source}, {src}, {tgt}, {src_lang}, {tgt_lang}"
        ) from None
    return literal


def fill(template: str, source: str, src: str, tgt: str) -> str:
    """The prompt for one sentence: `template` (resolved) filled with it and the languages."""
    names = {"src": src, "tgt": tgt, "src_lang": LANGUAGES.get(src, src), "tgt_lang": LANGUAGES.get(tgt, tgt)}
    return template.format(source=source, **names)


@dataclass(frozen=True)
class Pair:
    """A translation direction and its parallel data, as `--pair de-en=PATH` gives it."""

    src: str
    tgt: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.src}-{self.tgt}"


def parse_pairs(specs: Sequence[str], flag: str = "--pair") -> list[Pair]:
    """`SRC-TGT=PATH` values, each direction once.

    Raises:
        UsageError: a value of another shape, a direction from a language to itself, or a
            direction given twice.
    """
    out: list[Pair] = []
    for spec in specs:
        direction, sep, path = spec.partition("=")
        src, dash, tgt = direction.strip().partition("-")
        if not sep or not path or not dash or not _CODE.match(src) or not _CODE.match(tgt):
            raise UsageError(f"{flag} {spec!r}: expected SRC-TGT=PATH", hint=f"e.g. {flag} de-en=train.de-en.jsonl")
        if src == tgt:
            raise UsageError(f"{flag} {spec!r}: source and target are both {src!r}")
        if any(p.src == src and p.tgt == tgt for p in out):
            raise UsageError(f"{flag}: direction {src}-{tgt} given twice")
        out.append(Pair(src, tgt, Path(path)))
    return out


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """The (source, target) sentences of a jsonl file of `{"source": ..., "target": ...}`.

    Raises:
        InputError: naming the file and line that is missing, not JSON, or lacks a string
            field; or an empty file.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such parallel data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for n, record in jsonl.records(path, text):
        for key in ("source", "target"):
            if not isinstance(record.get(key), str):
                raise jsonl.record_error(path, n, f"no string field {key!r}")
        out.append((record["source"], record["target"]))
    if not out:
        raise InputError(f"{path}: no sentence pairs")
    return out


@dataclass(frozen=True)
class PairRows:
    """A direction's examples as padded rows, with labels on the target tokens only.

    Attributes:
        pair: the direction.
        input_ids: [n, seq_len] int64 (padding: the tokenizer's pad or EOS id).
        labels: [n, seq_len] int64, IGNORE on the prompt and the padding.
        truncated: examples cut at `seq_len`.
        attention_mask: [n, seq_len] int64, 1 on the example's tokens, 0 on the padding.
    """

    pair: Pair
    input_ids: torch.Tensor
    labels: torch.Tensor
    truncated: int
    attention_mask: torch.Tensor | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "pair": self.pair.name,
            "path": str(self.pair.path),
            "examples": len(self.input_ids),
            "target_tokens": int((self.labels != IGNORE).sum()),
            "truncated": self.truncated,
        }


def pair_rows(pair: Pair, sentences: Sequence[tuple[str, str]], tokenizer: Any, template: str, seq_len: int) -> PairRows:
    """Tokenize each sentence pair as `prompt + SEPARATOR + target + EOS`, the prompt with the
    tokenizer's special tokens (a Llama tokenizer's BOS), labels on the target and EOS only;
    right-padded to `seq_len`, an example longer than that cut (and counted).

    The prompt and target are tokenized apart and joined, so that the boundary is exact
    whatever the tokenizer merges across it.
    """
    template = resolve_template(template)
    pad = pad_id(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids, labels, attention, truncated = [], [], [], 0
    for source, target in sentences:
        prompt = tokenizer(fill(template, source, pair.src, pair.tgt), add_special_tokens=True)["input_ids"]
        answer = tokenizer(SEPARATOR + target, add_special_tokens=False)["input_ids"] + eos
        row, lab = prompt + answer, [IGNORE] * len(prompt) + answer
        if len(row) > seq_len:
            truncated += 1
            row, lab = row[:seq_len], lab[:seq_len]
        ids.append(row + [pad] * (seq_len - len(row)))
        labels.append(lab + [IGNORE] * (seq_len - len(lab)))
        attention.append([1] * len(row) + [0] * (seq_len - len(row)))
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.int64).view(-1, seq_len)
    return PairRows(pair, as_tensor(ids), as_tensor(labels), truncated, as_tensor(attention))
