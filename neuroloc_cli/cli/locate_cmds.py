"""`neuroloc locate delta` (MAET Eq. 1), `gradient` (linguistic regions), `lape` (language-specific
neurons), `awareness` (LANDeRMT), `select` (a mask from importance files) and `list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import ExcludeOpt, JsonOpt, LanguagesOpt, OverwriteOpt, SeqLenOpt

locate_app = typer.Typer(help="Find the units that matter and save them as a mask.", no_args_is_help=True)


@locate_app.command("delta")
def delta(
    base: Annotated[Path, typer.Argument(help="Base checkpoint folder.", show_default=False)],
    tuned: Annotated[Path, typer.Argument(help="Trained checkpoint folder (or a delta checkpoint).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file to write (.safetensors).")],
    top: Annotated[float, typer.Option("--top", help="Share of units to keep, e.g. 0.05 for 5 %.")] = 0.05,
    granularity: Annotated[str, typer.Option("--granularity", help="row (output neurons), ffn (MLP neurons) or element.")] = "row",
    scope: Annotated[
        str, typer.Option("--scope", help="global: rank all units together (the paper); tensor: top share of each tensor.")
    ] = "global",
    include: Annotated[
        Optional[list[str]],
        typer.Option(
            "--include",
            help="Rank only tensors matching this glob or substring (repeatable). Default: rows of every 2-D weight, token rows of the embedding and LM head included; ffn and element: the transformer blocks.",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option(
            "--exclude",
            help="Leave out tensors matching this glob or substring (repeatable), e.g. --exclude '*embed*'.",
            show_default=False,
        ),
    ] = None,
    importance: Annotated[
        Optional[Path],
        typer.Option(
            "--importance",
            help="Also write |delta| of every ranked tensor to this importance file (re-select it with `locate select`).",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check both checkpoints' headers and print the units, the bytes the mask (and --importance) take on disk and the memory the run holds; read no weights, write nothing.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Select the units whose weights changed most (importance = norm of the change)."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.io.output import check_output_file
    from neuroloc_cli.locate import LOCATORS
    from neuroloc_cli.masks.stats import mask_stats

    loc = LOCATORS.get("delta")
    settings = dict(top=top, granularity=granularity, scope=scope, include=include or (), exclude=exclude or (), importance=importance)
    opts = loc.parse(base=base, tuned=tuned, **settings)
    check_output_file(output, [base, tuned], overwrite)
    if importance is not None:
        check_output_file(importance, [base, tuned], overwrite)
        if importance.resolve() == output.resolve():
            raise UsageError(f"--importance {importance} is the mask file -o as well", hint="give them different names")
    if dry_run:
        from neuroloc_cli.locate.delta import plan_delta

        _render_plan(output, plan_delta(opts).describe(), as_json)
        return
    mask = loc.fn(opts)
    stats = mask_stats(mask)
    mask.save(output)
    _render_saved(output, stats, mask.provenance, as_json)


def _render_plan(path: Path, plan: dict, as_json: bool) -> None:
    """What a locator's `--dry-run` prints: its own summary line, then disk and memory."""
    doc = {"output": str(path), "dry_run": True, **plan}
    if as_json:
        render.print_json(doc)
        return
    console = render.out()
    if "units" in plan:
        console.print(
            f"would rank {render.human_count(plan['units'])} {plan['granularity']} units ({plan['scope']}) of "
            f"{plan['tensors']} tensors and keep {render.human_count(plan['selected_units'])} into {path}"
        )
    if "kept_neurons" in plan:
        console.print(
            f"would score {len(plan['directions'])} directions ({', '.join(plan['languages'])}) in rows of {plan['seq_len']} tokens "
            f"and keep {plan['kept_blocks']} layers ({render.human_count(plan['kept_neurons'])} FFN neurons) into {path}"
        )
    disk, mem = plan["disk_bytes"], plan["memory_bytes"]
    console.print(
        "disk: "
        + " + ".join(f"{k} {render.human_bytes(v)}" for k, v in disk.items() if k != "total")
        + f" = {render.human_bytes(disk['total'])}"
    )
    console.print(
        "memory: "
        + " + ".join(f"{k} {render.human_bytes(v)}" for k, v in mem.items() if k != "total")
        + f" = {render.human_bytes(mem['total'])}"
    )
    render.err().print("[green]valid[/green]: no weights were read, nothing was written")


