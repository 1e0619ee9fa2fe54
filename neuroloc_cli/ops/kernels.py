"""Fused loops of the sparsify-and-mix family (ties, dare, breadcrumbs, della), and of sce's and
ramplus_tl's passes, compiled by Numba.

In PyTorch the family costs ~15 passes over tensor-sized temporaries per model, or, done in
cache-sized blocks, ~50 small calls per block: either way several times a plain task
arithmetic. These loops read each input once per pass and keep every intermediate in a
block of `BLOCK` elements, and their inner loops are branch-free so that LLVM vectorizes
them. They release the GIL, so the engine's reader thread keeps prefetching meanwhile.

The loops take NumPy views of flat CPU tensors in one float dtype (float32 or float64: the
arithmetic runs in that dtype) and describe each model's mask by one row of `floats` (in that
dtype) and one row of `ints`, packed from a `neuroloc_cli.ops.blockwise.Keep` by
`blockwise._pack`, the only code that writes them:

- a magnitude cut: keep `|δ| > CUT`, and `|δ| == CUT` at flat positions `<= CUT_TIE`
  (−inf and −1 keep everything);
- minus outliers (breadcrumbs): drop `|δ| > OUTLIER`, and `|δ| == OUTLIER` at positions
  `<= OUTLIER_TIE` (inf and −1 drop nothing);
- a random draw: keep where `u < P` (DRAW_ONE) or `u < p_each[pos]` (DRAW_EACH), `u` uniform on
  the 2^24 steps of [0, 1) from a counter-based generator (`draw`: splitmix64 of the model's
  `KEY` and the position), so a draw depends on (seed, model, position) only; a first pass
  may store its draws (1 byte each) for a second one to read back (DRAW_STORED);
- survivors divided by their keep probability (INVERSE_P: the papers' rescale), then
  multiplied by `SCALE · WEIGHT`.

Each loop is sequential; callers run them on parts of a tensor in parallel threads (they
release the GIL), passing each part's `offset` so that positions stay those of the tensor.
Compiled code is cached on disk (`cache=True`), so only the first run on a machine compiles.
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 1024  # elements per block: the M + 3 scratch rows of it stay in L1

# columns of `ints`, and their number
CUT_TIE, OUTLIER_TIE, DRAW, INVERSE_P, KEY = range(5)
INT_COLUMNS = 5
# columns of `floats`, and their number
CUT, OUTLIER, P, SCALE, WEIGHT = range(5)
FLOAT_COLUMNS = 5
# values of `ints[:, DRAW]`
DRAW_NONE, DRAW_ONE, DRAW_EACH, DRAW_STORED = 0, 1, 2, 3

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_UNIT = 2.0**24  # draws are integers in [0, 2^24): u = draw / 2^24


def _jit(fn):
    """`numba.njit` releasing the GIL and caching the machine code on disk. Where no cache
    folder is writable (neither beside this file nor the user's cache folder) Numba refuses
    `cache=True`; the loops then compile in every process instead of failing."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


@_jit
def draw(key, pos):
    """The draw at flat position `pos` of stream `key` (uint64): the top 24 bits of
    splitmix64's output for the state `key + (pos + 1)·golden`, an int32 in [0, 2^24).

    An element is kept where `draw < p · 2^24`, compared in the compute dtype (an int32 below
    2^24 converts exactly, and 32-bit conversions vectorize where 64-bit ones do not): a
    probability of p to within 2^-24."""
    z = key + np.uint64(pos + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return np.int32((z ^ (z >> np.uint64(31))) >> np.uint64(40))


@_jit
def _kept(base, tuned, p_each, drawn, start, floats, ints, j, factor, row, total):
    """row[:n] = factor · model j's kept delta over one block (base, tuned, p_each, drawn:
    views of n elements from flat position `start`; with INVERSE_P, each survivor of the
    draw is divided by its p), and total[:n] += row[:n].

    A draw (DRAW_ONE, DRAW_EACH) is written to `drawn` (1 kept, 0 dropped) when that is not
    empty, and DRAW_STORED reads it back: a second pass then costs no hashing.

    Dropped elements are multiplied by 0 rather than selected away, a cut's ties are handled
    by splitting the block where its last kept tie falls, and loops index views from 0, so
    that every loop is branch-free and vectorizes (a NaN or infinite delta stays NaN, as it
    would in a sum)."""
    dt = row.dtype.type
    n = base.size
    cut, outlier, kind = floats[j, CUT], floats[j, OUTLIER], ints[j, DRAW]
    # an outlier cut at +inf drops only the infinities up to its last tie: none in this block?
    no_outliers = outlier == np.inf and ints[j, OUTLIER_TIE] < start
    # with nothing after the cut, its loop scales and adds up too (one pass instead of two)
    last = no_outliers and kind == DRAW_NONE
    first = factor if last else dt(1)
    split = _tie_split(ints[j, CUT_TIE], start, n) if cut != -np.inf else 0
    _delta_cut(row[:split], tuned[:split], base[:split], cut, True, first, total[:split], last)
    _delta_cut(row[split:n], tuned[split:], base[split:], cut, False, first, total[split:n], last)
    if last:
        return
    if not no_outliers:
        split = _tie_split(ints[j, OUTLIER_TIE], start, n)
        _drop_outliers(row[:split], outlier, True)
        _drop_outliers(row[split:n], outlier, False)
    if kind == DRAW_NONE:
        for i in range(n):
            x = row[i] * factor
            row[i] = x
            total[i] += x
    elif kind == DRAW_STORED:
        for i in range(n):
            x = row[i] * (factor * dt(drawn[i]))
            row[i] = x
            total[i] += x
    elif kind == DRAW_ONE:
        key, limit = np.uint64(ints[j, KEY]), floats[j, P] * dt(_UNIT)
        if ints[j, INVERSE_P]:
            factor = factor / floats[j, P]
        store = drawn.size > 0
        for i in range(n):
            keep = dt(draw(key, start + i)) < limit
            if store:
                drawn[i] = keep
            x = row[i] * (factor * dt(keep))
            row[i] = x
            total[i] += x
    else:
        key, inverse, unit = np.uint64(ints[j, KEY]), ints[j, INVERSE_P] != 0, dt(_UNIT)
        store = drawn.size > 0
        for i in range(n):
            p = p_each[i]
            keep = dt(draw(key, start + i)) < p * unit
            if store:
                drawn[i] = keep
            x = row[i] * ((factor / p if inverse else factor) * dt(keep))
            row[i] = x
            total[i] += x


@_jit
def _tie_split(last_tie, start, n):
    """How many of the n elements from flat position `start` lie at or before `last_tie`."""
    return min(max(last_tie - start + 1, 0), n)


@_jit
def _delta_cut(row, tuned, base, cut, ties_kept, factor, total, add):
    """row = factor · (tuned − base) where |tuned − base| > cut (>= cut if `ties_kept`), else
    0; and total += row if `add`. (The flags are loop-invariant: LLVM unswitches them.)"""
    dt = row.dtype.type
    for i in range(row.size):
        d = tuned[i] - base[i]
        a = abs(d)
        x = d * (factor * dt((a >= cut) if ties_kept else (a > cut)))
        row[i] = x
        if add:
            total[i] += x


@_jit
def _drop_outliers(row, outlier, ties_dropped):
    """Zero row where |row| > outlier (or >= outlier if `ties_dropped`)."""
    dt = row.dtype.type
    if ties_dropped:
        for i in range(row.size):
            row[i] *= dt(abs(row[i]) < outlier)
    else:
        for i in range(row.size):
            row[i] *= dt(abs(row[i]) <= outlier)


@_jit
def mix(base, tuned, p_each, drawn, offset, floats, ints, consensus, normalize, plain_divisor, lambda_, out):
    """out = base + λ · mix_j(WEIGHT_j · SCALE_j · kept δ_j), over flat arrays that start at
    flat position `offset` of their tensors.

    With `consensus` (TIES): the sign of the summed weighted deltas is elected (0 → +), only
    values of that sign are added, and with `normalize` the sum is divided by the weights of
    the models that agree (0 → 1). Without it: the plain sum, divided by `plain_divisor` when
    `normalize`.
    """
    m, total_n = len(tuned), base.size
    dt = base.dtype.type
    zero, one = dt(0), dt(1)
    rows = np.empty((m, BLOCK), base.dtype)
    total = np.empty(BLOCK, base.dtype)
    mixed = np.empty(BLOCK, base.dtype)
    agreeing = np.empty(BLOCK, base.dtype)
    lam = dt(lambda_)
    divisor = dt(plain_divisor) if normalize and not consensus else one
    for s in range(0, total_n, BLOCK):
        e = min(s + BLOCK, total_n)
        n = e - s
        b, o = base[s:e], out[s:e]
        total[:n] = zero
        for j in range(m):
            factor = floats[j, SCALE] * floats[j, WEIGHT]
            _kept(b, tuned[j][s:e], p_each[j][s:e], drawn[j][s:e], offset + s, floats, ints, j, factor, rows[j], total)
        if consensus:
            mixed[:n] = zero
            agreeing[:n] = zero
            for j in range(m):
                row, w = rows[j], floats[j, WEIGHT]
                for i in range(n):
                    x, t = row[i], total[i]
                    agree = dt(((x > zero) & (t >= zero)) | ((x < zero) & (t < zero)))
                    mixed[i] += x * agree
                    agreeing[i] += w * agree
            if normalize:
                for i in range(n):
                    d = agreeing[i]
                    mixed[i] /= one if d == zero else d
            for i in range(n):
                o[i] = b[i] + lam * mixed[i]
        else:
            for i in range(n):
                o[i] = b[i] + lam * (total[i] / divisor)


@_jit
def l1_norms(base, tuned, p_each, drawn, offset, floats, ints, j, before, after):
    """Per block of model j: before[b] = ‖δ‖₁ and after[b] = ‖kept δ‖₁, in float64; and
    the draws into `drawn` (see `_kept`)."""
    row = np.empty(BLOCK, base.dtype)
    total = np.zeros(BLOCK, base.dtype)  # _kept adds up into it; not needed here
    zeros = np.zeros(BLOCK, base.dtype)
    one = base.dtype.type(1)
    for b, s in enumerate(range(0, base.size, BLOCK)):
        e = min(s + BLOCK, base.size)
        _kept(base[s:e], tuned[s:e], p_each[s:e], drawn[s:e], offset + s, floats, ints, j, one, row, total)
        before[b] = _l1(tuned[s:e], base[s:e])
        after[b] = _l1(row[: e - s], zeros[: e - s])


@_jit
def _l1(tuned, base):
    """Σ |tuned − base| in float64. Four interleaved partial sums in a fixed order vectorize
    without fast-math reassociation, so the sum, and a rescale factor made from it, has the
    same bits on every CPU."""
    s0 = s1 = s2 = s3 = 0.0
    n = base.size
    for i in range(0, n - n % 4, 4):
        s0 += abs(np.float64(tuned[i] - base[i]))
        s1 += abs(np.float64(tuned[i + 1] - base[i + 1]))
        s2 += abs(np.float64(tuned[i + 2] - base[i + 2]))
        s3 += abs(np.float64(tuned[i + 3] - base[i + 3]))
    for i in range(n - n % 4, n):
        s0 += abs(np.float64(tuned[i] - base[i]))
    return (s0 + s1) + (s2 + s3)


@_jit
def collect(base, tuned, offset, lo, hi, values, positions):
    """Count |δ| > hi, and collect the |δ| in [lo, hi] with their flat positions (offset + i),
    in order, into the buffers (size c + 1 holds c: the last slot is scratch). Returns
    (count above, count in [lo, hi]); a count in [lo, hi] above c means they overflowed."""
    above = 0
    found = 0
    last = values.size - 1
    for i in range(base.size):
        a = abs(tuned[i] - base[i])
        above += a > hi
        # branch-free compaction: always write, advance only on a hit (a branch here cost 5x)
        k = min(found, last)
        values[k] = a
        positions[k] = offset + i
        found += (a >= lo) & (a <= hi)
    return above, found


@_jit
def count_at(base, tuned, value):
    """(count of |δ| > value, count of |δ| == value)."""
    above = 0
    equal = 0
    for i in range(base.size):
        a = abs(tuned[i] - base[i])
        above += a > value
        equal += a == value
    return above, equal


@_jit
def nth_at(base, tuned, value, nth):
    """The index of the `nth` (1-based) element with |δ| == value, or -1."""
    seen = 0
    for i in range(base.size):
        if abs(tuned[i] - base[i]) == value:
            seen += 1
            if seen == nth:
                return i
    return -1


@_jit
def row_ranks(keys, m, out):
    """out[r·m + i] = the rank of keys[r·m + i] within its row of m (ascending from 0; equal
    keys by position), for a flat array of whole rows of unsigned integer keys (the bit
    patterns of magnitudes: for floats >= 0 they order as the values do).

    A least-significant-digit radix sort per row, one byte a pass: stable and linear in m
    (10–25 ns an element here, against 35–38 for PyTorch's stable argsort); a pass is skipped
    where every key of the row shares that byte."""
    cur = np.empty(m, np.uint64)
    nxt = np.empty(m, np.uint64)
    idx = np.empty(m, np.int64)
    nidx = np.empty(m, np.int64)
    counts = np.empty(256, np.int64)
    for r in range(keys.size // m):
        row = keys[r * m : (r + 1) * m]
        for i in range(m):
            cur[i] = np.uint64(row[i])
            idx[i] = i
        for shift in range(0, keys.itemsize * 8, 8):
            s = np.uint64(shift)
            counts[:] = 0
            for i in range(m):
                counts[(cur[i] >> s) & np.uint64(255)] += 1
            if counts.max() == m:
                continue  # one bucket: this byte orders nothing
            start = 0
            for b in range(256):
                start, counts[b] = start + counts[b], start
            for i in range(m):
                b = (cur[i] >> s) & np.uint64(255)
                p = counts[b]
                counts[b] = p + 1
                nxt[p] = cur[i]
                nidx[p] = idx[i]
            cur, nxt = nxt, cur
            idx, nidx = nidx, idx
        base = r * m
        for p in range(m):
            out[base + idx[p]] = p


@_jit
def sce_variance2(base, a, b, out):
    """out[i] = the population variance of the two task vectors `a[i] − base[i]` and `b[i] −
    base[i]` (flat views of one float dtype), as PyTorch's CPU kernel computes `torch.var` of
    their stack: Welford's update in float64 (`δ = x_1 − x_0`, `mean = x_0 + δ / 2`, `m2 =
    δ · (x_1 − mean)`, divided by 2), rounded to the dtype of `out` (`methods.sce._variance`).
    Returns how many of the variances are not zero (NaN included, as `torch.count_nonzero`
    counts) and how many are NaN."""
    nonzero = 0
    nans = 0
    for i in range(base.size):
        x0 = np.float64(a[i] - base[i])
        x1 = np.float64(b[i] - base[i])
        d = x1 - x0
        mean = x0 + d / 2.0
        out[i] = (x1 - mean) * d / 2.0
        v = out[i]
        nonzero += v != 0
        nans += v != v
    return nonzero, nans


@_jit
def sce_squares(base, tuned, keep, masked, out):
    """out[i] = `δ[i]²` in float64, `δ = (tuned − base)` in the dtype of `base` (times `keep`
    where `masked`): the products of `ops.sums.dot_blocks(δ, δ)`, for SCE's model weights."""
    dt = base.dtype.type
    if masked:
        for i in range(base.size):
            d = np.float64((tuned[i] - base[i]) * dt(keep[i]))
            out[i] = d * d
    else:
        for i in range(base.size):
            d = np.float64(tuned[i] - base[i])
            out[i] = d * d


@_jit
def sce_mix(base, tuned, keep, masked, weights, eps, out):
    """SCE's erase-and-mix over a piece (`methods.sce._mix`): per element the task vectors
    `δ_j = tuned[j] − base` (times `keep` where `masked`), the elected sign of their sum (+1
    where it is >= 0), and `out = base + Σ w_j a_j δ_j / max(Σ w_j a_j, eps)` with `a_j` whether
    δ_j has that sign; every operation in the dtype of `base`, in the order of the PyTorch
    formulation (models summed first to last), so that the floats are the same. Worked through
    in blocks of `BLOCK` elements, model by model; the inner loops have no branch (a
    comparison becomes a 0 or 1 factor), so that they vectorize."""
    dt = base.dtype.type
    m = tuned.shape[0]
    factor = np.ones(BLOCK, base.dtype)
    mass = np.empty(BLOCK, base.dtype)
    merged = np.empty(BLOCK, base.dtype)
    divisor = np.empty(BLOCK, base.dtype)
    for start in range(0, base.size, BLOCK):
        n = min(BLOCK, base.size - start)
        b = base[start : start + n]
        if masked:
            k = keep[start : start + n]
            for i in range(n):
                factor[i] = dt(k[i])
        for i in range(n):
            mass[i] = dt(0)
            merged[i] = dt(0)
            divisor[i] = dt(0)
        for j in range(m):
            t = tuned[j, start : start + n]
            for i in range(n):
                mass[i] += (t[i] - b[i]) * factor[i]
        for i in range(n):  # the elected sign, ±1 (a NaN sum elects −1, as `torch.where` does)
            mass[i] = dt(2) * dt(mass[i] >= 0) - dt(1)
        for j in range(m):
            t, w = tuned[j, start : start + n], weights[j]
            for i in range(n):
                d = (t[i] - b[i]) * factor[i]
                agree = w * dt(d * mass[i] > 0)  # δ agrees where δ · sign > 0
                merged[i] += d * agree
                divisor[i] += agree
        for i in range(n):
            d = divisor[i]
            out[start + i] = merged[i] / (eps if d < eps else d) + b[i]  # `clamp(min=eps)`: NaN stays


@_jit
def ram_counts(base, tuned, eps, shared, unique):
    """RAM+'s counts over a piece (`methods.ram.ramplus_tl`): per model j, `shared[j] +=` the
    elements it changes (`|tuned[j] − base| > eps`, in the dtype of `base`) together with
    another model, `unique[j] +=` those it changes alone."""
    m = tuned.shape[0]
    count = np.empty(BLOCK, np.int64)
    for start in range(0, base.size, BLOCK):
        n = min(BLOCK, base.size - start)
        b = base[start : start + n]
        for i in range(n):
            count[i] = 0
        for j in range(m):
            t = tuned[j, start : start + n]
            for i in range(n):
                count[i] += abs(t[i] - b[i]) > eps
        for j in range(m):
            t = tuned[j, start : start + n]
            s = 0
            u = 0
            for i in range(n):
                changed = abs(t[i] - b[i]) > eps
                s += changed & (count[i] > 1)
                u += changed & (count[i] == 1)
            shared[j] += s
            unique[j] += u


@_jit
def ram_mix(base, tuned, eps, scales, out):
    """RAM+'s result over a piece (`methods.ram.ramplus_tl`): each model's changed task-vector
    elements (`|δ_j| > eps`), the ones it alone changed times `scales[j]`, the shared ones
    divided by how many models changed them, summed first model to last, plus the base; every
    operation in the dtype of `base`, as in the PyTorch formulation, so that the floats are
    the same."""
    dt = base.dtype.type
    m = tuned.shape[0]
    count = np.empty(BLOCK, base.dtype)
    total = np.empty(BLOCK, base.dtype)
    for start in range(0, base.size, BLOCK):
        n = min(BLOCK, base.size - start)
        b = base[start : start + n]
        for i in range(n):
            count[i] = dt(0)
            total[i] = dt(0)
        for j in range(m):
            t = tuned[j, start : start + n]
            for i in range(n):
                count[i] += dt(abs(t[i] - b[i]) > eps)
        for j in range(m):
            t, scale = tuned[j, start : start + n], scales[j]
            for i in range(n):
                d = t[i] - b[i]
                d = d if abs(d) > eps else dt(0)
                total[i] += d * scale if count[i] == 1 else d / max(count[i], dt(1))
        for i in range(n):
            out[start + i] = total[i] + b[i]
