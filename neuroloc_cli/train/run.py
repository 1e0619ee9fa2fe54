"""Masked continual pretraining as a recipe class you can read top to bottom.

    recipe = MaskedCPTRecipe(config, on_event)
    recipe.setup()             # check inputs; load the model and freeze it; optimizer; resume
    recipe.train()             # the loop: batches, loss, gradient sync, mask, clip, step, restore
    result = recipe.save()     # the trained model as a normal HF checkpoint
    recipe.cleanup()

This file holds the recipe and its loop; the jobs it calls on (checks, model loading,
selection, optimizer and schedule, processes, loss, events, checkpoints, export) each have a
module named for them, listed in the package's docstring.

One process, or several under `accelerate launch` (data-parallel: each process takes its
share of every global batch). Only the main process writes. fp32 weights throughout; bf16
autocast for the forward pass on CUDA.

Reproducibility: the data order, the dropout RNG and the learning rate are functions of
(seed, step) alone, so a run resumed from a checkpoint at step k computes exactly what an
uninterrupted run computes from step k on.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.format import DTYPE_NAMES
from neuroloc_cli.runtime.distributed import average_gradients, start_accelerator
from neuroloc_cli.runtime.model import load_model, model_skeleton, parameter_names
from neuroloc_cli.train.config import TrainConfig
from neuroloc_cli.train.data import MixtureSampler
from neuroloc_cli.train.estimate import output_bytes, planned_optimizer_bytes, training_memory
from neuroloc_cli.train.events import CheckpointEvent, EvalEvent, Event, EventLog, StartEvent, StepEvent
from neuroloc_cli.train.export import provenance, write_model
from neuroloc_cli.train.inputs import RunInputs, check_inputs
from neuroloc_cli.train.loss import held_out_perplexity, scored_targets, summed_nll
from neuroloc_cli.train.optim import adamw, learning_rate, optimizer_state_bytes
from neuroloc_cli.train.rng import derive_seed
from neuroloc_cli.train.selection import SelectionPlan, apply_selection, plan_selection
from neuroloc_cli.train.state import default_run_dir, discard_earlier_run, load_checkpoint, run_identity, save_checkpoint


@dataclass(frozen=True)
class TrainResult:
    """What a training run did and wrote."""

    output: Path | None
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    first_loss: float | None
    last_loss: float | None
    perplexity: dict[str, dict[str, float]]  # "before" / "after" -> corpus -> perplexity
    counts: dict[str, int]
    optimizer_state_bytes: int
    shards: list[str]
    main_process: bool = True  # False on the other processes of a data-parallel run

    def to_dict(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "main_process"}
        doc["output"] = str(self.output) if self.output else None
        return doc


class MaskedCPTRecipe:
    """Continual pretraining (causal-LM loss) of only what a mask or globs allow.

    Args:
        config: the validated run configuration.
        on_event: called on the main process with each event (`StartEvent`, `StepEvent`,
            `EvalEvent`, `CheckpointEvent`) once it is logged: the CLI draws its progress bar
            from these.
    """

    def __init__(self, config: TrainConfig, on_event: Callable[[Event], None] | None = None):
        self.cfg = config
        self.output = Path(config.output or "neuroloc-train-out")  # only --dry-run may omit it
        self.run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(self.output.absolute())
        # Our own hidden folder is removed once the output is written; a --run-dir is the user's.
        self.remove_run_dir = config.run_dir is None and not config.keep_state
        self.log = EventLog(Path(config.log) if config.log else self.run_dir / "log.jsonl", on_event)
        self.inputs: RunInputs | None = None
        self.step = 0
        self.tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.perplexity: dict[str, dict[str, float]] = {}
        self._seconds = 0.0
        self._tokens_this_run = 0

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check every input before touching weights, then build model, optimizer and data.

        Raises:
            InputError / UsageError / OutputError: naming the file, tensor or flag at fault;
                nothing has been written when they are raised.
        """
        if self.cfg.output is None:
            raise UsageError("train needs an output folder", hint="pass -o OUT_DIR, or --dry-run to only check the run")
        self._check_inputs()
        self.accelerator = start_accelerator()
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.model = load_model(Path(self.cfg.model), device=self.accelerator.device)
        self.model.config.use_cache = False  # no KV cache while training: it only costs memory
        names = parameter_names(self.model, self.inputs.source)
        plan = self._plan_selection(names)
        self.trainable = apply_selection(self.model, plan, names)
        self._prepare(names)
        self.counts = plan.counts()
        self.params = list(self.trainable.params.values())
        self.optimizer = adamw(self.params, self.cfg)
        self.total_steps = self._total_steps()
        self.sampler = self._make_sampler()
        self.identity = run_identity(self.inputs, self.world)
        self._resume_or_start()

    # -- what a method changes (LANDeRMT overrides these; see train/landermt.py) -------------

    def _prepare(self, names: dict[str, str]) -> None:
        """After the selection is applied: anything the method adds to the model (hooks)."""

    def _make_sampler(self) -> Any:
        return MixtureSampler(self.inputs.corpora, self.cfg.seed)

    def _training_rows(self) -> int:
        return sum(len(c.train) for c in self.inputs.corpora)

    def _describe_data(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.inputs.corpora]

    def _extra_files(self) -> dict[str, Path]:
        """Files copied into the output beside the weights (name in the output -> source)."""
        return {}

    def plan(self) -> dict[str, Any]:
        """Check every input and describe the run without loading weights or writing anything
        (`--dry-run`): what trains, optimizer state, peak memory, the output's size, steps and
        data (`train.estimate`). Assumes one process."""
        self._check_inputs()
        self.world = 1
        skeleton = model_skeleton(Path(self.cfg.model))
        plan = self._plan_selection(parameter_names(skeleton, self.inputs.source))
        counts = plan.counts()
        inputs, cfg = self.inputs, self.cfg
        disk = output_bytes(inputs.source, DTYPE_NAMES[cfg.out_dtype] if cfg.out_dtype else None)
        return {
            "output": cfg.output,
            "total_steps": self._total_steps(),
            "tokens_per_step": self.global_batch * cfg.seq_len,
            "seq_len": cfg.seq_len,
            "seq_len_default": inputs.seq_len_default,
            "positions": inputs.positions,
            **counts,
            "optimizer_state_bytes": planned_optimizer_bytes(plan),
            "memory_bytes": training_memory(plan, skeleton.config, cfg.batch_size * cfg.seq_len),
            "disk_bytes": {"output": disk, "total": disk},
            "data": self._describe_data(),
            "framing": inputs.framing.describe(),
            "warnings": inputs.warnings,
            "hyper_parameters": cfg.hyper_parameters(),
        }

    def _check_inputs(self) -> None:
        self.inputs = check_inputs(self.cfg)
        self.cfg = self.inputs.config  # with the sequence length chosen

    def _plan_selection(self, names: dict[str, str]) -> SelectionPlan:
        """What trains, from the shapes of the checkpoint tensors the model has (`names`)."""
        cfg, inputs = self.cfg, self.inputs
        plan = plan_selection(
            {n: inputs.source.tensors[n].shape for n in names},
            train_mask=inputs.mask if cfg.mask_role == "train" else None,
            freeze_mask=inputs.mask if cfg.mask_role == "freeze" else None,
            trainable=cfg.trainable,
        )
        if plan.counts()["trainable"] == 0:
            raise UsageError("nothing to train: the mask and --trainable select no parameter")
        return plan

    def _total_steps(self) -> int:
        cfg = self.cfg
        per_step = self.global_batch * cfg.seq_len
        candidates = [s for s in (cfg.max_steps, math.ceil(cfg.max_tokens / per_step) if cfg.max_tokens else None) if s]
        if candidates:
            return min(candidates)
        # Neither limit given: one pass over the training sequences.
        return max(1, math.ceil(self._training_rows() / self.global_batch))

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def _resume_or_start(self) -> None:
        """With --resume, continue from the newest checkpoint of the run folder; without, start
        afresh — over an earlier run's checkpoints and log only with --overwrite."""
        if self.cfg.resume:
            resumed = load_checkpoint(self.run_dir, self.trainable.params, self.optimizer, self.identity)
            self.trainable.after_step()  # the loaded slices into their tensors' rows
            self.step, self.tokens = resumed.step, resumed.tokens
            self.sampler.counters = list(resumed.counters)
            if self.is_main:  # which alone writes the log and reports
                self._recall_start(self.log.rewind(resumed.step))
        else:
            discard_earlier_run(self.run_dir, self.log.path, overwrite=self.cfg.overwrite, delete=self.is_main)
        self.accelerator.wait_for_everyone()

    def _recall_start(self, logged: list[Event]) -> None:
        """Take what the run measured at its start from its log — the perplexity before
        training and the first step's loss — since the weights to measure them are gone."""
        for event in logged:
            if isinstance(event, EvalEvent) and event.step == 0:
                self.perplexity.setdefault("before", event.perplexity)
            elif isinstance(event, StepEvent) and event.step == 1 and self.first_loss is None:
                self.first_loss = event.loss

    # -- training ---------------------------------------------------------------------------

    def train(self) -> None:
        """Run optimizer steps until `total_steps`, evaluating and checkpointing as configured."""
        cfg = self.cfg
        self._emit(self._start_event())
        if self.step == 0:
            self.perplexity["before"] = self.evaluate()
            self._emit(EvalEvent(step=0, perplexity=self.perplexity["before"]))
        start = time.perf_counter()
        tokens_at_start = self.tokens
        while self.step < self.total_steps:
            lr = learning_rate(self.step, cfg, self.total_steps)
            loss, grad_norm = self._optimizer_step(lr)
            self.step += 1
            self.tokens += self.global_batch * cfg.seq_len
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
            elapsed = time.perf_counter() - start
            self._emit(
                StepEvent(
                    step=self.step,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens=self.tokens,
                    tokens_per_s=(self.tokens - tokens_at_start) / max(elapsed, 1e-9),
                    trainable=self.counts["trainable"],
                )
            )
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self._emit(EvalEvent(step=self.step, perplexity=self.evaluate()))
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        self._seconds = time.perf_counter() - start
        self._tokens_this_run = self.tokens - tokens_at_start
        self.perplexity["after"] = self.evaluate()
        self._emit(EvalEvent(step=self.step, perplexity=self.perplexity["after"]))

    def _optimizer_step(self, lr: float) -> tuple[float, float | None]:
        """One optimizer step: accumulate micro-batches, sync, mask, clip, step, restore."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.sampler.next_batch(self.step, self.global_batch)  # same on every process
        local = batch.view(self.world, cfg.grad_accum, cfg.batch_size, cfg.seq_len)[self.rank]
        # The step's loss is the mean NLL over the scored targets of the whole global batch: each
        # micro-batch's sum over that count, times the process count that the sync divides by.
        # Every token weighs the same, however padding spreads them over micro-batches.
        scale = self.world / scored_targets(batch)
        # Dropout draws depend on (seed, step, process) only, so a resumed run repeats them.
        torch.manual_seed(derive_seed(cfg.seed, self.step) + self.rank)
        self.model.train()
        total = torch.zeros((), device=self.accelerator.device)
        for micro in local:
            with self.accelerator.autocast():
                loss = summed_nll(self.model, micro.to(self.accelerator.device), self.inputs.framing.pad_token_id) * scale
            loss.backward()
            total += loss.detach()
        return float(total), self._apply_gradients(total)

    def _apply_gradients(self, total: torch.Tensor) -> float | None:
        """After the micro-batches' backward passes: collect, sync, clip, step, restore.

        Args:
            total: the step's loss (summed over micro-batches), averaged over processes in place.

        Returns:
            The gradient norm before clipping, or None without clipping.
        """
        self.trainable.collect_gradients()  # slices take their rows' gradients; frozen ones zeroed
        moving = self.trainable.active_params()
        average_gradients(moving, total, self.world)  # only the trainable ones travel
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(moving, self.cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.trainable.after_step()  # slices copied into their rows; frozen values written back
        return grad_norm

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity of each corpus (see `loss.held_out_perplexity`)."""
        return held_out_perplexity(
            self.model,
            self.inputs.corpora,
            pad_token_id=self.inputs.framing.pad_token_id,
            batch_size=self.cfg.batch_size,
            accelerator=self.accelerator,
        )

    def _start_event(self) -> StartEvent:
        inputs = self.inputs
        return StartEvent(
            step=self.step,
            total_steps=self.total_steps,
            seq_len=self.cfg.seq_len,
            seq_len_default=inputs.seq_len_default,
            positions=inputs.positions,
            **self.counts,
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer, self.params),
            world_size=self.world,
            framing=inputs.framing.describe(),
            warnings=inputs.warnings,
        )

    def _emit(self, event: Event) -> None:
        if self.is_main:  # one log and one progress bar for the run, not one per process
            self.log.write(event)

    # -- saving -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """A periodic checkpoint of the trainable state (main process writes it)."""
        if self.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.step,
                self.tokens,
                self.sampler.counters,
                self.trainable.params,
                self.optimizer,
                self.identity,
                self.cfg.keep_checkpoints,
            )
            self._emit(CheckpointEvent(step=self.step, path=str(path)))
        self.accelerator.wait_for_everyone()

    def save(self) -> TrainResult:
        """Write the trained model (main process); every process returns the result."""
        shards: list[str] = []
        if self.is_main:
            out_dtype = DTYPE_NAMES[self.cfg.out_dtype] if self.cfg.out_dtype else None
            record = provenance(
                self.inputs,
                self.identity,
                world_size=self.world,
                steps=self.step,
                tokens=self.tokens,
                counts=self.counts,
                perplexity=self.perplexity,
            )
            shards = write_model(
                self.output,
                self.inputs.source,
                self.trainable,
                inputs=self.inputs.paths,
                out_dtype=out_dtype,
                max_shard_bytes=self.inputs.max_shard_bytes,
                overwrite=self.cfg.overwrite,
                provenance=record,
                log_file=self.log.path,
                extra_files=self._extra_files(),
            )
            if self.remove_run_dir:  # the output holds the log now; the checkpoints served their purpose
                shutil.rmtree(self.run_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return TrainResult(
            self.output,
            self.step,
            self.tokens,
            self._seconds,
            self._tokens_this_run / max(self._seconds, 1e-9),
            self.first_loss,
            self.last_loss,
            self.perplexity,
            self.counts,
            optimizer_state_bytes(self.optimizer, self.params),
            shards,
            self.is_main,
        )

    def cleanup(self) -> None:
        """Release the checkpoint's file handles."""
        if self.inputs is not None:
            self.inputs.source.close()


def recipe_for(config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> MaskedCPTRecipe:
    """The recipe of the run's `method`."""
    if config.method == "landermt":
        from neuroloc_cli.train.landermt import LanderMTRecipe

        return LanderMTRecipe(config, on_event)
    return MaskedCPTRecipe(config, on_event)


def plan_training(config: TrainConfig) -> dict[str, Any]:
    """Check a run's inputs and describe it; load no weights, write nothing (`--dry-run`)."""
    recipe = recipe_for(config)
    try:
        return recipe.plan()
    finally:
        recipe.cleanup()


def run_training(config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Set up, train and save; the one core call of `neuroloc train`."""
    recipe = recipe_for(config, on_event)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()
