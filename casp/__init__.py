"""casp: compression of large multimodal models and LLMs to about 2 bits per weight.

The public API: load a model to compress (:func:`load_pretrained`), rebuild a casp
checkpoint (:func:`load_checkpoint`, :func:`load_model`), and the error every user mistake
raises (:class:`CaspError`). The package map is in README.md.
"""
from casp.checkpoint import load_checkpoint, load_model
from casp.errors import CaspError
from casp.loading import load_pretrained
from casp.version import __version__

__all__ = ["CaspError", "__version__", "load_checkpoint", "load_model", "load_pretrained"]
