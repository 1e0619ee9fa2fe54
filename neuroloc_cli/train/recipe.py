"""Masked continual pretraining as a recipe class you can read top to bottom.

    recipe = MaskedCPTRecipe(config, on_event)
    recipe.setup()             # check inputs, load tokenizer, data, model; freeze; optimizer; resume
    recipe.train()             # the loop: batches, loss, gradient sync, mask, clip, step, restore
    result = recipe.save()     # the trained model as a normal HF checkpoint
    recipe.cleanup()

One process, or several under `accelerate launch` (data-parallel: each process takes its
share of every global batch; the trainable gradients — only those, so traffic follows the
selection too — are averaged with one all-reduce per optimizer step). Only the main process
writes. fp32 weights throughout; bf16 autocast for the forward pass on CUDA.

Reproducibility: the data order, the dropout RNG and the learning rate are functions of
(seed, step) alone, so a run resumed from a checkpoint at step k computes exactly what an
uninterrupted run computes from step k on.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli import __version__
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.eval.context import model_positions
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.format import DTYPE_NAMES
from neuroloc_cli.io.output import check_output_path
from neuroloc_cli.io.writer import parse_size
from neuroloc_cli.masks import Mask
from neuroloc_cli.train import data as datalib
from neuroloc_cli.train import state as statelib
from neuroloc_cli.train.config import DEFAULT_SEQ_LEN, TrainConfig
from neuroloc_cli.train.export import write_model
from neuroloc_cli.train.loss import scored_targets, summed_nll
from neuroloc_cli.train.masking import SelectionPlan, apply_selection, plan_selection, resolve_names, tied_duplicates

Event = dict[str, Any]


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
        on_event: called on the main process with each event (`start`, `step`, `eval`,
            `checkpoint`): the CLI draws its progress bar from these.
    """

    def __init__(self, config: TrainConfig, on_event: Callable[[Event], None] | None = None):
        self.cfg = config
        self.on_event = on_event or (lambda e: None)
        self.output = Path(config.output or "neuroloc-train-out")  # only --dry-run may omit it
        self.run_dir = Path(config.run_dir) if config.run_dir else statelib.default_run_dir(self.output)
        # Our own hidden folder is removed once the output is written; a --run-dir is the user's.
        self.remove_run_dir = config.run_dir is None and not config.keep_state
        self.log_path = Path(config.log) if config.log else self.run_dir / "log.jsonl"
        self.step = 0
        self.tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.perplexity: dict[str, dict[str, float]] = {}
        self._seconds = 0.0

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check every input before touching weights, then build model, optimizer and data.

        Raises:
            InputError / UsageError / OutputError: naming the file, tensor or flag at fault;
                nothing has been written when they are raised.
        """
        from accelerate import Accelerator

        if self.cfg.output is None:
            raise UsageError("train needs an output folder", hint="pass -o OUT_DIR, or --dry-run to only check the run")
        self._check_inputs()
        cuda = torch.cuda.is_available()
        # fp32 master weights; bf16 autocast on CUDA only (CPU autocast is slow and not needed).
        self.accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self._build_model()
        self.total_steps = self._total_steps()
        self.sampler = datalib.MixtureSampler(self.corpora, self.cfg.seed)
        self.identity = self._identity()
        self._prepare_run_dir()

    def plan(self) -> dict[str, Any]:
        """Check every input and describe the run without loading weights or writing anything
        (`--dry-run`): what trains, optimizer state, steps and data. Assumes one process."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self._check_inputs()
        self.world = 1
        with torch.device("meta"):  # names and shapes only, no memory
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(self.model_path)))
        plan = self._selection_plan(model)
        counts = plan.counts()
        return {"output": self.cfg.output, "total_steps": self._total_steps(), "tokens_per_step": self.global_batch * self.cfg.seq_len,
                "seq_len": self.cfg.seq_len, "seq_len_default": self.seq_len_default, "positions": self.positions,
                **counts, "optimizer_state_bytes": 8 * counts["optimizer_elements"],
                "data": [c.describe() for c in self.corpora], "framing": self.framing.describe(), "warnings": self.warnings,
                "hyper_parameters": self.cfg.hyper_parameters()}

    def _check_inputs(self) -> None:
        self.model_path = Path(self.cfg.model)
        self.source = Checkpoint.open(self.model_path, spec=self.cfg.model)
        try:
            self.max_shard_bytes = parse_size(self.cfg.max_shard_size)
        except ValueError as e:
            raise UsageError(f"--max-shard-size: {e}") from None
        self.positions = model_positions(self.source.config)
        self.seq_len_default = self.cfg.seq_len is None
        self.cfg = cfg = self.cfg.model_copy(update={"seq_len": self._seq_len()})
        mask_path = cfg.train_mask or cfg.freeze_mask
        self.mask = self._load_mask(Path(mask_path)) if mask_path else None
        self.inputs = [self.model_path, *(Path(d.path) for d in cfg.data), *([Path(mask_path)] if mask_path else [])]
        if cfg.output is not None:
            check_output_path(self.output, self.inputs, cfg.overwrite)
        self.tokenizer = datalib.load_tokenizer(self.model_path)
        self.framing = datalib.framing_of(self.tokenizer, cfg.packing, cfg.txt_docs)
        self.corpora = datalib.load_corpora(cfg.data, self.tokenizer, self.framing, cfg.seq_len, cfg.eval_share)
        self.warnings = [w for c in self.corpora for w in c.warnings]

    def _seq_len(self) -> int:
        """--seq-len, which must fit the model's positions; without it, the smaller of 512 and
        those positions. Every later step (packing, the resume check, provenance) reads the
        value chosen here from the config."""
        seq_len, limit = self.cfg.seq_len, self.positions
        if seq_len is None:
            return min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
        if limit is not None and seq_len > limit:
            raise UsageError(f"--seq-len {seq_len} exceeds the model's {limit} positions", hint=f"use --seq-len {limit} or less")
        return seq_len

    def _load_mask(self, path: Path) -> Mask:
        mask = Mask.load(path)
        shapes = {n: i.shape for n, i in self.source.tensors.items()}
        try:
            mask.check_shapes(shapes, str(self.model_path))
        except InputError as e:
            raise InputError(f"{path}: {e.message}", hint=e.hint) from None
        return mask

    def _build_model(self) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is on stderr; one is enough
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=torch.float32)
        except Exception as e:  # transformers' many error types: unknown architecture, bad config
            raise InputError(f"{self.model_path}: cannot load the model ({type(e).__name__}: {e})") from None
        model.to(self.accelerator.device)
        model.config.use_cache = False  # no KV cache while training: it only costs memory
        plan = self._selection_plan(model)
        self.trainable = apply_selection(model, plan, self._names)
        self.counts = plan.counts()
        self.model = model
        cfg = self.cfg
        self.params = list(self.trainable.params.values())
        self.optimizer = torch.optim.AdamW(
            self.trainable.param_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas), foreach=True
        )

    def _selection_plan(self, model: torch.nn.Module) -> SelectionPlan:
        cfg = self.cfg
        self._names = resolve_names(model, [n for n, i in self.source.tensors.items() if i.torch_dtype.is_floating_point])
        for kept, alias in tied_duplicates(model, self._names):
            # Training one parameter under two stored names would write the pair apart.
            raise InputError(
                f"{self.model_path}: stores both {kept} and {alias}, which the model ties into one parameter",
                hint="re-save it with save_pretrained (which stores the pair once), or untie the weights in config.json",
            )
        plan = plan_selection(
            {n: self.source.tensors[n].shape for n in self._names},
            train_mask=self.mask if cfg.train_mask else None,
            freeze_mask=self.mask if cfg.freeze_mask else None,
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
        return max(1, math.ceil(sum(len(c.train) for c in self.corpora) / self.global_batch))

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def _identity(self) -> dict[str, Any]:
        """The hyper-parameters and input fingerprints a resume must match."""
        return {
            "hyper_parameters": self.cfg.hyper_parameters(),
            "framing": self.framing.describe(),
            "world_size": self.world,
            "model": self.source.fingerprint,
            "mask": _sha256(Path(self.cfg.train_mask or self.cfg.freeze_mask)) if self.mask else None,
            "mask_role": "train" if self.cfg.train_mask else "freeze" if self.cfg.freeze_mask else None,
            "data": [c.describe() for c in self.corpora],
        }

    def _prepare_run_dir(self) -> None:
        found = statelib.checkpoints(self.run_dir)
        if self.cfg.resume:
            resumed = statelib.load_checkpoint(self.run_dir, self.trainable.params, self.optimizer, self.identity)
            self.trainable.after_step()  # the loaded slices into their tensors' rows
            self.step, self.tokens = resumed.step, resumed.tokens
            self.sampler.counters = list(resumed.counters)
            self._resume_log(resumed.step)
        elif found or self.log_path.exists():
            if not self.cfg.overwrite:
                raise UsageError(f"{self.run_dir}: holds the checkpoints or log of an earlier run",
                                 hint="pass --resume to continue it, or --overwrite to start over")
            if self.is_main:
                for old in found:
                    shutil.rmtree(old)
                self.log_path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _resume_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (the resumed run writes them again), and
        take what the run measured at its start from the rest: the perplexity before training
        and the first step's loss (the weights to measure them are gone). One read, on the main
        process, which alone writes the log and reports."""
        if not self.is_main or not self.log_path.is_file():
            return
        keep = [line for line in self.log_path.read_text().splitlines() if _logged_step(line) <= step]
        self.log_path.write_text("".join(line + "\n" for line in keep))
        for event in map(json.loads, keep):  # every kept line parses: _logged_step saw to it
            if event.get("event") == "eval" and event.get("step") == 0:
                self.perplexity.setdefault("before", event["perplexity"])
            elif event.get("event") == "step" and event.get("step") == 1 and self.first_loss is None:
                self.first_loss = event["loss"]

    # -- training ---------------------------------------------------------------------------

    def train(self) -> None:
        """Run optimizer steps until `total_steps`, evaluating and checkpointing as configured."""
        cfg = self.cfg
        self._emit({"event": "start", "step": self.step, "total_steps": self.total_steps, "seq_len": cfg.seq_len,
                    "seq_len_default": self.seq_len_default, "positions": self.positions, **self.counts,
                    "optimizer_state_bytes": self.optimizer_state_bytes(), "world_size": self.world,
                    "framing": self.framing.describe(), "warnings": self.warnings})
        if self.step == 0:
            self.perplexity["before"] = self.evaluate()
            self._emit({"event": "eval", "step": 0, "perplexity": self.perplexity["before"]})
        start = time.perf_counter()
        tokens_at_start = self.tokens
        while self.step < self.total_steps:
            loss, grad_norm = self._optimizer_step()
            self.step += 1
            self.tokens += self.global_batch * cfg.seq_len
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
            elapsed = time.perf_counter() - start
            self._emit({"event": "step", "step": self.step, "loss": loss, "lr": self._lr_at(self.step - 1),
                        "grad_norm": grad_norm, "tokens": self.tokens,
                        "tokens_per_s": (self.tokens - tokens_at_start) / max(elapsed, 1e-9),
                        "trainable": self.counts["trainable"]})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self._emit({"event": "eval", "step": self.step, "perplexity": self.evaluate()})
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        self._seconds = time.perf_counter() - start
        self._tokens_this_run = self.tokens - tokens_at_start
        self.perplexity["after"] = self.evaluate()
        self._emit({"event": "eval", "step": self.step, "perplexity": self.perplexity["after"]})

    def _optimizer_step(self) -> tuple[float, float | None]:
        """One optimizer step: accumulate micro-batches, sync, mask, clip, step, restore."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.step)
        batch = self.sampler.next_batch(self.step, self.global_batch)  # same on every process
        local = batch.view(self.world, cfg.grad_accum, cfg.batch_size, cfg.seq_len)[self.rank]
        # The step's loss is the mean NLL over the scored targets of the whole global batch: each
        # micro-batch's sum over that count, times the process count that the sync divides by.
        # Every token weighs the same, however padding spreads them over micro-batches.
        scale = self.world / scored_targets(batch)
        # Dropout draws depend on (seed, step, process) only, so a resumed run repeats them.
        torch.manual_seed(datalib._mix(cfg.seed, self.step) + self.rank)
        self.model.train()
        total = torch.zeros((), device=self.accelerator.device)
        for micro in local:
            with self.accelerator.autocast():
                loss = summed_nll(self.model, micro.to(self.accelerator.device), self.framing.pad_token_id) * scale
            loss.backward()
            total += loss.detach()
        self.trainable.collect_gradients()  # slices take their rows' gradients; frozen ones zeroed
        self._sync_gradients(total)
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.trainable.after_step()  # slices copied into their rows; frozen values written back
        return float(total), grad_norm

    def _sync_gradients(self, loss: torch.Tensor) -> None:
        """Average trainable gradients (and the loss) over processes with one all-reduce."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n
        loss.copy_(flat[-1])

    def _lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup` steps (the first step already gets lr/warmup), then
        cosine decay to 0 at the last step, or constant."""
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return cfg.lr
        progress = (step - cfg.warmup) / max(1, self.total_steps - cfg.warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Perplexity on each corpus's held-out sequences (corpora without any are skipped):
        exp of the mean NLL over their scored targets, padding never counted."""
        self.model.eval()
        out = {}
        for corpus in self.corpora:
            seqs = corpus.held_out[self.rank::self.world]
            total = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)  # NLL sum, scored targets
            for start in range(0, len(seqs), self.cfg.batch_size):
                rows = seqs[start:start + self.cfg.batch_size]
                with self.accelerator.autocast():
                    nll = summed_nll(self.model, rows.to(self.accelerator.device), self.framing.pad_token_id)
                total += torch.tensor([float(nll), scored_targets(rows)], dtype=torch.float64, device=total.device)
            if self.world > 1:
                import torch.distributed as dist

                dist.all_reduce(total)
            if total[1] > 0:
                out[str(corpus.path)] = math.exp(float(total[0] / total[1]))
        self.model.train()
        return out

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors (moments, step counters); before the
        first step, what AdamW will allocate: two fp32 moments and a step per parameter."""
        held = sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        if held:
            return held
        return sum(2 * p.numel() * 4 + 4 for p in self.params)

    # -- saving -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """A periodic checkpoint of the trainable state (main process writes it)."""
        if self.is_main:
            path = statelib.save_checkpoint(self.run_dir, self.step, self.tokens, self.sampler.counters, self.trainable.params,
                                            self.optimizer, self.identity, self.cfg.keep_checkpoints)
            self._emit({"event": "checkpoint", "step": self.step, "path": str(path)})
        self.accelerator.wait_for_everyone()

    def save(self) -> TrainResult:
        """Write the trained model (main process); every process returns the result."""
        shards: list[str] = []
        if self.is_main:
            out_dtype = DTYPE_NAMES[self.cfg.out_dtype] if self.cfg.out_dtype else None
            shards = write_model(self.output, self.source, self.trainable, inputs=self.inputs, out_dtype=out_dtype,
                                 max_shard_bytes=self.max_shard_bytes, overwrite=self.cfg.overwrite,
                                 provenance=self._provenance(), log_file=self.log_path)
            if self.remove_run_dir:  # the output holds the log now; the checkpoints served their purpose
                shutil.rmtree(self.run_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return TrainResult(self.output, self.step, self.tokens, self._seconds,
                           getattr(self, "_tokens_this_run", 0) / max(self._seconds, 1e-9), self.first_loss, self.last_loss,
                           self.perplexity, self.counts, self.optimizer_state_bytes(), shards, self.is_main)

    def _provenance(self) -> dict[str, Any]:
        return {
            "neuroloc_version": __version__,
            "command": "train",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": {"path": str(self.model_path.resolve()), "fingerprint": self.source.fingerprint},
            "mask": {"path": str(Path(self.cfg.train_mask or self.cfg.freeze_mask).resolve()), "role": self.identity["mask_role"],
                     "sha256": self.identity["mask"], "granularity": self.mask.granularity} if self.mask else None,
            "data": self.identity["data"],
            "framing": self.identity["framing"],
            "hyper_parameters": self.cfg.hyper_parameters(),
            "world_size": self.world,
            "steps": self.step,
            "tokens": self.tokens,
            "counts": self.counts,
            "perplexity": self.perplexity,
            "config": self.cfg.model_dump(),
        }

    def cleanup(self) -> None:
        """Release the checkpoint's file handles."""
        self.source.close()

    # -- events -----------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if not self.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **event}, default=str) + "\n")
        self.on_event(event)


def plan_training(config: TrainConfig) -> dict[str, Any]:
    """Check a run's inputs and describe it; load no weights, write nothing (`--dry-run`)."""
    recipe = MaskedCPTRecipe(config)
    try:
        return recipe.plan()
    finally:
        if hasattr(recipe, "source"):
            recipe.cleanup()


def run_training(config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Set up, train and save; the one core call of `neuroloc train`."""
    recipe = MaskedCPTRecipe(config, on_event)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        if hasattr(recipe, "source"):
            recipe.cleanup()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _logged_step(line: str) -> float:
    """The step of a JSONL log line; infinity for a line a killed run left half-written, so
    that truncating the log at a checkpoint drops it."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf
