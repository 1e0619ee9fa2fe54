"""Locators: methods that find the units of a model that matter and save them as a mask.

Registered by name in `LOCATORS` (importing this package registers them all).
"""

from neuroloc_cli.locate import awareness, delta, gradient, lape, select  # noqa: F401  (registration)
from neuroloc_cli.locate.base import LOCATORS, Locator, locator

__all__ = ["LOCATORS", "Locator", "locator"]