def _render_saved(path: Path, stats: dict, provenance: dict, as_json: bool) -> None:
    # units: the locator's neurons (a bias entry shares its weight row's unit), not mask entries
    doc = {"output": str(path), **{k: stats[k] for k in ("granularity", "selected", "total", "share")}}
    doc.update(units=provenance.get("units", stats["units"]), selected_units=provenance.get("selected_units", stats["selected_units"]))
    if as_json:
        render.print_json(doc)
        return
    render.out().print(
        f"wrote [bold]{path}[/bold]: {doc['granularity']} mask, {doc['selected_units']} of {doc['units']} units, "
        f"{render.human_count(doc['selected'])} of {render.human_count(doc['total'])} elements ({100 * doc['share']:.2f} %)"
    )


@locate_app.command("gradient")
def gradient(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (with its tokenizer).", show_default=False)],
    data: LanguagesOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: importance, masks, summary.json.")],
    top: Annotated[float, typer.Option("--top", help="Share of each tensor's elements a region keeps (the paper: 0.01).")] = 0.01,
    samples: Annotated[
        Optional[int], typer.Option("--samples", help="Packed rows scored per language. Default: 64.", show_default=False)
    ] = None,
    max_tokens: Annotated[
        Optional[int],
        typer.Option("--max-tokens", help="Tokens scored per language instead of --samples (whole rows).", show_default=False),
    ] = None,
    seq_len: SeqLenOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per backward pass.")] = 8,
    abs_per_batch: Annotated[
        bool, typer.Option("--abs-per-batch", help="Importance sum_b |g_b * theta| instead of |sum_b g_b * theta| (the paper's code).")
    ] = False,
    score: Annotated[str, typer.Option("--score", help="taylor: gradient times weight; fisher: sum_b g_b^2.")] = "taylor",
    include: Annotated[
        Optional[list[str]],
        typer.Option(
            "--include",
            help="Score only tensors matching this glob or substring (repeatable). Default: the transformer blocks.",
            show_default=False,
        ),
    ] = None,
    exclude: ExcludeOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random control mask.")] = 0,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the settings and show what would be scored and the memory it takes; load nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find core and monolingual regions from per-language gradients (linguistic regions).

    Runs data-parallel under `accelerate launch`: each process scores its share of the
    batches, and the sums are added once at the end."""
    from neuroloc_cli.io.output import check_output_path
    from neuroloc_cli.locate import LOCATORS
    from neuroloc_cli.locate.gradient import plan_gradient

    loc = LOCATORS.get("gradient")
    opts = loc.parse(
        model=model,
        data=data,
        top=top,
        samples=samples,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        score=score,
        abs_per_batch=abs_per_batch,
        include=include or (),
        exclude=exclude or (),
        seed=seed,
    )
    inputs = [model, *(lang.path for lang in opts.languages)]
    check_output_path(output, inputs, overwrite)
    if dry_run:
        _render_scoring_plan(output, plan_gradient(opts).describe(), as_json)
        return
    regions = loc.fn(opts)
    if not regions.is_main:
        return  # under accelerate launch, the first process writes
    regions.save(output, inputs, overwrite)
    _render_regions(output, regions.summary, as_json)


def _render_scoring_plan(path: Path, plan: dict, as_json: bool) -> None:
    doc = {"output": str(path), "dry_run": True, **plan}
    if as_json:
        render.print_json(doc)
        return
    mem = plan["memory_bytes"]
    render.out().print(
        f"would score {render.human_count(plan['scored_elements'])} elements in {plan['tensors']} tensors on "
        f"{plan['rows_per_language']} rows of {plan['seq_len']} tokens per language ({', '.join(plan['languages'])}) into {path}"
    )
    render.out().print(
        f"memory: model {render.human_bytes(mem['model'])} + accumulators {render.human_bytes(mem['accumulators'])} + "
        f"one gradient {render.human_bytes(mem['gradient'])} = {render.human_bytes(mem['total'])}, plus activations"
    )
    if "disk_bytes" in plan:
        disk = plan["disk_bytes"]
        render.out().print(
            f"disk: importance {render.human_bytes(disk['importance'])} + masks {render.human_bytes(disk['masks'])} = {render.human_bytes(disk['total'])}"
        )


def _render_regions(path: Path, summary: dict, as_json: bool) -> None:
    doc = {"output": str(path), **summary}
    if as_json:
        render.print_json(doc)
        return
    from rich.table import Table

    table = Table(title=f"{path}: regions of {render.human_count(summary['elements'])} elements in {summary['tensors']} tensors")
    for col in ("mask", "selected", "share"):
        table.add_column(col)
    for stem, m in summary["masks"].items():
        table.add_row(stem, render.human_count(m["selected"]), f"{100 * m['share']:.3f} %")
    render.out().print(table)
    for pair, j in summary["jaccard"].items():
        render.out().print(f"Jaccard of the top sets {pair}: {j:.3f}")


@locate_app.command("lape")
def lape(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (with its tokenizer).", show_default=False)],
    data: LanguagesOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: a mask per language, importance, summary.json.")],
    top: Annotated[float, typer.Option("--top", help="Share of all FFN neurons kept, lowest entropy first (the paper: 0.01).")] = 0.01,
    filter_percentile: Annotated[
        float,
        typer.Option(
            "--filter-percentile",
            help="Quantile of all activation probabilities a neuron must exceed for a language to belong to it (the paper: 0.95).",
        ),
    ] = 0.95,
    samples: Annotated[
        Optional[int], typer.Option("--samples", help="Packed rows read per language. Default: 64.", show_default=False)
    ] = None,
    max_tokens: Annotated[
        Optional[int],
        typer.Option("--max-tokens", help="Tokens read per language instead of --samples (whole rows).", show_default=False),
    ] = None,
    seq_len: SeqLenOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")] = 8,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find language-specific FFN neurons by activation-probability entropy (LAPE).

    Runs data-parallel under `accelerate launch`: each process counts its share of the
    batches, and the counts are added once at the end."""
    from neuroloc_cli.io.output import check_output_path
    from neuroloc_cli.locate import LOCATORS

    loc = LOCATORS.get("lape")
    opts = loc.parse(
        model=model,
        data=data,
        top=top,
        filter_percentile=filter_percentile,
        samples=samples,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
    )
    inputs = [model, *(lang.path for lang in opts.languages)]
    check_output_path(output, inputs, overwrite)
    found = loc.fn(opts)
    if not found.is_main:
        return  # under accelerate launch, the first process writes
    found.save(output, inputs, overwrite)
    summary = found.summary
    if as_json:
        render.print_json({"output": str(output), **summary})
        return
    render.out().print(
        f"wrote [bold]{output}[/bold]: {summary['selected']} of {summary['neurons']} FFN neurons "
        f"({summary['above_threshold']} above the threshold {summary['threshold']:.4f})"
    )
    for lang, d in summary["languages"].items():
        layers = ", ".join(f"{layer}: {n}" for layer, n in d["per_layer"].items())
        render.out().print(f"  {lang}: {d['neurons']} neurons ({layers})")
    for pair, o in summary["overlaps"].items():
        render.out().print(f"  shared {pair}: {o['shared']} (Jaccard {o['jaccard']:.3f})")


@locate_app.command("awareness")
def awareness(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (with its tokenizer).", show_default=False)],
    pair: Annotated[
        list[str],
        typer.Option(
            "--pair", help='SRC-TGT=PATH: one direction\'s jsonl of {"source", "target"} sentence pairs; repeatable.', show_default=False
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: masks, importance, routing.json, summary.json.")],
    layers: Annotated[
        Optional[int],
        typer.Option(
            "--layers", help="Keep the k layers whose mean FFN activation changes most to the next layer. Default: 4.", show_default=False
        ),
    ] = None,
    layer_ids: Annotated[
        Optional[str], typer.Option("--layer-ids", help="Keep these layers instead of --layers, e.g. 3,4,21,22.", show_default=False)
    ] = None,
    general: Annotated[
        float, typer.Option("--general", help="Share of each kept layer's neurons that are language-general (the paper: 0.9).")
    ] = 0.9,
    samples: Annotated[
        Optional[int], typer.Option("--samples", help="Examples read per direction, from the top. Default: all.", show_default=False)
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option("--seq-len", help="Tokens per example. Default: the smaller of 512 and the model's positions.", show_default=False),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per pass (one direction per batch).")] = 8,
    template: Annotated[
        str, typer.Option("--template", help="Instruction template: flan-following, flan-sentence, ... or a literal.")
    ] = "flan-following",
    order: Annotated[
        str, typer.Option("--order", help="abs-mean: mean over tokens of |h·dL/dh|; mean-abs: |mean of h·dL/dh|.")
    ] = "abs-mean",
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the settings against the model's headers and print the bytes the folder takes and the memory the scoring holds (model, sums, captured activations); load nothing, write nothing.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the layers and FFN neurons that matter for translation: language-general and language-specific ones (LANDeRMT).

    Runs data-parallel under `accelerate launch`: each process takes its share of the
    batches, and the sums are added once at the end."""
    from neuroloc_cli.io.output import check_output_path
    from neuroloc_cli.locate import LOCATORS

    loc = LOCATORS.get("awareness")
    opts = loc.parse(
        model=model,
        pair=pair,
        layers=layers,
        layer_ids=layer_ids or (),
        general=general,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        template=template,
        order=order,
    )
    inputs = [model, *(p.path for p in opts.pairs)]
    check_output_path(output, inputs, overwrite)
    if dry_run:
        from neuroloc_cli.locate.awareness import plan_awareness

        _render_plan(output, plan_awareness(opts), as_json)
        return
    found = loc.fn(opts)
    if not found.is_main:
        return  # under accelerate launch, the first process writes
    found.save(output, inputs, overwrite)
    _render_awareness(output, found.summary, as_json)


def _render_awareness(path: Path, summary: dict, as_json: bool) -> None:
    if as_json:
        render.print_json({"output": str(path), **summary})
        return
    from rich.table import Table

    langs = summary["provenance"]["languages"]
    table = Table(title=f"{path}: layers {summary['layers']}, {100 * summary['general']:g} % general")
    for col in ("layer", "D (to next)", "kept", "general", *(f"specific {lang}" for lang in langs)):
        table.add_column(col)
    for layer in summary["mean_activation"]:
        d = summary["layer_scores"].get(layer)
        c = summary["counts"].get(layer)
        cells = [str(c["general"]), *(str(c["specific"][lang]) for lang in langs)] if c else [""] * (1 + len(langs))
        table.add_row(layer, "-" if d is None else f"{d:.4g}", "yes" if c else "", *cells)
    render.out().print(table)
    for direction, per_layer in summary["coefficient"].items():
        render.out().print(f"  routing c {direction}: " + ", ".join(f"layer {layer} {c:.3f}" for layer, c in per_layer.items()))


@locate_app.command("gram")
def gram(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (with its tokenizer).", show_default=False)],
    data: Annotated[
        list[str],
        typer.Option(
            "--data", help="[NAME=]PATH: a corpus (.txt, .jsonl or a folder); repeatable, one Gram file each.", show_default=False
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: importance/NAME.safetensors, summary.json.")],
    samples: Annotated[
        Optional[int], typer.Option("--samples", help="Packed rows read per corpus. Default: 64.", show_default=False)
    ] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option("--max-tokens", help="Tokens read per corpus instead of --samples (whole rows).", show_default=False)
    ] = None,
    seq_len: SeqLenOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")] = 8,
    include: Annotated[
        Optional[list[str]],
        typer.Option(
            "--include",
            help="Score only weights matching this glob or substring (repeatable). Default: the transformer blocks.",
            show_default=False,
        ),
    ] = None,
    exclude: ExcludeOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the settings and show the layers scored and the memory it takes; load nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Gram matrices of every linear layer's inputs on a corpus, for `merge_method: regmean`.

    Runs data-parallel under `accelerate launch`: each process takes its share of the
    batches, and the sums are added once at the end."""
    from neuroloc_cli.arch import NameFilter
    from neuroloc_cli.io.output import check_output_path
    from neuroloc_cli.locate.gram import gram_matrices, parse_corpora, plan_gram

    corpora = parse_corpora(data)
    settings = dict(keep=NameFilter.of(include, exclude), samples=samples, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
    inputs = [model, *(c.path for c in corpora)]
    check_output_path(output, inputs, overwrite)
    if dry_run:
        plan = plan_gram(model, corpora, **settings)[1].describe()
        doc = {"output": str(output), "dry_run": True, **plan}
        if as_json:
            render.print_json(doc)
            return
        mem = plan["memory_bytes"]
        render.out().print(
            f"would compute {plan['tensors']} Gram matrices ({render.human_count(plan['gram_elements'])} elements) on "
            f"{plan['rows_per_corpus']} rows of {plan['seq_len']} tokens per corpus ({', '.join(plan['corpora'])}) into {output}"
        )
        render.out().print(
            f"memory: model {render.human_bytes(mem['model'])} + float64 accumulators {render.human_bytes(mem['accumulators'])} = "
            f"{render.human_bytes(mem['total'])}, plus activations"
        )
        return
    grams = gram_matrices(model, corpora, **settings)
    if not grams.is_main:
        return  # under accelerate launch, the first process writes
    grams.save(output, inputs, overwrite)
    summary = grams.summary
    if as_json:
        render.print_json({"output": str(output), **summary})
        return
    tokens = ", ".join(f"{name}: {render.human_count(c['tokens'])} tokens" for name, c in summary["corpora"].items())
    render.out().print(f"wrote [bold]{output}[/bold]: {summary['tensors']} Gram matrices per corpus ({tokens})")


@locate_app.command("select")
def select(
    importance: Annotated[
        list[Path],
        typer.Argument(help="Importance files (written by `locate ...`); several are summed element-wise.", show_default=False),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file to write (.safetensors).")],
    top: Annotated[float, typer.Option("--top", help="Share of units to select, e.g. 0.01 for 1 %.")] = 0.01,
    granularity: Annotated[str, typer.Option("--granularity", help="element, row (output neurons) or ffn (MLP neurons).")] = "element",
    scope: Annotated[
        str, typer.Option("--scope", help="tensor: each tensor (or MLP block) keeps its share; global: rank all together.")
    ] = "tensor",
    bottom: Annotated[bool, typer.Option("--bottom", help="Select the lowest-scored units instead (a control).")] = False,
    random: Annotated[
        bool, typer.Option("--random", help="Select as many units per tensor as the top selection, drawn at random (a control).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --random.")] = 0,
    minus: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--minus", help="Take this mask's units out of the selection (repeatable), e.g. other languages' top sets.", show_default=False
        ),
    ] = None,
    include: Annotated[
        Optional[list[str]],
        typer.Option(
            "--include",
            help="Select only among tensors matching this glob or substring (repeatable). Default: every scored tensor for row; the transformer blocks for element and ffn.",
            show_default=False,
        ),
    ] = None,
    exclude: ExcludeOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn importance files into a mask: top, bottom or random share, per tensor or global."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.io.output import check_output_file
    from neuroloc_cli.locate import LOCATORS
    from neuroloc_cli.masks.stats import mask_stats

    if bottom and random:
        raise UsageError("--bottom and --random both given", hint="choose one control")
    loc = LOCATORS.get("select")
    pick = "bottom" if bottom else "random" if random else "top"
    opts = loc.parse(
        importance=importance,
        top=top,
        granularity=granularity,
        scope=scope,
        pick=pick,
        seed=seed,
        minus=minus or (),
        include=include or (),
        exclude=exclude or (),
    )
    check_output_file(output, [*importance, *(minus or [])], overwrite)
    mask = loc.fn(opts)
    stats = mask_stats(mask)
    mask.save(output)
    _render_saved(output, stats, mask.provenance, as_json)


@locate_app.command("list")
def list_locators(as_json: JsonOpt = False) -> None:
    """List the locators: what each reads, its paper and its options."""
    from rich.table import Table

    from neuroloc_cli.locate import LOCATORS

    docs = [loc.describe() for _, loc in LOCATORS.items()]
    if as_json:
        render.print_json(docs)
        return
    for d in docs:
        paper = f" ({d['paper']})" if d["paper"] else ""
        table = Table(title=f"[bold]locate {d['name']}[/bold]: {d['summary']}{paper}", caption=f"reads {d['reads']}", title_justify="left")
        for col in ("option", "default", "meaning"):
            table.add_column(col)
        for o in d["options"]:
            default = "(required)" if o["required"] else "" if o["default"] in (None, [], ()) else str(o["default"])
            table.add_row(o["flag"], default, o["description"])
        render.out().print(table)
