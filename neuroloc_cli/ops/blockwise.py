"""Sparsify-and-mix: the engine of the ties / dare / breadcrumbs / della family.

Each model's mask is described, not stored (`Keep`), and `mix` runs the fused loops of
`neuroloc_cli.ops.kernels` over the flat tensors, block by block: one pass reads every
input once. The only whole-tensor work before it is a magnitude threshold per model (found
from a sample, then refined exactly on the few candidates near it) and, for mergekit's
rescale, two L1 norms per model.

The mix follows mergekit's definitions (`wd_i = w_i · scale_i · (keep_i ⊙ δ_i)`):

    sign  = +1 where Σ_i wd_i >= 0, else −1    (election by summed mass; ties go to +)
    a_i   = [sign(wd_i) == sign]               (zeros never agree)
    mixed = Σ_i a_i · wd_i,   divisor = Σ_i a_i · w_i   (0 → 1)
    without consensus: mixed = Σ_i wd_i, divisor = Σ_i w_i (|·| < 1e-8 → 1)
    out   = base + λ · (mixed / divisor if normalize else mixed)

The loops take float32 or float64 tensors and compute in that dtype (`sparse_task_arithmetic`
brings half-precision inputs to float32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

_SAMPLE = 1 << 14  # magnitudes sampled to bracket the threshold
_EXACT_BELOW = 1 << 17  # smaller tensors: one exact kthvalue is cheaper than bracketing
_ALL_TIES = 2**62  # a last tie past every position: every equal magnitude is kept
_CHUNK = 1 << 20  # elements per parallel task: fixed, so that no result depends on the thread count

T = TypeVar("T")


def _kernels():
    """The compiled loops, imported on first use: importing Numba takes a quarter second
    that commands not merging with these methods should not pay."""
    from neuroloc_cli.ops import kernels

    return kernels


def _np(t: torch.Tensor) -> np.ndarray:
    """A flat NumPy view of a contiguous CPU tensor (no copy)."""
    return t.reshape(-1).numpy()


def _chunked(n: int, fn: Callable[[int, int], T]) -> list[T]:
    """`fn(start, stop)` over consecutive `_CHUNK`-sized spans of `range(n)`, on as many threads
    as PyTorch uses (the kernels release the GIL); results in span order."""
    spans = [(a, min(n, a + _CHUNK)) for a in range(0, n, _CHUNK)]
    threads = min(torch.get_num_threads(), len(spans))
    if threads <= 1:
        return [fn(a, b) for a, b in spans]
    return list(_pool(threads).map(lambda span: fn(*span), spans))


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


def magnitude_cut(base: torch.Tensor, tuned: torch.Tensor, k: int) -> Cut:
    """The `Cut` that keeps the `k` largest |tuned − base| (flat float32/float64 tensors),
    equal magnitudes by position.

    A sample of 16384 magnitudes brackets the k-th largest; one pass counts what lies above
    the bracket and collects what lies inside it (with positions), and a k-th value
    selection (`np.partition`, linear time) on those few candidates gives the exact threshold
    and the last tie kept. If the bracket misses (skewed data), the selection runs on the
    whole tensor instead: the result is the same, only slower.
    """
    n = base.numel()
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    b, t = _np(base), _np(tuned)
    if n < _EXACT_BELOW:
        return _exact_cut(b, t, k)
    lo, hi = _bracket(b, t, k)
    if lo == hi:  # one magnitude fills the bracket (e.g. an unchanged tensor: all zeros)
        return _flat_cut(b, t, k, hi) or _exact_cut(b, t, k)
    # each chunk collects into its own region of the buffers: an eighth of its size (the
    # bracket holds ~4% of the elements), + 1024, + the kernel's scratch slot
    collect, scalar, region = _kernels().collect, b.dtype.type, _CHUNK // 8 + 1025
    values = np.empty(len(range(0, n, _CHUNK)) * region, b.dtype)
    positions = np.empty(values.size, np.int64)

    def one_chunk(start: int, stop: int) -> tuple[int, int]:
        mine = slice(start // _CHUNK * region, (start // _CHUNK + 1) * region)
        return collect(b[start:stop], t[start:stop], start, scalar(lo), scalar(hi), values[mine], positions[mine])

    counts = _chunked(n, one_chunk)
    if any(found >= region for _, found in counts):  # a chunk overflowed its region
        return _exact_cut(b, t, k)
    keep = np.concatenate([np.arange(c * region, c * region + found) for c, (_, found) in enumerate(counts)])
    above = sum(a for a, _ in counts)
    need = k - above  # how many of the candidates are kept
    if not 0 < need <= keep.size:
        return _exact_cut(b, t, k)
    return _select(values[keep], need, above, positions[keep])


def _flat_cut(b: np.ndarray, t: np.ndarray, k: int, value: float) -> Cut | None:
    """The cut when the sample suggests the k-th largest magnitude is exactly `value`: count
    what is above and equal to it, chunk by chunk, instead of collecting candidates; the last
    tie kept is then searched for in the one chunk that holds it (None if `value` is not the
    k-th largest)."""
    kernels, v = _kernels(), b.dtype.type(value)
    counts = _chunked(b.size, lambda start, stop: kernels.count_at(b[start:stop], t[start:stop], v))
    missing = k - sum(above for above, _ in counts)
    if not 0 < missing <= sum(equal for _, equal in counts):
        return None
    for start in range(0, b.size, _CHUNK):
        equal = counts[start // _CHUNK][1]
        if missing == equal and start + _CHUNK >= b.size:
            return Cut(value)  # every tie is kept
        if missing <= equal:
            stop = start + _CHUNK
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
    return _select(np.abs(t - b), k, 0, None)


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
    """Which elements of one model's delta survive (all, by default), and how survivors of a
    random draw are rescaled.

    Attributes:
        cut: keep only the magnitudes this cut keeps (the top k).
        outliers: of those, drop the ones this cut keeps (breadcrumbs' largest).
        p: keep each element with this probability (a number, or a flat tensor, one per
            element), drawn from the stream `key` (see `neuroloc_cli.ops.kernels`).
        inverse_p: divide each survivor by its probability (the DARE and DELLA papers).
    """

    cut: Cut | None = None
    outliers: Cut | None = None
    p: float | torch.Tensor | None = None
    key: int = 0
    inverse_p: bool = False


def _kernel_args(keeps: Sequence[Keep], scales: Sequence[float], weights: Sequence[float], dtype: np.dtype):
    """The masks as the kernels' per-model rows (`floats`, `ints`) and per-element probabilities."""
    k = _kernels()
    floats = np.zeros((len(keeps), 5), dtype)
    ints = np.zeros((len(keeps), 5), np.int64)
    p_each = []
    for j, (keep, scale, weight) in enumerate(zip(keeps, scales, weights)):
        floats[j, k.SCALE], floats[j, k.WEIGHT] = scale, weight
        cut, outliers = keep.cut or KEEP_ALL, keep.outliers or KEEP_NONE
        floats[j, k.CUT], ints[j, k.CUT_TIE] = cut.value, _last(cut)
        floats[j, k.OUTLIER], ints[j, k.OUTLIER_TIE] = outliers.value, _last(outliers)
        each = np.empty(0, dtype)
        if isinstance(keep.p, torch.Tensor):
            ints[j, k.DRAW] = k.DRAW_EACH
            each = np.ascontiguousarray(_np(keep.p), dtype)
        elif keep.p is not None:
            ints[j, k.DRAW], floats[j, k.P] = k.DRAW_ONE, keep.p
        ints[j, k.KEY], ints[j, k.INVERSE_P] = keep.key, keep.inverse_p
        p_each.append(each)
    return floats, ints, tuple(p_each)


def _last(cut: Cut) -> int:
    return _ALL_TIES if cut.last_tie is None else cut.last_tie


def l1_norms(base: torch.Tensor, tuned: torch.Tensor, keep: Keep) -> tuple[float, float]:
    """(‖δ‖₁, ‖keep ⊙ δ‖₁) of flat tensors, summed in float64."""
    b, t = _np(base), _np(tuned)
    floats, ints, (p,) = _kernel_args([keep], [1.0], [1.0], b.dtype)
    l1 = _kernels().l1_norms
    sums = _chunked(b.size, lambda start, stop: l1(b[start:stop], t[start:stop], p[start:stop], start, floats, ints, 0))
    return sum(s for s, _ in sums), sum(s for _, s in sums)


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
    b = _np(base)
    out = np.empty_like(b)
    floats, ints, p_each = _kernel_args(keeps, scales, weights, b.dtype)
    total_weight = float(sum(weights))
    plain_divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
    models = tuple(_np(t) for t in tuned)
    kernel = _kernels().mix

    def one_chunk(start: int, stop: int) -> None:
        part = slice(start, stop)
        ts, ps = tuple(t[part] for t in models), tuple(p[part] for p in p_each)
        kernel(b[part], ts, ps, start, floats, ints, consensus, normalize, plain_divisor, float(lambda_), out[part])

    _chunked(b.size, one_chunk)
    return torch.from_numpy(out)
