"""`neuroloc train`: masked continual pretraining, and LANDeRMT's selective finetuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt
from neuroloc_cli.train.events import CheckpointEvent, EvalEvent, Event, StartEvent, StepEvent

_SEL = "What trains"
_OPT = "Optimisation"
_DATA = "Data"
_RUN = "Run"


def train(
    model: Annotated[Optional[Path], typer.Argument(help="Base checkpoint folder (or `model:` in --config).", show_default=False)] = None,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            "--data",
            help="Corpus: .txt, .jsonl with a 'text' field, or a folder; PATH:WEIGHT sets its mixture weight. Repeatable.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output checkpoint folder (appears atomically).")] = None,
    method: Annotated[
        Optional[str],
        typer.Option(
            "--method",
            help=r"cpt (continual pretraining on --data) or landermt (LANDeRMT: selective finetuning with routing on --pair) \[cpt].",
            rich_help_panel=_SEL,
        ),
    ] = None,
    pair: Annotated[
        Optional[list[str]],
        typer.Option(
            "--pair",
            help="landermt: SRC-TGT=PATH, a jsonl of {source, target} for one direction. Repeatable.",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    masks: Annotated[
        Optional[Path],
        typer.Option("--masks", help="landermt: the folder `neuroloc locate awareness` wrote (routing.json).", rich_help_panel=_SEL),
    ] = None,
    template: Annotated[
        Optional[str],
        typer.Option(
            "--template",
            help=r"landermt: instruction template (a name, or a string with {source}) \[flan-following].",
            rich_help_panel=_DATA,
        ),
    ] = None,
    full_finetune: Annotated[
        bool,
        typer.Option(
            "--full-finetune", help="landermt: the baseline: train every parameter on the same data, no routing.", rich_help_panel=_SEL
        ),
    ] = False,
    config: Annotated[
        Optional[Path], typer.Option("--config", help="YAML training recipe; its keys are these flags' names, flags override it.")
    ] = None,
    train_mask: Annotated[
        Optional[Path], typer.Option("--train-mask", help="Update only this mask's selection.", rich_help_panel=_SEL)
    ] = None,
    freeze_mask: Annotated[
        Optional[Path], typer.Option("--freeze-mask", help="Keep this mask's selection exactly; train the rest.", rich_help_panel=_SEL)
    ] = None,
    trainable: Annotated[
        Optional[list[str]], typer.Option("--trainable", help="Train whole tensors matching this glob. Repeatable.", rich_help_panel=_SEL)
    ] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps.", rich_help_panel=_OPT)] = None,
    max_tokens: Annotated[
        Optional[int],
        typer.Option("--max-tokens", help="Training tokens (the smaller limit wins; neither: one pass).", rich_help_panel=_OPT),
    ] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate [5e-5].", rich_help_panel=_OPT)] = None,
    weight_decay: Annotated[
        Optional[float], typer.Option("--weight-decay", help="AdamW decoupled weight decay, matrices only [0.01].", rich_help_panel=_OPT)
    ] = None,
    adam_betas: Annotated[
        Optional[str], typer.Option("--adam-betas", help="AdamW betas as B1,B2 [0.9,0.95].", rich_help_panel=_OPT)
    ] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="Linear warm-up steps [0].", rich_help_panel=_OPT)] = None,
    schedule: Annotated[
        Optional[str], typer.Option("--schedule", help="cosine (to 0) or constant \\[cosine].", rich_help_panel=_OPT)
    ] = None,
    grad_clip: Annotated[
        Optional[float], typer.Option("--grad-clip", help="Gradient norm clip, 0 = off [1.0].", rich_help_panel=_OPT)
    ] = None,
    grad_accum: Annotated[
        Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step [1; landermt: 10].", rich_help_panel=_OPT)
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Sequences per micro-batch per process [8].", rich_help_panel=_OPT)
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option("--seq-len", help="Tokens per row, packed or padded [512, or the model's positions if fewer].", rich_help_panel=_OPT),
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of data order and dropout [0].", rich_help_panel=_OPT)] = None,
    packing: Annotated[
        Optional[str],
        typer.Option(
            "--packing",
            help="packed (documents joined and cut into rows) or padded (one document per row, padding not scored) \\[packed].",
            rich_help_panel=_DATA,
        ),
    ] = None,
    txt_docs: Annotated[
        Optional[str],
        typer.Option(
            "--txt-docs",
            help="A .txt document ends at a blank line (paragraph) or at every line (line) \\[paragraph].",
            rich_help_panel=_DATA,
        ),
    ] = None,
    eval_share: Annotated[
        Optional[float], typer.Option("--eval-share", help="Held-out share of each corpus, for perplexity [0.05].", rich_help_panel=_RUN)
    ] = None,
    eval_every: Annotated[
        Optional[int], typer.Option("--eval-every", help="Held-out perplexity every N steps (and at start and end).", rich_help_panel=_RUN)
    ] = None,
    save_every: Annotated[
        Optional[int], typer.Option("--save-every", help="Periodic checkpoint every N steps, into the run folder.", rich_help_panel=_RUN)
    ] = None,
    keep_checkpoints: Annotated[
        Optional[int], typer.Option("--keep-checkpoints", help="Periodic checkpoints kept [2].", rich_help_panel=_RUN)
    ] = None,
    run_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--run-dir",
            help="Checkpoints and log, kept after the run \\[hidden .OUTPUT.neuroloc-run beside the output, removed when the run completes].",
            rich_help_panel=_RUN,
        ),
    ] = None,
    keep_state: Annotated[
        bool,
        typer.Option("--keep-state", help="Keep the hidden run folder (checkpoints, log) after a successful run.", rich_help_panel=_RUN),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.", rich_help_panel=_RUN)
    ] = False,
    log: Annotated[Optional[Path], typer.Option("--log", help="JSONL log file [RUN_DIR/log.jsonl].", rich_help_panel=_RUN)] = None,
    out_dtype: Annotated[
        Optional[str], typer.Option("--out-dtype", help="Output dtype \\[each input tensor's].", rich_help_panel=_RUN)
    ] = None,
    max_shard_size: Annotated[
        Optional[str], typer.Option("--max-shard-size", help="Output shard size cap [5GB].", rich_help_panel=_RUN)
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output and earlier run folder.", rich_help_panel=_RUN)
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check inputs and print the plan; load no weights, write nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Continual pretraining that updates only what a mask allows, or all but a frozen region;
    or LANDeRMT's selective finetuning on translation pairs (--method landermt)."""
    from neuroloc_cli.train.config import build_config
    from neuroloc_cli.train.run import plan_training, run_training

    # Every flag is the config key of the same name; None (and an unset switch) leaves the
    # recipe's value, or the default, in place.
    flags = {
        "model": _text(model),
        "data": data,
        "method": method,
        "pair": pair,
        "masks": _text(masks),
        "template": template,
        "full_finetune": full_finetune or None,
        "output": _text(output),
        "train_mask": _text(train_mask),
        "freeze_mask": _text(freeze_mask),
        "trainable": trainable,
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "lr": lr,
        "weight_decay": weight_decay,
        "adam_betas": _betas(adam_betas),
        "warmup": warmup,
        "schedule": schedule,
        "grad_clip": grad_clip,
        "grad_accum": grad_accum,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "packing": packing,
        "txt_docs": txt_docs,
        "eval_share": eval_share,
        "eval_every": eval_every,
        "save_every": save_every,
        "keep_checkpoints": keep_checkpoints,
        "run_dir": _text(run_dir),
        "keep_state": keep_state or None,
        "resume": resume or None,
        "log": _text(log),
        "out_dtype": out_dtype,
        "max_shard_size": max_shard_size,
        "overwrite": overwrite or None,
    }
    cfg = build_config(config, flags)
    if dry_run:
        _render_plan(plan_training(cfg), as_json)
        return
    with _Progress() as on_event:
        result = run_training(cfg, on_event)
    _render(result, as_json)


