"""Everything a training run reads, checked before a weight is loaded.

`check_inputs` comes first in a run and in `--dry-run` alike, so that a bad flag value, mask,
output path, tokenizer or corpus is found and named while nothing has been loaded or written.
Only the checkpoint's headers are read here; its tensors are read by the model and the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, model_positions
from neuroloc_cli.io.output import check_output_path
from neuroloc_cli.io.writer import parse_size
from neuroloc_cli.masks import Mask
from neuroloc_cli.masks.format import layout_digest
from neuroloc_cli.runtime.data import Framing, choose_seq_len, framing_of, load_tokenizer
from neuroloc_cli.runtime.prompts import Pair, parse_pairs
from neuroloc_cli.runtime.routing import ROUTING_FILE, Routing, refuse_routed
from neuroloc_cli.train.config import TrainConfig
from neuroloc_cli.train.data import Corpus, PairCorpus, load_corpora, load_pair_corpora


@dataclass(frozen=True)
class RunInputs:
    """A run's inputs, read and checked.

    Attributes:
        config: the run's configuration with `seq_len` chosen: every later step (rows, the
            resume check, provenance) reads the value from here.
        source: the base checkpoint, opened from its headers.
        mask: the `--train-mask` or `--freeze-mask`, checked against the checkpoint's shapes.
        positions: the model's positions, None when its config names none.
        seq_len_default: no `--seq-len` was given; `config.seq_len` was chosen from `positions`.
        max_shard_bytes: `--max-shard-size` in bytes.
        paths: every input path, which the output must not be, contain or lie inside.
    """

    config: TrainConfig
    source: Checkpoint
    mask: Mask | None
    tokenizer: Any
    framing: Framing
    corpora: list[Corpus]
    positions: int | None
    seq_len_default: bool
    max_shard_bytes: int
    paths: list[Path]
    pairs: list[PairCorpus] = field(default_factory=list)  # landermt: the translation directions
    routing: Routing | None = None  # landermt: the neuron sets and coefficients of --masks

    @property
    def warnings(self) -> list[str]:
        """What looked wrong in the data without being an error (reported at the start)."""
        return [w for c in self.corpora for w in c.warnings]


def check_inputs(config: TrainConfig) -> RunInputs:
    """Open and check every input of a run, in the order a user would fix them: the model
    folder, the shard size, the sequence length, the mask, the output path, then tokenizer
    and corpora.

    Raises:
        InputError / UsageError / OutputError: naming the file, tensor or flag at fault.
    """
    model_path = Path(config.model)
    source = Checkpoint.open(model_path, spec=config.model)
    refuse_routed(model_path)
    try:
        max_shard_bytes = parse_size(config.max_shard_size)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None
    positions = model_positions(source.config)
    cfg = config.model_copy(update={"seq_len": choose_seq_len(config.seq_len, positions)})
    mask = _load_mask(Path(cfg.mask_path), source) if cfg.mask_path else None
    pairs = parse_pairs(cfg.pair)
    routing = _load_routing(Path(cfg.masks), source, pairs) if cfg.method == "landermt" and not cfg.full_finetune else None
    paths = [model_path, *(Path(d.path) for d in cfg.data), *([Path(cfg.mask_path)] if cfg.mask_path else [])]
    paths += [p.path for p in pairs] + ([Path(cfg.masks)] if cfg.masks else [])
    if cfg.output is not None:
        check_output_path(Path(cfg.output), paths, cfg.overwrite)
    tokenizer = load_tokenizer(model_path)
    if cfg.method == "landermt":
        framing = framing_of(tokenizer, "padded", cfg.txt_docs)
        corpora = load_pair_corpora(pairs, tokenizer, cfg.template, cfg.seq_len, cfg.eval_share)
        args = (cfg, source, mask, tokenizer, framing, [], positions, config.seq_len is None, max_shard_bytes, paths)
        return RunInputs(*args, pairs=corpora, routing=routing)
    framing = framing_of(tokenizer, cfg.packing, cfg.txt_docs)
    corpora = load_corpora(cfg.data, tokenizer, framing, cfg.seq_len, cfg.eval_share)
    return RunInputs(cfg, source, mask, tokenizer, framing, corpora, positions, config.seq_len is None, max_shard_bytes, paths)


def _load_routing(folder: Path, source: Checkpoint, pairs: list[Pair]) -> Routing:
    """`--masks DIR`'s routing.json, checked against the model and the directions trained.

    Raises:
        InputError: no routing file, one made for another model layout, or a direction the
            locator did not score.
    """
    path = folder / ROUTING_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {ROUTING_FILE}", hint="make the folder with `neuroloc locate awareness`")
    routing = Routing.load(path)
    layout = layout_digest({n: i.shape for n, i in source.tensors.items()})
    if routing.model_layout != layout:
        raise InputError(f"{path}: made for a model of another layout ({routing.model_layout}, this one is {layout})")
    routing.check_model({n: i.shape for n, i in source.tensors.items()}, str(source.path))
    for pair in pairs:
        if pair.name not in routing.directions:
            raise InputError(f"{path}: has no routing for direction {pair.name}", hint=f"its directions: {', '.join(routing.directions)}")
    return routing


def _load_mask(path: Path, source: Checkpoint) -> Mask:
    """The mask file, refused (naming it) when its tensors or shapes are not the checkpoint's."""
    mask = Mask.load(path)
    shapes = {n: i.shape for n, i in source.tensors.items()}
    try:
        mask.check_shapes(shapes, str(source.path))
    except InputError as e:
        raise InputError(f"{path}: {e.message}", hint=e.hint) from None
    return mask
