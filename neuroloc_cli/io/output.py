"""Output folders that appear atomically, and the files copied beside the weights.

Everything is written into a hidden temporary folder beside the target and renamed into
place at the very end, so an error, Ctrl-C or `kill -9` leaves nothing at the target path.
A killed run leaves its `.NAME.neuroloc-tmp-HOST-PID-*` folder beside it; the next run for
that target on the same machine deletes the ones whose process is gone.

The renames that put an output in place are one step that Ctrl-C and SIGTERM cannot split,
and each output put in place is noted (see `neuroloc_cli.io.commit`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from neuroloc_cli.errors import WRITE_ERRNOS, OutputError
from neuroloc_cli.io.checkpoint import KIND_KEY, PROVENANCE_FILE, Kind
from neuroloc_cli.io.commit import note_written, signals_held
from neuroloc_cli.io.writer import DEFAULT_MAX_SHARD_BYTES, OutTensor, ShardedWriter

# Files of a HF checkpoint that are not weights and that a merged model needs to load.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)

# The side files that belong to the tokenizer (taken from `tokenizer_source`'s model when a recipe names one).
TOKENIZER_FILES = frozenset(HF_SIDE_FILES) - {"config.json", "generation_config.json"}

# Template files that transformers reads in preference to tokenizer_config.json's field.
_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


def check_output_path(target: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that is, contains or lies inside an input, or that exists already.

    Raises:
        OutputError: naming the input that clashes, or the existing target.
    """
    out = target.resolve()
    for p in inputs:
        inp = p.resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            raise OutputError(f"{target}: output path overlaps input {p}", hint="choose an output folder outside every input")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists", hint="pass --overwrite to replace it, or choose another path")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")


