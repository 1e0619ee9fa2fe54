"""Pictures of a mask (PNG, drawn with Pillow).

- a heat map of the selected share per layer (rows) × tensor kind (columns);
- for a chosen tensor, its selection density as a 2-D map (block-averaged to at most
  `MAX_SIDE` cells a side) with the share of each row (right strip) and column (bottom strip):
  the way the linguistic-regions paper shows regions concentrating in a few rows and
  columns of `o_proj` and `down_proj`.

Element masks are read one block of rows at a time, so a large tensor is never expanded to
floats at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from neuroloc_cli.arch import layer_index, name_matches, tensor_kind
from neuroloc_cli.errors import UsageError, did_you_mean
from neuroloc_cli.io.output import atomic_file
from neuroloc_cli.masks.algebra import selected_elements
from neuroloc_cli.masks.format import Mask, MaskEntry

MAX_SIDE = 256  # cells a side of a tensor's density map
_CELL = 22  # pixels per cell of the layer × kind map
_PAD = 8
_BG, _FG, _NONE = (255, 255, 255), (20, 20, 20), (215, 215, 215)
# viridis at 0, .25, .5, .75, 1
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


@dataclass(frozen=True)
class Grid:
    """Shares in [0, 1] (NaN where there is nothing) with row and column labels."""

    values: torch.Tensor  # [rows, cols] float
    rows: list[str]
    cols: list[str]


def layer_kind_grid(mask: Mask) -> Grid:
    """Selected share per layer × tensor kind; tensors outside the blocks form a row "-"."""
    cells: dict[tuple[str, str], list[int]] = {}
    for name, e in mask.entries.items():
        layer = layer_index(name)
        key = ("-" if layer is None else str(layer), tensor_kind(name))
        c = cells.setdefault(key, [0, 0])
        c[0] += selected_elements(e)
        c[1] += math.prod(e.shape)
    rows = sorted({r for r, _ in cells}, key=lambda r: (r == "-", int(r) if r != "-" else 0))
    cols = sorted({k for _, k in cells if _is_block_kind(k, mask)}) + sorted({k for r, k in cells if r == "-"})
    cols = list(dict.fromkeys(cols))
    values = torch.full((len(rows), len(cols)), float("nan"))
    for (r, k), (sel, tot) in cells.items():
        values[rows.index(r), cols.index(k)] = sel / tot if tot else float("nan")
    return Grid(values, rows, cols)


def _is_block_kind(kind: str, mask: Mask) -> bool:
    return any(layer_index(n) is not None and tensor_kind(n) == kind for n in mask.entries)


def find_tensor(mask: Mask, pattern: str) -> str:
    """The one tensor of `mask` named `pattern`, or matched by it as a glob or substring.

    Raises:
        UsageError: nothing or several tensors match.
    """
    if pattern in mask.entries:
        return pattern
    hits = [n for n in mask.entries if name_matches(pattern, n)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise UsageError(f"--tensor {pattern!r}: no tensor of the mask matches{did_you_mean(pattern, mask.entries)}")
    raise UsageError(f"--tensor {pattern!r}: matches {len(hits)} tensors ({', '.join(hits[:3])}, ...)", hint="give a full tensor name")


def density_map(entry: MaskEntry, max_side: int = MAX_SIDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tensor's selection density, block-averaged, and its exact row and column shares.

    Args:
        entry: the tensor's mask entry; 1-D tensors are drawn as one row, tensors of more
            than two dimensions as `[shape[0], rest]`.

    Returns:
        (map [≤max_side, ≤max_side], row shares [rows], column shares [cols]).
    """
    shape = (
        entry.shape
        if len(entry.shape) == 2
        else ((1, entry.shape[0]) if len(entry.shape) == 1 else (entry.shape[0], math.prod(entry.shape[1:])))
    )
    rows, cols = shape
    if entry.axis is not None:
        unit = entry.selected.float()
        # 1-D tensors and axis-0 selections vary along rows (1-D: along its only row).
        along_rows = len(entry.shape) > 1 and entry.axis == 0
        row_share = unit if along_rows else torch.full((rows,), unit.mean().item())
        col_share = torch.full((cols,), unit.mean().item()) if along_rows else unit
        grid = (
            _pool(row_share, max_side)[:, None] * torch.ones(1, min(cols, max_side))
            if along_rows
            else torch.ones(min(rows, max_side), 1) * _pool(col_share, max_side)[None, :]
        )
        return grid, row_share, col_share
    selected = entry.selected.reshape(rows, cols)
    row_share = torch.empty(rows)
    col_sum = torch.zeros(cols, dtype=torch.float64)
    out_rows = min(rows, max_side)
    bounds = [(i * rows) // out_rows for i in range(out_rows + 1)]
    grid = torch.empty(out_rows, min(cols, max_side))
    for i in range(out_rows):
        block = selected[bounds[i] : bounds[i + 1]].float()
        row_share[bounds[i] : bounds[i + 1]] = block.mean(1)
        col_sum += block.sum(0, dtype=torch.float64)
        grid[i] = _pool(block.mean(0), max_side)
    return grid, row_share, (col_sum / rows).float()


def _pool(v: torch.Tensor, size: int) -> torch.Tensor:
    return F.adaptive_avg_pool1d(v.float()[None, None], min(v.numel(), size))[0, 0]


def render_png(mask: Mask, out: Path, tensor: str | None = None) -> dict:
    """Draw the layer × kind heat map (and the chosen tensor's density map) into `out`.

    Args:
        mask: the mask.
        out: the PNG file to write (atomically).
        tensor: a tensor name, glob or unique substring; None for the heat map only.

    Returns:
        What was drawn: `{"output", "width", "height", "tensor"}`.

    Raises:
        UsageError: `tensor` matches no tensor or several.
        OutputError: the file cannot be written.
    """
    from PIL import Image

    panels = [_grid_panel(layer_kind_grid(mask), f"selected share per layer x tensor kind ({mask.granularity} mask)")]
    name = None
    if tensor is not None:
        name = find_tensor(mask, tensor)
        panels.append(_tensor_panel(name, mask.entries[name]))
    width = max(p.width for p in panels) + 2 * _PAD
    height = sum(p.height for p in panels) + _PAD * (len(panels) + 1)
    image = Image.new("RGB", (width, height), _BG)
    y = _PAD
    for p in panels:
        image.paste(p, (_PAD, y))
        y += p.height + _PAD
    with atomic_file(out, "image") as tmp:
        image.save(tmp, format="PNG")
    return {"output": str(out), "width": width, "height": height, "tensor": name}


def _color(share: float, vmax: float = 1.0) -> tuple[int, int, int]:
    if share != share:  # NaN: the mask has no such tensor
        return _NONE
    x = min(1.0, max(0.0, share / vmax)) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    f = x - i
    return tuple(round(a + (b - a) * f) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1]))


