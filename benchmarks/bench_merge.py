"""Benchmark: `neuroloc merge` task_arithmetic against a minimal streaming reference merge.

Builds synthetic Llama checkpoints (bf16, sharded) of a preset size, a base and three
"fine-tunes", then times, in the same run and interleaved:

- neuroloc:  `python -m neuroloc_cli merge recipe.yaml -o OUT`
- reference: this script's `--reference` mode: per input shard, `safe_open` every model,
  `base + Σ (model_i − base)` in float32, cast to bf16, `save_file` one output shard.

Each is a separate process; wall time is measured around the process, and peak private
memory is the highest `RssAnon` (anonymous resident memory: tensors and heap, not the page
cache that memory-mapped shards occupy) seen by sampling /proc every 5 ms.

    python benchmarks/bench_merge.py --preset 125m --runs 3
    python benchmarks/bench_merge.py --preset 1.1b --runs 1 --workdir /big/disk/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, build_family, reference_merge

N_MODELS = 3


def build_inputs(workdir: Path, preset: str) -> Path:
    """The preset's base and three fine-tunes, and a task-arithmetic recipe over them."""
    folder = workdir / preset
    _, fts = build_family(folder, preset, N_MODELS, scale=0.002)
    models = "\n".join(f"  - model: ./{ft.name}\n    parameters: {{weight: 1.0}}" for ft in fts)
    (folder / "recipe.yaml").write_text(
        f"merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n{models}\ndtype: float32\nout_dtype: bfloat16\n"
    )
    return folder


def measure(cmd: list[str]) -> tuple[float, int]:
    """Run a command; return (wall seconds, peak RssAnon bytes)."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return elapsed, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m", choices=["tiny", "125m", "1.1b"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # internal: run the reference into this folder
    args = ap.parse_args()

    folder = build_inputs(args.workdir, args.preset)
    if args.reference:
        reference_merge(folder / "base", [folder / f"ft{i}" for i in range(1, N_MODELS + 1)], [1.0] * N_MODELS, args.reference)
        return

    import shutil

    results: dict[str, list[tuple[float, int]]] = {"neuroloc": [], "reference": []}
    for run in range(args.runs):
        for name in ("reference", "neuroloc"):
            out = folder / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "neuroloc":
                cmd = [sys.executable, "-m", "neuroloc_cli", "merge", str(folder / "recipe.yaml"), "-o", str(out)]
            else:
                cmd = [sys.executable, __file__, "--preset", args.preset, "--workdir", str(args.workdir), "--reference", str(out)]
            results[name].append(measure(cmd))
            print(f"run {run + 1} {name:9s} {results[name][-1][0]:7.2f} s  {results[name][-1][1] / 2**20:8.0f} MiB", file=sys.stderr)
    summary = {
        name: {"median_seconds": statistics.median(t for t, _ in r), "peak_private_mib": max(m for _, m in r) / 2**20}
        for name, r in results.items()
    }
    summary["time_ratio"] = summary["neuroloc"]["median_seconds"] / summary["reference"]["median_seconds"]
    summary["memory_ratio"] = summary["neuroloc"]["peak_private_mib"] / summary["reference"]["peak_private_mib"]
    print(json.dumps({"preset": args.preset, "runs": args.runs, **summary}, indent=2))


if __name__ == "__main__":
    main()