def check_output_file(target: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output file that is one of the inputs (even with `--overwrite`: the input
    is still being read) or lies inside an input folder (inputs stay untouched), is a folder,
    or exists already without `overwrite`.

    Raises:
        OutputError: naming the input that clashes, or the existing target.
    """
    out = target.resolve()
    for p in inputs:
        inp = p.resolve()
        if out == inp:
            raise OutputError(f"{target}: output is also an input", hint="write to another path")
        if inp in out.parents:
            raise OutputError(f"{target}: output lies inside input {p}", hint="write outside every input folder")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder", hint="give a file name")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists", hint="pass --overwrite to replace it, or choose another path")


@contextmanager
def atomic_output_dir(target: Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `target` only if the block succeeds.

    Raises:
        OutputError: see `check_output_path`; the parent folder cannot be created; or the
            block fails to write (a full disk or quota, a read-only folder, any error on a file
            inside the temporary folder). Other errors pass through, the folder removed.
    """
    check_output_path(target, inputs, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = target.parent / f"{_tmp_prefix(target)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{target}: cannot create output folder ({e.strerror})") from None
    try:
        yield tmp
        with signals_held():
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.neuroloc-old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            os.replace(tmp, target)
            note_written(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_error(e, tmp):
            raise
        raise OutputError(f"{target}: cannot write {Path(e.filename).name if e.filename else 'the output'} ({e.strerror or e})") from None
    except BaseException:  # errors, Ctrl-C and SIGTERM (see `cli.app.Terminated`)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_write_error(e: OSError, tmp: Path) -> bool:
    """A full disk or quota, or any failure on a file inside the output's temporary folder."""
    if e.errno in WRITE_ERRNOS:
        return True
    return any(f and tmp in Path(f).parents for f in (e.filename, e.filename2))


@contextmanager
def atomic_file(target: Path, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside `target` that is renamed to `target` only if the block
    succeeds; on any error, Ctrl-C or SIGTERM it is removed.

    Raises:
        OutputError: the file cannot be written (a full disk, a read-only folder), naming
            `target` and saying it is a `what`.
    """
    tmp = target.parent / f"{_tmp_prefix(target)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with signals_held():
            os.replace(tmp, target)
            note_written(target)
    except OSError as e:
        raise OutputError(f"{target}: cannot write {what} ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):  # absent, or on a read-only file system
            tmp.unlink()


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.neuroloc-tmp-"


def _remove_stale(target: Path) -> None:
    """Delete the temporary folders for `target` left by killed runs on this machine: those
    named with this host and the id of a process that no longer exists (POSIX only; a
    folder of a live process, of another host or of another form is left alone)."""
    if os.name != "posix":
        return
    prefix, host = _tmp_prefix(target), socket.gethostname()
    for folder in target.parent.glob(glob.escape(prefix) + "*"):
        named_host, _, rest = folder.name[len(prefix) :].rpartition("-")[0].rpartition("-")
        if named_host == host and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


@contextmanager
def checkpoint_output(
    out_dir: Path,
    tensors: Sequence[OutTensor],
    *,
    kind: Kind,
    provenance: dict,
    source: Path,
    inputs: Sequence[Path] = (),
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_dtype: torch.dtype | None = None,
    config_updates: dict | None = None,
    shard_provenance: dict | None = None,
    chat_template: str | None = None,
    tokenizer_dir: Path | None = None,
) -> Iterator[tuple[ShardedWriter, Path]]:
    """Write a Hugging Face checkpoint atomically: yield a `ShardedWriter` laid out for
    `tensors` (and the temporary folder, for extra files); once every tensor is written, add
    `source`'s side files and `neuroloc.json`, and move the folder into place.

    Every shard's metadata records `kind` (a `Kind`), the neuroloc version and
    `shard_provenance` (default: the provenance less its `created` time); `neuroloc.json`
    holds the whole provenance. Shards thus say nothing about when (or, as the caller
    decides, where) a run wrote them: the same inputs and settings give byte-identical shard
    files. See `copy_side_files` for `config_dtype`, `config_updates`, `chat_template` and
    `tokenizer_dir`.

    Raises:
        OutputError: see `atomic_output_dir`.
    """
    from neuroloc_cli import __version__

    metadata = {
        KIND_KEY: kind,
        "neuroloc.version": __version__,
        "neuroloc.provenance": json.dumps(
            shard_provenance if shard_provenance is not None else {k: v for k, v in provenance.items() if k != "created"},
            separators=(",", ":"),
            default=str,
        ),
    }
    with atomic_output_dir(out_dir, inputs, overwrite) as tmp:
        writer = ShardedWriter(tmp, tensors, max_shard_bytes, metadata)
        try:
            yield writer, tmp
        finally:
            writer.abort()
        writer.close()
        copy_side_files(source, tmp, config_dtype, config_updates, chat_template, tokenizer_dir)
        write_provenance(tmp, provenance)


def copy_side_files(
    source: Path,
    dest: Path,
    out_dtype: torch.dtype | None = None,
    config_updates: dict | None = None,
    chat_template: str | None = None,
    tokenizer_dir: Path | None = None,
) -> list[str]:
    """Copy config, tokenizer and generation files from `source` to `dest`.

    Args:
        out_dtype: when all output tensors share one dtype, recorded in config.json so that
            `from_pretrained(..., dtype="auto")` picks it.
        config_updates: keys to set in config.json (e.g. a changed layer count).
        chat_template: Jinja text for `tokenizer_config.json`'s `chat_template` (the file is
            created if `source` has none); `source`'s own template files are then not copied,
            since transformers would prefer them to the field.
        tokenizer_dir: a folder to take the tokenizer files (`TOKENIZER_FILES`) from instead
            of `source` (a merge's `tokenizer_source`).

    Returns:
        The names of the files copied.
    """
    copied = []
    for name in HF_SIDE_FILES:
        if chat_template is not None and name in _TEMPLATE_FILES:
            continue
        src = (tokenizer_dir if tokenizer_dir is not None and name in TOKENIZER_FILES else source) / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    config = dest / "config.json"
    if (out_dtype is not None or config_updates) and config.is_file():
        doc = json.loads(config.read_text())
        if out_dtype is not None:
            for k in [k for k in ("torch_dtype", "dtype") if k in doc] or ["torch_dtype"]:
                doc[k] = str(out_dtype).removeprefix("torch.")
        doc.update(config_updates or {})
        config.write_text(json.dumps(doc, indent=2) + "\n")
    if chat_template is not None:
        tok = dest / "tokenizer_config.json"
        doc = json.loads(tok.read_text()) if tok.is_file() else {}
        doc["chat_template"] = chat_template
        tok.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        if "tokenizer_config.json" not in copied:
            copied.append("tokenizer_config.json")
    return copied


def write_provenance(folder: Path, provenance: dict) -> None:
    """Write `neuroloc.json`: how this output was made (recipe, inputs, version)."""
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
