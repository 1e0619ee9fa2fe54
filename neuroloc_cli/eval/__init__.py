"""`neuroloc eval`: lm-eval tasks, per-language perplexity and sacreBLEU translation scores.

Data flows in this order: `specs` (what to evaluate, parsed and checked before any model
loads, with `task_options` for the shipped shapes), `task_names` (task names and the user's
task YAMLs, checked without lm-eval) and `context` (generation lengths that fit each model)
→ `offline` (no downloads, fast clear errors) and `quiet` (libraries' output off stderr) →
`harness` (lm-eval's `simple_evaluate` on one `lm.NeurolocLM` per model), `perplexity`
(token, word and byte perplexities from one pass) and `translate` (greedy generation,
sacrebleu's Python API) → `results` (one object: a Rich table or one JSON document) →
`runner` (ties them together for every model). Heavy libraries are imported inside
functions so that `neuroloc --help` stays instant, and so that a mistake is reported before
they load.
"""
