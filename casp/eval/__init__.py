"""Evaluation: perplexity (and later lmms-eval tasks and efficiency)."""
from casp.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
