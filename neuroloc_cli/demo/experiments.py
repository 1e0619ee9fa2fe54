"""The papers' experiments on the toy world, each as the exact sequence of neuroloc commands.

Every experiment is a function `(ctx) -> Experiment` that runs `neuroloc` commands through
`ctx.run(argv)` (in the demo's folder, paths relative to it) and reads its numbers back from
the files those commands wrote (`neuroloc eval -o DIR` → `DIR/results.json`), so that each
number in the report comes from a command the report prints and a user can rerun.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli.demo.settings import Settings
from neuroloc_cli.demo.world import ABILITY_LANGUAGE, LANGUAGES, MATH_PROMPT, TRANSLATE_TEMPLATE

MATH_METRIC = "exact_match,flexible-extract"
PPL_METRIC = "token_perplexity"
EXPERIMENTS = ("maet", "regions", "landermt", "sweep")
"""Experiment names of `neuroloc demo --only`, in the order they run."""


@dataclass
class Table:
    """One result table: rows of a label and numbers, and the command that produced them."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    source: str  # the command (as printed) whose output holds these numbers
    results: str  # the file the numbers were read from, relative to the demo folder
    plot: str | None = None  # a PNG the command drew itself (relative to the demo folder); else the report draws bars

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "source": self.source,
            "results": self.results,
            "plot": self.plot,
        }


@dataclass
class Claim:
    """What a paper claims, and whether the toy world shows it."""

    claim: str
    observed: str
    holds: bool | None  # None: cannot be told at this scale / not measured

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "observed": self.observed, "holds": self.holds}


@dataclass
class Experiment:
    """One experiment's tables, the papers' claims checked against them, and its commands."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    plots: list[str | None] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "tables": [t.to_dict() for t in self.tables],
            "claims": [c.to_dict() for c in self.claims],
            "commands": self.commands,
            "plots": self.plots,
            "note": self.note,
        }


@dataclass
class Context:
    """What an experiment runs in: the demo folder, its settings, and the command runner."""

    root: Path
    settings: Settings
    runner: Callable[[list[str], Path], None]  # (argv without "neuroloc", log file) -> raises on failure
    commands: list[str] = field(default_factory=list)

    def run(self, *argv: str) -> str:
        """Run one neuroloc command (paths relative to the demo folder); returns it as printed."""
        args = [str(a) for a in argv]
        shown = "neuroloc " + " ".join(_quote(a) for a in args)
        log = self.root / "logs" / f"{len(self.commands) + 1:03d}-{args[0]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.runner(args, log)
        self.commands.append(shown)
        return shown

    def train_flags(self, steps: int) -> list[str]:
        s = self.settings
        return [
            "--max-steps", str(steps), "--lr", str(s.lr), "--warmup", str(max(1, steps // 10)), "--seq-len", str(s.seq_len),
            "--batch-size", str(s.batch_size), "--seed", "0", "--eval-share", "0.02",
        ]  # fmt: skip


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _eval(ctx: Context, models: list[str], out: str, *, math: bool = False, extra: list[str] | None = None) -> tuple[str, dict]:
    """`neuroloc eval` of `models` on held-out perplexity per language (and arithmetic per
    language); returns the command as printed and {label: {task: {metric: value}}}."""
    argv = ["eval", *models]
    if math:
        argv += ["--tasks", ",".join(f"neuroloc_math=world/math/{lang}.jsonl" for lang in LANGUAGES)]
        argv += ["--task-option", f"neuroloc_math.prompt={MATH_PROMPT}", "--task-option", "neuroloc_math.max_gen_toks=4"]
    for lang in LANGUAGES:
        argv += ["--ppl", f"world/heldout/{lang}.jsonl:{lang}"]
    argv += [*(extra or []), "--bootstrap-iters", "0", "--seed", "0", "--dtype", "float32", "-o", out]
    shown = ctx.run(*argv)
    return shown, read_scores(ctx.root / out / "results.json")


def read_scores(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{model label: {task: {metric: value}}} of a `neuroloc eval` results.json."""
    doc = json.loads(path.read_text())
    return {m["label"]: {t: {k: v["value"] for k, v in ms.items()} for t, ms in m["tasks"].items()} for m in doc["models"]}


