"""Benchmark `neuroloc locate gradient`'s scorer: tokens/s and peak memory against a plain
forward + backward loop.

    python benchmarks/bench_locate.py                          # ~41M-parameter Llama, CPU (a minute or two)
    python benchmarks/bench_locate.py --preset tiny --reps 2   # a smoke run, seconds
    python benchmarks/bench_locate.py --preset 125m --device cuda --json

Builds a synthetic bf16 Llama of the preset (no tokenizer: the batches are seeded random
token ids) into a temporary folder, loads it in float32 as the scorer does, and scores the
transformer blocks (`locate gradient`'s default tensors) on the same `--batches` batches:

- `plain`:  `model(input_ids).logits` → cross entropy (as the scorer computes it) →
            `backward()` → `zero_grad()`, the same parameters requiring grad: the least any
            gradient scorer must do;
- `signed`, `abs`, `fisher`: `locate.scoring.importance_of` with that score (a float32
            accumulator per scored element, each gradient folded in by a post-accumulate
            hook and freed, the final |acc ⊙ θ| of `signed` and the copy to the CPU included).

Throughput: after one discarded warm-up run of each variant, `--reps` rounds run every
variant once, interleaved (the order rotates per round); the median of each variant counts,
in tokens/s (wall) and tokens per CPU-second of this process (which other jobs on a shared
machine disturb less). The target is scorer / plain ≥ 0.9.

Peak memory: each variant runs once more in a fresh subprocess. After loading (whose own
peak, bf16 shards read into a float32 model, is higher than the run's), freed heap is given
back and the peak resident set restarted (Linux: `/proc/self/clear_refs`); the subprocess
reports its resident set before the run and its peak during it (VmHWM; elsewhere
`resource.getrusage(...).ru_maxrss`, loading included; on CUDA also
`torch.cuda.max_memory_allocated`). Expected: the loaded process (Python, torch, one float32
model) + 4 bytes × scored elements (the accumulators) + activations. Plain's gradients, as
many bytes, are born while backward frees the activations, so they hardly raise its peak; the
accumulators live through the whole pass, so a scorer's peak should exceed plain's by about
the accumulators (`over_plain_vs_accumulators` near 1; holding every gradient as well would
make it 2).

Prints a table, or one JSON document with `--json`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # noqa: F401  (it puts this checkout on the path)

VARIANTS = ("plain", "signed", "abs", "fisher")
# Sizes on top of synthetic.PRESETS: "small" is the 125m preset cut to 4 layers and an
# 8000-token vocabulary, ~41M parameters (28M of them in the blocks), a minute or two on 2 cores.
SHAPES = {"small": ("125m", dict(num_hidden_layers=4, vocab_size=8000))}


def _config(preset: str):
    from neuroloc_cli.synthetic import preset_config

    base, overrides = SHAPES.get(preset, (preset, {}))
    cfg = preset_config(base)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 2
    return cfg


def _load(model_path: Path, device: str, n_batches: int, batch_size: int, seq_len: int):
    """The model in float32 (eval mode), its scored block parameters by checkpoint name, and
    the seeded batches on `device`: what `score_languages` sets up before `importance_of`."""
    import torch

    from neuroloc_cli.arch import NameFilter
    from neuroloc_cli.io.checkpoint import Checkpoint
    from neuroloc_cli.runtime.model import load_model, parameter_names

    ckpt = Checkpoint.open(model_path)
    model = load_model(model_path, device=device, dtype=torch.float32).eval()
    keep = NameFilter.of(None, None)
    by_module = parameter_names(model, ckpt)
    params = dict(model.named_parameters(remove_duplicate=False))
    scored = {n: params[by_module[n]] for n, info in ckpt.tensors.items() if keep(n) and info.torch_dtype.is_floating_point}
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(3, vocab, (batch_size, seq_len), generator=gen).to(device) for _ in range(n_batches)]
    return model, scored, batches


def _plain(model, scored, batches) -> None:
    """Forward, the scorer's loss, backward, zero grads: no hooks, no accumulators."""
    import torch.nn.functional as F

    for p in model.parameters():
        p.requires_grad_(False)
    for p in scored.values():
        p.requires_grad_(True)
    for batch in batches:
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)


def _run(variant: str, model, scored, batches) -> None:
    from neuroloc_cli.locate.scoring import importance_of

    if variant == "plain":
        _plain(model, scored, batches)
    else:
        importance_of(model, scored, batches, score=variant)


