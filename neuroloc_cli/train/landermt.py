"""LANDeRMT's selective finetuning with conditional awareness routing (Zhu et al. 2024, §3.3–3.4).

The recipe of `neuroloc train --method landermt`: the loop of `run.MaskedCPTRecipe`, with
what the method changes:

- **Data.** Translation directions (`--pair de-en=FILE`), each example an instruction
  template around the source sentence and the target after it, the loss on the target tokens
  only (`runtime.prompts`). Every optimizer step takes all its examples from ONE direction
  (`data.PairSampler`).
- **What trains.** Only the FFN neurons of the layers `locate awareness` kept: the general
  ones and each language's specific ones, split into one group of slices per set (rows of
  gate/up, columns of down; `selection.plan_groups`). A step of direction S-T trains the
  groups general, specific(S) and specific(T); the other languages' groups get no gradient,
  so AdamW leaves them, their moments and their decay alone. Every other parameter is
  frozen bit for bit, and optimizer state exists only for the neurons that can move.
- **Routing (Eq. 6–9).** Per kept layer and direction, the general neurons see `c·x` and the
  specific ones `(1 − c)·x`; the other languages' specific neurons are switched off (their
  input scaled by 0). `runtime.routing` applies it with hooks that follow the step's direction,
  in training and in the held-out evaluation alike.
- **The baseline** (`--full-finetune`): the same data, templates and loop, every parameter
  trained, no routing: gain and forgetting can be compared with the selective run.

The output is the trained checkpoint with `routing.json` beside it; `neuroloc export-pair`
folds one direction's routing into an ordinary checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.runtime.data import IGNORE
from neuroloc_cli.runtime.distributed import sum_over_processes
from neuroloc_cli.runtime.routing import ROUTING_FILE, attach
from neuroloc_cli.train.data import PairSampler
from neuroloc_cli.train.rng import derive_seed
from neuroloc_cli.train.run import MaskedCPTRecipe
from neuroloc_cli.train.selection import SelectionPlan, plan_groups, plan_selection

GENERAL = "general"


def specific(language: str) -> str:
    """The selection group of a language's specific neurons."""
    return f"specific-{language}"


def target_nll(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the labelled (target) tokens of right-padded rows.

    Args:
        input_ids, labels, attention_mask: [n, seq_len] each (`runtime.prompts.PairRows`);
            labels are IGNORE on the prompt and the padding.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")


class LanderMTRecipe(MaskedCPTRecipe):
    """`train --method landermt`: see the module docstring."""

    # -- selection and routing --------------------------------------------------------------

    def _plan_selection(self, names: dict[str, str]) -> SelectionPlan:
        shapes = {n: self.inputs.source.tensors[n].shape for n in names}
        if self.cfg.full_finetune:
            return plan_selection(shapes)
        routing = self.inputs.routing
        groups: dict[str, dict[str, tuple[int, torch.Tensor]]] = {GENERAL: {}}
        groups.update({specific(lang): {} for lang in routing.languages})
        for block in routing.blocks.values():
            sets = {GENERAL: block.general, **{specific(lang): idx for lang, idx in block.specific.items()}}
            for tensor, axis in block.parts:
                if tensor not in shapes:
                    raise UsageError(f"{self.cfg.masks}: routing names tensor {tensor}, which the model does not have")
                for group, index in sets.items():
                    if len(index):
                        groups[group][tensor] = (axis, torch.as_tensor(index, dtype=torch.int64))
        plan = plan_groups(shapes, {g: t for g, t in groups.items() if t})
        if plan.counts()["trainable"] == 0:
            raise UsageError(f"{self.cfg.masks}: the routing selects no neuron to train")
        return plan

    def _prepare(self, names: dict[str, str]) -> None:
        self.directions = [c.name for c in self.inputs.pairs]
        self.routes = None
        if not self.cfg.full_finetune:
            self.routes = attach(self.model, self.inputs.routing, self.directions[0], names)

    def _route(self, direction: str) -> None:
        """Switch routing and the trained groups to one direction."""
        if self.routes is None:
            return
        self.routes.set_direction(direction)
        src, tgt = self.inputs.routing.pair(direction)
        # a group without a neuron in any kept block was never made: nothing of it to train
        self.trainable.set_active({g for g in (GENERAL, specific(src), specific(tgt)) if g in self.trainable.groups})

    # -- data -------------------------------------------------------------------------------

    def _make_sampler(self) -> PairSampler:
        return PairSampler(self.inputs.pairs, self.cfg.seed)

    def _training_rows(self) -> int:
        return sum(c.train.stop - c.train.start for c in self.inputs.pairs)

    def _describe_data(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.inputs.pairs]

    # -- the step ---------------------------------------------------------------------------

    def _optimizer_step(self, lr: float) -> tuple[float, float | None]:
        """One optimizer step on one direction: route, accumulate, then the shared tail."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        c, ids, labels, attention = self.sampler.next_batch(self.step, self.global_batch)  # same on every process
        self._route(self.directions[c])
        shape = (self.world, cfg.grad_accum, cfg.batch_size, ids.shape[-1])
        local = zip(*(t.view(shape)[self.rank] for t in (ids, labels, attention)))
        scale = self.world / max(int((labels[:, 1:] != IGNORE).sum()), 1)  # mean over the global batch's targets
        torch.manual_seed(derive_seed(cfg.seed, self.step) + self.rank)
        self.model.train()
        total = torch.zeros((), device=self.accelerator.device)
        device = self.accelerator.device
        for micro in local:
            with self.accelerator.autocast():
                loss = target_nll(self.model, *(t.to(device) for t in micro)) * scale
            loss.backward()
            total += loss.detach()
        return float(total), self._apply_gradients(total)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out target-token perplexity of each direction, routed for that direction."""
        world, rank, device = self.world, self.rank, self.accelerator.device
        self.model.eval()
        out = {}
        for corpus in self.inputs.pairs:
            self._route(corpus.name)
            rows = [t[corpus.held_out][rank::world] for t in (corpus.rows.input_ids, corpus.rows.labels, corpus.rows.attention_mask)]
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for start in range(0, len(rows[0]), self.cfg.batch_size):
                b_ids, b_labels, b_attention = (t[start : start + self.cfg.batch_size].to(device) for t in rows)
                with self.accelerator.autocast():
                    nll = target_nll(self.model, b_ids, b_labels, b_attention)
                total += torch.tensor([float(nll), int((b_labels[:, 1:] != IGNORE).sum())], dtype=torch.float64, device=device)
            sum_over_processes(total, world)
            if total[1] > 0:
                out[corpus.name] = math.exp(float(total[0] / total[1]))
        self.model.train()
        return out

    # -- saving -----------------------------------------------------------------------------

    def _extra_files(self) -> dict[str, Path]:
        """routing.json travels with the trained model: `export-pair` reads it there. It must be
        the file the run was trained with, not one written into --masks since.

        Raises:
            InputError: the file changed during the run.
        """
        if self.cfg.full_finetune:
            return {}
        routing = self.inputs.routing
        if hashlib.sha256(routing.path.read_bytes()).hexdigest() != routing.sha256:
            raise InputError(f"{routing.path}: changed while the model trained with it", hint="train again, or restore the file")
        return {ROUTING_FILE: routing.path}

    def cleanup(self) -> None:
        if getattr(self, "routes", None) is not None:
            self.routes.remove()
        super().cleanup()
