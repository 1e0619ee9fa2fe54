"""Block-wise sparsify-and-mix: the fast path of the ties / dare / breadcrumbs / della family.

A whole-tensor implementation makes ~15 passes over tensor-sized temporaries per model, and
on a CPU those passes are bound by memory bandwidth. Here the delta `t − base` is recomputed
in blocks of `BLOCK` elements, so that every temporary stays in cache; the only whole-tensor
quantities are a magnitude threshold per model (found from a sample, then refined exactly on
the few candidates near it) and, for rescaling, two L1 norms. What this leaves is the cost of
dispatching ~50 small PyTorch calls per block; a fused kernel would be the next step.
`BLOCK` also stays at PyTorch's parallel grain, so each call runs on one thread: larger
blocks went multi-threaded and became erratic on a loaded machine.

The mix follows mergekit's definitions (`wd_i = w_i · scale_i · (mask_i ⊙ δ_i)`):

    sign  = +1 where Σ_i wd_i >= 0, else −1    (election by summed mass; ties go to +)
    a_i   = [sign(wd_i) == sign]               (zeros never agree)
    mixed = Σ_i a_i · wd_i,   divisor = Σ_i a_i · w_i   (0 → 1)
    without consensus: mixed = Σ_i wd_i, divisor = Σ_i w_i (|·| < 1e-8 → 1)
    out   = base + λ · (mixed / divisor if normalize else mixed)

Masks are described, not stored:
- `Cut`: keep |δ| above a threshold, with equal magnitudes taken in position order up to
  `last_tie`, so exactly `k` elements are kept (as `sparsify.top_k_mask`);
- `Draw`: keep with a probability, drawn block by block from a per-model generator; when a
  rescale pass needs the draws first they are kept as a `Stored` boolean mask for the mix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BLOCK = 1 << 15  # elements per block: its temporaries fit in L2; = PyTorch's grain (one thread per call)
_SAMPLE = 1 << 14  # magnitudes sampled to bracket the threshold
_EXACT_BELOW = 4 * BLOCK  # smaller tensors: one exact kthvalue is cheaper than bracketing


def _blocks(n: int):
    for s in range(0, n, BLOCK):
        yield s, min(n, s + BLOCK)


@dataclass(frozen=True)
class Cut:
    """Keep `|δ| > value`, and `|δ| == value` at flat positions `<= last_tie` (all if None)."""

    value: float
    last_tie: int | None = None

    def __call__(self, s: int, e: int, magnitude: torch.Tensor) -> torch.Tensor:
        if self.last_tie is None or e - 1 <= self.last_tie:
            return magnitude >= self.value  # every tie in this block is kept
        if s > self.last_tie:
            return magnitude > self.value
        keep = magnitude > self.value
        keep |= (magnitude == self.value) & (torch.arange(s, e) <= self.last_tie)
        return keep


KEEP_ALL = Cut(-1.0)  # every |δ| >= -1
KEEP_NONE = Cut(math.inf, last_tie=-1)  # no |δ| > inf, no tie kept


def magnitude_cut(base: torch.Tensor, tuned: torch.Tensor, k: int) -> Cut:
    """The `Cut` that keeps the `k` largest |tuned − base| (flat tensors), ties by position.

    A sample of 16384 magnitudes brackets the k-th largest; one block-wise pass counts what
    lies above the bracket and collects what lies inside it, and `torch.kthvalue` on those few
    candidates gives the exact threshold. If the bracket misses (skewed data), an exact
    whole-tensor `kthvalue` is used instead: the result is the same, only slower.
    """
    n = base.numel()
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    if n < _EXACT_BELOW:
        return _exact_cut(torch.sub(tuned, base).abs_(), k)
    lo, hi = _bracket(base, tuned, k)
    if lo == hi:  # one magnitude fills the bracket (e.g. an unchanged tensor: all zeros)
        return _flat_cut(base, tuned, k, hi)
    above = 0
    candidates = []
    for s, e in _blocks(n):
        a = torch.sub(tuned[s:e], base[s:e]).abs_()
        above += int((a > hi).sum())
        candidates.append(a[(a >= lo) & (a <= hi)])
    cand = torch.cat(candidates)
    need = k - above  # how many of the candidates are kept
    if not 0 < need <= cand.numel():
        return _exact_cut(torch.sub(tuned, base).abs_(), k)
    value = torch.kthvalue(cand, cand.numel() - need + 1).values
    greater = above + int((cand > value).sum())
    equal = int((cand == value).sum())
    missing = k - greater
    if missing == equal:
        return Cut(float(value))
    return Cut(float(value), _last_tie(base, tuned, value, missing))


def _flat_cut(base: torch.Tensor, tuned: torch.Tensor, k: int, value: float) -> Cut:
    """The cut when the sample suggests the k-th largest magnitude is exactly `value`: count
    what is above and equal to it instead of collecting candidates."""
    above = equal = 0
    for s, e in _blocks(base.numel()):
        a = torch.sub(tuned[s:e], base[s:e]).abs_()
        above += int((a > value).sum())
        equal += int((a == value).sum())
    missing = k - above
    if not 0 < missing <= equal:
        return _exact_cut(torch.sub(tuned, base).abs_(), k)
    if missing == equal:
        return Cut(value)
    return Cut(value, _last_tie(base, tuned, torch.tensor(value), missing))


def _bracket(base: torch.Tensor, tuned: torch.Tensor, k: int) -> tuple[float, float]:
    """Magnitudes `lo <= hi` that enclose the k-th largest with high probability."""
    n = base.numel()
    idx = _sample_positions(n)
    sample = torch.sub(tuned[idx], base[idx]).abs_().sort().values
    q = (n - k) / n  # the threshold's quantile from below
    margin = 5 * math.sqrt(_SAMPLE * q * (1 - q)) + 8
    lo = sample[max(0, int(q * _SAMPLE - margin))]
    hi = sample[min(_SAMPLE - 1, int(q * _SAMPLE + margin) + 1)]
    return float(lo), float(hi)


@functools.lru_cache(maxsize=32)
def _sample_positions(n: int) -> torch.Tensor:
    """Fixed pseudo-random positions (they only steer speed, never the result)."""
    return torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n))


def _exact_cut(magnitude: torch.Tensor, k: int) -> Cut:
    n = magnitude.numel()
    value = torch.kthvalue(magnitude, n - k + 1).values
    greater = int((magnitude > value).sum())
    ties = torch.nonzero(magnitude == value).squeeze(1)
    missing = k - greater
    if missing == ties.numel():
        return Cut(float(value))
    return Cut(float(value), int(ties[missing - 1]))


def _last_tie(base: torch.Tensor, tuned: torch.Tensor, value: torch.Tensor, missing: int) -> int:
    """The flat position of the `missing`-th element whose magnitude equals `value`."""
    seen = 0
    for s, e in _blocks(base.numel()):
        pos = torch.nonzero(torch.sub(tuned[s:e], base[s:e]).abs_() == value).squeeze(1)
        if seen + pos.numel() >= missing:
            return s + int(pos[missing - seen - 1])
        seen += pos.numel()
    raise AssertionError("fewer ties than counted")  # cannot happen: counted on the same data


@dataclass
class Both:
    """Kept by `inner` and not by `outer` (breadcrumbs: the top n − n_bottom minus the top n_top)."""

    inner: Cut
    outer: Cut

    def __call__(self, s: int, e: int, magnitude: torch.Tensor) -> torch.Tensor:
        return self.inner(s, e, magnitude) & ~self.outer(s, e, magnitude)


class Draw:
    """Keep each element with probability `p` (a number, or a flat tensor of per-element
    probabilities), drawn block by block in order from `generator`."""

    needs_magnitude = False

    def __init__(self, p: float | torch.Tensor, generator: torch.Generator):
        self.p = p
        self.generator = generator

    def __call__(self, s: int, e: int, magnitude: torch.Tensor | None) -> torch.Tensor:
        p = self.p if isinstance(self.p, float) else self.p[s:e]
        return torch.rand(e - s, generator=self.generator) < p


@dataclass
class Stored:
    """A mask already drawn (1 byte per element), so that a second pass sees the same draws."""

    mask: torch.Tensor
    needs_magnitude = False

    def __call__(self, s: int, e: int, magnitude: torch.Tensor | None) -> torch.Tensor:
        return self.mask[s:e]


Mask = Callable[[int, int, torch.Tensor], torch.Tensor]


def l1_norms(base: torch.Tensor, tuned: torch.Tensor, mask: Mask) -> tuple[float, float, Mask]:
    """(‖δ‖₁, ‖mask ⊙ δ‖₁, the mask to use from now on) for flat tensors, block by block
    (float64 sums). A random mask comes back `Stored`, so the mixing pass uses these draws."""
    before = after = 0.0
    stored = torch.empty(base.numel(), dtype=torch.bool) if isinstance(mask, Draw) else None
    for s, e in _blocks(base.numel()):
        a = torch.sub(tuned[s:e], base[s:e]).abs_()
        m = mask(s, e, a)
        if stored is not None:
            stored[s:e] = m
        before += float(a.sum(dtype=torch.float64))
        after += float(a.mul_(m).sum(dtype=torch.float64))
    return before, after, (Stored(stored) if stored is not None else mask)


def mix_blocks(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    masks: Sequence[Mask | None],
    scales: Sequence[float | torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """`base + λ · mix(w_i · scale_i · mask_i ⊙ (tuned_i − base))`, block by block.

    The mix is the module docstring's: with `consensus`, TIES sign election by summed mass
    and (if `normalize`) division by the agreeing weights; without it, the sum (÷ Σ w_i if
    `normalize`). Flat tensors in; a flat tensor out.

    Args:
        masks: per model, a block mask (None keeps everything).
        scales: per model, a number or a flat per-element tensor (DELLA's paper rescale).
    """
    n = base.numel()
    out = torch.empty_like(base)
    total_weight = float(sum(weights))
    plain_divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
    for s, e in _blocks(n):
        b = base[s:e]
        deltas = []  # masked and rescaled, not yet weighted
        for t, mask, scale in zip(tuned, masks, scales):
            d = torch.sub(t[s:e], b)
            if mask is not None:
                d.mul_(mask(s, e, d.abs() if getattr(mask, "needs_magnitude", True) else None))
            if isinstance(scale, torch.Tensor):
                d.mul_(scale[s:e])
            elif scale != 1:
                d.mul_(scale)
            deltas.append(d)
        if consensus:
            mixed = _elect(deltas, weights, normalize)
        else:
            mixed = _weighted_sum(deltas, weights)
            if normalize:
                mixed.div_(plain_divisor)
        out[s:e] = mixed.mul_(lambda_).add_(b) if lambda_ != 1 else mixed.add_(b)
    return out


def _weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = deltas[0].mul_(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        out.add_(d, alpha=w)
    return out


def _elect(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES on one block of (unweighted) deltas: elect the sign of `S = Σ w_i·d_i`, keep the
    agreeing `w_i·d_i`, and (if `normalize`) divide by the agreeing weights, 0 → 1."""
    if min(weights) <= 0:
        return _elect_any_weights([d.mul_(w) for d, w in zip(deltas, weights)], weights, normalize)
    # With positive weights sign(w·d) = sign(d). With e = ±1 the elected sign, `max(e·d, 0)`
    # is |d| where d agrees and 0 elsewhere (zeros never agree), so both sums are plain adds.
    total = torch.mul(deltas[0], weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        total.add_(d, alpha=w)
    sign = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    for d, w in zip(deltas, weights):
        agreeing = d.mul_(sign).clamp_min_(0)
        mixed.add_(agreeing, alpha=w)
        if divisor is not None:
            divisor.add_(agreeing > 0, alpha=w)
    mixed.mul_(sign)
    if divisor is None:
        return mixed
    # the divisor is 0 or at least min(w), and where it is 0 so is `mixed`: clamping the
    # zeros to a smaller positive value leaves 0 there, as mergekit's 0 → 1 does
    return mixed.div_(divisor.clamp_min_(min(weights) / 2))


def _elect_any_weights(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """The general case (some weight <= 0) on weighted deltas: where `S = Σ wd_i` is >= 0 the
    agreeing values are the positive ones, so the result is `P = Σ max(wd_i, 0)` there and
    `S − P` elsewhere; the agreeing weights are `Σ w_i·[wd_i > 0]` resp. `Σ w_i·[wd_i < 0]`,
    i.e. `(A ± Z) / 2` with `Z = Σ w_i·sign(wd_i)`, `A = Σ w_i·|sign(wd_i)|`."""
    total = weighted[0].clone()
    for d in weighted[1:]:
        total.add_(d)
    positive = total >= 0
    plus = torch.zeros_like(total)
    z = torch.zeros_like(total) if normalize else None
    a = torch.zeros_like(total) if normalize else None
    for d, w in zip(weighted, weights):
        if z is not None:
            sign = torch.sign(d)
            z.add_(sign, alpha=w)
            a.add_(sign.abs_(), alpha=w)
        plus.add_(d.clamp_min_(0))
    mixed = torch.where(positive, plus, total.sub_(plus))
    if z is None:
        return mixed
    divisor = torch.where(positive, a.add(z), a.sub_(z)).mul_(0.5)
    return mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
