"""Merge methods, registered by name in `METHODS`; importing this package registers them all."""

from neuroloc_cli.methods import (  # noqa: F401  (registration)
    ablate,
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    delta,
    fisher,
    karcher,
    linear,
    maet,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from neuroloc_cli.methods.base import METHODS, MergeMethod, merge_method

__all__ = ["METHODS", "MergeMethod", "merge_method"]