def _verdict(holds: bool, compared: Any) -> bool | None:
    """`holds`, unless every compared number is the same (all zero, say): then nothing can be told."""
    return None if len(set(compared)) <= 1 else holds


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


# ---- 1. MAET ----------------------------------------------------------------------------


MAET_INPUTS = "maet/cpt-math-" + ABILITY_LANGUAGE
"""The folder whose presence says MAET's inputs (trained models and recipes) are built."""


def maet(ctx: Context) -> Experiment:
    """MAET (Chen et al. 2024): locate, masked CPT, ability and language vectors, rank, merge."""
    exp = Experiment("maet", "MAET: arithmetic taught in one language, transferred to the others")
    others = [lang for lang in LANGUAGES if lang != ABILITY_LANGUAGE]
    start = len(ctx.commands)
    _maet_inputs(ctx)
    ctx.run("rank", "maet/r-ability", "maet/r-lang", "--metric", "dot", "--csv")
    ctx.run("merge", "recipes/maet.yaml", "-o", "maet/maet")
    ctx.run("merge", "recipes/task-vector.yaml", "-o", "maet/task-vector")
    # the masked ability model itself (MAET's input) beside the merge: whether the masked CPT
    # learned the ability, apart from what the merge keeps of it
    models = ["base", "maet/full-cpt", "maet/task-vector", MAET_INPUTS, "maet/maet"]
    shown, scores = _eval(ctx, models, "evals/maet", math=True)
    labels = ["base", "full-cpt", "task-vector", MAET_INPUTS.split("/")[-1], "maet"]
    exp.tables.append(
        Table(
            "Arithmetic accuracy per language (exact match of the first number; 'ka' is the language it was taught "
            f"in; {labels[3]}: MAET's masked CPT, the merge's input)",
            ["model", *LANGUAGES],
            [[m, *(_r(scores[m][f"neuroloc_math_{lang}"][MATH_METRIC]) for lang in LANGUAGES)] for m in labels],
            shown,
            "evals/maet/results.json",
        )
    )
    exp.tables.append(
        Table(
            "Held-out token perplexity per language (forgetting: lower is better)",
            ["model", *LANGUAGES],
            [[m, *(_r(scores[m][f"ppl_{lang}"][PPL_METRIC], 2) for lang in LANGUAGES)] for m in labels],
            shown,
            "evals/maet/results.json",
        )
    )
    transfer = {m: statistics.fmean(scores[m][f"neuroloc_math_{lang}"][MATH_METRIC] for lang in others) for m in labels}
    best = max(("full-cpt", "task-vector"), key=transfer.get)
    exp.claims.append(
        Claim(
            "MAET transfers the ability to the other languages better than full CPT and a plain task vector (the paper's Table 1).",
            f"mean accuracy over {', '.join(others)}: " + ", ".join(f"{m} {transfer[m]:.3f}" for m in labels),
            _verdict(transfer["maet"] > transfer[best], transfer.values()),
        )
    )
    forget = {m: statistics.fmean(scores[m][f"ppl_{lang}"][PPL_METRIC] for lang in others) for m in labels}
    exp.claims.append(
        Claim(
            "MAET keeps the other languages' general ability (perplexity near the base's) where full CPT degrades it.",
            f"mean held-out perplexity over {', '.join(others)}: " + ", ".join(f"{m} {forget[m]:.2f}" for m in labels),
            forget["maet"] < forget["full-cpt"],
        )
    )
    exp.commands = ctx.commands[start:]
    return exp


