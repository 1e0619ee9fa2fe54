"""Pictures of a mask or an importance file (PNG, drawn with Pillow).

- a heat map per layer (rows) × tensor kind (columns): of a mask, the selected share; of an
  importance file, the mean importance with each kind's column scaled to its own largest mean
  (kinds differ by orders of magnitude — a norm's scores are not a projection's — so one scale
  would show one kind; per kind it shows where in depth each kind matters most);
- for a chosen tensor, a 2-D map (block-averaged to at most `MAX_SIDE` cells a side) with the
  mean of each row (right strip) and column (bottom strip), and how concentrated the tensor
  is in its top rows and columns (`dimensions.concentration`): the way the linguistic-regions
  paper shows regions concentrating in a few rows and columns of `o_proj` and `down_proj`;
- optionally that concentration for every output projection of the file.

Masks and importance files take one drawing path: each becomes per-tensor sums (the heat
map) and a `dimensions.Profile` of a tensor, read one block of rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroloc_cli.arch import layer_index, name_matches, tensor_kind
from neuroloc_cli.errors import UsageError, did_you_mean
from neuroloc_cli.io.output import atomic_file
from neuroloc_cli.masks.algebra import selected_elements
from neuroloc_cli.masks.dimensions import MAX_SIDE, Profile, concentration, is_output_projection, pool, profile
from neuroloc_cli.masks.format import Mask, MaskEntry
from neuroloc_cli.masks.importance import Importance

_CELL = 22  # pixels per cell of the layer × kind map
_PAD = 8
_BG, _FG, _NONE = (255, 255, 255), (20, 20, 20), (215, 215, 215)
# viridis at 0, .25, .5, .75, 1
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


@dataclass(frozen=True)
class Grid:
    """Values (NaN where there is nothing) with row (layer) and column (tensor kind) labels."""

    values: torch.Tensor  # [rows, cols] float
    rows: list[str]
    cols: list[str]


def layer_kind_grid(sums: Mapping[str, tuple[float, int]]) -> Grid:
    """The mean per layer × tensor kind of per-tensor `(sum, elements)`; tensors outside the
    blocks form a row "-". With a mask's selected counts (`mask_sums`) the mean is the
    selected share."""
    cells: dict[tuple[str, str], list[float]] = {}
    for name, (total, n) in sums.items():
        layer = layer_index(name)
        c = cells.setdefault(("-" if layer is None else str(layer), tensor_kind(name)), [0.0, 0])
        c[0] += total
        c[1] += n
    rows = sorted({r for r, _ in cells}, key=lambda r: (r == "-", int(r) if r != "-" else 0))
    in_blocks = {tensor_kind(n) for n in sums if layer_index(n) is not None}
    cols = list(dict.fromkeys(sorted(in_blocks) + sorted({k for r, k in cells if r == "-"})))
    values = torch.full((len(rows), len(cols)), float("nan"))
    for (r, k), (total, n) in cells.items():
        values[rows.index(r), cols.index(k)] = total / n if n else float("nan")
    return Grid(values, rows, cols)


def mask_sums(mask: Mask) -> dict[str, tuple[float, int]]:
    """Per tensor: (selected elements, elements), without expanding an entry."""
    return {name: (selected_elements(e), math.prod(e.shape)) for name, e in mask.entries.items()}


def importance_sums(imp: Importance) -> dict[str, tuple[float, int]]:
    """Per tensor: (importance sum in float64, elements), reading one tensor at a time."""
    return {name: (float(t.sum(dtype=torch.float64)), t.numel()) for name, t in imp.items()}


def scale_columns(grid: Grid) -> Grid:
    """Each column divided by its largest value (a column of zeros stays zeros)."""
    values = grid.values.clone()
    for j in range(values.shape[1]):
        col = values[:, j]
        finite = col[~col.isnan()]
        top = float(finite.max()) if finite.numel() else 0.0
        if top > 0:
            values[:, j] = col / top
    return Grid(values, grid.rows, grid.cols)


def find_tensor(names: Iterable[str], pattern: str, what: str = "mask") -> str:
    """The one tensor of `names` named `pattern`, or matched by it as a glob or substring.

    Args:
        what: the file the names are from, for the message ("mask", "importance file").

    Raises:
        UsageError: nothing or several tensors match.
    """
    names = list(names)
    if pattern in names:
        return pattern
    hits = [n for n in names if name_matches(pattern, n)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise UsageError(f"--tensor {pattern!r}: no tensor of the {what} matches{did_you_mean(pattern, names)}")
    raise UsageError(f"--tensor {pattern!r}: matches {len(hits)} tensors ({', '.join(hits[:3])}, ...)", hint="give a full tensor name")


def density_map(entry: MaskEntry, max_side: int = MAX_SIDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tensor's selection density, block-averaged, and its exact row and column shares.

    Args:
        entry: the tensor's mask entry; 1-D tensors are drawn as one row, tensors of more
            than two dimensions as `[shape[0], rest]`.

    Returns:
        (map [≤max_side, ≤max_side], row shares [rows], column shares [cols]).
    """
    p = profile(entry.dense(), max_side)
    return p.grid, p.row_mean, p.col_mean


