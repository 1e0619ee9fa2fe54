"""One tensor as a 2-D map of a mask's selection or of importance, and how it depends on dimensions.

The linguistic-regions paper (Zhang et al. 2024, "Unveiling Linguistic Regions in Large
Language Models") reports that regions concentrate in a few rows and columns of `o_proj` and
`down_proj`: a few hidden dimensions carry most of a region. `concentration` measures it: the
share of the tensor's mass (its selected elements, or its importance sum) that lies in the top
1 % of its rows, ranked by their own mass, and likewise for columns.

Rows and columns are those of the stored weight. Linear weights (Llama's `o_proj`,
`down_proj`) are stored `[out, in]`: rows are output dimensions, the hidden dimensions
written into the residual stream. GPT-2's `Conv1D` weights (`attn.c_proj`, `mlp.c_proj`) are
stored `[in, out]`: there the columns are the hidden dimensions. `row_dim` / `col_dim` say so.

A tensor is read one block of rows at a time, so a large one is never expanded to floats at
once; 1-D tensors are one row, tensors of more than two dimensions `[shape[0], rest]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neuroloc_cli.arch import CONV1D_KINDS, tensor_kind

MAX_SIDE = 256  # cells a side of a tensor's map
TOP = 0.01  # the share of rows, columns or elements whose mass `concentration` and `importance_stats` report

# Output projections of attention and MLP, whose rows/columns the paper finds concentrated:
# tensor kind → the stored layout (True: GPT-2 Conv1D, [in, out]).
OUTPUT_PROJECTIONS = {
    "self_attn.o_proj.weight": False,
    "mlp.down_proj.weight": False,
    "attn.c_proj.weight": True,
    "mlp.c_proj.weight": True,
}


def is_output_projection(name: str) -> bool:
    """`o_proj` / `down_proj` (Llama, Mistral, Qwen2) or GPT-2's `attn.c_proj` / `mlp.c_proj`."""
    return tensor_kind(name) in OUTPUT_PROJECTIONS


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view a tensor is drawn and measured as: 1-D as one row, N-D as `[shape[0], rest]`."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) < 2:
        return 1, math.prod(shape)
    return int(shape[0]), math.prod(shape[1:])


def axis_names(name: str, shape: Sequence[int]) -> tuple[str | None, str | None]:
    """What the rows and columns of a 2-D weight are (`output` / `input`), or None where the
    name does not say (1-D and N-D tensors, embeddings)."""
    kind = tensor_kind(name)
    if len(shape) != 2 or not kind.endswith("weight") or any(w in name for w in ("embed", "wte", "wpe")):
        return None, None
    return ("input", "output") if kind in CONV1D_KINDS else ("output", "input")


@dataclass(frozen=True)
class Profile:
    """A tensor's mass by position: block means for the picture, exact sums per row and column.

    Attributes:
        shape: the model tensor's shape.
        grid: [≤MAX_SIDE, ≤MAX_SIDE] means over blocks of rows and columns.
        row_sum: [rows] float64, the mass of each row of the 2-D view.
        col_sum: [cols] float64, the mass of each column.
    """

    shape: tuple[int, ...]
    grid: torch.Tensor
    row_sum: torch.Tensor
    col_sum: torch.Tensor

    @property
    def row_mean(self) -> torch.Tensor:
        return (self.row_sum / max(1, self.col_sum.numel())).float()

    @property
    def col_mean(self) -> torch.Tensor:
        return (self.col_sum / max(1, self.row_sum.numel())).float()


