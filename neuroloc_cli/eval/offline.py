"""Offline by default: no download is tried, and a missing dataset is one clear error.

Many clusters (and this project's CI) cannot reach the Hugging Face Hub. Without offline
mode, `datasets` and `huggingface_hub` retry network calls for minutes before failing with a
long traceback. With `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` set they fail at once, and
datasets already in the local cache still load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from neuroloc_cli.errors import InputError

_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

LOCAL_DATA_HINT = (
    "nothing is downloaded by default; point at local data instead: a shipped task with your "
    "file (--tasks neuroloc_math=FILE.jsonl, neuroloc_choice=FILE.jsonl), or --include-path DIR "
    "holding a task YAML with 'dataset_path: json' and 'dataset_kwargs: {data_files: {test: FILE}}'; "
    "or fill the datasets cache (HF_DATASETS_CACHE) where there is network, or pass --online"
)


@contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """Set the Hub's offline switches for the duration of the block, then restore them.

    The environment variables are read when `huggingface_hub` and `datasets` are imported;
    when they were imported earlier (transformers imports the Hub client), their module
    constants are switched as well.
    """
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _ENV}
    saved_attrs = []
    for k in _ENV:
        os.environ[k] = "1"
    for module, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for attr in attrs:
            if mod is not None and hasattr(mod, attr):
                saved_attrs.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, attr, value in saved_attrs:
            setattr(mod, attr, value)


def is_missing_dataset(exc: BaseException) -> bool:
    """Whether `exc` means "this dataset is not here and may not be downloaded"."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    markers = {
        "ConnectionError",
        "OfflineModeIsEnabled",
        "DatasetNotFoundError",
        "LocalEntryNotFoundError",
        "HfHubHTTPError",
        "EmptyDatasetError",
    }
    return bool(names & markers) or isinstance(exc, FileNotFoundError)


def missing_dataset_error(task: str, exc: BaseException, online: bool) -> InputError:
    """The one-line error for a task whose dataset cannot be loaded."""
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    where = "is not available offline" if not online else "could not be loaded"
    return InputError(f"task {task!r}: its dataset {where} ({reason})", hint=LOCAL_DATA_HINT)
