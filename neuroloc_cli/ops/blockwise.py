"""Sparsify-and-mix: the engine of the ties / dare / breadcrumbs / della family.

Each model's mask is described, not stored: a `Keep` says which elements of its delta
survive, in the few terms the fused loops of `neuroloc_cli.ops.kernels` know (a magnitude
cut with its last tie, outliers above a second cut, a keep probability drawn from the
model's random stream, survivors divided by it). Sparsifiers (`neuroloc_cli.ops.sparsify`)
speak only this language; `_pack` alone turns it into the loops' arrays. `mix` runs the
loops over the flat tensors, block by block: one pass reads every input once. The only
whole-tensor work before it is a magnitude threshold per model (found from a sample, then
refined exactly on the few candidates near it) and, for mergekit's rescale, two L1 norms per
model (that pass stores a random mask's draws, a byte each, for the mix to read back).

The mix follows mergekit's definitions (`wd_i = w_i · scale_i · (keep_i ⊙ δ_i)`):

    sign  = +1 where Σ_i wd_i >= 0, else −1    (election by summed mass; ties go to +)
    a_i   = [sign(wd_i) == sign]               (zeros never agree)
    mixed = Σ_i a_i · wd_i,   divisor = Σ_i a_i · w_i   (0 → 1)
    without consensus: mixed = Σ_i wd_i, divisor = Σ_i w_i (|·| < 1e-8 → 1)
    out   = base + λ · (mixed / divisor if normalize else mixed)

`neuroloc_cli.ops.reference` computes the same in plain PyTorch (the specification the tests
hold this module to). The loops take float32 or float64 tensors and compute in that dtype
(`methods.gta` runs half precision through `reference.merge_in_dtype` instead).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

_SAMPLE = 1 << 14  # magnitudes sampled to bracket the threshold
_EXACT_BELOW = 1 << 17  # smaller tensors: one exact selection is cheaper than bracketing
_ALL_TIES = 2**62  # a last tie past every position: every equal magnitude is kept
_MIN_PART = 1 << 16  # elements: a smaller part of a tensor is not worth a thread
_NO_DRAWS = np.empty(0, np.uint8)
RESCALE_EPS = 1e-7  # below this L1 norm a delta counts as zero and is not rescaled (mergekit's)

T = TypeVar("T")


def _kernels():
    """The compiled loops, imported on first use: importing Numba takes a quarter second
    that commands not merging with these methods should not pay."""
    from neuroloc_cli.ops import kernels

    return kernels


def _np(t: torch.Tensor) -> np.ndarray:
    """A flat NumPy view of a CPU tensor (a copy only if it is not contiguous)."""
    return t.reshape(-1).contiguous().numpy()


def _check_sizes(base: torch.Tensor, *others: torch.Tensor) -> None:
    """The compiled loops do not check bounds: refuse tensors of other sizes up front."""
    for t in others:
        if t.numel() != base.numel():
            raise ValueError(f"tensor of {t.numel()} elements where {base.numel()} are expected")


def _parts(n: int, fn: Callable[[int, int], T], unit: int | None = None) -> list[T]:
    """`fn(start, stop)` over consecutive parts of `range(n)`, one per thread PyTorch uses (the
    kernels release the GIL), each a whole number of `unit`s (default: kernel blocks) and at
    least `_MIN_PART` elements; results in part order.

    The parts follow the thread count, so every caller combines them into results that do not:
    counts, candidates in position order, per-block sums.
    """
    parts = min(torch.get_num_threads(), n // _MIN_PART)
    if parts <= 1:
        return [fn(0, n)]
    unit = unit or _kernels().BLOCK
    step = _ceil_div(_ceil_div(n, parts), unit) * unit
    spans = [(a, min(n, a + step)) for a in range(0, n, step)]
    return list(_pool(len(spans)).map(lambda span: fn(*span), spans))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="neuroloc-mix")


@dataclass(frozen=True)
class Cut:
    """Keep `|δ| > value`, and `|δ| == value` at flat positions `<= last_tie` (all if None)."""

    value: float
    last_tie: int | None = None

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The kept elements of a flat tensor of magnitudes (whole-tensor form, for checks)."""
        keep = magnitude > self.value
        keep |= (magnitude == self.value) & (torch.arange(magnitude.numel()) <= _last(self))
        return keep


