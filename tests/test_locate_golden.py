"""`locate delta`'s masks are pinned: the digests in `golden/locate_delta.json` were taken
from the locator before it moved onto the score-then-select path, and every later change of
a selection fails here.

To re-pin after an intended change of selection (say why in the commit):
`NEUROLOC_WRITE_GOLDEN=1 python -m pytest tests/test_locate_golden.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from neuroloc_cli.locate import LOCATORS

GOLDEN = Path(__file__).parent / "golden" / "locate_delta.json"

# (architecture, granularity, scope, share, extra keywords)
CASES = [
    ("llama", "row", "global", 0.05, {}),
    ("llama", "row", "tensor", 0.1, {}),
    ("llama", "row", "global", 0.05, {"exclude": ["*embed*", "lm_head*"]}),
    ("llama", "ffn", "global", 0.1, {}),
    ("llama", "ffn", "tensor", 0.2, {}),
    ("llama", "element", "global", 0.01, {}),
    ("llama", "element", "global", 0.03, {"cap": 500}),  # several histogram passes
    ("llama", "element", "tensor", 0.02, {}),
    ("gpt2", "row", "global", 0.05, {}),
    ("gpt2", "ffn", "global", 0.1, {}),
    ("gpt2", "element", "global", 0.02, {"include": ["*mlp*"]}),
    ("qwen2", "row", "tensor", 0.05, {}),
]


def _key(arch, granularity, scope, share, extra) -> str:
    return f"{arch}/{granularity}/{scope}/{share}/{json.dumps(extra, sort_keys=True)}"


def _digest(mask) -> str:
    """sha256 over every entry's name, shape, axis and selected bits (not the provenance,
    which names this machine's paths)."""
    h = hashlib.sha256()
    for name in sorted(mask.entries):
        e = mask.entries[name]
        h.update(f"{name}:{list(e.shape)}:{e.axis}:".encode())
        h.update(np.packbits(e.dense().reshape(-1).numpy(), bitorder="little").tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[_key(*c) for c in CASES])
def test_delta_masks_match_the_pinned_selection(zoo, case):
    arch, granularity, scope, share, extra = case
    fam = zoo.get(arch)
    mask = LOCATORS.get("delta").run(base=fam.base, tuned=fam.ft1, top=share, granularity=granularity, scope=scope, **extra)
    digest = _digest(mask)
    pinned = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("NEUROLOC_WRITE_GOLDEN"):
        pinned[_key(*case)] = digest
        GOLDEN.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        return
    assert digest == pinned[_key(*case)]
