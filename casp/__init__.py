"""casp: compression of large multimodal models and LLMs to about 2 bits per weight.

Stage 1 (low-rank W_q, W_k), the layer-wise engine, checkpoints and evaluation live here.
"""
__version__ = "0.1.0"

from .checkpoint import load_checkpoint, load_model  # noqa: E402
from .errors import CaspError  # noqa: E402
from .loading import load_pretrained  # noqa: E402

__all__ = ["CaspError", "__version__", "load_checkpoint", "load_model", "load_pretrained"]
