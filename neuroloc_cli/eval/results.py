"""The result of `neuroloc eval`: one object, rendered as a side-by-side Rich table or as one
JSON document, and saved with its samples and hypotheses by `--output`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
HYPOTHESES_FILE = "hypotheses.txt"


@dataclass
class ModelResult:
    """Scores of one model.

    Attributes:
        label: the name used in table columns and output sub-folders (folder name, made unique).
        path: the checkpoint folder, absolute.
        fingerprint: `Checkpoint.fingerprint` of the weights evaluated.
        tasks: task → metric → {"value", "stderr" (None where not meaningful), "signature" (sacrebleu)}.
        n_samples: task → documents scored.
        n_shot: task → few-shot examples per prompt (lm-eval tasks).
        positions: the model's positions, prompt and generation together (config.json; None: not given).
        max_gen_toks: task → tokens generated at most, for generative tasks and translation.
        capped: task → the default generation length that was lowered to fit `positions`
            (half of them) because no --max-gen-toks was given.
    """

    label: str
    path: str
    fingerprint: str
    tasks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    n_shot: dict[str, int] = field(default_factory=dict)
    positions: int | None = None
    max_gen_toks: dict[str, int] = field(default_factory=dict)
    capped: dict[str, int] = field(default_factory=dict)


@dataclass
class ModelArtifacts:
    """What `--output` saves beside the results for one model (never printed)."""

    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    translations: list[dict[str, Any]] = field(default_factory=list)
    hypotheses: list[str] | None = None


@dataclass
class EvalResult:
    """Every model's scores, with how they were made (settings, seeds, versions)."""

    models: list[ModelResult]
    config: dict[str, Any]
    seeds: dict[str, int]
    versions: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """The JSON document `--json` prints and `results.json` holds."""
        return {"models": [asdict(m) for m in self.models], "config": self.config, "seeds": self.seeds, "versions": self.versions}

    def rows(self) -> list[tuple[str, str, list[str]]]:
        """(task, metric, one cell per model) for every metric any model has, in first-seen order."""
        keys: dict[tuple[str, str], None] = {}
        for m in self.models:
            for task, metrics in m.tasks.items():
                for metric in metrics:
                    keys[(task, metric)] = None
        return [(task, metric, [_cell(m.tasks.get(task, {}).get(metric)) for m in self.models]) for task, metric in keys]

    def table(self):
        """A Rich table: one row per task and metric, one column per model."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="evaluation")
        table.add_column("task")
        table.add_column("metric")
        for m in self.models:
            table.add_column(escape(m.label), justify="right")
        for task, metric, cells in self.rows():
            table.add_row(escape(task), escape(metric), *cells)
        return table

    def signatures(self) -> list[str]:
        """'task metric: signature' lines, one per sacrebleu score (the same for every model)."""
        lines: dict[str, None] = {}
        for m in self.models:
            for task, metrics in m.tasks.items():
                for metric, v in metrics.items():
                    if v.get("signature"):
                        lines[f"{task} {metric}: {v['signature']}"] = None
        return list(lines)

    def notes(self) -> list[str]:
        """One line per generation length lowered to fit a model: scores made with a shorter
        generation than asked for must not pass unnoticed."""
        return [
            f"{m.label}: {task}: generated at most {m.max_gen_toks[task]} tokens, not {default}, to fit the model's "
            f"{m.positions} positions (--max-gen-toks sets it)"
            for m in self.models
            for task, default in m.capped.items()
        ]


def _cell(v: dict[str, Any] | None) -> str:
    if v is None or v.get("value") is None:
        return "—"
    text = f"{v['value']:.4f}"
    return f"{text} ± {v['stderr']:.4f}" if v.get("stderr") is not None else text


def save(folder: Path, result: EvalResult, artifacts: list[ModelArtifacts]) -> None:
    """Write results.json into `folder`, and each model's samples and hypotheses beside it
    (in `folder` for one model, in `folder/LABEL/` for several)."""
    (folder / RESULTS_FILE).write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    for model, art in zip(result.models, artifacts):
        where = folder if len(result.models) == 1 else folder / model.label
        where.mkdir(exist_ok=True)
        for task, samples in art.samples.items():
            with open(where / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
        if art.hypotheses is not None:
            (where / HYPOTHESES_FILE).write_text("".join(h + "\n" for h in art.hypotheses), encoding="utf-8")
            with open(where / "translations.jsonl", "w", encoding="utf-8") as f:
                for t in art.translations:
                    f.write(json.dumps(t, ensure_ascii=False, default=str) + "\n")
