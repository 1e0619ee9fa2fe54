"""lm-eval's `HFLM` with two corrections, so that a score means the same in any company.

- **Greedy generation runs one request at a time.** lm-eval batches the generation requests
  of every task that shares generation settings, left-padded to the longest prompt of the
  batch. Positions and attention mask are right (transformers derives the positions from
  the mask), but a padded row's decoding steps round differently from the same prompt alone:
  in bfloat16 its logits move by a unit in the last place, and where two tokens tie, greedy
  decoding picks the other one. So a task's predictions depended on which other tasks ran in
  the same command and on `--batch-size`. A prompt generated on its own has no padding and
  no neighbours, and gives the same tokens whatever else is asked for.
- **A document's log-likelihood conditions on exactly one BOS.** lm-eval puts its prefix
  token (the BOS) before the document's tokens, and a tokenizer that adds a BOS itself
  (Llama's, Mistral's) puts a second one there, so the first token scored was a BOS. Here the
  document is tokenized without special tokens, and the prefix token is the only one.

Log-likelihood requests (multiple choice, rolling windows) are still batched by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm


@dataclass(frozen=True)
class RollingScore:
    """A document's log-likelihood (natural log, summed over its tokens) and how many tokens it has."""

    logprob: float
    tokens: int


class NeurolocLM(HFLM):
    """The `HFLM` every `neuroloc eval` model is loaded as; see the module docstring."""

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each request on its own, so that its tokens do not depend on the others."""
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests"):
            outputs.extend(super().generate_until([request], disable_tqdm=True))
        return outputs

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling log-likelihood (perplexity tasks), with one BOS per document."""
        return [s.logprob for s in self.rolling_scores([r.args[0] for r in requests])]

    def rolling_scores(self, texts: list[str]) -> list[RollingScore]:
        """Score every text as lm-eval does (disjoint windows of the model's length, each token
        predicted once, batches of the batch size in document order), after exactly one BOS."""
        windows: list[tuple[int, tuple]] = []
        counts = []
        for doc, text in enumerate(texts):
            tokens = self.tok_encode(text, add_special_tokens=False)
            counts.append(len(tokens))
            for window in get_rolling_token_windows(tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1):
                windows.append((doc, (None, *make_disjoint_window(window))))
        totals = [0.0] * len(texts)
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start : start + self.batch_size]
            scores = self._loglikelihood_tokens([w for _, w in batch], disable_tqdm=True, override_bs=len(batch))
            for (doc, _), (logprob, _) in zip(batch, scores):
                totals[doc] += logprob
        return [RollingScore(total, n) for total, n in zip(totals, counts)]
