"""Masked continual pretraining: train only what a mask allows, keep the rest bit-for-bit.

Read `run.py` first: the recipe class (setup / train / save / cleanup) and its training loop,
top to bottom. Loading the model, reading text into rows and the processes of a run are
`runtime`'s (shared with the locators and eval). Each other job has a module of its own, in
the order a run uses them:

    config.py       the run's settings: YAML keys and flags, validated once
    inputs.py       every input checked before a weight loads: model, mask, output, tokenizer, data
    data.py         the corpora cut into rows with a held-out share; the mixture sampler;
                    translation directions and the one-direction-per-step sampler
    landermt.py     LANDeRMT's selective finetuning with routing (`--method landermt`)
    export_pair.py  one direction's routing folded into an ordinary checkpoint (`export-pair`)
    selection.py    what trains, and the three ways everything else is kept exact
    optim.py        AdamW parameter groups, the learning-rate schedule
    rng.py          seeds derived from (seed, step), so that a resumed run draws the same
    loss.py         the causal-LM loss over scored targets, held-out perplexity
    events.py       what a run reports, and its JSONL log
    state.py        periodic checkpoints, and resuming from them
    export.py       the trained checkpoint and its provenance
"""