def _maet_inputs(ctx: Context) -> None:
    """MAET's trained models and recipes: Eq. 1 (probe CPT, `locate delta`), the masked CPTs,
    the full-CPT baseline, R(A) and R_Lang (what the MAET merge and the sweep read)."""
    s = ctx.settings
    a, others = ABILITY_LANGUAGE, [lang for lang in LANGUAGES if lang != ABILITY_LANGUAGE]
    math = f"world/math-{a}.txt"
    # Eq. 1: probe CPT (every parameter, a few steps), then the 5 % of rows that moved most
    ctx.run("train", "base", "--data", math, "-o", "maet/probe-math", *ctx.train_flags(s.probe_steps))
    ctx.run("locate", "delta", "base", "maet/probe-math", "--top", "0.05", "-o", "maet/n-math.safetensors")
    for lang in LANGUAGES:
        ctx.run("train", "base", "--data", f"world/general/{lang}.txt", "-o", f"maet/probe-{lang}", *ctx.train_flags(s.probe_steps))
        ctx.run("locate", "delta", "base", f"maet/probe-{lang}", "--top", "0.05", "-o", f"maet/n-{lang}.safetensors")
    ctx.run("mask", "union", "maet/n-math.safetensors", f"maet/n-{a}.safetensors", "-o", f"maet/n-math-{a}.safetensors")
    # Eq. 2-3: masked CPT of the located neurons only; the ability on arithmetic and `ka` text
    mix = ["--data", f"{math}:0.8", "--data", f"world/general/{a}.txt:0.2"]
    ctx.run("train", "base", *mix, "--train-mask", f"maet/n-math-{a}.safetensors", "-o", MAET_INPUTS, *ctx.train_flags(s.cpt_steps))
    for lang in LANGUAGES:
        ctx.run(
            "train", "base", "--data", f"world/general/{lang}.txt", "--train-mask", f"maet/n-{lang}.safetensors",
            "-o", f"maet/cpt-{lang}", *ctx.train_flags(s.lang_steps),
        )  # fmt: skip
    # the baseline: full CPT on the same mixture, the same steps
    ctx.run("train", "base", *mix, "-o", "maet/full-cpt", *ctx.train_flags(s.cpt_steps))
    # Eq. 2-5 as recipes: R(A), R_Lang, their per-tensor ranking, the MAET merge; a plain task vector
    for name, text in _maet_recipes(a, others).items():
        (ctx.root / "recipes" / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.root / "recipes" / name).write_text(text)
    ctx.run("merge", "recipes/ability-vector.yaml", "-o", "maet/r-ability")
    ctx.run("merge", "recipes/language-vector.yaml", "-o", "maet/r-lang")


def _maet_recipes(a: str, others: list[str]) -> dict[str, str]:
    """The recipes of MAET Eq. 2-5 with the paper's coefficients (recipes/maet-math.yaml's shape)."""
    w = 1 / len(others)
    langs = "".join(f"  - {{model: ../maet/cpt-{lang}, weight: {w:g}}}\n" for lang in others)
    ability = f"ability:\n  model: ../maet/cpt-math-{a}\n  language_model: ../maet/cpt-{a}\n"
    head = "# Written by `neuroloc demo`; paths are relative to this file.\nbase_model: ../base\n"
    return {
        "ability-vector.yaml": f"{head}# MAET Eq. 2: R(A) = alpha*Δ(A,{a}) - beta*Δ({a})\nmerge_method: ability_vector\n{ability}"
        "parameters: {alpha: 0.8, beta: 0.2}\ndtype: float32\nout_dtype: float32\n",
        "language-vector.yaml": f"{head}# MAET Eq. 3: R_Lang = Σ μ_i Δ(L_i), equal μ_i\nmerge_method: language_vector\nlanguages:\n{langs}"
        "dtype: float32\nout_dtype: float32\n",
        "maet.yaml": f"{head}# MAET Eq. 4-5 with the paper's coefficients (math: k2 = 0.8)\nmerge_method: maet\n{ability}languages:\n{langs}"
        "parameters: {alpha: 0.8, beta: 0.2, gamma: 0.2, eta: 1.0, k2: 0.8}\ndtype: float32\nout_dtype: float32\n",
        "task-vector.yaml": f"{head}# The baseline: base + Δ(full CPT on the ability) + the same R_Lang as MAET, every tensor\n"
        "merge_method: task_arithmetic\nmodels:\n  - {model: ../maet/full-cpt, parameters: {weight: 1.0}}\n"
        + "".join(f"  - {{model: ../maet/cpt-{lang}, parameters: {{weight: {w:g}}}}}\n" for lang in others)
        + "dtype: float32\nout_dtype: float32\n",
    }


# ---- 2. Linguistic regions --------------------------------------------------------------