@dataclass(frozen=True)
class _Subject:
    """What `_render` draws: a mask or an importance file, reduced to what the pictures need."""

    what: str  # "mask", "importance file": for messages
    names: list[str]
    shapes: Mapping[str, tuple[int, ...]]
    grid: Grid
    heading: str  # the heat map's title
    legend: str  # the heat map's colour scale
    cell: str  # the tensor map's colour scale
    profile_of: Callable[[str], Profile]


def render_png(mask: Mask, out: Path, tensor: str | None = None, dimensions: bool = False) -> dict:
    """Draw a mask's layer × kind heat map of the selected share (and a tensor's density) into `out`.

    Args:
        mask: the mask.
        out: the PNG file to write (atomically).
        tensor: a tensor name, glob or unique substring; None for the heat map only.
        dimensions: also report the concentration of every output projection.

    Returns:
        What was drawn: `{"output", "width", "height", "heat_map", "tensor", "concentration",
        "dimensions"}`; `concentration` (`dimensions.concentration` of the selected elements
        of `tensor`) is None without a tensor, `dimensions` (a list of them) None unless asked.

    Raises:
        UsageError: `tensor` matches no tensor or several, or has no elements.
        OutputError: the file cannot be written.
    """
    subject = _Subject(
        "mask",
        list(mask.entries),
        {n: e.shape for n, e in mask.entries.items()},
        layer_kind_grid(mask_sums(mask)),
        f"selected share per layer x tensor kind ({mask.granularity} mask)",
        "share of elements selected",
        "share selected",
        lambda name: profile(mask.entries[name].dense()),
    )
    return _render(subject, out, tensor, dimensions)


def render_importance_png(imp: Importance, out: Path, tensor: str | None = None, dimensions: bool = False) -> dict:
    """Draw an importance file's layer × kind heat map of the mean importance, each kind scaled
    to its largest (and a tensor's importance) into `out`.

    Args and Returns: as `render_png`; `concentration` is of the tensor's importance sum.

    Raises:
        UsageError: `tensor` matches no tensor or several, or has no elements.
        OutputError: the file cannot be written.
    """
    source = f", {imp.meta.source}" if imp.meta.source else ""
    subject = _Subject(
        "importance file",
        list(imp.shapes),
        imp.shapes,
        scale_columns(layer_kind_grid(importance_sums(imp))),
        f"mean importance per layer x tensor kind, each kind scaled to its largest ({imp.meta.score}{source})",
        "mean / the kind's largest mean",
        "mean importance",
        lambda name: profile(imp.read(name)),
    )
    return _render(subject, out, tensor, dimensions)


