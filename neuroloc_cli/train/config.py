"""The training recipe: YAML whose keys are the `neuroloc train` flags, validated once.

    model: ./base                      # = MODEL
    data:                              # = --data (repeatable), PATH or PATH:WEIGHT
      - {path: ./math.jsonl, weight: 0.7}
      - ./general.txt                  # weight omitted: proportional to its token count
    output: ./math-cpt                 # = -o
    train_mask: ./n_a_union_n_l0.mask  # = --train-mask
    lr: 5.0e-5                         # = --lr, and so on for every flag

Flags given on the command line override the recipe's keys. Paths in a recipe are relative
to the recipe's folder; paths on the command line to the current folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from neuroloc_cli.config_models import Frozen, describe_error, load_yaml
from neuroloc_cli.errors import RecipeError, UsageError
from neuroloc_cli.io.format import DtypeName

_PATH_KEYS = ("model", "output", "train_mask", "freeze_mask", "run_dir", "log", "masks")
_ARGUMENTS = ("model",)  # command-line arguments, not flags


class DataSource(Frozen):
    """One corpus of the mixture: a .txt or .jsonl file, or a folder of them."""

    path: str
    weight: float | None = Field(default=None, gt=0)
    """Sampling weight; None = in proportion to the corpus's token count."""
    field: str = "text"
    """The JSONL field holding the text."""


