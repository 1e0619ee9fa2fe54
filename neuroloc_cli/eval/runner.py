"""Evaluate one or more checkpoints: every model is loaded once, as one lm-eval `HFLM`, and
serves the lm-eval tasks, the perplexity tasks and the translations."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.eval.harness import HarnessSettings, load_tasks, run_tasks, task_manager
from neuroloc_cli.eval.offline import offline_mode
from neuroloc_cli.eval.results import EvalResult, ModelArtifacts, ModelResult
from neuroloc_cli.eval.specs import TaskRequest
from neuroloc_cli.eval.translate import TranslationSettings, check_settings, resolve_template, translate

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EvalRequest:
    """Everything `neuroloc eval` was asked to do.

    Attributes:
        models: checkpoint folders.
        tasks: lm-eval tasks and perplexity files (see `specs.parse_tasks`).
        include_paths: extra folders of lm-eval task YAMLs.
        translation: the translation test, if any.
        harness: lm-eval settings (limit, few-shot, generation length, seeds).
        device: "cpu" or "cuda" (or "cuda:N").
        dtype: weights' dtype when loaded ("auto": as stored).
        batch_size: requests per forward pass (lm-eval's and the translations').
        online: allow downloads of datasets (off by default).
    """

    models: list[Path]
    tasks: TaskRequest = field(default_factory=TaskRequest)
    include_paths: list[Path] = field(default_factory=list)
    translation: TranslationSettings | None = None
    harness: HarnessSettings = field(default_factory=HarnessSettings)
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 8
    online: bool = False


def load_lm(path: Path, device: str, dtype: str, batch_size: int):
    """Load a checkpoint once as an lm-eval `HFLM` (tests replace this with a fake LM).

    Raises:
        InputError: transformers cannot load the folder as a causal language model.
    """
    from lm_eval.models.huggingface import HFLM

    try:
        return HFLM(pretrained=str(path), device=device, dtype=dtype, batch_size=batch_size)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: cannot be loaded as a causal language model ({' '.join(str(e).split())[:300]})") from None


def evaluate(request: EvalRequest, on_model: Callable[[str], None] | None = None) -> tuple[EvalResult, list[ModelArtifacts]]:
    """Evaluate every model of `request`; see `EvalRequest`.

    Args:
        on_model: called with each model's label before it loads (progress).

    Returns:
        The result object and, per model, what `--output` saves.

    Raises:
        UsageError: nothing to evaluate, a CUDA device that is not there, an unknown task.
        InputError: a checkpoint or data file is missing or invalid, a dataset is not available offline.
    """
    if not request.tasks.names and request.translation is None:
        raise UsageError("nothing to evaluate", hint="pass --tasks, --ppl or --translate")
    _check_device(request.device)
    if request.dtype not in DTYPES:
        raise UsageError(f"--dtype {request.dtype!r}: use one of {', '.join(DTYPES)}")
    fingerprints = [_fingerprint(p) for p in request.models]
    labels = _labels(request.models)
    records = check_settings(request.translation) if request.translation else None
    results, artifacts = [], []
    with offline_mode(not request.online):
        _quiet_libraries()
        manager = task_manager(request.tasks, request.include_paths) if request.tasks.names else None
        for path, label, fingerprint in zip(request.models, labels, fingerprints):
            # Tasks first: a dataset that cannot be loaded fails before a big model loads.
            tasks = load_tasks(manager, request.tasks, request.online) if manager else []
            if on_model:
                on_model(label)
            lm = load_lm(path, request.device, request.dtype, request.batch_size)
            model, art = ModelResult(label, str(path.resolve()), fingerprint), ModelArtifacts()
            if tasks:
                out = run_tasks(lm, tasks, manager, request.harness)
                model.tasks.update(out.metrics)
                model.n_samples.update(out.n_samples)
                model.n_shot.update(out.n_shot)
                art.samples = out.samples
            if request.translation and records is not None:
                tr = translate(lm, records, request.translation)
                model.tasks[request.translation.task_name] = tr.metrics
                model.n_samples[request.translation.task_name] = len(records)
                art.hypotheses = tr.hypotheses
                art.translations = [{**r, "prompt": p, "hypothesis": h} for r, p, h in zip(tr.records, tr.prompts, tr.hypotheses)]
            results.append(model)
            artifacts.append(art)
            del lm
            gc.collect()
    return EvalResult(models=results, config=_config(request), seeds=dict(request.harness.seeds), versions=versions()), artifacts


def versions() -> dict[str, str]:
    """Versions of the libraries that make the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    from neuroloc_cli import __version__

    out = {"neuroloc": __version__}
    for dist in ("lm_eval", "sacrebleu", "transformers", "torch", "datasets"):
        try:
            out[dist] = version(dist.replace("_", "-"))
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _config(r: EvalRequest) -> dict[str, Any]:
    h = r.harness
    doc: dict[str, Any] = {
        "tasks": {t.name: {"shape": t.shape, "data": str(t.data)} for t in r.tasks.local} | {n: {"lm_eval": n} for n in r.tasks.named},
        "include_paths": [str(p) for p in r.include_paths],
        "device": r.device,
        "dtype": r.dtype,
        "batch_size": r.batch_size,
        "limit": h.limit,
        "num_fewshot": h.num_fewshot,
        "max_gen_toks": h.max_gen_toks,
        "bootstrap_iters": h.bootstrap_iters,
        "online": r.online,
    }
    if r.translation:
        t = r.translation
        doc["translation"] = {
            "data": str(t.data.resolve()), "src": t.src, "tgt": t.tgt, "template": resolve_template(t.template),
            "max_gen_toks": t.max_gen_toks, "decoding": "greedy", "bleu_tokenize": t.tokenize, "bleu_smooth": t.bleu_smooth,
        }
    return doc


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available", hint="use --device cpu")
        return
    raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N")


def _fingerprint(path: Path) -> str:
    from neuroloc_cli.io.checkpoint import Checkpoint

    return Checkpoint.open(path, spec=str(path)).fingerprint


def _labels(paths: list[Path]) -> list[str]:
    names = [p.resolve().name or "model" for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}-{n}" for i, n in enumerate(names, 1)]


def _quiet_libraries() -> None:
    # lm-eval logs every setting at INFO; datasets draws a bar per file. Keep stderr readable.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