def _text(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _betas(text: Optional[str]) -> Optional[tuple[float, ...]]:
    """--adam-betas B1,B2 as two floats (their range is the config's to check)."""
    from neuroloc_cli.errors import UsageError

    if text is None:
        return None
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2:
        raise UsageError(f"--adam-betas: {text!r} is not B1,B2 (e.g. 0.9,0.95)")
    return betas


class _Progress:
    """A Rich progress bar on stderr with loss, tokens/s and the trainable count."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = render.err()
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("trainable {task.fields[trainable]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.bar.__enter__()
        self.task = None
        return self.on_event

    def on_event(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self._start(event)
        elif isinstance(event, StepEvent) and self.task is not None:
            self.bar.update(self.task, completed=event.step, loss=f"{event.loss:.4f}", tps=f"{event.tokens_per_s:.0f}")
        elif isinstance(event, EvalEvent):
            ppl = ", ".join(f"{Path(k).name} {v:.2f}" for k, v in event.perplexity.items())
            self.console.print(f"step {event.step}: held-out token perplexity {ppl or '(no held-out data)'}")
        elif isinstance(event, CheckpointEvent):
            self.console.print(f"step {event.step}: checkpoint {event.path}")

    def _start(self, e: StartEvent) -> None:
        share = e.trainable / max(1, e.parameters)
        self.console.print(
            f"training {render.human_count(e.trainable)} of {render.human_count(e.parameters)} parameters "
            f"({share:.2%}), frozen {render.human_count(e.frozen)}; optimizer state "
            f"{render.human_bytes(e.optimizer_state_bytes)}; sequences of {e.seq_len} tokens; {e.world_size} process(es)"
        )
        self.console.print(f"documents: {_framing(e.framing)}", markup=False, highlight=False)
        _warn(e.warnings)
        self.task = self.bar.add_task(
            "train", total=e.total_steps, completed=e.step, loss="-", tps="-", trainable=render.human_count(e.trainable)
        )

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def _render(result, as_json: bool) -> None:
    if not result.main_process:  # one report per run, not one per data-parallel process
        return
    if as_json:
        render.print_json(result.to_dict())
        return
    before, after = result.perplexity.get("before", {}), result.perplexity.get("after", {})
    ppl = ", ".join(f"{Path(k).name} {before.get(k, float('nan')):.2f} → {v:.2f}" for k, v in after.items())
    render.out().print(
        f"wrote [bold]{result.output}[/bold]: {result.steps} steps, {render.human_count(result.tokens)} tokens, "
        f"{result.tokens_per_s:.0f} tokens/s; loss {result.first_loss:.4f} → {result.last_loss:.4f}"
        + (f"; held-out token perplexity {ppl}" if ppl else "")
    )


def _render_plan(doc: dict, as_json: bool) -> None:
    if as_json:
        render.print_json({"valid": True, **doc})
        return
    share = doc["trainable"] / max(1, doc["parameters"])
    render.out().print(
        f"would train {render.human_count(doc['trainable'])} of {render.human_count(doc['parameters'])} parameters ({share:.2%}) "
        f"for {doc['total_steps']} steps of {doc['tokens_per_step']} tokens in sequences of {doc['seq_len']}{_seq_len_source(doc)}; "
        f"AdamW state about {render.human_bytes(doc['optimizer_state_bytes'])}"
    )
    mem = doc["memory_bytes"]
    render.out().print(
        "memory: "
        + " + ".join(f"{k.replace('_', ' ')} {render.human_bytes(mem[k])}" for k in mem if k != "total" and mem[k])
        + f" = about {render.human_bytes(mem['total'])} at the peak of a step (activations of {doc['seq_len']}-token rows under bf16 autocast)"
    )
    render.out().print(f"disk: output checkpoint {render.human_bytes(doc['disk_bytes']['output'])}")
    render.out().print(f"documents: {_framing(doc['framing'])}", markup=False, highlight=False)
    for d in doc["data"]:
        render.out().print(
            f"  {d['path']}: {d['tokens']} tokens, {d['train_sequences']} training / {d['held_out_sequences']} held-out sequences, weight {d['weight']:g}"
        )
    _warn(doc["warnings"])
    render.err().print("[green]run is valid[/green]: no weights were loaded, nothing was written")


def _framing(f: dict) -> str:
    """The `framing` of a start event or plan in words, e.g. 'BOS from the tokenizer, EOS
    appended; packed into rows; .txt: a document per blank-line-separated paragraph'."""
    bos = "BOS from the tokenizer" if f["bos_added"] else "no BOS"
    eos = "EOS from the tokenizer" if f["eos_added"] else "EOS appended" if f["eos_appended"] else "no EOS"
    rows = "packed into rows" if f["packing"] == "packed" else f"one per row, padded with token {f['pad_token_id']} (not scored)"
    txt = "a document per line" if f["txt_docs"] == "line" else "a document per blank-line-separated paragraph"
    return f"{bos}, {eos}; {rows}; .txt: {txt}"


def _warn(lines: list[str]) -> None:
    for line in lines:
        render.err().print(f"warning: {line}", markup=False, highlight=False)


def _seq_len_source(doc: dict) -> str:
    if not doc["seq_len_default"]:
        return ""
    return f" (default: the model's {doc['positions']} positions)" if doc["seq_len"] == doc["positions"] else " (default)"