class TrainConfig(Frozen):
    """A validated training run: every key is also a flag of `neuroloc train`."""

    model: str
    method: Literal["cpt", "landermt"] = "cpt"
    """cpt: continual pretraining on corpora (`data`); landermt: selective finetuning of
    LANDeRMT's neurons with routing on translation pairs (`pairs`, `masks`)."""
    data: list[DataSource] = Field(default_factory=list)
    pair: list[str] = Field(default_factory=list)
    """landermt: `SRC-TGT=PATH`, one jsonl of {"source", "target"} per direction."""
    masks: str | None = None
    """landermt: the folder `neuroloc locate awareness` wrote (its routing.json)."""
    template: str = "flan-following"
    """landermt: the instruction template around each source sentence (see runtime.prompts)."""
    full_finetune: bool = False
    """landermt: the baseline, on the same data and templates: every parameter trains, no routing."""
    output: str | None = None
    train_mask: str | None = None
    freeze_mask: str | None = None
    trainable: list[str] = Field(default_factory=list)

    max_steps: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(default=1.0, ge=0)
    grad_accum: int = Field(default=1, gt=0)
    batch_size: int = Field(default=8, gt=0)
    seq_len: int | None = Field(default=None, gt=1)
    """Tokens per row (packed or padded); None: the smaller of DEFAULT_SEQ_LEN and the model's positions
    (chosen by `inputs.check_inputs` before anything reads it)."""
    seed: int = 0
    packing: Literal["packed", "padded"] = "packed"
    """packed: documents joined and cut into rows, no padding; padded: one document per row,
    padding left out of the loss (see `neuroloc_cli.runtime.data`)."""
    txt_docs: Literal["paragraph", "line"] = "paragraph"
    """Where a .txt document ends: at a blank line, or at every line."""

    eval_share: float = Field(default=0.05, ge=0, lt=1)
    eval_every: int | None = Field(default=None, gt=0)
    save_every: int | None = Field(default=None, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    run_dir: str | None = None
    """Periodic checkpoints and the live JSONL log, kept; default a hidden `.OUTPUT.neuroloc-run`
    beside the output, removed once the run completes (see `keep_state`)."""
    keep_state: bool = False
    """Keep the default run folder after a successful run."""
    resume: bool = False
    log: str | None = None
    out_dtype: DtypeName | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False

    @field_validator("data", mode="before")
    @classmethod
    def _data_forms(cls, v: Any) -> Any:
        # A bare string is the short form `PATH` or `PATH:WEIGHT`, as on the command line.
        if isinstance(v, (str, dict)):
            v = [v]
        return [parse_data_spec(x) if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, v: Any) -> Any:
        # LANDeRMT's defaults (the paper: batch 8, gradient accumulation 10), unless given
        if isinstance(v, dict) and v.get("method") == "landermt" and v.get("grad_accum") is None:
            v = {**v, "grad_accum": 10}
        return v

    @model_validator(mode="after")
    def _method(self) -> TrainConfig:
        if self.method == "cpt":
            if not self.data:
                raise ValueError("no training data: give --data (a corpus), or --method landermt with --pair")
            for key in ("pair", "masks", "full_finetune"):
                if getattr(self, key):
                    raise ValueError(f"--{key.replace('_', '-')} applies to --method landermt only")
            if "template" in self.model_fields_set:
                raise ValueError("--template applies to --method landermt only")
            return self
        for key in ("packing", "txt_docs"):
            if key in self.model_fields_set:
                raise ValueError(
                    f"--{key.replace('_', '-')} applies to --method cpt only (translation pairs are one padded example per row)"
                )
        if self.data:
            raise ValueError("--method landermt trains on --pair SRC-TGT=PATH translation data, not --data")
        if not self.pair:
            raise ValueError("--method landermt needs at least one --pair SRC-TGT=PATH")
        if self.train_mask or self.freeze_mask or self.trainable:
            raise ValueError(
                "--method landermt trains the neurons of --masks (or everything with --full-finetune), not --train-mask/--freeze-mask/--trainable"
            )
        if not self.full_finetune and not self.masks:
            raise ValueError("--method landermt needs --masks DIR (from `neuroloc locate awareness`), or --full-finetune for the baseline")
        return self

    @model_validator(mode="after")
    def _masks(self) -> TrainConfig:
        if self.train_mask and self.freeze_mask:
            raise ValueError("train_mask and freeze_mask cannot be combined (train only a mask, or everything but one)")
        return self

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> TrainConfig:
        # An omitted weight means "in proportion to the token count", a scale that explicit
        # weights such as 0.5 cannot be compared with: mixing them would starve a corpus.
        given = [d.weight is not None for d in self.data]
        if any(given) and not all(given):
            missing = next(d.path for d in self.data if d.weight is None)
            raise ValueError(f"give a weight to every corpus or to none ({missing} has none; e.g. {missing}:0.5)")
        return self

    @property
    def mask_path(self) -> str | None:
        """The mask file of the run, whichever its role."""
        return self.train_mask or self.freeze_mask

    @property
    def mask_role(self) -> Literal["train", "freeze"] | None:
        """What the mask selects: the units that train, or those kept frozen."""
        return "train" if self.train_mask else "freeze" if self.freeze_mask else None

    def hyper_parameters(self) -> dict[str, Any]:
        """The settings that define the optimisation; a resumed run must match them exactly."""
        keys = (
            "method",
            "full_finetune",
            "template",
            "trainable",
            "max_steps",
            "max_tokens",
            "lr",
            "weight_decay",
            "adam_betas",
            "warmup",
            "schedule",
            "grad_clip",
            "grad_accum",
            "batch_size",
            "seq_len",
            "seed",
            "eval_share",
        )
        return {k: getattr(self, k) for k in keys}


def parse_data_spec(spec: str) -> dict[str, Any]:
    """`PATH` or `PATH:WEIGHT` (the weight is what follows the last colon, if it is a number)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return {"path": head, "weight": float(tail)}
        except ValueError:
            pass
    return {"path": spec}


def build_config(recipe: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge a YAML recipe (if any) with command-line values and validate them together.

    Args:
        recipe: the YAML file, or None.
        overrides: flag values the user gave (None values are ignored).

    Returns:
        The validated configuration, every path made absolute or cwd-relative.

    Raises:
        UsageError: a flag's value is wrong (naming the flag; the first such flag).
        RecipeError: unreadable YAML, unknown keys, wrong values — every problem at once.
    """
    source = str(recipe) if recipe else "command line"
    doc: dict[str, Any] = {}
    if recipe is not None:
        doc = _read_yaml(recipe)
        _rebase_paths(doc, recipe.resolve().parent)
    flags = {k: v for k, v in overrides.items() if v is not None and v != [] and v != ()}
    doc.update(flags)
    try:
        return TrainConfig.model_validate(doc)
    except ValidationError as e:
        errors = e.errors()
    for err in errors:  # a value typed on the command line is named as it was typed
        if err["loc"] and err["loc"][0] in flags and err["loc"][0] not in _ARGUMENTS:
            raise UsageError(_describe_flag(err, flags[err["loc"][0]])) from None
    raise RecipeError(source, [describe_error(err, TrainConfig) for err in errors]) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = load_yaml(path.read_text())
    except OSError as e:
        raise RecipeError(str(path), [f"cannot read ({e.strerror})"]) from None
    except ValueError as e:
        raise RecipeError(str(path), [str(e)]) from None
    if not isinstance(doc, dict):
        raise RecipeError(str(path), ["a training recipe is a mapping with at least 'model' and 'data'"])
    return doc


def _rebase_paths(doc: dict[str, Any], root: Path) -> None:
    """Make a recipe's relative paths relative to its own folder."""
    for key in _PATH_KEYS:
        if isinstance(doc.get(key), str):
            doc[key] = str(root / Path(doc[key]).expanduser())
    data = doc.get("data")
    items = data if isinstance(data, list) else [data]
    rebased = []
    for item in items:
        if isinstance(item, str):
            item = parse_data_spec(item)
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            item = {**item, "path": str(root / Path(item["path"]).expanduser())}
        rebased.append(item)
    if data is not None:
        doc["data"] = rebased
    pairs = doc.get("pair")
    if isinstance(pairs, list):  # SRC-TGT=PATH: the path is relative to the recipe too
        doc["pair"] = [_rebase_pair(p, root) for p in pairs]


def _rebase_pair(spec: Any, root: Path) -> Any:
    if not isinstance(spec, str) or "=" not in spec:
        return spec
    direction, _, path = spec.partition("=")
    return f"{direction}={root / Path(path).expanduser()}"


def _describe_flag(err: Any, value: Any) -> str:
    """'--lr -1.0: Input should be greater than 0': the flag, and its value as given."""
    key, *inner = (str(p) for p in err["loc"])
    if isinstance(value, list) and inner and inner[0].isdigit():  # one value of a repeated flag (--data)
        value, inner = value[int(inner[0])], inner[1:]
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    where = f" {'.'.join(inner)}:" if inner else ""
    return f"--{key.replace('_', '-')} {shown}:{where} {err['msg'].removeprefix('Value error, ')}"
