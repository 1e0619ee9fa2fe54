"""`neuroloc eval`: lm-eval tasks, per-language perplexity and sacreBLEU, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt

_TASKS, _MT, _RUN = "Tasks", "Translation", "Running"


def eval_(
    models: Annotated[list[Path], typer.Argument(help="Checkpoint folders to compare.", show_default=False)],
    tasks: Annotated[
        Optional[str],
        typer.Option(
            "--tasks",
            "-t",
            help="Comma-separated lm-eval tasks (mgsm_direct_es, m_mmlu_es, …) or shipped ones: neuroloc_math, neuroloc_choice, neuroloc_ppl, each optionally =FILE.jsonl.",
            rich_help_panel=_TASKS,
        ),
    ] = None,
    task_option: Annotated[
        Optional[list[str]],
        typer.Option(
            "--task-option",
            help="TARGET.KEY=VALUE: an option of a shipped task shape, or of one task made from it (neuroloc_math: prompt, max_gen_toks, until, extract); repeatable.",
            rich_help_panel=_TASKS,
        ),
    ] = None,
    include_path: Annotated[
        Optional[list[Path]],
        typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs (repeatable).", rich_help_panel=_TASKS),
    ] = None,
    ppl: Annotated[
        Optional[list[str]],
        typer.Option(
            "--ppl", help='FILE.jsonl[:LANG] of {"text": …} records: perplexity task ppl_LANG (repeatable).', rich_help_panel=_TASKS
        ),
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="At most N documents per task (and translations).", rich_help_panel=_TASKS)
    ] = None,
    num_fewshot: Annotated[
        Optional[int], typer.Option("--num-fewshot", min=0, help="Override every task's few-shot count.", rich_help_panel=_TASKS)
    ] = None,
    max_gen_toks: Annotated[
        Optional[int],
        typer.Option(
            "--max-gen-toks",
            min=1,
            help="Cap on generated tokens (default: tasks' own, 256 for translation, at most half the model's positions).",
            rich_help_panel=_TASKS,
        ),
    ] = None,
    translate_file: Annotated[
        Optional[Path], typer.Option("--translate", help='jsonl of {"source", "target"} records to translate.', rich_help_panel=_MT)
    ] = None,
    src: Annotated[Optional[str], typer.Option("--src", help="Source language code (en, de, zh, …).", rich_help_panel=_MT)] = None,
    tgt: Annotated[Optional[str], typer.Option("--tgt", help="Target language code.", rich_help_panel=_MT)] = None,
    template: Annotated[
        str,
        typer.Option(
            "--template",
            help="flan-following, flan-sentence, flan-translate-to, flan-to, flan-how-is (FLAN v2), or a template with {source}, {src_lang}, {tgt_lang}.",
            rich_help_panel=_MT,
        ),
    ] = "flan-following",
    bleu_tokenize: Annotated[
        Optional[str],
        typer.Option("--bleu-tokenize", help="sacrebleu tokenizer (default: zh for Chinese targets, else 13a).", rich_help_panel=_MT),
    ] = None,
    bleu_smooth: Annotated[
        str, typer.Option("--bleu-smooth", help="sacrebleu BLEU smoothing: none, floor, add-k, exp.", rich_help_panel=_MT)
    ] = "none",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.", rich_help_panel=_RUN)] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (as stored), float32, bfloat16, float16.", rich_help_panel=_RUN)] = "auto",
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            help="Log-likelihood requests per forward pass (generation runs one request at a time, so that its answers do not depend on the batch).",
            rich_help_panel=_RUN,
        ),
    ] = 8,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Set lm-eval's four seeds (default: its own, 0/1234/1234/1234).", rich_help_panel=_RUN)
    ] = None,
    bootstrap_iters: Annotated[
        int, typer.Option("--bootstrap-iters", min=0, help="Bootstrap resamples for stderrs (0: none).", rich_help_panel=_RUN)
    ] = 100000,
    online: Annotated[bool, typer.Option("--online", help="Allow dataset downloads (offline by default).", rich_help_panel=_RUN)] = False,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "-o", "--output", help="Folder for results.json, samples and hypotheses.txt (appears atomically).", rich_help_panel=_RUN
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.", rich_help_panel=_RUN)] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show progress, and lm-eval's, transformers' and datasets' logs, on stderr.", rich_help_panel=_RUN),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate checkpoints on lm-eval tasks, perplexity and translation; print them side by side."""
    from neuroloc_cli.eval.runner import build_request, evaluate

    request = build_request(
        list(models),
        tasks=tasks,
        task_option=task_option,
        include_path=include_path,
        ppl=ppl,
        limit=limit,
        num_fewshot=num_fewshot,
        max_gen_toks=max_gen_toks,
        translate=translate_file,
        src=src,
        tgt=tgt,
        template=template,
        bleu_tokenize=bleu_tokenize,
        bleu_smooth=bleu_smooth,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        bootstrap_iters=bootstrap_iters,
        online=online,
    )
    if output is not None:
        from neuroloc_cli.io.output import check_output_path

        check_output_path(output, request.models, overwrite)  # fail before hours of evaluation
    # Progress lines for people; piped, stderr holds nothing but an error, first.
    progress = verbose or render.err().is_terminal
    result, artifacts = evaluate(request, on_model=_progress if progress else None, verbose=verbose)
    if output is not None:
        from neuroloc_cli.eval.results import save
        from neuroloc_cli.io.output import atomic_output_dir

        with atomic_output_dir(output, request.models, overwrite) as tmp:
            save(tmp, result, artifacts)
    if as_json:
        render.print_json(result.to_json())
        return
    render.out().print(result.table())
    for line in result.signatures() + result.notes():
        render.out().print(line, highlight=False, markup=False)


def _progress(label: str) -> None:
    render.err().print(f"evaluating {label}", markup=False)
