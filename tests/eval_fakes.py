"""Fake lm-eval models for the eval tests: they answer from the documents they are given."""

from __future__ import annotations

from lm_eval.api.model import LM

LETTERS = "ABCDEFGHIJ"


class OracleLM(LM):
    """Answers every math, choice and translation request from its document.

    Args:
        math_answer: format of the math answer, e.g. " {n}" or " The answer is {n:,}." .
        wrong: answer wrongly instead (the right number + 1, another letter, an empty translation).
        translate: maps a record to its hypothesis (default: the reference itself).
        nats_per_byte: the negative log-likelihood `loglikelihood_rolling` returns per UTF-8 byte.
    """

    def __init__(self, math_answer=" {n}", wrong=False, translate=None, nats_per_byte=0.5):
        super().__init__()
        self.math_answer, self.wrong, self.nats_per_byte = math_answer, wrong, nats_per_byte
        self.translate = translate or (lambda doc: " " + doc["target"])
        self.calls: list[str] = []

    def loglikelihood(self, requests, disable_tqdm=False):
        self.calls.append("loglikelihood")
        out = []
        for r in requests:
            _, continuation = r.args
            right = " " + LETTERS[(r.doc["answer"] + (1 if self.wrong else 0)) % len(r.doc["choices"])]
            out.append((0.0 if continuation == right else -10.0, continuation == right))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        self.calls.append("loglikelihood_rolling")
        return [-self.nats_per_byte * len(r.args[0].encode("utf-8")) for r in requests]

    def generate_until(self, requests, disable_tqdm=False):
        self.calls.append("generate_until")
        out = []
        for r in requests:
            if "answer_number" in r.doc:
                n = r.doc["answer_number"] + (1 if self.wrong else 0)
                out.append(self.math_answer.format(n=n))
            else:
                out.append("" if self.wrong else self.translate(r.doc))
        return out
