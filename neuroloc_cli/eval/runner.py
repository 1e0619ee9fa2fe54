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


def build_request(
    models: list[Path],
    *,
    tasks: str | None = None,
    task_option: list[str] | None = None,
    include_path: list[Path] | None = None,
    ppl: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    translate: Path | None = None,
    src: str | None = None,
    tgt: str | None = None,
    template: str = "flan-following",
    bleu_tokenize: str | None = None,
    bleu_smooth: str = "none",
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    seed: int | None = None,
    bootstrap_iters: int = 100000,
    online: bool = False,
) -> EvalRequest:
    """An `EvalRequest` from `neuroloc eval`'s options, named as its flags (`--task-option` is
    `task_option`); `neuroloc sweep --eval KEY=VALUE` takes the same keys.

    Raises:
        UsageError: --translate without --src and --tgt; a task or option that does not parse.
    """
    from neuroloc_cli.eval.harness import DEFAULT_SEEDS
    from neuroloc_cli.eval.specs import parse_tasks

    translation = None
    if translate is not None:
        if not src or not tgt:
            raise UsageError("--translate needs --src and --tgt language codes")
        translation = TranslationSettings(translate, src, tgt, template, max_gen_toks, bleu_tokenize, bleu_smooth, limit)
    seeds = dict.fromkeys(DEFAULT_SEEDS, seed) if seed is not None else dict(DEFAULT_SEEDS)
    return EvalRequest(
        models=list(models),
        tasks=parse_tasks(tasks, ppl, task_option or []),
        include_paths=list(include_path or []),
        translation=translation,
        harness=HarnessSettings(limit, num_fewshot, max_gen_toks, bootstrap_iters, seeds),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        online=online,
    )


def load_lm(path: Path, device: str, dtype: str, batch_size: int):
    """Load a checkpoint once as a `NeurolocLM`, lm-eval's `HFLM` with its corrections (tests
    replace this with a fake LM). The model is loaded the one way every command loads one
    (`runtime.model.load_model`) and handed to lm-eval built.

    Raises:
        InputError: transformers cannot load the folder as a causal language model, or its
            tokenizer.
    """
    import torch

    from neuroloc_cli.runtime.model import load_model
    from neuroloc_cli.runtime.routing import refuse_routed

    refuse_routed(path)
    model = load_model(path, device=device, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return wrap_model(model, path, batch_size)


def wrap_model(model, tokenizer_folder: Path, batch_size: int):
    """A built causal LM (in memory: `neuroloc sweep`'s merged model) as a `NeurolocLM`, with
    the tokenizer of `tokenizer_folder`.

    Raises:
        InputError: lm-eval cannot use the model or its tokenizer.
    """
    from neuroloc_cli.eval.lm import NeurolocLM
    from neuroloc_cli.runtime.data import load_tokenizer

    model.eval()
    tokenizer = load_tokenizer(tokenizer_folder)
    try:
        return NeurolocLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{tokenizer_folder}: cannot be evaluated as a causal language model ({' '.join(str(e).split())[:300]})") from None


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
    evaluator = Evaluator(request, verbose)
    results, artifacts = [], []
    for model in evaluator.models:
        result, art = evaluator.score(model, on_model=on_model)
        results.append(result)
        artifacts.append(art)
        gc.collect()  # the model's weights, before the next model loads
    return evaluator.result(results), artifacts


class Evaluator:
    """`evaluate`, one model at a time: the request checked and the task index built once,
    then `score` per model, loaded from its folder or handed in built (`neuroloc sweep`
    scores a merged model in memory this way, with the numbers `eval` gives its folder).

    Raises (on construction): as `check_request`.
    """

    def __init__(self, request: EvalRequest, verbose: bool = False):
        self.request, self.verbose = request, verbose
        self.models, self._records = check_request(request)
        with offline_mode(not request.online), library_output(verbose):
            self._manager = task_manager(request.tasks, request.include_paths) if request.tasks.uses_lm_eval else None

    def score(self, model: ModelToEvaluate, lm=None, on_model: Callable[[str], None] | None = None) -> tuple[ModelResult, ModelArtifacts]:
        """Evaluate one model: `lm` if given (a `NeurolocLM`, see `wrap_model`), else its folder loaded."""
        request = self.request
        with offline_mode(not request.online):
            with library_output(self.verbose):
                # Tasks first: a dataset that cannot be loaded fails before a big model loads.
                tasks = load_tasks(self._manager, request.tasks, request.include_paths, request.online) if self._manager else LoadedTasks()
            if on_model:
                on_model(model.label)
            with library_output(self.verbose):
                if lm is None:
                    lm = load_lm(model.path, request.device, request.dtype, request.batch_size)
                return _evaluate_model(lm, model, tasks, self._manager, self._records, request)

    def wrap(self, model, tokenizer_folder: Path):
        """A built model as the LM `score` takes (`wrap_model`), with lm-eval's messages
        silenced as for a loaded one."""
        with library_output(self.verbose):
            return wrap_model(model, tokenizer_folder, self.request.batch_size)

    def result(self, results: list[ModelResult]) -> EvalResult:
        """The results of `score` calls as one result object, with the settings and versions."""
        request = self.request
        return EvalResult(models=results, config=_config(request), seeds=dict(request.harness.seeds), versions=versions())


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
    lm, model: ModelToEvaluate, tasks: LoadedTasks, manager, records: list[dict[str, Any]] | None, request: EvalRequest
) -> tuple[ModelResult, ModelArtifacts]:
    """Run one model's tasks and translations on its `lm`."""
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