def profile(values: torch.Tensor, max_side: int = MAX_SIDE) -> Profile:
    """Sum a tensor (BOOL selections or float scores) by row and column, a block of rows at a time.

    Args:
        values: the tensor, of the model tensor's shape (e.g. `MaskEntry.dense()`, a view).
        max_side: the picture's cells a side; blocks are unequal where a side does not divide.

    Raises:
        ValueError: the tensor has no elements.
    """
    rows, cols = matrix_shape(values.shape)
    if rows * cols == 0:
        raise ValueError(f"a tensor of shape {list(values.shape)} has no elements")
    m = values.reshape(rows, cols)
    out_rows = min(rows, max_side)
    bounds = [(i * rows) // out_rows for i in range(out_rows + 1)]
    row_sum = torch.empty(rows, dtype=torch.float64)
    col_sum = torch.zeros(cols, dtype=torch.float64)
    grid = torch.empty(out_rows, min(cols, max_side))
    for i in range(out_rows):
        block = m[bounds[i] : bounds[i + 1]]
        sums = block.sum(0, dtype=torch.float64)
        row_sum[bounds[i] : bounds[i + 1]] = block.sum(1, dtype=torch.float64)
        col_sum += sums
        grid[i] = pool(sums / block.shape[0], max_side)
    return Profile(tuple(values.shape), grid, row_sum, col_sum)


def pool(v: torch.Tensor, size: int) -> torch.Tensor:
    """A vector averaged down to at most `size` cells (float32)."""
    return F.adaptive_avg_pool1d(v.float()[None, None], min(v.numel(), size))[0, 0]


def top_count(n: int, top: float = TOP) -> int:
    """How many of `n` rows, columns or elements the top share holds: `int(top · n)` (the rule of
    `ops.sparsify.share_count`), at least one of a non-empty group."""
    return min(n, max(1, int(top * n)))


def concentration(name: str, p: Profile, top: float = TOP) -> dict:
    """How much of a tensor's mass its top rows and columns hold.

    Returns:
        `tensor`, `shape`, `rows`, `cols`, `row_dim` / `col_dim` (`output`, `input` or None),
        `mass` (the selected elements or the importance sum), `top`, `top_rows` / `top_cols`
        (how many), `row_share` / `col_share` (the share of `mass` in the top rows / columns;
        None when the mass is 0), and `even_row_share` / `even_col_share` (the share they
        would hold were the mass spread evenly: `top_rows / rows`).
    """
    rows, cols = p.row_sum.numel(), p.col_sum.numel()
    mass = float(p.row_sum.sum())
    k_rows, k_cols = top_count(rows, top), top_count(cols, top)
    row_dim, col_dim = axis_names(name, p.shape)

    def share(sums: torch.Tensor, k: int) -> float | None:
        return float(torch.topk(sums, k, sorted=False).values.sum()) / mass if mass > 0 else None

    return {
        "tensor": name,
        "shape": list(p.shape),
        "rows": rows,
        "cols": cols,
        "row_dim": row_dim,
        "col_dim": col_dim,
        "mass": mass,
        "top": top,
        "top_rows": k_rows,
        "top_cols": k_cols,
        "row_share": share(p.row_sum, k_rows),
        "col_share": share(p.col_sum, k_cols),
        "even_row_share": k_rows / rows,
        "even_col_share": k_cols / cols,
    }


# -- text, for the commands' tables (the core formats; the commands print) -------------------

# (header, justification) of the `--dimensions` table
TABLE_COLUMNS = tuple(
    (col, "left" if col in ("tensor", "shape", "rows are", "cols are") else "right")
    for col in ("tensor", "shape", "rows are", "top rows", "row share", "even", "cols are", "top cols", "col share", "even")
)
NO_PROJECTIONS = "no o_proj / down_proj / c_proj tensors to report dimensions of"


def table_title(mass: str) -> str:
    """The `--dimensions` table's title; `mass` is what the shares are of ("selected elements")."""
    return f"share of {mass} in the top 1 % of rows and of columns (even: the share were it spread evenly)"


def table_row(c: dict) -> list[str]:
    """One `concentration` as the cells of `TABLE_COLUMNS`."""
    return [
        c["tensor"],
        str(c["shape"]),
        c["row_dim"] or "-",
        str(c["top_rows"]),
        _pct(c["row_share"]),
        _pct(c["even_row_share"]),
        c["col_dim"] or "-",
        str(c["top_cols"]),
        _pct(c["col_share"]),
        _pct(c["even_col_share"]),
    ]


def describe(c: dict, mass: str) -> str:
    """One `concentration` as a sentence."""
    rows = f"{c['top_rows']} of {c['rows']}" + (f", {c['row_dim']} dims" if c["row_dim"] else "")
    cols = f"{c['top_cols']} of {c['cols']}" + (f", {c['col_dim']} dims" if c["col_dim"] else "")
    return (
        f"{c['tensor']} {c['shape']}: top {_pct(c['top'], 0)} of rows ({rows}) hold {_pct(c['row_share'])} of its {mass} "
        f"(even: {_pct(c['even_row_share'])}); of columns ({cols}) {_pct(c['col_share'])} (even: {_pct(c['even_col_share'])})"
    )


def _pct(share: float | None, digits: int = 1) -> str:
    return "-" if share is None else f"{100 * share:.{digits}f} %"
