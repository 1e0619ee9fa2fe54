"""neuroloc: locate abilities and languages inside LLM checkpoints, and move them."""

__version__ = "0.1.0"
