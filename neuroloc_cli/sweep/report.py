"""A sweep's results as people read them: a CSV, a PNG of the objective over the swept keys
(matplotlib), and a sketch of the same for a terminal."""

from __future__ import annotations

import csv
import io
import math
import textwrap
from pathlib import Path

from neuroloc_cli.sweep.run import PointResult

_SHADES = " ░▒▓█"


def csv_text(ranked: list[PointResult], keys: list[str]) -> str:
    """One row per point, best first: rank, index, the swept values, objective, every metric."""
    metrics = list(dict.fromkeys(f"{t}.{m}" for r in ranked for t, ms in r.metrics.items() for m in ms))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "point", *keys, "objective", *metrics, "seconds"])
    for rank, r in enumerate(ranked, 1):
        flat = {f"{t}.{m}": v for t, ms in r.metrics.items() for m, v in ms.items()}
        writer.writerow(
            [rank, r.index, *(r.values.get(k) for k in keys), _num(r.objective), *(_num(flat.get(m)) for m in metrics), f"{r.seconds:.3f}"]
        )
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def _numeric(ranked: list[PointResult], key: str) -> bool:
    return all(isinstance(r.values.get(key), (int, float)) and not isinstance(r.values.get(key), bool) for r in ranked)


def _order(ranked: list[PointResult], key: str):
    """A sort key for the values of `key`: by number when all are numbers, else by text."""
    return (lambda v: float(v)) if _numeric(ranked, key) else (lambda v: str(v))


def plot_png(path: Path, ranked: list[PointResult], keys: list[str], objective: str) -> bool:
    """The objective over the first one or two swept keys (a line, or a heatmap for a full
    grid, else a scatter coloured by the objective). Returns False when there is nothing to
    draw (no finite objective)."""
    finite = [r for r in ranked if math.isfinite(r.objective)]
    if not finite:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuroloc_cli.io.output import atomic_file

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    label = "\n".join(textwrap.wrap(objective, 48, break_on_hyphens=False)) or objective  # a long weighted sum wraps
    x = keys[0]
    if len(keys) == 1 or not _numeric(finite, keys[1]):
        order = _order(finite, x)
        pts = sorted(finite, key=lambda r: order(r.values[x]))
        xs = [r.values[x] if _numeric(finite, x) else str(r.values[x]) for r in pts]
        ax.plot(xs, [r.objective for r in pts], marker="o")
        ax.set_xlabel(x)
        ax.set_ylabel(label, fontsize=8 if "\n" in label else None)
    else:
        y = keys[1]
        xv = sorted({r.values[x] for r in finite}, key=_order(finite, x))
        yv = sorted({r.values[y] for r in finite}, key=float)
        cells = {(r.values[x], r.values[y]): r.objective for r in finite}
        if len(cells) == len(xv) * len(yv) and len(finite) == len(cells):  # a full grid
            grid = [[cells[(a, b)] for a in xv] for b in yv]
            image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(xv)), [str(v) for v in xv])
            ax.set_yticks(range(len(yv)), [str(v) for v in yv])
            lo, hi = min(min(row) for row in grid), max(max(row) for row in grid)
            for j, row in enumerate(grid):
                for i, v in enumerate(row):  # dark text on the bright end of the colour map
                    bright = hi > lo and (v - lo) / (hi - lo) > 0.6
                    ax.text(i, j, f"{v:.3g}", ha="center", va="center", color="black" if bright else "white", fontsize=8)
        else:
            image = ax.scatter(
                [r.values[x] for r in finite], [r.values[y] for r in finite], c=[r.objective for r in finite], cmap="viridis"
            )
        fig.colorbar(image, ax=ax).set_label(label, fontsize=8 if "\n" in label else None)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    ax.set_title("neuroloc sweep")
    fig.tight_layout()
    with atomic_file(path, "image") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def sketch(ranked: list[PointResult], keys: list[str], minimize: bool = False) -> list[str]:
    """Text lines for a terminal: bars of the objective per value of one key, or a shaded
    grid over two (longer and darker is better)."""
    finite = [r for r in ranked if math.isfinite(r.objective)]
    if not finite:
        return []
    lo, hi = min(r.objective for r in finite), max(r.objective for r in finite)
    span = hi - lo or 1.0

    def goodness(v: float) -> float:  # 0 worst .. 1 best
        return (hi - v) / span if minimize else (v - lo) / span

    x = keys[0]
    if len(keys) == 1:
        order = _order(finite, x)
        pts = sorted(finite, key=lambda r: order(r.values[x]))
        width = max(len(str(r.values[x])) for r in pts)
        return [f"{x}={str(r.values[x]).rjust(width)} {'█' * (1 + round(29 * goodness(r.objective))):<30} {r.objective:.4g}" for r in pts]
    y = keys[1]
    xv = list(dict.fromkeys(sorted((r.values[x] for r in finite), key=_order(finite, x))))
    yv = list(dict.fromkeys(sorted((r.values[y] for r in finite), key=_order(finite, y))))
    best: dict[tuple, float] = {}
    for r in finite:  # other keys: the best value at each cell
        cell = (r.values[x], r.values[y])
        best[cell] = r.objective if cell not in best else (min if minimize else max)(best[cell], r.objective)
    width = max(len(str(v)) for v in yv)
    lines = [f"{y}\\{x}".ljust(width) + " " + " ".join(str(v)[:6].center(6) for v in xv)]
    for b in reversed(yv):
        row = []
        for a in xv:
            v = best.get((a, b))
            row.append("  ·   " if v is None else (_SHADES[min(4, int(5 * goodness(v)))] * 6))
        lines.append(str(b).rjust(width) + " " + " ".join(row))
    worst, top = (hi, lo) if minimize else (lo, hi)
    lines.append(f"shade: objective from {worst:.4g} (light, worst) to {top:.4g} (dark, best)")
    return lines
