"""The causal-LM loss over the scored targets of a batch of rows.

One function serves training and held-out perplexity, so both score exactly the same tokens:
position t + 1 is a target of the token at t when it holds a token, never when it is padding
(`IGNORE`). Sums are returned rather than means, so that callers weight every scored token
equally however padding spreads them over micro-batches, batches and processes; perplexity
is then exp(summed NLL / scored targets).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from neuroloc_cli.train.data import IGNORE


def scored_targets(rows: torch.Tensor) -> int:
    """How many next-token targets `rows` [n, seq_len] holds."""
    return int((rows[:, 1:] != IGNORE).sum())


def summed_nll(model: Any, rows: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Summed next-token negative log-likelihood of `rows` [n, seq_len] over its scored targets.

    Args:
        pad_token_id: the input id of padding (`IGNORE`, always at the end of a row), which
            gets an attention mask as a Hugging Face model expects — under the causal mask no
            real token could see it anyway. None for packed rows, which hold no padding.
    """
    if pad_token_id is None:
        logits = model(input_ids=rows).logits
    else:
        real = rows != IGNORE
        logits = model(input_ids=rows.masked_fill(~real, pad_token_id), attention_mask=real.long()).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), rows[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
