"""Evaluation: perplexity (and later lmms-eval tasks and efficiency)."""
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
