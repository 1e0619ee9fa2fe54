"""What a sweep varies: `--grid KEY=V1,V2,…` enumerates values, `--search KEY=LOW:HIGH` draws
them with a seeded optimizer (optuna's TPE sampler, or random sampling).

Keys are `recipe.overrides` paths (`parameters.gamma`, `models.0.parameters.weight`) or bare
parameter names (`gamma`, `density`). A point is `{key: value}` in the order the flags were
given.

Reproducibility: trial `n` is drawn by a sampler seeded from (`--seed`, `n`) and shown every
finished trial before it, so a sweep resumed after trial `n` draws what an uninterrupted one
draws, whatever happened to the process in between.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from neuroloc_cli.config_models import load_yaml
from neuroloc_cli.errors import UsageError

SAMPLERS = ("tpe", "random")
Point = dict[str, Any]


@dataclass(frozen=True)
class GridAxis:
    """`--grid KEY=V1,V2,…`: the values, read as YAML (numbers, booleans, names)."""

    key: str
    values: tuple[Any, ...]

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "grid": list(self.values)}


@dataclass(frozen=True)
class SearchRange:
    """`--search KEY=LOW:HIGH[:log][:int]`: a range the optimizer draws from."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "low": self.low, "high": self.high, "log": self.log, "int": self.integer}

    def distribution(self):
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)


def parse_grid(text: str) -> GridAxis:
    """`gamma=0.2,0.5,1.0` → a `GridAxis`.

    Raises:
        UsageError: no `=`, no value, a value that is not YAML, or a value given twice.
    """
    key, values = _split(text, "--grid", "KEY=V1,V2,…, e.g. gamma=0.2,0.5,1.0")
    parsed = []
    for raw in _top_level(values):
        if not raw.strip():
            raise UsageError(f"--grid {text!r}: empty value in the list")
        try:
            parsed.append(load_yaml(raw))
        except ValueError as e:
            raise UsageError(f"--grid {text!r}: {raw!r} is not a YAML value ({e})") from None
    if len({repr(v) for v in parsed}) != len(parsed):
        raise UsageError(f"--grid {text!r}: a value is listed twice")
    return GridAxis(key, tuple(parsed))


def _top_level(values: str) -> list[str]:
    """`0.1,[0.2, 0.3],x` → ['0.1', '[0.2, 0.3]', 'x']: commas inside brackets or braces stay."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(values):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(values[start:i])
            start = i + 1
    out.append(values[start:])
    return out


def parse_search(text: str) -> SearchRange:
    """`density=0.1:0.9`, `lr=1e-5:1e-3:log`, `layers=1:8:int` → a `SearchRange`.

    Raises:
        UsageError: a malformed range, LOW ≥ HIGH, a log range that is not positive.
    """
    key, spec = _split(text, "--search", "KEY=LOW:HIGH[:log][:int], e.g. density=0.1:0.9")
    parts = spec.split(":")
    flags = set(parts[2:])
    if len(parts) < 2 or not flags <= {"log", "int"}:
        raise UsageError(f"--search {text!r}: expected KEY=LOW:HIGH[:log][:int], e.g. density=0.1:0.9")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"--search {text!r}: LOW and HIGH must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UsageError(f"--search {text!r}: needs finite LOW < HIGH")
    if "log" in flags and low <= 0:
        raise UsageError(f"--search {text!r}: a log range needs LOW > 0")
    if "int" in flags and (low != int(low) or high != int(high)):
        raise UsageError(f"--search {text!r}: an int range needs whole-number bounds")
    return SearchRange(key, low, high, log="log" in flags, integer="int" in flags)


def _split(text: str, flag: str, shape: str) -> tuple[str, str]:
    key, sep, rest = text.partition("=")
    if not sep or not key.strip() or not rest.strip():
        raise UsageError(f"{flag} {text!r}: expected {shape}")
    return key.strip(), rest.strip()


def check_axes(grid: list[GridAxis], search: list[SearchRange]) -> None:
    """A key swept twice, or nothing swept, is a usage error; so is `--grid` with `--search`."""
    keys = [a.key for a in grid] + [r.key for r in search]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UsageError(f"swept twice: {', '.join(twice)}")
    if not keys:
        raise UsageError("nothing to sweep", hint="give --grid KEY=V1,V2,… or --search KEY=LOW:HIGH")
    if grid and search:
        raise UsageError("give --grid or --search, not both", hint="a grid enumerates every point; --search draws --trials points")


def grid_points(grid: list[GridAxis]) -> list[Point]:
    """Every combination, the last axis varying fastest."""
    return [dict(zip([a.key for a in grid], values)) for values in itertools.product(*(a.values for a in grid))]


def bounds_points(search: list[SearchRange]) -> list[Point]:
    """The corners' two extremes (every range at its low end, then at its high end): planned
    before a search starts, so a range a recipe cannot take fails at once."""
    return [{r.key: _value(r, r.low) for r in search}, {r.key: _value(r, r.high) for r in search}]


def _value(r: SearchRange, x: float) -> float | int:
    return int(x) if r.integer else x


def next_trial(
    search: list[SearchRange], history: list[tuple[Point, float]], number: int, seed: int, sampler: str, maximize: bool
) -> Point:
    """Trial `number`'s point, drawn given the finished trials `history` (point, objective).

    Raises:
        UsageError: an unknown sampler.
    """
    import optuna

    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_seed = (seed * 1_000_003 + number) % 2**32
    chosen = optuna.samplers.TPESampler(seed=trial_seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=trial_seed)
    study = optuna.create_study(direction="maximize" if maximize else "minimize", sampler=chosen)
    distributions = {r.key: r.distribution() for r in search}
    for point, value in history:
        if math.isfinite(value):
            study.add_trial(optuna.trial.create_trial(params=dict(point), distributions=distributions, value=value))
    trial = study.ask(distributions)
    return {r.key: trial.params[r.key] for r in search}