def regions(ctx: Context) -> Experiment:
    """Linguistic regions (Zhang et al. 2024): locate, remove, measure; core-frozen CPT."""
    s = ctx.settings
    exp = Experiment("regions", "Linguistic regions: the damage study and core-frozen continual pretraining")
    start = len(ctx.commands)
    data = [x for lang in LANGUAGES for x in ("--data", f"{lang}=world/general/{lang}.txt")]
    scoring = ["--samples", str(s.locate_samples), "--seq-len", str(s.seq_len), "--batch-size", "8", "--seed", "0"]
    ctx.run("locate", "gradient", "base", *data, "--top", "0.01", *scoring, "-o", "regions/top1")
    removed = ["core", "random", "bottom", *(f"mono-{lang}" for lang in LANGUAGES)]
    for region in removed:
        ctx.run("ablate", "base", f"regions/top1/{region}.safetensors", "-o", f"regions/{region}-removed", "--mode", "zero")
    shown, scores = _eval(ctx, ["base", *(f"regions/{r}-removed" for r in removed)], "evals/regions-damage")
    labels = ["base", *(f"{r}-removed" for r in removed)]
    ppl = {m: {lang: scores[m][f"ppl_{lang}"][PPL_METRIC] for lang in LANGUAGES} for m in labels}
    exp.tables.append(
        Table(
            "Damage study: held-out token perplexity per language with a 1 % region removed (zeroed)",
            ["model", *LANGUAGES],
            [[m, *(_r(ppl[m][lang], 2) for lang in LANGUAGES)] for m in labels],
            shown,
            "evals/regions-damage/results.json",
        )
    )
    rise = {m: statistics.fmean(ppl[m][lang] / ppl["base"][lang] for lang in LANGUAGES) for m in labels}
    exp.claims.append(
        Claim(
            "Removing the core region (1 %) breaks every language; a random region of the same size barely matters.",
            f"mean perplexity ratio to the base: core {rise['core-removed']:.2f}, random {rise['random-removed']:.2f}, "
            f"bottom {rise['bottom-removed']:.2f}",
            rise["core-removed"] > 1.5 * rise["random-removed"] and rise["random-removed"] < 1.1,
        )
    )
    own = []
    for lang in LANGUAGES:
        m = f"mono-{lang}-removed"
        mine = ppl[m][lang] / ppl["base"][lang]
        theirs = statistics.fmean(ppl[m][o] / ppl["base"][o] for o in LANGUAGES if o != lang)
        own.append((lang, mine, theirs))
    exp.claims.append(
        Claim(
            "Removing a language's monolingual region hurts that language more than the others.",
            "perplexity ratio own / others: " + ", ".join(f"{lang} {m:.2f}/{t:.2f}" for lang, m, t in own),
            all(m > t for _, m, t in own),
        )
    )
    # core-frozen CPT (the paper freezes the top 5 %) against plain CPT, on one language
    target = LANGUAGES[-1]
    ctx.run("locate", "gradient", "base", *data, "--top", "0.05", *scoring, "-o", "regions/top5")
    flags = ctx.train_flags(s.lang_steps)
    ctx.run("train", "base", "--data", f"world/general/{target}.txt", "-o", f"regions/cpt-{target}", *flags)
    ctx.run(
        "train", "base", "--data", f"world/general/{target}.txt", "--freeze-mask", "regions/top5/core.safetensors",
        "-o", f"regions/cpt-{target}-frozen-core", *flags,
    )  # fmt: skip
    shown, scores = _eval(ctx, ["base", f"regions/cpt-{target}", f"regions/cpt-{target}-frozen-core"], "evals/regions-freeze")
    labels = ["base", f"cpt-{target}", f"cpt-{target}-frozen-core"]
    ppl = {m: {lang: scores[m][f"ppl_{lang}"][PPL_METRIC] for lang in LANGUAGES} for m in labels}
    exp.tables.append(
        Table(
            f"Further pretraining on '{target}' only: held-out token perplexity per language (plain vs the top 5 % core frozen)",
            ["model", *LANGUAGES],
            [[m, *(_r(ppl[m][lang], 2) for lang in LANGUAGES)] for m in labels],
            shown,
            "evals/regions-freeze/results.json",
        )
    )
    others = [lang for lang in LANGUAGES if lang != target]
    forget = {m: statistics.fmean(ppl[m][o] for o in others) for m in labels}
    exp.claims.append(
        Claim(
            "Freezing the core region during further pretraining slows forgetting of the other languages.",
            f"mean perplexity over {', '.join(others)}: " + ", ".join(f"{m} {forget[m]:.2f}" for m in labels),
            forget[labels[2]] < forget[labels[1]],
        )
    )
    exp.commands = ctx.commands[start:]
    return exp


