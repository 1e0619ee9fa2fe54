"""Merge methods, registered by name in `METHODS`; importing this package registers them all."""

from neuroloc_cli.methods import delta, linear, maet, task_arithmetic  # noqa: F401  (registration)
from neuroloc_cli.methods.base import METHODS, MergeMethod, merge_method

__all__ = ["METHODS", "MergeMethod", "merge_method"]