KEEP_ALL = Cut(-math.inf, last_tie=-1)  # every |δ| > -inf
KEEP_NONE = Cut(math.inf, last_tie=-1)  # no |δ| > inf, no tie kept


def magnitude_cut(base: torch.Tensor | None, tuned: torch.Tensor, k: int) -> Cut:
    """The `Cut` that keeps the `k` largest |tuned − base| (flat float32/float64 tensors),
    equal magnitudes by position; with `base` None, the `k` largest |tuned| (a zero base is
    read, not made).

    A sample of 16384 magnitudes brackets the k-th largest; one pass counts what lies above
    the bracket and collects what lies inside it (with positions), and a k-th value
    selection (`np.partition`, linear time) on those few candidates gives the exact threshold
    and the last tie kept. If the bracket misses (skewed data), the selection runs on the
    whole tensor instead: the result is the same, only slower.
    """
    n = tuned.numel()
    if base is not None:
        _check_sizes(base, tuned)
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    t = _np(tuned)
    b = _np(base) if base is not None else np.broadcast_to(np.zeros(1, t.dtype), t.shape)
    if n < _EXACT_BELOW:
        return _exact_cut(b, t, k)
    lo, hi = _bracket(b, t, k)
    if lo == hi:  # one magnitude fills the bracket (e.g. an unchanged tensor: all zeros)
        return _flat_cut(b, t, k, hi) or _exact_cut(b, t, k)
    collect, scalar = _kernels().collect, b.dtype.type

    def one_part(start: int, stop: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        # room for an eighth of the part (the bracket holds ~4% of the elements), + scratch
        values = np.empty((stop - start) // 8 + 64, b.dtype)
        positions = np.empty(values.size, np.int64)
        above, found = collect(b[start:stop], t[start:stop], start, scalar(lo), scalar(hi), values, positions)
        return above, found, values, positions

    parts = _parts(n, one_part)
    if any(found >= values.size for _, found, values, _ in parts):  # a part's buffers overflowed
        return _exact_cut(b, t, k)
    above = sum(a for a, _, _, _ in parts)
    need = k - above  # how many of the candidates are kept
    if not 0 < need <= sum(found for _, found, _, _ in parts):
        return _exact_cut(b, t, k)
    values = np.concatenate([v[:found] for _, found, v, _ in parts])
    positions = np.concatenate([p[:found] for _, found, _, p in parts])
    return _select(values, need, above, positions)


def _flat_cut(b: np.ndarray, t: np.ndarray, k: int, value: float) -> Cut | None:
    """The cut when the sample suggests the k-th largest magnitude is exactly `value`: count
    what is above and equal to it, part by part, instead of collecting candidates; the last
    tie kept is then searched for in the one part that holds it (None if `value` is not the
    k-th largest)."""
    kernels, v = _kernels(), b.dtype.type(value)
    parts = _parts(b.size, lambda start, stop: (start, stop, *kernels.count_at(b[start:stop], t[start:stop], v)))
    missing = k - sum(above for _, _, above, _ in parts)
    if not 0 < missing <= sum(equal for _, _, _, equal in parts):
        return None
    for start, stop, _, equal in parts:
        if missing == equal and stop == b.size:
            return Cut(value)  # every tie is kept
        if missing <= equal:
            return Cut(value, start + int(kernels.nth_at(b[start:stop], t[start:stop], v, missing)))
        missing -= equal
    raise AssertionError("the counts cover every tie")


def _bracket(b: np.ndarray, t: np.ndarray, k: int) -> tuple[float, float]:
    """Magnitudes `lo <= hi` that enclose the k-th largest with high probability."""
    n = b.size
    idx = _sample_positions(n)
    sample = np.sort(np.abs(t[idx] - b[idx]))
    q = (n - k) / n  # the threshold's quantile from below
    margin = 5 * math.sqrt(_SAMPLE * q * (1 - q)) + 8
    lo = sample[max(0, int(q * _SAMPLE - margin))]
    hi = sample[min(_SAMPLE - 1, int(q * _SAMPLE + margin) + 1)]
    return float(lo), float(hi)


@functools.lru_cache(maxsize=32)
def _sample_positions(n: int) -> np.ndarray:
    """Fixed pseudo-random positions, sorted so that gathering them walks memory forward
    (they only steer speed, never the result)."""
    return np.sort(np.random.default_rng(n).integers(n, size=_SAMPLE))


def _exact_cut(b: np.ndarray, t: np.ndarray, k: int) -> Cut:
    magnitudes = np.abs(t - b)
    # a NaN delta is never selected (as in the bracketed pass, where it compares false) and
    # does not count towards k; the merged value there is NaN whatever the mask says
    magnitudes[np.isnan(magnitudes)] = -1
    return _select(magnitudes, k, 0, None)


def _select(magnitudes: np.ndarray, need: int, above: int, positions: np.ndarray | None) -> Cut:
    """The cut keeping `above` elements known to lie above `magnitudes` plus the `need`
    largest of `magnitudes` (at `positions`, ascending; None: 0, 1, ...), ties by position."""
    m = magnitudes.size
    value = np.partition(magnitudes, m - need)[m - need]
    greater = above + int(np.count_nonzero(magnitudes > value))
    ties = np.flatnonzero(magnitudes == value)
    missing = above + need - greater
    if missing == ties.size:
        return Cut(float(value))
    last = ties[missing - 1]
    return Cut(float(value), int(last if positions is None else positions[last]))


@dataclass(frozen=True)
class Keep:
    """Which elements of one model's delta survive, in the fused loops' terms: an element
    survives where `cut` keeps its magnitude, `outliers` does not, and its draw falls below
    `p` (by default every element survives).

    This is the whole interface between a sparsifier and the loops: a rule that can be said
    in these terms needs no change to `neuroloc_cli.ops.kernels` (see `_pack` for one that
    cannot).

    Attributes:
        cut: keep only the magnitudes this cut keeps (the top k).
        outliers: of those, drop the ones this cut keeps (breadcrumbs' largest).
        p: keep each element with this probability (a number, or a flat tensor, one per
            element), drawn from the stream `key` (see `neuroloc_cli.ops.kernels.draw`).
        key: the model's random stream.
        inverse_p: divide each survivor by its probability (the DARE and DELLA papers'
            rescale).
        drawn: the draws already made (1 kept, 0 dropped; see `l1_norms`), read instead of
            drawing again.
    """

    cut: Cut | None = None
    outliers: Cut | None = None
    p: float | torch.Tensor | None = None
    key: int = 0
    inverse_p: bool = False
    drawn: np.ndarray | None = field(default=None, compare=False, repr=False)


def _pack(keeps: Sequence[Keep], scales: Sequence[float], weights: Sequence[float], dtype: np.dtype, store: bool = False):
    """The keeps, scales and weights as the loops' arrays, laid out as `neuroloc_cli.ops.kernels`
    describes: per model a row of `floats` (in the compute dtype) and one of `ints`, its
    per-element probabilities and its stored draws (with `store`, `Keep.drawn` is where the
    loop writes its draws, not where it reads them).

    The only code that writes those arrays: a sparsifier that needs a term `Keep` lacks adds
    it to `Keep`, packs it here (a new column) and applies it in `kernels._kept`.
    """
    k = _kernels()
    floats = np.zeros((len(keeps), k.FLOAT_COLUMNS), dtype)
    ints = np.zeros((len(keeps), k.INT_COLUMNS), np.int64)
    p_each, drawn = [], []
    for j, (keep, scale, weight) in enumerate(zip(keeps, scales, weights)):
        floats[j, k.SCALE], floats[j, k.WEIGHT] = scale, weight
        cut, outliers = keep.cut or KEEP_ALL, keep.outliers or KEEP_NONE
        floats[j, k.CUT], ints[j, k.CUT_TIE] = cut.value, _last(cut)
        floats[j, k.OUTLIER], ints[j, k.OUTLIER_TIE] = outliers.value, _last(outliers)
        each = np.empty(0, dtype)
        if keep.drawn is not None and not store:
            if keep.inverse_p:  # the mix reads stored draws without their probabilities
                raise ValueError("stored draws cannot be rescaled by 1/p")
            ints[j, k.DRAW] = k.DRAW_STORED
        elif isinstance(keep.p, torch.Tensor):
            ints[j, k.DRAW] = k.DRAW_EACH
            each = np.ascontiguousarray(_np(keep.p), dtype)
        elif keep.p is not None:
            ints[j, k.DRAW], floats[j, k.P] = k.DRAW_ONE, keep.p
        ints[j, k.KEY], ints[j, k.INVERSE_P] = keep.key, keep.inverse_p
        p_each.append(each)
        drawn.append(keep.drawn if keep.drawn is not None else _NO_DRAWS)
    return floats, ints, tuple(p_each), tuple(drawn)


def _last(cut: Cut) -> int:
    return _ALL_TIES if cut.last_tie is None else cut.last_tie


def magnitude_ranks(rows: torch.Tensor) -> torch.Tensor:
    """The rank of each |value| within its row of a 2-D float32 tensor (ascending from 0,
    equal magnitudes by position), as float32: a stable radix sort per row, rows in parallel."""
    n_rows, m = rows.shape
    keys = np.abs(_np(rows.contiguous())).view(np.uint32)  # bit patterns order as magnitudes do
    out = np.empty(keys.size, np.float32)
    kernel = _kernels().row_ranks
    _parts(keys.size, lambda start, stop: kernel(keys[start:stop], m, out[start:stop]), unit=m)
    return torch.from_numpy(out).reshape(n_rows, m)


def l1_norms(base: torch.Tensor, tuned: torch.Tensor, keep: Keep) -> tuple[float, float, Keep]:
    """(‖δ‖₁, ‖keep ⊙ δ‖₁) of flat tensors, summed in float64, and `keep` with its draws
    stored (1 byte an element), so that `mix` reads them instead of drawing again."""
    _check_sizes(base, tuned, *([keep.p] if isinstance(keep.p, torch.Tensor) else []))
    b, t = _np(base), _np(tuned)
    store = keep.p is not None and keep.drawn is None
    if store:
        keep = dataclasses.replace(keep, drawn=np.empty(b.size, np.uint8))
    floats, ints, (p,), (drawn,) = _pack([keep], [1.0], [1.0], b.dtype, store=store)
    kernels = _kernels()
    # one pair of sums per kernel block, added up here in a fixed order: the total does not
    # depend on how the blocks were shared out between threads
    blocks = _ceil_div(b.size, kernels.BLOCK)
    before, after = np.empty(blocks), np.empty(blocks)

    def one_part(start: int, stop: int) -> None:
        mine = slice(start // kernels.BLOCK, _ceil_div(stop, kernels.BLOCK))
        part = slice(start, stop)
        kernels.l1_norms(b[part], t[part], p[part], drawn[part], start, floats, ints, 0, before[mine], after[mine])

    _parts(b.size, one_part)
    return float(before.sum()), float(after.sum()), keep


def l1_rescale_factor(before: float, after: float) -> float:
    """`before / after`: the factor that gives the kept part of a delta (L1 norm `after`) the
    L1 norm `before` of the whole delta (mergekit's `rescale`).

    Returns 1 when either norm is below `RESCALE_EPS` (an all-zero delta stays zero).
    """
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def mix(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    keeps: Sequence[Keep],
    scales: Sequence[float],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """`base + λ · mix(w_i · scale_i · keep_i ⊙ (tuned_i − base))`: the module docstring's
    mix, with TIES sign election if `consensus`. Flat tensors in; a flat tensor out.

    Args:
        keeps: per model, what survives.
        scales: per model, a factor on the survivors (mergekit's L1 rescale; 1 for none).
    """
    _check_sizes(base, *tuned, *(keep.p for keep in keeps if isinstance(keep.p, torch.Tensor)))
    _check_sizes(base, *(torch.from_numpy(keep.drawn) for keep in keeps if keep.drawn is not None))
    b = _np(base)
    out = np.empty_like(b)
    floats, ints, p_each, drawn = _pack(keeps, scales, weights, b.dtype)
    total_weight = float(sum(weights))
    plain_divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
    models = tuple(_np(t) for t in tuned)
    kernel = _kernels().mix

    def one_part(start: int, stop: int) -> None:
        part = slice(start, stop)
        ts, ps, ds = (tuple(x[part] for x in xs) for xs in (models, p_each, drawn))
        kernel(b[part], ts, ps, ds, start, floats, ints, consensus, normalize, plain_divisor, float(lambda_), out[part])

    _parts(b.size, one_part)
    return torch.from_numpy(out)
