"""The processes of a run: accelerate's setup, and the sums and averages between processes.

One process, or several under `accelerate launch` (data-parallel, CPU with gloo too). Every
process holds the whole model and takes its share of each global batch; only the trainable
gradients travel — so traffic follows the selection, as optimizer memory does — in one
all-reduce per optimizer step. The functions here do nothing in a run of one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator


def start_accelerator() -> Accelerator:
    """The run's `accelerate.Accelerator`: fp32 master weights everywhere, bf16 autocast of the
    forward pass on CUDA only (on CPU autocast is slow, and fp32 is what is wanted)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)


def average_gradients(params: list[nn.Parameter], loss: torch.Tensor, world: int) -> None:
    """Average the gradients of `params` (a missing one counts as zeros) and `loss` over the
    `world` processes, in place, with one all-reduce of a single flat buffer."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n
    loss.copy_(flat[-1])


def sum_over_processes(total: torch.Tensor, world: int) -> None:
    """Add up `total` over the `world` processes, in place."""
    if world == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(total)
