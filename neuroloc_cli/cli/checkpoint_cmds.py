"""`neuroloc inspect`, `neuroloc delta`, `neuroloc ablate` and `neuroloc export-pair`: commands on single checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt, ModelArg, shard_size_option


def inspect(model: ModelArg, as_json: JsonOpt = False) -> None:
    """Show a checkpoint's architecture, parameter count, dtypes, shards and tensors."""
    from rich.table import Table

    from neuroloc_cli.io.checkpoint import Checkpoint

    doc = Checkpoint.open(model, spec=str(model)).summary()
    if as_json:
        render.print_json(doc)
        return
    console = render.out()
    console.print(
        f"[bold]{doc['path']}[/bold]: {doc['kind']}, {doc['architecture'] or 'unknown architecture'}, "
        f"{doc['num_layers']} layers, {render.human_count(doc['parameters'])} parameters "
        f"({', '.join(f'{k} {render.human_count(v)}' for k, v in doc['dtypes'].items())})"
    )
    shards = Table(title="shards")
    for col in ("file", "tensors", "size"):
        shards.add_column(col)
    for s in doc["shards"]:
        shards.add_row(s["file"], str(s["tensors"]), render.human_bytes(s["bytes"]))
    console.print(shards)
    tensors = Table(title="tensors")
    for col in ("name", "shape", "dtype", "shard"):
        tensors.add_column(col, overflow="fold")
    for t in doc["tensors"]:
        tensors.add_row(t["name"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"], t["shard"])
    console.print(tensors)


def delta(
    base: Annotated[Path, typer.Argument(help="Base checkpoint folder.", show_default=False)],
    tuned: Annotated[Path, typer.Argument(help="Fine-tuned checkpoint folder.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (appears atomically).")],
    out_dtype: Annotated[Optional[str], typer.Option("--out-dtype", help="float32 (default), bfloat16, float16.")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Output shard size cap.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the weight delta TUNED − BASE of every tensor as a delta checkpoint."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.io.format import DTYPE_NAMES
    from neuroloc_cli.merge.plan import plan_delta
    from neuroloc_cli.merge.run import run_merge

    if out_dtype is not None and out_dtype not in DTYPE_NAMES:
        raise UsageError(f"--out-dtype: unknown dtype {out_dtype!r}", hint=f"use one of {', '.join(DTYPE_NAMES)}")
    shard_bytes = shard_size_option(max_shard_size)
    plan = plan_delta(base, tuned, out_dtype)
    with render.progress("delta", len(plan.steps)) as advance:
        result = run_merge(plan, output, max_shard_bytes=shard_bytes, overwrite=overwrite, on_tensor=lambda _: advance(), command="delta")
    render.merge_result(result, as_json)


def ablate(
    model: ModelArg,
    mask: Annotated[Path, typer.Argument(help="The region: a mask file (.safetensors, written by `neuroloc locate`).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output folder (appears atomically).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="zero (remove), mean (the tensor's mean) or noise (add Gaussian noise).")] = "zero",
    scale: Annotated[
        Optional[float], typer.Option("--scale", help="With --mode noise: noise std in units of the tensor's std [1.0].")
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the noise.")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Output shard size cap.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the model and mask and print the plan; write nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove or perturb a region of MODEL: inside MASK the weights are zeroed, set to the mean
    or perturbed; outside it they stay bit for bit (the linguistic-regions damage study)."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.merge.plan import plan_ablation
    from neuroloc_cli.merge.run import run_merge

    plan = plan_ablation(model, mask, mode, scale)
    if dry_run:
        render.merge_plan(plan, as_json, what="ablation")
        return
    if output is None:
        raise UsageError("ablate needs an output folder", hint="pass -o OUT_DIR, or --dry-run to only check the model and mask")
    shard_bytes = shard_size_option(max_shard_size)
    with render.progress(f"ablate ({mode})", len(plan.steps)) as advance:
        result = run_merge(
            plan, output, max_shard_bytes=shard_bytes, overwrite=overwrite, seed=seed, on_tensor=lambda _: advance(), command="ablate"
        )
    render.merge_result(result, as_json)


def export_pair(
    model: Annotated[
        Path, typer.Argument(help="A LANDeRMT-finetuned checkpoint folder, with its routing.json.", show_default=False, metavar="FT")
    ],
    pair: Annotated[str, typer.Option("--pair", help="The translation direction to export, SOURCE-TARGET (e.g. de-en).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (appears atomically).")],
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Output shard size cap.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the model and its routing.json and print the bytes the export writes and the memory it holds (the largest tensor, and a float32 copy of a folded one); read no weights, write nothing.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export one translation direction of a LANDeRMT model as an ordinary checkpoint: the
    routing folded into the kept MLP blocks' up-side rows, other languages' neurons removed,
    everything else bit for bit."""
    from neuroloc_cli.train.export_pair import describe_export, plan_export_pair, run_export_pair

    shard_bytes = shard_size_option(max_shard_size)
    export = plan_export_pair(model, pair)
    if dry_run:
        from neuroloc_cli.io.output import check_output_path

        check_output_path(output, [model], overwrite)
        _render_export_plan(describe_export(export), output, as_json)
        return
    with render.progress(f"export-pair ({pair})", len(export.checkpoint.tensors)) as advance:
        result = run_export_pair(export, output, max_shard_bytes=shard_bytes, overwrite=overwrite, on_tensor=lambda _: advance())
    render.merge_result(result, as_json)


def _render_export_plan(plan: dict, output: Path, as_json: bool) -> None:
    doc = {"output": str(output), "dry_run": True, **plan}
    if as_json:
        render.print_json(doc)
        return
    render.out().print(
        f"would export {plan['pair']} into {output}: {plan['tensors']} tensors, {len(plan['folded_tensors'])} folded; "
        f"disk {render.human_bytes(plan['disk_bytes']['total'])}; memory {render.human_bytes(plan['memory_bytes']['total'])}"
    )


def convert(
    source: Annotated[Path, typer.Argument(help="Checkpoint folder with PyTorch .bin weights.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (appears atomically).")],
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Output shard size cap.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a PyTorch .bin checkpoint into safetensors (plain tensors only; nothing else is unpickled)."""
    from neuroloc_cli.io.convert import convert_checkpoint

    result = convert_checkpoint(source, output, max_shard_bytes=shard_size_option(max_shard_size), overwrite=overwrite)
    render.merge_result(result, as_json)
