"""Benchmark `neuroloc train --method landermt`: tokens/s of selective against full finetuning,
and optimizer memory at the paper's selection.

    python benchmarks/bench_landermt.py                          # ~69M-parameter Llama, CPU (about 2 minutes on 2 cores)
    python benchmarks/bench_landermt.py --preset tiny --steps 4  # a smoke run, seconds
    python benchmarks/bench_landermt.py --preset 125m --device cuda --json

Builds a synthetic bf16 Llama of the preset (with its tokenizer) into a temporary folder,
translation pairs from `synthetic.SENTENCES` for de-en, en-de and fr-en, and a routing.json at
the paper's selection: `--kept` layers (4, spread evenly from the first layer to the last, so
the backward pass runs the whole depth, the least favourable case for selective training),
in each a seeded partition of the FFN neurons into general ones (`--general`, the paper's
ε = 0.9) and the rest dealt out among de, en and fr. Then, on the same data, steps, batch,
sequence length and gradient accumulation, through `run_training(build_config(...))` as
`neuroloc train` runs it:

- `selective`: `--method landermt --masks DIR`: the general and the pair's specific neurons
               of the kept layers train (split slices), with the routing hooks;
- `full`:      `--method landermt --full-finetune`: every parameter trains, no routing.

There is no switch to run the selection without the routing hooks, so their share of the
selective run's cost is not measured apart (see the report in the JSON's `notes`).

Throughput is the median time between optimizer steps (the first step excluded: it pays for
allocator warm-up and the optimizer's first state), after one discarded warm-up run of each
variant; `--reps` rounds run both, the order alternating (A/B, B/A, ...). Tokens per CPU-second
of this process are reported beside tokens/s: on a shared machine they compare the variants'
work more fairly than wall time. The target is selective / full >= 0.9.

Optimizer memory is what AdamW holds after the run (`optimizer_state_bytes`: two fp32 moments
per element and a step per parameter, only for slices that got a gradient), beside what it
would hold if every group had trained (the start event's figure), and a projection to
Llama-2-7B shapes at the same selection.

Prints a table, or one JSON document with `--json`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # noqa: F401  (it puts this checkout on the path)

VARIANTS = ("selective", "full")
LANGUAGES = {"en": 0, "fr": 1, "de": 2}  # language -> its sentence in synthetic.SENTENCES
DIRECTIONS = ("de-en", "en-de", "fr-en")
# Sizes on top of synthetic.PRESETS: "small" is the 125m preset cut to 8 layers and an
# 8000-token vocabulary, ~69M parameters (57M of them in the blocks): 4 kept layers of 8.
SHAPES = {"small": ("125m", dict(num_hidden_layers=8, vocab_size=8000))}


def _config(preset: str):
    from neuroloc_cli.synthetic import preset_config

    base, overrides = SHAPES.get(preset, (preset, {}))
    cfg = preset_config(base)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 2  # <s>, </s>, <pad> of the synthetic tokenizer
    return cfg


def _kept_layers(n_layers: int, kept: int) -> list[int]:
    """`kept` layers spread evenly from the first to the last (all of them if there are fewer)."""
    if kept >= n_layers:
        return list(range(n_layers))
    if kept == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (kept - 1)) for i in range(kept)})


def _pairs(folder: Path, n: int) -> dict[str, Path]:
    """One jsonl of `n` {"source", "target"} examples per direction, of one or two sentences
    each (rows of ~70 and ~110 tokens: padded to --seq-len 128, none cut)."""
    from neuroloc_cli.synthetic import SENTENCES

    out = {}
    for direction in DIRECTIONS:
        src, tgt = direction.split("-")
        lines = []
        for i in range(n):
            k = 1 + i % 2
            lines.append(
                json.dumps({"source": " ".join([SENTENCES[LANGUAGES[src]]] * k), "target": " ".join([SENTENCES[LANGUAGES[tgt]]] * k)})
            )
        out[direction] = folder / f"{direction}.jsonl"
        out[direction].write_text("\n".join(lines) + "\n")
    return out


def _routing(model: Path, folder: Path, layers: list[int], general_share: float) -> dict:
    """A routing.json in `folder` for the kept `layers`: per layer, a seeded partition of the
    FFN neurons into general (`general_share`) and specific ones dealt out among the languages;
    seeded coefficients. Returns the neuron counts per set."""
    import torch

    from neuroloc_cli.io.checkpoint import Checkpoint
    from neuroloc_cli.masks.format import layout_digest

    ckpt = Checkpoint.open(model)
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
    ckpt.close()
    gen = torch.Generator().manual_seed(0)
    langs = list(LANGUAGES)
    blocks, sizes = {}, {}
    for layer in layers:
        key = f"model.layers.{layer}.mlp"
        size = shapes[f"{key}.up_proj.weight"][0]
        perm = torch.randperm(size, generator=gen).tolist()
        cut = round(general_share * size)
        specific = {lang: sorted(perm[cut:][i :: len(langs)]) for i, lang in enumerate(langs)}
        parts = [[f"{key}.gate_proj.weight", 0], [f"{key}.up_proj.weight", 0], [f"{key}.down_proj.weight", 1]]
        blocks[key] = {"layer": layer, "size": size, "parts": parts, "general": sorted(perm[:cut]), "specific": specific}
        sizes[key] = {"size": size, "general": cut, **{lang: len(ids) for lang, ids in specific.items()}}
    coefficient = {d: {k: round(float(torch.empty(()).uniform_(0.05, 0.3, generator=gen)), 4) for k in blocks} for d in DIRECTIONS}
    doc = {
        "neuroloc.kind": "landermt-routing",
        "version": 1,
        "model": str(model),
        "model_layout": layout_digest(shapes),
        "template": "flan-following",
        "languages": langs,
        "directions": list(DIRECTIONS),
        "layers": layers,
        "blocks": blocks,
        "coefficient": coefficient,
    }
    folder.mkdir(parents=True)
    (folder / "routing.json").write_text(json.dumps(doc))
    return sizes


def _run(variant: str, model: Path, pairs: dict[str, Path], masks: Path, out: Path, args, steps: int) -> dict:
    """One training run; step times from its events, counts and optimizer state from its result."""
    from neuroloc_cli.train.config import build_config
    from neuroloc_cli.train.events import StartEvent, StepEvent
    from neuroloc_cli.train.run import run_training

    kw = {
        "model": str(model),
        "method": "landermt",
        "pair": [f"{d}={p}" for d, p in pairs.items()],
        "output": str(out),
        "max_steps": steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": 5e-5,
        "eval_share": 0.0,  # no held-out evaluation: it is not what is timed
        "overwrite": True,
    }
    if variant == "full":
        kw["full_finetune"] = True
    else:
        kw["masks"] = str(masks)
    times: list[tuple[float, float]] = []
    start: list[StartEvent] = []

    def on_event(e) -> None:
        if isinstance(e, StepEvent):
            times.append((time.perf_counter(), time.process_time()))
        elif isinstance(e, StartEvent):
            start.append(e)

    result = run_training(build_config(None, kw), on_event)
    return {
        "step_seconds": [b[0] - a[0] for a, b in zip(times, times[1:])],  # from the end of step 1 on
        "step_cpu_seconds": [b[1] - a[1] for a, b in zip(times, times[1:])],
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "optimizer_state_bytes_all_groups": start[0].optimizer_state_bytes,
        **result.counts,
    }


def _project_7b(kept: int, general_share: float) -> dict:
    """Trainable elements and AdamW state for Llama-2-7B shapes (no weights): full finetuning
    against `kept` layers' FFN neurons, all of them (every language's group has trained) and
    those of one direction (general + two languages' shares of the specific ones)."""
    from transformers import AutoConfig

    from neuroloc_cli.synthetic import parameter_shapes

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
    total = sum(math.prod(s) for _, s in parameter_shapes(cfg))
    kept_elements = kept * 3 * cfg.intermediate_size * cfg.hidden_size  # gate and up rows, down columns
    one_direction = round(kept_elements * (general_share + (1 - general_share) * 2 / len(LANGUAGES)))
    adam = 2 * 4  # two fp32 moments per trained element
    return {
        "parameters": total,
        "full_adam_bytes": adam * total,
        "kept_layers": kept,
        "selective_trainable": kept_elements,
        "selective_adam_bytes": adam * kept_elements,
        "selective_one_direction_adam_bytes": adam * one_direction,
    }


NOTES = (
    "Selective finetuning computes the whole forward pass and the activation gradients down to "
    "the lowest kept layer, but weight gradients only for the kept layers' gate/up/down tensors "
    "(every other parameter has requires_grad=False), and AdamW runs over their selected slices "
    "only. Its extra costs: per kept tensor, the whole-tensor weight gradient is still computed, "
    "then its selected rows/columns are copied into each active group's slice (index_select, "
    "~90 % of the tensor for the general group) and, after the step, copied back (index_copy_); "
    "and per kept layer two routing hooks (gate and up) that rescale the [batch, seq, intermediate] "
    "outputs in float32 (s * out, then a where for switched-off neurons) in forward and backward. "
    "No switch turns the hooks off while keeping the selection, so they are not timed apart."
)


def main() -> None:
    from neuroloc_cli.synthetic import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=[*SHAPES, *PRESETS])
    ap.add_argument("--kept", type=int, default=4, help="kept layers (the paper's k = 4)")
    ap.add_argument("--general", type=float, default=0.9, help="share of general neurons per kept layer (the paper's ε)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved rounds of both variants")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="training picks CUDA when it sees one")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2: the first step is not timed")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: the training runs where it finds a device

    import torch

    from neuroloc_cli.synthetic import build_checkpoint

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    cfg = _config(args.preset)
    layers = _kept_layers(cfg.num_hidden_layers, args.kept)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    tokens = args.batch_size * args.grad_accum * args.seq_len  # per optimizer step, padding included
    with tempfile.TemporaryDirectory(prefix="bench-landermt-") as tmp:
        root = Path(tmp)
        print(f"building the {args.preset} checkpoint ...", file=sys.stderr)
        model = build_checkpoint(cfg, root / "base", seed=0, dtype=torch.bfloat16)
        pairs = _pairs(root, 200)
        sizes = _routing(model, root / "landermt", layers, args.general)
        for v in VARIANTS:  # warm-up: allocator growth, kernel choice, first use of each code path
            _run(v, model, pairs, root / "landermt", root / "out", args, steps=2)
        for rep in range(args.reps):
            for v in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                runs[v].append(_run(v, model, pairs, root / "landermt", root / "out", args, steps=args.steps))
                print(f"round {rep + 1} {v:>9}: {tokens / statistics.median(runs[v][-1]['step_seconds']):8.0f} tokens/s", file=sys.stderr)

    result = {}
    for v, rs in runs.items():
        first = rs[0]
        # The median step over every round: robust to the load spikes of a shared machine. CPU
        # seconds of this process are also far less sensitive than wall time to other jobs there.
        result[v] = {
            "tokens_per_s": tokens / statistics.median(t for r in rs for t in r["step_seconds"]),
            "tokens_per_cpu_s": tokens / statistics.median(t for r in rs for t in r["step_cpu_seconds"]),
            "per_round_tokens_per_s": [round(tokens / statistics.median(r["step_seconds"]), 1) for r in rs],
            **{k: first[k] for k in ("parameters", "trainable", "frozen", "optimizer_elements")},
            "optimizer_state_bytes": first["optimizer_state_bytes"],
            "optimizer_state_bytes_all_groups": first["optimizer_state_bytes_all_groups"],
        }
    sel, full = result["selective"], result["full"]
    doc = {
        "device": device,
        "model": {"preset": args.preset, "layers": cfg.num_hidden_layers, "parameters": full["parameters"]},
        "selection": {"kept_layers": layers, "general_share": args.general, "blocks": sizes},
        "settings": {
            "directions": list(DIRECTIONS),
            "steps": args.steps,
            "reps": args.reps,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "seq_len": args.seq_len,
            "tokens_per_step": tokens,
        },
        "variants": result,
        "selective_vs_full": {
            "tokens_per_s": sel["tokens_per_s"] / full["tokens_per_s"],
            "tokens_per_cpu_s": sel["tokens_per_cpu_s"] / full["tokens_per_cpu_s"],
            "trainable": sel["trainable"] / full["trainable"],
            "optimizer_state_bytes": sel["optimizer_state_bytes"] / full["optimizer_state_bytes"],
        },
        "target_tokens_per_s_ratio": 0.9,
        "llama2_7b_projection": _project_7b(min(args.kept, 32), args.general),
        "notes": NOTES,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    mib, ratio = 2**20, doc["selective_vs_full"]
    print(f"{device}; {args.preset}: {full['parameters'] / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers; kept layers {layers}")
    print(f"{doc['settings']['tokens_per_step']} tokens per step, {args.steps} steps, {args.reps} rounds")
    for v, r in result.items():
        print(
            f"{v:>9}: {r['tokens_per_s']:7.0f} tokens/s, {r['tokens_per_cpu_s']:7.0f} tokens/CPU-s; trainable {r['trainable']:,}; "
            f"optimizer state {r['optimizer_state_bytes'] / mib:.1f} MiB (all groups {r['optimizer_state_bytes_all_groups'] / mib:.1f} MiB)"
        )
    print(
        f"selective / full: {ratio['tokens_per_s']:.2f}x tokens/s ({ratio['tokens_per_cpu_s']:.2f}x per CPU-s; target >= 0.9), "
        f"{ratio['trainable']:.3f}x trainable, {ratio['optimizer_state_bytes']:.3f}x optimizer state"
    )
    p = doc["llama2_7b_projection"]
    print(
        f"Llama-2-7B shapes: full AdamW state {p['full_adam_bytes'] / 1e9:.1f} GB; {p['kept_layers']} kept layers' FFN neurons "
        f"{p['selective_adam_bytes'] / 1e9:.2f} GB ({p['selective_one_direction_adam_bytes'] / 1e9:.2f} GB if one direction only)"
    )


if __name__ == "__main__":
    main()
