"""Running a checkpoint: the one way a command turns a checkpoint folder into a model and text
into its inputs.

    model.py        a checkpoint folder as a transformers model on a device and dtype;
                    checkpoint tensor names <-> module parameters (tied weights included)
    data.py         corpora read into documents, tokenized, framed, cut into rows; batches
                    tagged with their source (a language, a corpus, a pair)
    distributed.py  accelerate's setup, and the sums and averages between processes
    prompts.py      translation templates (FLAN v2), parallel pairs as rows with labels on
                    the target only
    routing.py      LANDeRMT's conditional awareness routing: routing.json, hooks, folding

`train`, the data locators and `eval` all load through here: there is no second copy.
"""
