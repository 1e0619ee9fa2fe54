"""Benchmark: the mergekit-parity methods against task arithmetic and the streaming floor.

    python benchmarks/bench_new_methods.py [--preset 125m] [--runs 3] [--workdir DIR]
                                           [--methods nuslerp,nearswap,...]

Target (the issue): each method stays streaming, with peak private memory within the floor
merge's and time within 2× a plain task arithmetic of the same inputs. Builds a synthetic
bf16 Llama of the preset (base and two fine-tunes, sharded, `common.build_family`), then
runs, interleaved round by round, each as its own process:

- `floor`: the minimal streaming task arithmetic of `common.reference_merge` (weights
  0.6 / 0.4), in this script's internal `--floor OUT` mode;
- `task_arithmetic` and each method through `python -m neuroloc_cli merge`, recipes below
  (`dtype: float32`, `out_dtype: bfloat16`, the settings of `bench_merge.py`).

Wall time is measured around the process and peak private memory is the highest `RssAnon`
sampled every 5 ms (`bench_merge.measure`); CPU time is the process's user and system
seconds, steadier than wall time on a shared machine. Prints one JSON document: per job the
median seconds and CPU seconds and the peak MiB, `time_vs_task_arithmetic` (target ≤ 2),
`cpu_vs_task_arithmetic` and `memory_vs_floor` (target ≤ 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
from pathlib import Path

from bench_merge import measure
from common import ROOT, build_family, reference_merge

TWO = "models:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\n"
BASE = "base_model: {base}\n"
RECIPES = {  # method: recipe body, less `merge_method:` and the dtypes
    "task_arithmetic": BASE + TWO,
    "nuslerp": BASE + TWO,
    "nearswap": BASE + "models:\n  - model: {ft1}\nparameters: {{t: 0.001}}\n",
    "multislerp": BASE + TWO,
    "karcher": "models:\n  - model: {ft1}\n  - model: {ft2}\n",
    "sce": BASE + "models:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{select_topk: 0.5}}\n",
    "ram": BASE + "models:\n  - model: {ft1}\n  - model: {ft2}\n",
    "ramplus_tl": BASE + "models:\n  - model: {ft1}\n  - model: {ft2}\n",
    "arcee_fusion": BASE + "models:\n  - model: {ft1}\n",
}
METHODS = ",".join(m for m in RECIPES if m != "task_arithmetic")


def _child_cpu() -> float:
    """User and system CPU seconds of the finished child processes: on a shared machine a
    steadier measure of the work than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_jobs(cmds: dict, out: Path, runs: int) -> dict[str, dict]:
    """Run every job `runs` times, round by round, each into `out` (emptied first): per job the
    seconds, median wall and CPU seconds and peak private MiB, and its ratios to
    `task_arithmetic` (time, CPU) and to `floor` (memory). `bench_vocab.py` times its jobs so too."""
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in cmds}
    for run in range(runs):
        for name, cmd in cmds.items():
            shutil.rmtree(out, ignore_errors=True)
            before = _child_cpu()
            seconds, peak = measure(cmd(out))
            results[name].append((seconds, peak, _child_cpu() - before))
            print(f"run {run + 1} {name:16s} {seconds:7.2f} s  {results[name][-1][2]:7.2f} cpu s  {peak / 2**20:8.0f} MiB", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    summary = {
        name: {
            "seconds": [round(t, 2) for t, _, _ in r],
            "median_seconds": statistics.median(t for t, _, _ in r),
            "median_cpu_seconds": statistics.median(c for _, _, c in r),
            "peak_private_mib": max(m for _, m, _ in r) / 2**20,
        }
        for name, r in results.items()
    }
    ta, floor = summary["task_arithmetic"], summary["floor"]["peak_private_mib"]
    for s in summary.values():
        s["time_vs_task_arithmetic"] = round(s["median_seconds"] / ta["median_seconds"], 2)
        s["cpu_vs_task_arithmetic"] = round(s["median_cpu_seconds"] / ta["median_cpu_seconds"], 2)
        s["memory_vs_floor"] = round(s["peak_private_mib"] / floor, 2)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m", choices=["tiny", "125m", "1.1b"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--methods", default=METHODS, help="comma-separated methods of RECIPES to time")
    ap.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # internal: run the floor merge into this folder
    args = ap.parse_args()

    folder = args.workdir / f"{args.preset}-two"
    base, (ft1, ft2) = build_family(folder, args.preset, 2)
    if args.floor:
        reference_merge(base, [ft1, ft2], [0.6, 0.4], args.floor)
        return

    methods = ["task_arithmetic", *(m for m in args.methods.split(",") if m != "task_arithmetic")]
    cmds = {"floor": lambda out: [sys.executable, __file__, "--preset", args.preset, "--workdir", str(args.workdir), "--floor", str(out)]}
    for m in methods:
        recipe = folder / f"{m}.yaml"
        body = RECIPES[m].format(base=base, ft1=ft1, ft2=ft2)
        recipe.write_text(f"merge_method: {m}\n{body}dtype: float32\nout_dtype: bfloat16\n")
        cmds[m] = lambda out, r=recipe: [sys.executable, "-m", "neuroloc_cli", "merge", str(r), "-o", str(out)]
    summary = time_jobs(cmds, folder / "out", args.runs)
    print(json.dumps({"preset": args.preset, "runs": args.runs, **summary}, indent=2))


if __name__ == "__main__":
    main()
