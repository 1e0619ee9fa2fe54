"""Benchmark `neuroloc sweep`: time per point against `merge` to disk then `eval` of the
same point, and the memory of each.

    python benchmarks/bench_sweep.py                     # 125M-class Llama, 3 points, perplexity eval
    python benchmarks/bench_sweep.py --preset tiny       # a smoke run, seconds
    python benchmarks/bench_sweep.py --points 5 --docs 64 --json

Builds (once, into `--work`, default a temporary folder) a synthetic bf16 Llama of the preset
with its tokenizer, two "fine-tunes", a task-arithmetic recipe over them, and a perplexity
file of `--docs` documents. Then, side by side in one run, each as the commands a user types
(a fresh process each, as on a shell):

- `by hand`: per point, `neuroloc merge recipe --set weight=W -o DIR` then
             `neuroloc eval DIR --ppl FILE`: a checkpoint on disk per point;
- `sweep`:   one `neuroloc sweep recipe --grid weight=W1,W2,… --eval ppl=FILE`.

Reported: by hand, the wall time per point (merge + eval, process start-up included); for
the sweep, its wall time divided by the points (start-up, loading and the first read of the
inputs spread over them) and the steady per-point time it records for points after the first.
The target is sweep / by hand ≤ 0.3 per point. Memory is each process's peak RSS
(`getrusage` of the children): the sweep's against the larger of merge's and eval's.

Prints a table, or one JSON document with `--json`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # noqa: F401  (it puts this checkout on the path)


def _build(work: Path, preset: str, docs: int) -> tuple[Path, Path]:
    import torch

    from neuroloc_cli.synthetic import SENTENCES, build_checkpoint, derive_finetune, preset_config

    base = work / "base"
    if not base.exists():
        print(f"building {preset} checkpoints in {work} ...", file=sys.stderr)
        build_checkpoint(preset_config(preset), base, seed=0, dtype=torch.bfloat16)
    for seed in (1, 2):
        if not (work / f"ft{seed}").exists():
            derive_finetune(base, work / f"ft{seed}", seed=seed, scale=0.01)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
        "  - model: ./ft1\n    parameters: {weight: 0.5}\n  - model: ./ft2\n    parameters: {weight: 0.5}\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )
    data = work / "ppl.jsonl"
    data.write_text(
        "".join(json.dumps({"text": " ".join(SENTENCES[i % len(SENTENCES)] for i in range(k, k + 6))}) + "\n" for k in range(docs))
    )
    return recipe, data


# Runs `neuroloc ARGS` in this process and reports its own peak RSS on stderr's last line.
_CHILD = """
import resource, runpy, sys
sys.argv = ["neuroloc", *sys.argv[1:]]
try:
    runpy.run_module("neuroloc_cli", run_name="__main__")
finally:
    print(f"peak-rss-kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def _run(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one `neuroloc` process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"neuroloc {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    last = done.stderr.strip().splitlines()[-1]
    return seconds, int(last.removeprefix("peak-rss-kib=")) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="125m", help="synthetic.PRESETS name (default 125m)")
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--docs", type=int, default=32, help="perplexity documents per point")
    ap.add_argument("--work", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="neuroloc-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe, data = _build(work, a.preset, a.docs)
    weights = [round(0.2 + 0.6 * i / max(1, a.points - 1), 3) for i in range(a.points)]
    env_threads = os.environ.get("OMP_NUM_THREADS", "default")

    # by hand for the first point, the sweep, then by hand for the rest: both see the same machine
    merge_peak = eval_peak = 0
    by_hand = []

    def hand_point(w: float) -> None:
        nonlocal merge_peak, eval_peak
        out = work / f"hand-{w}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"by hand: merge + eval at weight={w}", file=sys.stderr)
        t_merge, m_peak = _run(["merge", str(recipe), "--set", f"weight={w}", "-o", str(out)])
        t_eval, e_peak = _run(["eval", str(out), "--ppl", f"{data}:x", "--bootstrap-iters", "0", "--json"])
        merge_peak, eval_peak = max(merge_peak, m_peak), max(eval_peak, e_peak)
        by_hand.append(t_merge + t_eval)
        shutil.rmtree(out)

    hand_point(weights[0])
    sweep_dir = work / "sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)
    print(f"sweep: {a.points} points", file=sys.stderr)
    grid = ",".join(str(w) for w in weights)
    t_sweep, sweep_peak = _run(["sweep", str(recipe), "--grid", f"weight={grid}", "--eval", f"ppl={data}:x", "-o", str(sweep_dir)])
    recorded = [json.loads(x)["seconds"] for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    for w in weights[1:]:
        hand_point(w)
    hand = statistics.median(by_hand)
    steady = statistics.median(recorded[1:]) if len(recorded) > 1 else recorded[0]
    doc = {
        "preset": a.preset,
        "points": a.points,
        "docs": a.docs,
        "threads": env_threads,
        "by_hand_seconds_per_point": round(hand, 2),
        "sweep_seconds_per_point_amortized": round(t_sweep / a.points, 2),
        "sweep_seconds_per_point_steady": round(steady, 2),
        "ratio_amortized": round(t_sweep / a.points / hand, 3),
        "ratio_steady": round(steady / hand, 3),
        "peak_rss_bytes": {"merge": merge_peak, "eval": eval_peak, "sweep": sweep_peak},
    }
    if a.json:
        print(json.dumps(doc, indent=1))
        return
    print(f"{a.preset}, {a.points} points, {a.docs} perplexity documents, OMP_NUM_THREADS={env_threads}")
    print(f"by hand (merge to disk + eval), per point: {hand:.2f} s")
    print(
        f"sweep, per point: {t_sweep / a.points:.2f} s amortized ({doc['ratio_amortized']}x), {steady:.2f} s steady ({doc['ratio_steady']}x)"
    )
    gib = 1024**3
    print(f"peak RSS: merge {merge_peak / gib:.2f} GiB, eval {eval_peak / gib:.2f} GiB, sweep {sweep_peak / gib:.2f} GiB")


if __name__ == "__main__":
    main()
