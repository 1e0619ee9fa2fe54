"""`DIR/report.md` and its PNG plots: the tables, the papers' claims next to what the toy world
shows, and the exact commands that produced every number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuroloc_cli.demo.experiments import Experiment, Table


def _cell(v: Any) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _plot(table: Table, path: Path, ylabel: str) -> None:
    """A grouped bar chart: one group per column, one bar per row (model)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    columns = table.columns[1:]
    fig, ax = plt.subplots(figsize=(8.5, 3.6), dpi=100)
    width = 0.8 / max(1, len(table.rows))
    for i, row in enumerate(table.rows):
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(xs, [v if v is not None else 0 for v in row[1:]], width, label=str(row[0]))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns)
    values = [v for row in table.rows for v in row[1:] if v]
    if ylabel == "perplexity" and values and max(values) > 20 * min(values):
        ax.set_yscale("log")  # forgetting spans orders of magnitude
    ax.set_ylabel(ylabel)
    ax.set_title(table.title if len(table.title) < 70 else table.title[:67] + "…", fontsize=9)
    ax.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})  # no timestamp: same bytes per run
    plt.close(fig)
    tmp.replace(path)


def write_plots(exp: Experiment, folder: Path) -> None:
    """One PNG per table of `exp`, into folder/plots/; their paths go to `exp.plots`."""
    (folder / "plots").mkdir(exist_ok=True)
    exp.plots = []
    for i, table in enumerate(exp.tables):
        if table.plot:  # the command drew its own (the sweep's objective over its grid)
            exp.plots.append(table.plot if (folder / table.plot).is_file() else None)
            continue
        rel = f"plots/{exp.name}-{i + 1}.png"
        ylabel = (
            "accuracy" if "accuracy" in table.title.lower() else "BLEU / chrF / perplexity" if "BLEU" in table.columns else "perplexity"
        )
        _plot(table, folder / rel, ylabel)
        exp.plots.append(rel)


def render_markdown(result: Any) -> str:
    """The report: settings and versions, then per experiment its tables, claims and commands."""
    s = result.settings
    out = [
        "# neuroloc demo",
        "",
        f"Level `{s.level}`, seed {result.seed}, {s.threads} torch thread(s), deterministic algorithms. "
        + ", ".join(f"{k} {v}" for k, v in result.versions.items())
        + ".",
        "",
        "Every command below runs from this folder (`cd` into it first). The numbers are whatever the toy "
        "world gives: where a paper's claim does not show here, the claim is marked **not seen**.",
        "",
        "## The world and the base model",
        "",
        f"4 languages, {s.docs} general documents each, {s.math_docs} arithmetic documents in one language; a tiny Llama "
        f"({s.layers} layers, hidden {s.hidden}) initialised at random in `init/` (with the world's word-level tokenizer) and "
        f"pretrained on the general and code-switched text{' (reused from the cache)' if result.base_cached else ''}:",
        "",
        "```bash",
        *result.base_commands,
        "```",
        "",
    ]
    for exp in result.experiments:
        out += [f"## {exp.title}", ""]
        if exp.note:
            out += [exp.note, ""]
        for table, plot in zip(exp.tables, exp.plots or [None] * len(exp.tables)):
            out += [f"**{table.title}** (from `{table.results}`)", "", markdown_table(table), ""]
            if plot:
                out += [f"![{table.title}]({plot})", ""]
        if exp.claims:
            out += ["| the paper's claim | here | seen? |", "|---|---|---|"]
            verdict = {True: "yes", False: "**not seen**", None: "cannot tell"}
            out += [f"| {c.claim} | {c.observed} | {verdict[c.holds]} |" for c in exp.claims]
            out += [""]
        if exp.commands:
            out += ["Commands, in order:", "", "```bash", *exp.commands, "```", ""]
    return "\n".join(out)


def write_report(result: Any) -> Path:
    """Write folder/report.md, folder/report.json and the plots; returns the report's path."""
    for exp in result.experiments:
        if exp.tables:
            write_plots(exp, result.folder)
    path = result.folder / "report.md"
    for target, text in ((path, render_markdown(result)), (result.folder / "report.json", json.dumps(result.to_dict(), indent=1) + "\n")):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return path
