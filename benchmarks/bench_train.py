"""Benchmark `neuroloc train`: tokens/s of masked vs full training, and optimizer memory.

    python benchmarks/bench_train.py            # ~25M-parameter Llama, CPU (a few minutes)
    python benchmarks/bench_train.py --quick    # tiny model, seconds (a smoke run)

Modes, all on the same synthetic model and corpus:

- full:          plain CPT, every parameter trains (the baseline);
- row-5%:        `--train-mask` selecting 5 % of the rows of every linear weight of the
                 blocks (split slices: optimizer state follows the selection);
- element-5%:    `--freeze-mask` of 5 % of the elements of every block tensor (gradient
                 masking + restore: full optimizer state).

Throughput is the median over optimizer steps (the first step excluded: it pays for
allocator warm-up), after one discarded warm-up run; each mode runs `--repeats` times
interleaved with the others and the best run counts, since machines are often shared. Tokens
per CPU-second of this process are reported beside tokens/s: on a shared machine they
compare the modes' work more fairly than wall time. Prints a table on stderr and one JSON
document on stdout. The last section projects optimizer memory for Llama-2-7B shapes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from neuroloc_cli.io.checkpoint import Checkpoint  # noqa: E402
from neuroloc_cli.masks import Mask, MaskEntry  # noqa: E402
from neuroloc_cli.synthetic import (  # noqa: E402
    SENTENCES,  # noqa: E402
    build_checkpoint,
    parameter_shapes,
)
from neuroloc_cli.train.config import build_config  # noqa: E402
from neuroloc_cli.train.events import StepEvent  # noqa: E402
from neuroloc_cli.train.run import run_training  # noqa: E402

SHAPES = {
    "quick": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    "small": dict(
        hidden_size=512, num_hidden_layers=6, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8, vocab_size=8000
    ),
}


def _config(shape: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", max_position_embeddings=1024, tie_word_embeddings=False, **SHAPES[shape])
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 2
    return cfg


def _masks(model: Path, folder: Path, share: float) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    infos = {n: i for n, i in Checkpoint.open(model).tensors.items() if ".layers." in n}
    rows = {n: MaskEntry(i.shape, 0, torch.rand(i.shape[0], generator=gen) < share) for n, i in infos.items() if len(i.shape) == 2}
    elements = {n: MaskEntry(i.shape, None, torch.rand(i.shape, generator=gen) < share) for n, i in infos.items()}
    Mask("row", rows).save(folder / "rows.mask")
    Mask("element", elements).save(folder / "elements.mask")
    return {"row-5%": folder / "rows.mask", "element-5%": folder / "elements.mask"}


def _run(model: Path, corpus: Path, out: Path, mode: str, masks: dict[str, Path], args) -> dict:
    kw = {
        "model": str(model),
        "data": [str(corpus)],
        "output": str(out),
        "max_steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "lr": 1e-4,
        "weight_decay": 0.01,
        "eval_share": 0.0,
        "overwrite": True,
    }
    if mode == "row-5%":
        kw["train_mask"] = str(masks[mode])
    elif mode == "element-5%":
        kw["freeze_mask"] = str(masks[mode])
    times: list[tuple[float, float]] = []
    result = run_training(
        build_config(None, kw), lambda e: times.append((time.perf_counter(), time.process_time())) if isinstance(e, StepEvent) else None
    )
    tokens = args.batch_size * args.seq_len  # per step
    # Median step time: robust to the load spikes of a shared machine. CPU seconds of this
    # process are also far less sensitive than wall time to other jobs there.
    wall = statistics.median(b[0] - a[0] for a, b in zip(times, times[1:]))
    cpu = statistics.median(b[1] - a[1] for a, b in zip(times, times[1:]))
    return {
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        **result.counts,
    }


def _project_7b() -> dict:
    """Optimizer memory for Llama-2-7B shapes (meta device: no memory), full vs 5 % rows."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    shapes = parameter_shapes(cfg)
    linear = sum(s[0] * s[1] for n, s in shapes if ".layers." in n and len(s) == 2)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    adam = 2 * 4  # two fp32 moments per trained element
    return {
        "parameters": total,
        "block_linear_parameters": linear,
        "full_adam_bytes": adam * total,
        "full_block_linear_adam_bytes": adam * linear,
        "row_5pct_adam_bytes": int(adam * 0.05 * linear),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke run")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    shape = "quick" if args.quick else "small"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_checkpoint(_config(shape), root / "base", seed=0, dtype=torch.bfloat16)
        rng = random.Random(0)
        corpus = root / "corpus.txt"
        corpus.write_text("\n\n".join(" ".join(rng.choice(SENTENCES) for _ in range(8)) for _ in range(3000)))
        masks = _masks(model, root, 0.05)
        modes = ["full", "row-5%", "element-5%"]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        # A discarded warm-up run: the first training in a process pays one-time costs
        # (kernel selection, allocator growth) that would otherwise count against "full".
        _run(model, corpus, root / "warm-up", "full", masks, argparse.Namespace(**{**vars(args), "steps": 3}))
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append(_run(model, corpus, root / f"out-{mode}", mode, masks, args))
    best = {m: max(r, key=lambda x: x["tokens_per_s"]) for m, r in runs.items()}
    full = best["full"]["tokens_per_s"]
    full_cpu = max(r["tokens_per_cpu_s"] for r in runs["full"])
    doc = {
        "device": device,
        "model": {"shape": SHAPES[shape], "parameters": best["full"]["parameters"]},
        "settings": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "repeats": args.repeats},
        "modes": {
            m: {
                **b,
                "vs_full": b["tokens_per_s"] / full,
                "all_tokens_per_s": [r["tokens_per_s"] for r in runs[m]],
                "best_tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in runs[m]),
                "cpu_vs_full": max(r["tokens_per_cpu_s"] for r in runs[m]) / full_cpu,
            }
            for m, b in best.items()
        },
        "llama2_7b_projection": _project_7b(),
    }
    for m, b in doc["modes"].items():
        print(
            f"{m:>11}: {b['tokens_per_s']:8.0f} tokens/s ({b['vs_full']:.2f}x full), "
            f"{b['best_tokens_per_cpu_s']:6.0f} tokens/CPU-s ({b['cpu_vs_full']:.2f}x full), trainable {b['trainable']:,}, "
            f"optimizer state {b['optimizer_state_bytes'] / 2**20:.1f} MiB",
            file=sys.stderr,
        )
    p = doc["llama2_7b_projection"]
    print(
        f"Llama-2-7B shapes: full AdamW state {p['full_adam_bytes'] / 1e9:.1f} GB; 5 % rows of block linears "
        f"{p['row_5pct_adam_bytes'] / 1e9:.2f} GB",
        file=sys.stderr,
    )
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
