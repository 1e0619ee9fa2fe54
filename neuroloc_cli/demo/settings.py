"""The demo's sizes: `tiny` (the test suite), `quick` (`neuroloc demo --quick`) and `full`.

One set of optimisation settings per level serves every method and its baselines alike:
nothing here is tuned for one method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Settings:
    """Sizes of the world, the model and every training run of one demo level."""

    level: str
    docs: int  # general documents per language
    heldout: int  # held-out documents per language (perplexity)
    math_docs: int  # arithmetic documents, ability language only
    math_test: int  # test sums per language
    pairs: int  # parallel sentences per direction
    layers: int
    hidden: int
    pretrain_steps: int
    probe_steps: int  # MAET Eq. 1: the short full-parameter CPT whose weight change locates neurons
    cpt_steps: int  # CPT on the arithmetic: MAET's masked ability model and the full-CPT baseline alike
    lang_steps: int  # CPT on one language's general text: MAET's language models, the regions' plain and core-frozen runs
    ft_steps: int  # translation finetuning, LANDeRMT and full finetuning alike
    batch_size: int = 8  # every CPT and finetuning run
    seq_len: int = 64
    pretrain_batch: int = 16
    lr_pretrain: float = 3e-3
    lr: float = 2e-3  # CPT and finetuning: one peak rate (10 % warm-up, cosine to 0) for every method and baseline
    locate_samples: int = 32  # rows scored per language by `locate gradient`
    awareness_layers: int = 2  # LANDeRMT: layers kept (the paper: 4 of 32)
    sweep_gamma: tuple[float, ...] = (0.2, 0.5, 1.0)  # MAET's γ (the paper: 0.2 for math)
    sweep_k2: tuple[float, ...] = (0.5, 0.8, 1.0)  # MAET's k2 (the paper: 0.8 for math)
    threads: int = 1  # torch threads, fixed: CPU reductions depend on the thread count, and one thread per run
    # is fastest on a shared or small machine (two threads contending for one core run many times slower)

    def world_options(self) -> dict[str, int]:
        return {"docs": self.docs, "heldout": self.heldout, "math_docs": self.math_docs, "math_test": self.math_test, "pairs": self.pairs}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LEVELS = {
    "tiny": Settings(
        "tiny", docs=120, heldout=12, math_docs=80, math_test=8, pairs=40, layers=2, hidden=64,
        pretrain_steps=40, probe_steps=4, cpt_steps=8, lang_steps=4, ft_steps=8, pretrain_batch=8, seq_len=48,
        locate_samples=8, awareness_layers=1, sweep_gamma=(0.2, 1.0), sweep_k2=(0.8,), threads=1,
    ),
    "quick": Settings(
        "quick", docs=600, heldout=40, math_docs=600, math_test=55, pairs=300, layers=4, hidden=128,
        pretrain_steps=300, probe_steps=20, cpt_steps=600, lang_steps=100, ft_steps=100,
    ),
    "full": Settings(
        "full", docs=1500, heldout=100, math_docs=1500, math_test=55, pairs=800, layers=4, hidden=128,
        pretrain_steps=1200, probe_steps=60, cpt_steps=1500, lang_steps=300, ft_steps=300, locate_samples=64,
        sweep_gamma=(0.1, 0.2, 0.5, 1.0, 2.0), sweep_k2=(0.2, 0.5, 0.8, 1.0),
    ),
}  # fmt: skip
