"""Evaluation: perplexity, easy-vqa accuracy (vqa.py), the lmms-eval bridge (lmms.py,
lmms_model.py) and attention sparsity (attention_sparsity.py, sparsity_report.py)."""
from casp.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