def _render(subject: _Subject, out: Path, tensor: str | None, dimensions: bool) -> dict:
    from PIL import Image

    panels = [_grid_panel(subject.grid, subject.heading, subject.legend)]
    name = conc = None
    if tensor is not None:
        name = find_tensor(subject.names, tensor, subject.what)
        if math.prod(subject.shapes[name]) == 0:
            raise UsageError(f"--tensor {name}: shape {list(subject.shapes[name])} has no elements to draw")
        p = subject.profile_of(name)
        conc = concentration(name, p)
        panels.append(_tensor_panel(f"{name} {list(p.shape)}: {subject.cell} (right: per row, bottom: per column)", p, subject.cell))
    report = None
    if dimensions:
        chosen = [n for n in subject.names if is_output_projection(n) and math.prod(subject.shapes[n]) > 0]
        report = [conc if n == name else concentration(n, subject.profile_of(n)) for n in chosen]
    width = max(p.width for p in panels) + 2 * _PAD
    height = sum(p.height for p in panels) + _PAD * (len(panels) + 1)
    image = Image.new("RGB", (width, height), _BG)
    y = _PAD
    for panel in panels:
        image.paste(panel, (_PAD, y))
        y += panel.height + _PAD
    with atomic_file(out, "image") as tmp:
        image.save(tmp, format="PNG")
    return {
        "output": str(out),
        "width": width,
        "height": height,
        "heat_map": subject.heading,
        "tensor": name,
        "concentration": conc,
        "dimensions": report,
    }


def _color(share: float, vmax: float = 1.0) -> tuple[int, int, int]:
    if share != share:  # NaN: the file has no such tensor
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


def _grid_panel(grid: Grid, title: str, legend_label: str):
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
    _legend(draw, 0, top + n_rows * _CELL + 6, legend_label, vmax)
    return img


def _vmax(values: torch.Tensor) -> float:
    """The colour scale's top: the largest value drawn, so a 5 % mask is not all dark."""
    finite = values[~values.isnan()]
    top = float(finite.max()) if finite.numel() else 0.0
    return top if top > 0 else 1.0


def _legend(draw, x: int, y: int, label: str, vmax: float) -> None:
    for k in range(101):
        draw.line([x + k, y, x + k, y + 8], fill=_color(k / 100))
    _text(draw, (x + 106, y - 2), f"0 .. {vmax:.3g}  {label}")


def _tensor_panel(title: str, p: Profile, legend_label: str):
    from PIL import Image, ImageDraw

    grid, row_mean, col_mean = p.grid, p.row_mean, p.col_mean
    scale = max(1, 256 // max(grid.shape))
    gh, gw = grid.shape[0] * scale, grid.shape[1] * scale
    strip = 12
    width = max(gw + strip + 8, 6 * len(title) + 4)
    height = 16 + gh + strip + 8 + 30
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    _text(draw, (0, 0), title)
    top = 16
    heat = Image.new("RGB", (grid.shape[1], grid.shape[0]))
    vmax = _vmax(torch.cat([grid.reshape(-1), row_mean, col_mean]))
    heat.putdata([_color(float(v), vmax) for v in grid.reshape(-1)])
    img.paste(heat.resize((gw, gh), Image.NEAREST), (0, top))
    for i, v in enumerate(pool(row_mean, grid.shape[0]).tolist()):
        draw.rectangle([gw + 4, top + i * scale, gw + 4 + strip, top + (i + 1) * scale - 1], fill=_color(v, vmax))
    for j, v in enumerate(pool(col_mean, grid.shape[1]).tolist()):
        draw.rectangle([j * scale, top + gh + 4, (j + 1) * scale - 1, top + gh + 4 + strip], fill=_color(v, vmax))
    _legend(draw, 0, top + gh + strip + 14, legend_label, vmax)
    return img


def grid_png(grid: Grid, out: Path, title: str, legend_label: str) -> dict:
    """Write one heat map of `grid` (NaN cells grey) to the PNG `out`, atomically.

    Returns:
        The output path, width and height.

    Raises:
        OutputError: the file cannot be written.
    """
    from PIL import Image

    panel = _grid_panel(grid, title, legend_label)
    image = Image.new("RGB", (panel.width + 2 * _PAD, panel.height + 2 * _PAD), _BG)
    image.paste(panel, (_PAD, _PAD))
    with atomic_file(out, "image") as tmp:
        image.save(tmp, format="PNG")
    return {"output": str(out), "width": image.width, "height": image.height}
