"""Benchmark: ties and dare_ties against a minimal streaming task-arithmetic reference.

    python benchmarks/bench_methods.py [--preset 125m] [--runs 3] [--workdir DIR] [--threads N]
                                       [--methods task_arithmetic,ties,dare_ties]

Builds a synthetic bf16 Llama of the preset (base and two fine-tunes, sharded), then times
full merges to disk, interleaved round by round (median of `--runs`; wall seconds by
`time.perf_counter`, and CPU seconds by `time.process_time`, which a shared machine's load
disturbs less):

- `reference`: the minimal streaming task arithmetic of `common.reference_merge`, weights
  0.6 / 0.4.
- `ties` and `dare_ties` (density 0.5, weights 0.6 / 0.4), and `task_arithmetic` for scale,
  through neuroloc's engine (`build_plan` + `run_merge`); `--methods` times others (any
  method taking `weight` and `density`, e.g. breadcrumbs_ties, della) with the same settings.

Prints one JSON document with the seconds and the ratios merge / reference (target ≤ 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import build_family, reference_merge  # noqa: E402  (it puts this checkout on the path)

SHARD_BYTES = 200 * 1024**2
# neuroloc's own task_arithmetic is timed too: it shows the engine's share of each ratio
METHODS = "task_arithmetic,ties,dare_ties"


def neuroloc_merge(method: str, base: Path, fts: list[Path], out: Path) -> None:
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.merge.run import run_merge
    from neuroloc_cli.recipe.schema import InputModel, MergeRecipe

    recipe = MergeRecipe(
        merge_method=method,
        base_model=str(base),
        models=[
            InputModel(model=str(f), parameters={"weight": w} | ({} if method == "task_arithmetic" else {"density": 0.5}))
            for f, w in zip(fts, (0.6, 0.4))
        ],
        random_seed=0,
    )
    run_merge(build_plan(recipe, Path.cwd(), "bench"), out, max_shard_bytes=SHARD_BYTES)


def timed_interleaved(jobs: dict, out: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    """Run every job once per round, `runs` rounds, so that load changes on a shared machine
    hit all of them alike; wall seconds (perf_counter) and CPU seconds (process_time) each."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in jobs}
    for _ in range(runs):
        for name, fn in jobs.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # start with the previous job's output on disk, not in dirty pages
            wall, cpu = time.perf_counter(), time.process_time()
            fn(out)
            times[name]["wall"].append(round(time.perf_counter() - wall, 3))
            times[name]["cpu"].append(round(time.process_time() - cpu, 3))
    shutil.rmtree(out, ignore_errors=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs here between runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 steadies timings on a busy machine)")
    ap.add_argument("--methods", default=METHODS, help="comma-separated neuroloc methods to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="neuroloc-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, (ft1, ft2) = build_family(root, args.preset, 2)
    out = root / "out"
    results: dict = {"preset": args.preset, "runs": args.runs, "threads": torch.get_num_threads()}
    jobs = {"reference": lambda o: reference_merge(base, [ft1, ft2], [0.6, 0.4], o)}
    jobs |= {m: (lambda o, m=m: neuroloc_merge(m, base, [ft1, ft2], o)) for m in args.methods.split(",")}
    times = timed_interleaved(jobs, out, args.runs)
    ref = {k: statistics.median(times["reference"][k]) for k in ("wall", "cpu")}
    for name, t in times.items():
        results[name] = {
            "wall_s": t["wall"],
            "cpu_s": t["cpu"],
            "median_wall_s": statistics.median(t["wall"]),
            "wall_ratio": round(statistics.median(t["wall"]) / ref["wall"], 2),
            "cpu_ratio": round(statistics.median(t["cpu"]) / ref["cpu"], 2),
        }
    print(json.dumps(results, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
