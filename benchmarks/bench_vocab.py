"""Benchmark: a `tokenizer_source` merge of two models whose vocabularies differ, against a
plain task arithmetic and the streaming floor.

    python benchmarks/bench_vocab.py [--preset 125m] [--runs 3] [--workdir DIR]

Target (the issue): the vocabulary merge stays streaming, with peak private memory within the
floor merge's and time within 2× a plain task arithmetic of the same inputs. Builds, with
`common.build_family`, a synthetic bf16 Llama of the preset (base and two fine-tunes,
sharded) and gives them word-level tokenizers of the preset's vocabulary size: the base and
`ft1` share one; `ft2v`, `ft2` with its last 1000 ordinary tokens replaced by others and two
added chat tokens (its embedding and head resized to fit, the new rows near the mean row),
as a fine-tune with a chat template looks. Then runs, interleaved round by round, each as its
own process:

- `floor`: the minimal streaming task arithmetic of `common.reference_merge` (base, ft1, ft2;
  weights 0.6 / 0.4), in this script's internal `--floor OUT` mode;
- `task_arithmetic`: the same merge through `python -m neuroloc_cli merge`;
- `union` and `base`: base, ft1 and ft2v with `tokenizer_source: union` (the output has
  every token of both: 1002 more rows) and `base` (the base's vocabulary);

all with `dtype: float32`, `out_dtype: bfloat16`. Prints one JSON document: per job the median
seconds and CPU seconds (user and system, steadier than wall time on a shared machine), the
peak private MiB (`bench_merge.measure`: the highest `RssAnon`), and the ratios
`time_vs_task_arithmetic` (target ≤ 2), `cpu_vs_task_arithmetic` and `memory_vs_floor`
(target ≤ 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_new_methods import time_jobs
from common import INPUT_SHARD, ROOT, build_family, reference_merge

REPLACED = 1000  # ordinary tokens of ft2v that the base lacks
ADDED = ["<|im_start|>", "<|im_end|>"]  # added special tokens of ft2v
SPECIALS = ["<s>", "</s>", "<unk>"]
RECIPE = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.4}}
dtype: float32
out_dtype: bfloat16
"""


def write_word_tokenizer(folder: Path, tokens: list[str]) -> None:
    """A word-level tokenizer whose ids are `tokens`' positions (the first three are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def build_inputs(folder: Path, preset: str) -> tuple[Path, Path, Path, Path]:
    """base, ft1, ft2 (one vocabulary) and ft2v (another); built only where missing."""
    import torch
    from transformers import AutoTokenizer

    from neuroloc_cli.io.checkpoint import KIND_KEY, Checkpoint, Kind
    from neuroloc_cli.io.output import copy_side_files
    from neuroloc_cli.io.writer import OutTensor, ShardedWriter
    from neuroloc_cli.merge.vocab import is_vocab_tensor

    base, (ft1, ft2) = build_family(folder, preset, 2)
    size = json.loads((base / "config.json").read_text())["vocab_size"]
    ordinary = [f"t{i}" for i in range(size - len(SPECIALS))]
    for model in (base, ft1, ft2):
        if not (model / "tokenizer.json").exists():
            write_word_tokenizer(model, SPECIALS + ordinary)
    ft2v = folder / "ft2v"
    if ft2v.exists():
        return base, ft1, ft2, ft2v
    ft2v.mkdir()
    ckpt = Checkpoint.open(ft2)
    grown = {n for n, i in ckpt.tensors.items() if is_vocab_tensor(n, tuple(i.shape), size)}
    infos = [
        OutTensor(n, ((i.shape[0] + len(ADDED)), *i.shape[1:]) if n in grown else tuple(i.shape), i.torch_dtype)
        for n, i in ckpt.tensors.items()
    ]
    writer = ShardedWriter(ft2v, infos, INPUT_SHARD, {KIND_KEY: Kind.MODEL})
    gen = torch.Generator().manual_seed(7)
    for info in infos:
        t = ckpt.read(info.name)
        if info.name in grown:  # new rows near the mean row, as a resized embedding starts
            extra = t.float().mean(0, keepdim=True) + 0.01 * torch.randn((len(ADDED), *t.shape[1:]), generator=gen)
            t = torch.cat([t, extra.to(t.dtype)])
        writer.write(info.name, t)
    writer.close()
    copy_side_files(ft2, ft2v)
    config = json.loads((ft2v / "config.json").read_text())
    (ft2v / "config.json").write_text(json.dumps({**config, "vocab_size": size + len(ADDED)}, indent=2) + "\n")
    replaced = min(REPLACED, len(ordinary) // 4)  # the tiny preset has 509 ordinary tokens
    write_word_tokenizer(ft2v, SPECIALS + ordinary[:-replaced] + [f"u{i}" for i in range(replaced)])
    tok = AutoTokenizer.from_pretrained(ft2v)
    tok.add_tokens(ADDED, special_tokens=True)
    tok.save_pretrained(ft2v)
    return base, ft1, ft2, ft2v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m", choices=["tiny", "125m", "1.1b"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # internal: run the floor merge into this folder
    args = ap.parse_args()

    folder = args.workdir / f"{args.preset}-vocab"
    base, ft1, ft2, ft2v = build_inputs(folder, args.preset)
    if args.floor:
        reference_merge(base, [ft1, ft2], [0.6, 0.4], args.floor)
        return

    cmds = {"floor": lambda out: [sys.executable, __file__, "--preset", args.preset, "--workdir", str(args.workdir), "--floor", str(out)]}
    jobs = {"task_arithmetic": (ft2, ""), "union": (ft2v, "tokenizer_source: union\n"), "base": (ft2v, "tokenizer_source: base\n")}
    for name, (second, extra) in jobs.items():
        recipe = folder / f"{name}.yaml"
        recipe.write_text(RECIPE.format(base=base, ft1=ft1, ft2=second) + extra)
        cmds[name] = lambda out, r=recipe: [sys.executable, "-m", "neuroloc_cli", "merge", str(r), "-o", str(out)]
    summary = time_jobs(cmds, folder / "out", args.runs)
    print(json.dumps({"preset": args.preset, "runs": args.runs, **summary}, indent=2))


if __name__ == "__main__":
    main()