def _timed(variant: str, model, scored, batches, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run over all batches."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    _run(variant, model, scored, batches)
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _rss(field: str) -> int | None:
    """VmRSS or VmHWM of this process in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def _reset_peak() -> bool:
    """Give freed heap back to the system and restart the peak resident set from the current
    one (Linux: `echo 5 > /proc/self/clear_refs`), so that the peak is the run's, not the
    loading's: loading a bf16 checkpoint into float32 peaks higher than scoring it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _rss("VmHWM") is not None


def _child(args) -> None:
    """One variant once in this fresh process; print its memory as one JSON line."""
    import torch

    cuda = args.device.startswith("cuda")
    model, scored, batches = _load(args.model, args.device, args.batches, args.batch_size, args.seq_len)
    exact = _reset_peak()
    before = _rss("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    _run(args.child, model, scored, batches)
    if exact:
        doc = {"rss_before_bytes": before, "peak_rss_bytes": _rss("VmHWM"), "peak_of": "the run (VmHWM reset after loading)"}
    else:  # no /proc: the peak of the whole process, loading included (ru_maxrss: bytes on macOS, KiB elsewhere)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        doc = {"rss_before_bytes": before, "peak_rss_bytes": peak, "peak_of": "the process, loading included (ru_maxrss)"}
    if cuda:
        torch.cuda.synchronize()
        doc.update(cuda_before_bytes=cuda_before, peak_cuda_bytes=torch.cuda.max_memory_allocated())
    print(json.dumps(doc))


def _memory(variant: str, model_path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", str(model_path), "--device", args.device]
    cmd += ["--batches", str(args.batches), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"memory run of {variant} failed with exit code {p.returncode}:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    from neuroloc_cli.synthetic import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=[*SHAPES, *PRESETS])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4, help="batches per run")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds of every variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one memory run
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    from neuroloc_cli.synthetic import build_checkpoint

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    tokens = args.batches * args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory(prefix="bench-locate-") as tmp:
        model_path = Path(tmp) / "base"
        print(f"building the {args.preset} checkpoint ...", file=sys.stderr)
        build_checkpoint(_config(args.preset), model_path, seed=0, dtype=torch.bfloat16, tokenizer=False)
        model, scored, batches = _load(model_path, args.device, args.batches, args.batch_size, args.seq_len)
        parameters = sum(p.numel() for p in model.parameters())
        scored_elements = sum(p.numel() for p in scored.values())

        times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up: allocator growth, kernel choice, first-touch of the accumulators
            _timed(v, model, scored, batches, args.device)
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for v in order:
                times[v].append(_timed(v, model, scored, batches, args.device))
                print(f"round {rep + 1} {v:>6}: {times[v][-1][0]:6.2f} s", file=sys.stderr)
        del model, scored, batches

        print("peak memory, one fresh process per variant ...", file=sys.stderr)
        memory = {v: _memory(v, model_path, args) for v in VARIANTS}

    speed = {
        v: {
            "tokens_per_s": tokens / statistics.median(w for w, _ in t),
            "tokens_per_cpu_s": tokens / statistics.median(c for _, c in t),
            "best_tokens_per_s": tokens / min(w for w, _ in t),
            "all_seconds": [round(w, 4) for w, _ in t],
        }
        for v, t in times.items()
    }
    for v in VARIANTS:
        speed[v]["vs_plain"] = speed[v]["tokens_per_s"] / speed["plain"]["tokens_per_s"]
        speed[v]["best_vs_plain"] = speed[v]["best_tokens_per_s"] / speed["plain"]["best_tokens_per_s"]
        speed[v]["cpu_vs_plain"] = speed[v]["tokens_per_cpu_s"] / speed["plain"]["tokens_per_cpu_s"]
    for v in VARIANTS:
        m = memory[v]
        if m["rss_before_bytes"] is not None:
            m["growth_bytes"] = m["peak_rss_bytes"] - m["rss_before_bytes"]  # what the run added to the loaded model
        m["over_plain_bytes"] = m["peak_rss_bytes"] - memory["plain"]["peak_rss_bytes"]
        m["over_plain_vs_accumulators"] = m["over_plain_bytes"] / (4 * scored_elements)
        if "peak_cuda_bytes" in m:
            m["cuda_growth_bytes"] = m["peak_cuda_bytes"] - m["cuda_before_bytes"]
            m["cuda_over_plain_bytes"] = m["peak_cuda_bytes"] - memory["plain"]["peak_cuda_bytes"]
    doc = {
        "device": device_name,
        "model": {"preset": args.preset, "parameters": parameters, "scored_elements": scored_elements},
        "settings": {"batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len, "reps": args.reps},
        "tokens_per_run": tokens,
        "throughput": speed,
        "memory": {
            "model_float32_bytes": 4 * parameters,
            "accumulator_bytes": 4 * scored_elements,
            "variants": memory,
        },
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    mib = 2**20
    print(f"{device_name}; {args.preset}: {parameters / 1e6:.1f}M parameters, {scored_elements / 1e6:.1f}M scored; {tokens} tokens per run")
    print(f"model (float32) {4 * parameters / mib:.0f} MiB, accumulators (4 bytes per scored element) {4 * scored_elements / mib:.0f} MiB")
    for v in VARIANTS:
        s, m = speed[v], memory[v]
        line = (
            f"{v:>6}: {s['tokens_per_s']:7.0f} tokens/s, median ({s['vs_plain']:.2f}x plain; best {s['best_vs_plain']:.2f}x), "
            f"{s['tokens_per_cpu_s']:7.0f} tokens/CPU-s ({s['cpu_vs_plain']:.2f}x); peak RSS {m['peak_rss_bytes'] / mib:6.0f} MiB"
        )
        if "growth_bytes" in m:
            line += f" = loaded + {m['growth_bytes'] / mib:4.0f} MiB"
        line += f", plain {m['over_plain_bytes'] / mib:+5.0f} MiB ({m['over_plain_vs_accumulators']:.2f}x the accumulators)"
        if "peak_cuda_bytes" in m:
            line += f"; CUDA peak {m['peak_cuda_bytes'] / mib:.0f} MiB, plain {m['cuda_over_plain_bytes'] / mib:+.0f} MiB"
        print(line)
    before = memory["plain"]["rss_before_bytes"]
    if before is not None:
        print(f"loaded (Python, torch, the float32 model, the batches): {before / mib:.0f} MiB; peak of {memory['plain']['peak_of']}")


if __name__ == "__main__":
    main()
