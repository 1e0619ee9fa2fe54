"""The causal-LM loss over the scored targets of a batch of rows, and held-out perplexity.

One function serves training and held-out perplexity, so both score exactly the same tokens:
position t + 1 is a target of the token at t when it holds a token, never when it is padding
(`IGNORE`). Sums are returned rather than means, so that callers weight every scored token
equally however padding spreads them over micro-batches, batches and processes; perplexity
is then exp(summed NLL / scored targets).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from neuroloc_cli.runtime.data import IGNORE
from neuroloc_cli.runtime.distributed import sum_over_processes
from neuroloc_cli.train.data import Corpus

if TYPE_CHECKING:
    from accelerate import Accelerator


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


@torch.no_grad()
def held_out_perplexity(
    model: Any, corpora: list[Corpus], *, pad_token_id: int | None, batch_size: int, accelerator: Accelerator
) -> dict[str, float]:
    """Perplexity on each corpus's held-out rows (corpora without any are skipped): exp of the
    mean NLL over their scored targets, padding never counted.

    Each process scores its share of the rows; the NLL sums and target counts are added over
    processes before dividing, so every scored token weighs the same whichever process scored it.

    Args:
        model: left in training mode on return.
        accelerator: the run's accelerator: its device, autocast and processes.

    Returns:
        Corpus path -> perplexity.
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    model.eval()
    out = {}
    for corpus in corpora:
        rows = corpus.held_out[rank::world]
        total = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, scored targets
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            with accelerator.autocast():
                nll = summed_nll(model, batch.to(device), pad_token_id)
            total += torch.tensor([float(nll), scored_targets(batch)], dtype=torch.float64, device=device)
        sum_over_processes(total, world)
        if total[1] > 0:
            out[str(corpus.path)] = math.exp(float(total[0] / total[1]))
    model.train()
    return out