# ---- 3. LANDeRMT ------------------------------------------------------------------------


def landermt(ctx: Context) -> Experiment:
    """LANDeRMT (Zhu et al. 2024): awareness, selective finetuning with routing, export."""
    s = ctx.settings
    exp = Experiment("landermt", "LANDeRMT: selective translation finetuning against full finetuning")
    start = len(ctx.commands)
    src, tgt = LANGUAGES[0], LANGUAGES[1]
    pairs = [(src, tgt), (tgt, src), (LANGUAGES[2], LANGUAGES[3]), (LANGUAGES[3], LANGUAGES[2])]
    aware = [x for a, b in pairs for x in ("--pair", f"{a}-{b}=world/parallel/{a}-{b}.jsonl")]
    template = ["--template", TRANSLATE_TEMPLATE]
    ctx.run(
        "locate", "awareness", "base", *aware, "--layers", str(s.awareness_layers), "--general", "0.9", *template, "-o", "landermt/aware"
    )
    train = ["--pair", f"{src}-{tgt}=world/parallel/{src}-{tgt}.jsonl", *template, *ctx.train_flags(s.ft_steps), "--grad-accum", "1"]
    ctx.run("train", "base", "--method", "landermt", "--masks", "landermt/aware", *train, "-o", "landermt/landermt")
    ctx.run("export-pair", "landermt/landermt", "--pair", f"{src}-{tgt}", "-o", f"landermt/landermt-{src}-{tgt}")
    ctx.run("train", "base", "--method", "landermt", "--full-finetune", *train, "-o", "landermt/full-ft")
    models = ["base", "landermt/full-ft", f"landermt/landermt-{src}-{tgt}"]
    extra = ["--translate", f"world/parallel-test/{src}-{tgt}.jsonl", "--src", src, "--tgt", tgt, *template, "--max-gen-toks", "24"]
    shown, scores = _eval(ctx, models, "evals/landermt", extra=extra)
    labels = ["base", "full-ft", f"landermt-{src}-{tgt}"]
    task = next(t for t in scores["base"] if t not in {f"ppl_{lang}" for lang in LANGUAGES})
    exp.tables.append(
        Table(
            f"Translation {src}→{tgt} (sacreBLEU on the held-out pairs) and held-out token perplexity per language",
            ["model", "BLEU", "chrF", *(f"ppl {lang}" for lang in LANGUAGES)],
            [
                [
                    m,
                    _r(scores[m][task].get("bleu"), 2),
                    _r(scores[m][task].get("chrf"), 2),
                    *(_r(scores[m][f"ppl_{lang}"][PPL_METRIC], 2) for lang in LANGUAGES),
                ]
                for m in labels
            ],
            shown,
            "evals/landermt/results.json",
        )
    )
    ours, full = scores[labels[2]][task].get("bleu"), scores["full-ft"][task].get("bleu")
    exp.claims.append(
        Claim(
            "Selective finetuning of the language-aware neurons with routing matches or beats full finetuning on the pair.",
            f"BLEU: landermt {ours:.2f}, full finetuning {full:.2f}",
            _verdict(ours >= full, (ours, full)),
        )
    )
    rest = [lang for lang in LANGUAGES if lang not in (src, tgt)]
    forget = {m: statistics.fmean(scores[m][f"ppl_{lang}"][PPL_METRIC] for lang in rest) for m in labels}
    exp.claims.append(
        Claim(
            "Training only the pair's neurons leaves the other languages alone, where full finetuning disturbs them.",
            f"mean perplexity over {', '.join(rest)}: " + ", ".join(f"{m} {forget[m]:.2f}" for m in labels),
            forget[labels[2]] < forget["full-ft"],
        )
    )
    exp.commands = ctx.commands[start:]
    return exp


