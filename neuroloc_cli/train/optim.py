"""AdamW over the trainable parameters, and the learning-rate schedule.

The optimizer sees only what trains (whole tensors, split slices, masked tensors; see
`selection`), so its state — two fp32 moments per element — follows the selection. The
learning rate is a function of the step alone, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neuroloc_cli.train.config import TrainConfig


def adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices (whole, or split slices of them) and none
    on vectors (biases, norms), as nanoGPT and HF Trainer do."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), foreach=True)


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (from 0): linear warm-up over `warmup` steps
    (the first step already gets lr/warmup), then cosine decay to 0 at the last step, or constant."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    """Bytes held by the optimizer's state tensors (moments, step counters); before the first
    step, what AdamW will allocate: two fp32 moments and a step per parameter."""
    held = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    if held:
        return held
    return sum(2 * p.numel() * 4 + 4 for p in params)
