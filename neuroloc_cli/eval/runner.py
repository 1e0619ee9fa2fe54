"""Evaluate one or more checkpoints: every model is loaded once, as one lm-eval `HFLM`
(`lm.NeurolocLM`), and serves the lm-eval tasks, the perplexity tasks and the translations."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.eval.context import DEFAULT_GEN_TOKS, check_max_gen_toks, fitting_gen_toks
from neuroloc_cli.eval.harness import HarnessSettings, LoadedTasks, fit_generation, load_tasks, run_tasks, task_manager
from neuroloc_cli.eval.offline import offline_mode
from neuroloc_cli.eval.perplexity import evaluate as evaluate_perplexity
from neuroloc_cli.eval.quiet import library_output
from neuroloc_cli.eval.results import EvalResult, ModelArtifacts, ModelResult
from neuroloc_cli.eval.specs import TaskRequest
from neuroloc_cli.eval.task_names import check_task_names
from neuroloc_cli.eval.translate import TranslationSettings, check_settings, resolve_template, translate
from neuroloc_cli.io.checkpoint import check_tokenizer_files, model_positions
from neuroloc_cli.io.format import DTYPE_NAMES

DTYPES = ("auto", *DTYPE_NAMES)  # "auto": as stored


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
        batch_size: log-likelihood requests per forward pass (generation runs one request at a time).
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
    """Load a checkpoint once as a `NeurolocLM`, lm-eval's `HFLM` with its corrections (tests
    replace this with a fake LM). The model is loaded the one way every command loads one
    (`runtime.model.load_model`) and handed to lm-eval built.

    Raises:
        InputError: transformers cannot load the folder as a causal language model, or its
            tokenizer.
    """
    import torch

    from neuroloc_cli.eval.lm import NeurolocLM
    from neuroloc_cli.runtime.data import load_tokenizer
    from neuroloc_cli.runtime.model import load_model
    from neuroloc_cli.runtime.routing import refuse_routed

    refuse_routed(path)
    model = load_model(path, device=device, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    model.eval()
    tokenizer = load_tokenizer(path)
    try:
        return NeurolocLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: cannot be evaluated as a causal language model ({' '.join(str(e).split())[:300]})") from None


def evaluate(
    request: EvalRequest, on_model: Callable[[str], None] | None = None, verbose: bool = False
) -> tuple[EvalResult, list[ModelArtifacts]]:
    """Evaluate every model of `request`; see `EvalRequest`.

    Args:
        on_model: called with each model's label before it loads (progress).
        verbose: let lm-eval, transformers and datasets write their logs and progress bars to
            stderr (by default they are silenced, see `quiet.library_output`).

    Returns:
        The result object and, per model, what `--output` saves.

    Raises:
        UsageError: nothing to evaluate, a CUDA device that is not there, an unknown task, a
            --max-gen-toks that a model cannot hold, a task YAML of the user's that is wrong.
        InputError: a checkpoint or data file is missing or invalid, a dataset is not available offline.
    """
    models, records = check_request(request)
    results, artifacts = [], []
    with offline_mode(not request.online):
        with library_output(verbose):
            manager = task_manager(request.tasks, request.include_paths) if request.tasks.uses_lm_eval else None
        for model in models:
            with library_output(verbose):
                # Tasks first: a dataset that cannot be loaded fails before a big model loads.
                tasks = load_tasks(manager, request.tasks, request.include_paths, request.online) if manager else LoadedTasks()
            if on_model:
                on_model(model.label)
            with library_output(verbose):
                result, art = _evaluate_model(model, tasks, manager, records, request)
            results.append(result)
            artifacts.append(art)
            gc.collect()  # the model's weights, before the next model loads
    return EvalResult(models=results, config=_config(request), seeds=dict(request.harness.seeds), versions=versions()), artifacts


@dataclass(frozen=True)
class ModelToEvaluate:
    """A checkpoint folder, checked: its label in the results, fingerprint and positions."""

    path: Path
    label: str
    fingerprint: str
    positions: int | None


def check_request(request: EvalRequest) -> tuple[list[ModelToEvaluate], list[dict[str, Any]] | None]:
    """Check all that can be checked before lm-eval is imported or a model loads, so that a
    mistake is reported at once, as the first line on stderr.

    Returns:
        The models, and the translation records (None without --translate).

    Raises:
        UsageError / InputError: as `evaluate`, except what only loading can tell.
    """
    if not request.tasks.names and request.translation is None:
        raise UsageError("nothing to evaluate", hint="pass --tasks, --ppl or --translate")
    _check_device(request.device)
    if request.dtype not in DTYPES:
        raise UsageError(f"--dtype {request.dtype!r}: use one of {', '.join(DTYPES)}")
    check_task_names(request.tasks.named, request.include_paths)
    records = check_settings(request.translation) if request.translation else None
    models = [_open_model(path, label) for path, label in zip(request.models, _labels(request.models))]
    asked = {request.harness.max_gen_toks, request.translation.max_gen_toks if request.translation else None}
    for model in models:
        for max_gen_toks in asked:
            check_max_gen_toks(max_gen_toks, model.path, model.positions)
    return models, records


def _open_model(path: Path, label: str) -> ModelToEvaluate:
    from neuroloc_cli.io.checkpoint import Checkpoint

    with Checkpoint.open(path, spec=str(path)) as checkpoint:
        model = ModelToEvaluate(path, label, checkpoint.fingerprint, model_positions(checkpoint.config))
    check_tokenizer_files(path)
    return model


def _evaluate_model(
    model: ModelToEvaluate, tasks: LoadedTasks, manager, records: list[dict[str, Any]] | None, request: EvalRequest
) -> tuple[ModelResult, ModelArtifacts]:
    """Load one model and run its tasks and translations on it."""
    lm = load_lm(model.path, request.device, request.dtype, request.batch_size)
    result = ModelResult(model.label, str(model.path.resolve()), model.fingerprint, positions=model.positions)
    art = ModelArtifacts()
    fit = fitting_gen_toks(model.positions)
    if tasks.top:
        result.max_gen_toks, result.capped = fit_generation(tasks.leaves, request.harness, fit)
        out = run_tasks(lm, tasks.top, manager, request.harness)
        result.tasks.update(out.metrics)
        result.n_samples.update(out.n_samples)
        result.n_shot.update(out.n_shot)
        art.samples = out.samples
    for task in request.tasks.perplexity:
        scored = evaluate_perplexity(lm, task, request.harness.limit)
        result.tasks[task.name] = scored.metrics
        result.n_samples[task.name] = len(scored.samples)
        art.samples[task.name] = scored.samples
    if request.translation and records is not None:
        t = request.translation
        gen = t.max_gen_toks or min(DEFAULT_GEN_TOKS, fit or DEFAULT_GEN_TOKS)
        result.max_gen_toks[t.task_name] = gen
        if gen < DEFAULT_GEN_TOKS and not t.max_gen_toks:
            result.capped[t.task_name] = DEFAULT_GEN_TOKS
        tr = translate(lm, records, t, gen)
        result.tasks[t.task_name] = tr.metrics
        result.n_samples[t.task_name] = len(records)
        art.hypotheses = tr.hypotheses
        art.translations = [{**r, "prompt": p, "hypothesis": h} for r, p, h in zip(tr.records, tr.prompts, tr.hypotheses)]
    return result, art


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
        "tasks": {t.name: {"shape": t.shape, "data": str(t.data), "options": t.options} for t in r.tasks.local}
        | {n: {"lm_eval": n} for n in r.tasks.named},
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
            "data": str(t.data.resolve()),
            "src": t.src,
            "tgt": t.tgt,
            "template": resolve_template(t.template),
            "max_gen_toks": t.max_gen_toks,
            "decoding": "greedy",
            "bleu_tokenize": t.tokenize,
            "bleu_smooth": t.bleu_smooth,
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


def _labels(paths: list[Path]) -> list[str]:
    names = [p.resolve().name or "model" for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}-{n}" for i, n in enumerate(names, 1)]