# ---- 4. The sweep ------------------------------------------------------------------------


def sweep(ctx: Context) -> Experiment:
    """MAET's γ × k2 grid through `neuroloc sweep`, scored by accuracy in the held-out languages."""
    s = ctx.settings
    exp = Experiment("sweep", "Sweep: MAET's γ × k2 grid, arithmetic accuracy in the languages it was not taught in")
    a, others = ABILITY_LANGUAGE, [lang for lang in LANGUAGES if lang != ABILITY_LANGUAGE]
    start = len(ctx.commands)
    if not (ctx.root / MAET_INPUTS).is_dir():  # `--only sweep`: build what the MAET merge reads
        _maet_inputs(ctx)
    tasks = ",".join(f"neuroloc_math=world/math/{lang}.jsonl" for lang in [*others, a])
    weight = f"{1 / len(others):.6g}"
    objective = " + ".join(f"{weight}*neuroloc_math_{lang}.{MATH_METRIC}" for lang in others)
    ctx.run(
        "sweep", "recipes/maet.yaml", "--grid", "gamma=" + ",".join(f"{g:g}" for g in s.sweep_gamma),
        "--grid", "k2=" + ",".join(f"{k:g}" for k in s.sweep_k2), "--eval", f"tasks={tasks}",
        "--eval", f"task-option=neuroloc_math.prompt={MATH_PROMPT}", "--eval", "task-option=neuroloc_math.max_gen_toks=4",
        "--eval", "seed=0", "--eval", "dtype=float32", "--objective", objective, "-o", "sweep/maet",
    )  # fmt: skip
    shown = ctx.commands[-1]
    points = [json.loads(line) for line in (ctx.root / "sweep" / "maet" / "results.jsonl").read_text().splitlines() if line.strip()]
    points.sort(key=lambda p: p["index"])

    def acc(p: dict, lang: str) -> float | None:
        return _r(p["metrics"][f"neuroloc_math_{lang}"][MATH_METRIC])

    def value(p: dict, key: str) -> float:
        return next(v for k, v in p["values"].items() if k.split(".")[-1] == key)

    rows = [[value(p, "gamma"), value(p, "k2"), _r(p["objective"]), *(acc(p, lang) for lang in others), acc(p, a)] for p in points]
    exp.tables.append(
        Table(
            f"MAET at every (γ, k2): mean arithmetic accuracy over {', '.join(others)} (the objective), each of them, and '{a}'",
            ["γ", "k2", "mean held-out", *others, a],
            rows,
            shown,
            "sweep/maet/results.jsonl",
            plot="sweep/maet/objective.png",
        )
    )
    scored = [r for r in rows if r[2] is not None]  # a point whose accuracy is undefined has no objective
    if not scored:
        exp.note = "No point of the grid has an objective (every accuracy undefined)."
        exp.commands = ctx.commands[start:]
        return exp
    best = max(scored, key=lambda r: r[2])
    paper = next((r for r in scored if r[0] == 0.2 and r[1] == 0.8), None)
    exp.note = f"Best of the grid: γ {best[0]:g}, k2 {best[1]:g}, mean held-out accuracy {best[2]:.3f}" + (
        f"; the paper's γ 0.2, k2 0.8: {paper[2]:.3f}." if paper else "."
    )
    if len({r[2] for r in scored}) > 1 and paper:
        exp.claims.append(
            Claim(
                "MAET's hand-picked coefficients for math (γ 0.2, k2 0.8) transfer the ability well; the paper leaves "
                "searching them to future work.",
                f"γ 0.2, k2 0.8: {paper[2]:.3f}; the grid's best (γ {best[0]:g}, k2 {best[1]:g}): {best[2]:.3f}; "
                f"its worst: {min(r[2] for r in scored):.3f}",
                paper[2] >= best[2],
            )
        )
    exp.commands = ctx.commands[start:]
    return exp


RUNNERS: dict[str, Callable[[Context], Experiment]] = {"maet": maet, "regions": regions, "landermt": landermt, "sweep": sweep}
