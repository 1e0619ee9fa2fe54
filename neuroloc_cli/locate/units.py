"""Which slices of which tensors form one unit ("neuron") at each granularity.

- row: one output unit of a linear layer: row `j` of a `[out, in]` weight plus bias entry
  `j`; GPT-2's `Conv1D` weights are stored `[in, out]`, so their output units are axis 1.
- ffn: one intermediate unit `i` of an MLP: row `i` of gate/up (column `i` of a Conv1D up
  projection), bias entry `i` of the up projection, and column `i` of down (row `i` of a
  Conv1D down projection).

Which tensors take part is a `NameFilter` (the `--include` / `--exclude` globs). By default,
rows are taken from every 2-D floating weight, the embedding and LM head included: their rows
are tokens rather than neurons, but a short continual pretraining on a new ability moves the
rows of the tokens it uses most, and in MAET experiments on a small model a selection
without them moved the ability far less (0.26 accuracy against 0.85 with them). FFN neurons
and elements are taken inside the transformer blocks only (`layers.N.`, `h.N.`): MLPs live
there, and linguistic regions scores the blocks alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from neuroloc_cli.arch import CONV1D_KINDS, NameFilter, in_blocks, layer_index, tensor_kind
from neuroloc_cli.errors import InputError
from neuroloc_cli.io.format import TensorInfo

# MLP module names per family: (up-side modules, down module). Up-side rows (Linear) or
# columns (Conv1D) are the FFN neurons; the down module's columns (Linear) or rows (Conv1D).
MLP_LAYOUTS = (
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, Mistral, Qwen2, Gemma
    (("mlp.c_fc",), "mlp.c_proj"),  # GPT-2 (Conv1D)
    (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),  # GPT-NeoX, BLOOM
    (("mlp.fc1",), "mlp.fc2"),  # Phi, OPT-style
    (("mlp.fc_in",), "mlp.fc_out"),  # GPT-J
)


@dataclass(frozen=True)
class Part:
    """A tensor whose slices along `axis` belong to the units of a group."""

    name: str
    axis: int


@dataclass(frozen=True)
class UnitGroup:
    """`size` units, each made of slice `j` along `axis` of every part."""

    key: str
    size: int
    parts: tuple[Part, ...]


def output_axis(name: str) -> int:
    """The axis of a weight's output units: 1 for Conv1D weights, else 0."""
    return 1 if tensor_kind(name) in CONV1D_KINDS else 0


def every_tensor(name: str) -> bool:
    """The default of row selection: every 2-D floating weight, token rows included."""
    return True


# The selections without --include / --exclude.
ROW_DEFAULT = NameFilter(default=every_tensor)
BLOCKS = NameFilter(default=in_blocks)


def row_groups(shapes: Mapping[str, Sequence[int]], keep: NameFilter = ROW_DEFAULT) -> list[UnitGroup]:
    """One group per weight of ≥ 2 dimensions that `keep` accepts, with its bias.

    Args:
        shapes: the floating tensors that can take part (name -> shape), e.g. `floating(ckpt.tensors)`.
    """
    groups = []
    for name, shape in shapes.items():
        if not keep(name) or len(shape) < 2:
            continue
        axis = output_axis(name)
        size = shape[axis]
        parts = [Part(name, axis)]
        bias = name.removesuffix(".weight") + ".bias" if name.endswith(".weight") else None
        if bias in shapes and tuple(shapes[bias]) == (size,):
            parts.append(Part(bias, 0))
        groups.append(UnitGroup(name, size, tuple(parts)))
    return groups


def ffn_groups(shapes: Mapping[str, Sequence[int]], source: str, keep: NameFilter = BLOCKS) -> list[UnitGroup]:
    """One group per MLP block whose tensors `keep` accepts: its intermediate units.

    Args:
        shapes: the floating tensors that can take part (name -> shape).
        source: the checkpoint or file they come from, for messages.

    Raises:
        InputError: no MLP of a known layout, or its tensors disagree on the unit count.
    """
    groups = []
    for prefix in sorted({n[: -len(tensor_kind(n))] for n in shapes if layer_index(n) is not None}, key=layer_index):
        for ups, down in MLP_LAYOUTS:
            names = [f"{prefix}{m}.weight" for m in ups]
            if not all(n in shapes and keep(n) for n in [*names, f"{prefix}{down}.weight"]):
                continue
            parts = [Part(n, output_axis(n)) for n in names]
            parts += [Part(f"{prefix}{m}.bias", 0) for m in ups if f"{prefix}{m}.bias" in shapes]
            down_w = f"{prefix}{down}.weight"
            parts.append(Part(down_w, 1 - output_axis(down_w)))
            sizes = {shapes[p.name][p.axis] for p in parts}
            if len(sizes) != 1:
                raise InputError(f"{source}: MLP tensors of {prefix.rstrip('.')} disagree on the intermediate size ({sorted(sizes)})")
            groups.append(UnitGroup(f"{prefix}mlp", sizes.pop(), tuple(parts)))
            break
    if not groups:
        known = ", ".join(f"{'/'.join(u)} + {d}" for u, d in MLP_LAYOUTS)
        raise InputError(f"{source}: no MLP tensors of a known layout for ffn granularity", hint=f"known: {known}; use --granularity row")
    return groups


def element_tensors(shapes: Mapping[str, Sequence[int]], keep: NameFilter = BLOCKS) -> list[str]:
    """Every tensor of `shapes` that `keep` accepts (by default the blocks, norms included, as
    linguistic regions does)."""
    return [n for n in shapes if keep(n)]


def floating(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a checkpoint's floating tensors: the ones that can be units."""
    return {n: i.shape for n, i in tensors.items() if i.torch_dtype.is_floating_point}