def _text(draw, xy, text: str) -> None:
    draw.text(xy, text, fill=_FG)


def _vertical_label(text: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (6 * len(text) + 4, 12), _BG)
    ImageDraw.Draw(img).text((1, 0), text, fill=_FG)
    return img.rotate(90, expand=True)


def _grid_panel(grid: Grid, title: str):
    from PIL import Image, ImageDraw

    labels = [_vertical_label(c) for c in grid.cols]
    top = 16 + max((lab.height for lab in labels), default=0) + 4
    left = 8 + 6 * max((len(r) for r in grid.rows), default=1)
    n_rows, n_cols = grid.values.shape
    vmax = _vmax(grid.values)
    legend = 30
    width = max(left + n_cols * _CELL + 4, 6 * len(title) + 4, 220)
    height = top + n_rows * _CELL + legend
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    _text(draw, (0, 0), title)
    for j, lab in enumerate(labels):
        img.paste(lab, (left + j * _CELL + (_CELL - lab.width) // 2, top - 4 - lab.height))
    for i, r in enumerate(grid.rows):
        _text(draw, (2, top + i * _CELL + 5), r)
        for j in range(n_cols):
            x, y = left + j * _CELL, top + i * _CELL
            draw.rectangle([x, y, x + _CELL - 2, y + _CELL - 2], fill=_color(float(grid.values[i, j]), vmax))
    _legend(draw, 0, top + n_rows * _CELL + 6, "share of elements selected", vmax)
    return img


def _vmax(values: torch.Tensor) -> float:
    """The colour scale's top: the largest share drawn, so a 5 % mask is not all dark."""
    finite = values[~values.isnan()]
    top = float(finite.max()) if finite.numel() else 0.0
    return top if top > 0 else 1.0


def _legend(draw, x: int, y: int, label: str, vmax: float) -> None:
    for k in range(101):
        draw.line([x + k, y, x + k, y + 8], fill=_color(k / 100))
    _text(draw, (x + 106, y - 2), f"0 .. {vmax:.3g}  {label}")


def _tensor_panel(name: str, entry: MaskEntry):
    from PIL import Image, ImageDraw

    grid, row_share, col_share = density_map(entry)
    scale = max(1, 256 // max(grid.shape))
    gh, gw = grid.shape[0] * scale, grid.shape[1] * scale
    strip = 12
    title = f"{name} {list(entry.shape)}: density (right: per row, bottom: per column)"
    width = max(gw + strip + 8, 6 * len(title) + 4)
    height = 16 + gh + strip + 8 + 30
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    _text(draw, (0, 0), title)
    top = 16
    heat = Image.new("RGB", (grid.shape[1], grid.shape[0]))
    vmax = _vmax(torch.cat([grid.reshape(-1), row_share, col_share]))
    heat.putdata([_color(float(v), vmax) for v in grid.reshape(-1)])
    img.paste(heat.resize((gw, gh), Image.NEAREST), (0, top))
    rows = _pool(row_share, grid.shape[0])
    cols = _pool(col_share, grid.shape[1])
    for i, v in enumerate(rows.tolist()):
        draw.rectangle([gw + 4, top + i * scale, gw + 4 + strip, top + (i + 1) * scale - 1], fill=_color(v, vmax))
    for j, v in enumerate(cols.tolist()):
        draw.rectangle([j * scale, top + gh + 4, (j + 1) * scale - 1, top + gh + 4 + strip], fill=_color(v, vmax))
    _legend(draw, 0, top + gh + strip + 14, "share selected", vmax)
    return img
