"""Perplexity of a model on the user's documents (`--ppl`, `--tasks neuroloc_ppl`), per token,
per word and per byte, from one scoring pass.

neuroloc scores these itself instead of through lm-eval's task: lm-eval's rolling
log-likelihood returns one number per document, and a token-level perplexity (what a training
log shows) needs the number of tokens scored as well. Each document is scored once, after
exactly one BOS (`lm.NeurolocLM.rolling_scores`); words and bytes are counted and aggregated
with lm-eval's own functions, so `word_perplexity`, `byte_perplexity` and `bits_per_byte` are
lm-eval's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neuroloc_cli.eval.specs import LocalTask, read_jsonl


@dataclass
class Perplexities:
    """One perplexity task's metrics (as `harness.metrics_of` gives them) and per-document samples."""

    metrics: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)


def evaluate(lm, task: LocalTask, limit: int | None) -> Perplexities:
    """Score the first `limit` documents of `task` (all when None) with `lm`.

    Every perplexity is corpus-level: exp(total negative log-likelihood / total units), units
    being the tokens of the model's tokenizer, the words (whitespace-separated) or the UTF-8
    bytes of the raw text; `bits_per_byte` is the byte-level one in bits.
    """
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.api.task import ConfigurableTask

    records = read_jsonl(task.data, ("text",))[:limit]
    texts = [str(r["text"]) for r in records]
    scores = lm.rolling_scores(texts)
    words = [ConfigurableTask.count_words(t) for t in texts]
    nbytes = [ConfigurableTask.count_bytes(t) for t in texts]
    logprobs = [s.logprob for s in scores]
    values = {
        "token_perplexity": weighted_perplexity(list(zip(logprobs, [s.tokens for s in scores]))),
        "word_perplexity": weighted_perplexity(list(zip(logprobs, words))),
        "byte_perplexity": weighted_perplexity(list(zip(logprobs, nbytes))),
        "bits_per_byte": bits_per_byte(list(zip(logprobs, nbytes))),
    }
    samples = [
        {"doc_id": i, "doc": r, "logprob": s.logprob, "tokens": s.tokens, "words": w, "bytes": b}
        for i, (r, s, w, b) in enumerate(zip(records, scores, words, nbytes))
    ]
    return Perplexities({name: {"value": v, "stderr": None} for name, v in values.items()}, samples)
