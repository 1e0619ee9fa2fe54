"""Fake lm-eval models for the eval tests: they answer from the documents they are given."""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.models.utils import postprocess_generated_text

from neuroloc_cli.eval.lm import RollingScore

LETTERS = "ABCDEFGHIJ"


class OracleLM(LM):
    """Answers every math, choice and translation request from its document.

    Generated text is cut at the request's stop sequences, as lm-eval's HFLM cuts it, so a
    run-on answer ("7\\nQuestion: …") reaches the task as a real model's would.

    Args:
        math_answer: format of the math answer, e.g. " {n}" or " The answer is {n:,}." .
        wrong: answer wrongly instead (the right number + 1, another letter, an empty translation).
        translate: maps a record to its hypothesis (default: the reference itself).
        nats_per_byte: the negative log-likelihood of each UTF-8 byte, its tokens being bytes.

    Attributes:
        prompts: every generation prompt, in the order asked.
        gen_kwargs: the generation settings of every generation request.
    """

    def __init__(self, math_answer=" {n}", wrong=False, translate=None, nats_per_byte=0.5):
        super().__init__()
        self.math_answer, self.wrong, self.nats_per_byte = math_answer, wrong, nats_per_byte
        self.translate = translate or (lambda doc: " " + doc["target"])
        self.calls: list[str] = []
        self.prompts: list[str] = []
        self.gen_kwargs: list[dict] = []

    def loglikelihood(self, requests, disable_tqdm=False):
        self.calls.append("loglikelihood")
        out = []
        for r in requests:
            _, continuation = r.args
            right = " " + LETTERS[(r.doc["answer"] + (1 if self.wrong else 0)) % len(r.doc["choices"])]
            out.append((0.0 if continuation == right else -10.0, continuation == right))
        return out

    def rolling_scores(self, texts):
        self.calls.append("rolling_scores")
        return [RollingScore(-self.nats_per_byte * len(t.encode("utf-8")), len(t.encode("utf-8"))) for t in texts]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [s.logprob for s in self.rolling_scores([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm=False):
        self.calls.append("generate_until")
        out = []
        for r in requests:
            prompt, kwargs = r.args
            self.prompts.append(prompt)
            self.gen_kwargs.append(dict(kwargs))
            if "answer_number" in r.doc:
                n = r.doc["answer_number"] + (1 if self.wrong else 0)
                text = self.math_answer.format(n=n)
            else:
                text = "" if self.wrong else self.translate(r.doc)
            out.append(postprocess_generated_text(text, stop=kwargs.get("until"), think_end_token=None))
        return out
