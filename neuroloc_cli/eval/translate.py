"""Machine translation: greedy generation from an instruction template, scored by
sacreBLEU's Python API (BLEU and chrF, each with its signature).

LANDeRMT (seed 002, §4) reports sacreBLEU with `case.mixed, numrefs.1, smooth.none,
tok.13a`, and finetunes with FLAN v2 translation templates (`runtime.prompts`, shared with
LANDeRMT's training so that a model is evaluated on the prompt it learnt); the defaults
follow it. lm-eval's
built-in `bleu` metric smooths with `exp`, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import UsageError
from neuroloc_cli.eval.specs import TRANSLATION_KEYS, read_jsonl
from neuroloc_cli.runtime.prompts import DEFAULT_TEMPLATE, TEMPLATES, fill, resolve_template

__all__ = ["DEFAULT_TEMPLATE", "TEMPLATES", "TranslationSettings", "build_prompts", "check_settings", "resolve_template", "translate"]


@dataclass(frozen=True)
class TranslationSettings:
    """How translations are made and scored (all recorded in the results).

    Attributes:
        data: jsonl file of records with `source` and `target`.
        src, tgt: language codes; `{src_lang}`/`{tgt_lang}` in templates become their English names.
        template: a name of TEMPLATES, or a literal template with `{source}`.
        max_gen_toks: generation length cap per record; None: 256 (`context.DEFAULT_GEN_TOKS`),
            lowered to half the model's positions where that is less.
        bleu_tokenize: sacrebleu tokenizer; None: `zh` for Chinese targets, else `13a`.
        bleu_smooth: sacrebleu smoothing method (LANDeRMT: none).
        limit: translate only the first N records.
    """

    data: Path
    src: str
    tgt: str
    template: str = DEFAULT_TEMPLATE
    max_gen_toks: int | None = None
    bleu_tokenize: str | None = None
    bleu_smooth: str = "none"
    limit: int | None = None

    @property
    def task_name(self) -> str:
        return f"translate_{self.src}-{self.tgt}"

    @property
    def tokenize(self) -> str:
        return self.bleu_tokenize or ("zh" if self.tgt.lower().startswith("zh") else "13a")


@dataclass
class Translations:
    """Sources, references, prompts and hypotheses of one model, and their scores."""

    records: list[dict[str, Any]]
    prompts: list[str]
    hypotheses: list[str]
    metrics: dict[str, dict[str, Any]]


def check_settings(s: TranslationSettings) -> list[dict[str, Any]]:
    """Check the template and the scorers' options before any model loads; return the records.

    Raises:
        UsageError: unknown template name, a template without {source}, an unknown sacrebleu option.
        InputError: the data file (see `read_jsonl`).
    """
    resolve_template(s.template)
    _scorers(s)
    records = read_jsonl(s.data, TRANSLATION_KEYS)
    return records[: s.limit] if s.limit else records


def build_prompts(records: list[dict[str, Any]], s: TranslationSettings) -> list[str]:
    """Fill the template for every record."""
    template = resolve_template(s.template)
    return [fill(template, str(r["source"]), s.src, s.tgt) for r in records]


def generate(lm, prompts: list[str], max_gen_toks: int, docs: list[dict[str, Any]] | None = None) -> list[str]:
    """Greedy generation through the lm-eval LM (one record at a time, see `lm`); one line each.

    Stops at the first newline, so each hypothesis is one line of `hypotheses.txt`.

    Args:
        docs: the records, attached to the requests as lm-eval attaches task documents.
    """
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    docs = docs or [{} for _ in prompts]
    requests = [
        Instance(request_type="generate_until", doc=d, arguments=(p, dict(kwargs)), idx=0, metadata=("translate", i, 1))
        for i, (p, d) in enumerate(zip(prompts, docs))
    ]
    outputs = lm.generate_until(requests)
    return [" ".join(str(o).split("\n", 1)[0].split()) for o in outputs]


def score(hypotheses: list[str], references: list[str], s: TranslationSettings) -> dict[str, dict[str, Any]]:
    """Corpus BLEU and chrF of `hypotheses` against one reference each, with signatures."""
    bleu, chrf = _scorers(s)
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": {"value": b.score, "stderr": None, "signature": str(bleu.get_signature())},
        "chrf": {"value": c.score, "stderr": None, "signature": str(chrf.get_signature())},
    }


def _scorers(s: TranslationSettings):
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.metrics.bleu import _TOKENIZERS

    if s.tokenize not in _TOKENIZERS:
        raise UsageError(f"--bleu-tokenize: unknown sacrebleu tokenizer {s.tokenize!r}", hint=f"use one of {', '.join(_TOKENIZERS)}")
    if s.bleu_smooth not in BLEU.SMOOTH_DEFAULTS:
        raise UsageError(f"--bleu-smooth: unknown smoothing method {s.bleu_smooth!r}", hint=f"use one of {', '.join(BLEU.SMOOTH_DEFAULTS)}")
    return BLEU(tokenize=s.tokenize, smooth_method=s.bleu_smooth), CHRF()


def translate(lm, records: list[dict[str, Any]], s: TranslationSettings, max_gen_toks: int) -> Translations:
    """Translate every record with `lm`, generating at most `max_gen_toks` tokens each (the
    setting, or the default fitted to the model), and score the result."""
    prompts = build_prompts(records, s)
    hypotheses = generate(lm, prompts, max_gen_toks, records)
    metrics = score(hypotheses, [str(r["target"]) for r in records], s)
    return Translations(records=records, prompts=prompts, hypotheses=hypotheses, metrics=metrics)
