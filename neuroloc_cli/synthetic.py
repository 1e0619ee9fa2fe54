"""Synthetic Hugging Face checkpoints with random weights, for the demo, tests and benchmarks.

A checkpoint is built from a transformers config: the model is instantiated on the `meta`
device (no memory) to learn its parameter names and shapes, then each tensor is drawn at
random and streamed to disk, so even a 1.1B-parameter preset never lives in memory at once.
The folder is a real HF checkpoint: config.json, a byte-level BPE tokenizer trained on a few
sentences, sharded or single-file safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neuroloc_cli.io.checkpoint import KIND_KEY, Checkpoint, Kind
from neuroloc_cli.io.writer import DEFAULT_MAX_SHARD_BYTES, OutTensor, ShardedWriter

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")

# Benchmark presets: synthetic Llama models of a given size (hidden, layers, intermediate, heads, kv heads).
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "125m": dict(
        hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000
    ),
    "1.1b": dict(
        hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000
    ),
}

# A few sentences in several languages and scripts: the tokenizer is trained on them, and tests
# and benchmarks build small corpora from them that a tiny model learns within a few steps.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Two plus three equals five, and five times four is twenty.",
    "El zorro marrón rápido salta sobre el perro perezoso.",
    "快速的棕色狐狸跳过了懒狗。",
)


def tiny_config(arch: str, *, layers: int = 2, hidden: int = 64, vocab: int = 512, tie: bool | None = None):
    """A tiny transformers config for `arch` (one of ARCHITECTURES)."""
    from transformers import AutoConfig

    if arch == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2", n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=256, bos_token_id=0, eos_token_id=1
        )
    else:
        cfg = AutoConfig.for_model(
            arch,
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=256,
            tie_word_embeddings=bool(tie),
        )
    if tie is not None:
        cfg.tie_word_embeddings = tie
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 2  # <s>, </s>, <pad> of write_tokenizer
    cfg.architectures = [_causal_lm_class(cfg.model_type)]
    return cfg


def preset_config(preset: str):
    """A Llama config of one of the benchmark PRESETS."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", max_position_embeddings=2048, tie_word_embeddings=False, **PRESETS[preset])
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def parameter_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the tensors `save_pretrained` would write for `config`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if out_emb is not None and p is out_emb.weight}
        tied.discard(next(n for n, p in model.named_parameters() if p is out_emb.weight))
    names = dict(model.named_parameters())
    return [(n, tuple(p.shape)) for n, p in names.items() if n not in tied]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens and save it as HF files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(SENTENCES) * 4, vocab_size=min(vocab_size, 400), min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)


def build_checkpoint(
    config,
    folder: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
) -> Path:
    """Write a random-weight checkpoint for `config` into `folder` (created).

    Norm weights are drawn around 1 and biases around 0, so the model runs sensibly.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(config)
    writer = ShardedWriter(folder, [OutTensor(n, s, dtype) for n, s in shapes], max_shard_bytes, {KIND_KEY: Kind.MODEL})
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02)
        if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t.add_(1.0)
        writer.write(name, t.to(dtype))
    writer.close()
    doc = config.to_dict()
    doc["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if tokenizer:
        write_tokenizer(folder, config.vocab_size)
    return folder


def derive_finetune(base: Path, folder: Path, *, seed: int, scale: float = 0.01, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a "fine-tune" of `base`: every floating tensor plus small random noise, in the
    base's dtypes, with the base's config and tokenizer files."""
    from neuroloc_cli.io.output import copy_side_files

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(base)
    infos = list(ckpt.tensors.values())
    writer = ShardedWriter(folder, [OutTensor(i.name, i.shape, i.torch_dtype) for i in infos], max_shard_bytes, {KIND_KEY: Kind.MODEL})
    gen = torch.Generator().manual_seed(seed)
    for info in infos:
        t = ckpt.read(info.name)
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(scale)
            t = (t.float() + noise).to(t.dtype)
        writer.write(info.name, t)
    writer.close()
    copy_side_files(base, folder)
    return folder
