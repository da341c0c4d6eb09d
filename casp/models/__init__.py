"""Architecture registry: one short declarative spec per supported architecture."""
from __future__ import annotations

from ..errors import CaspError
from .base import LLAMA_LINEAR_GROUPS, ModelSpec
from .llama import LLAMA
from .llava import LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO

SPECS: tuple[ModelSpec, ...] = (LLAMA, LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for s in SPECS for a in s.architectures)


def spec_for_architecture(architecture: str) -> ModelSpec:
    for spec in SPECS:
        if architecture in spec.architectures:
            return spec
    raise CaspError(
        f"unsupported architecture {architecture!r}; casp supports: "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


def spec_for_model(model) -> ModelSpec:
    """The spec of a loaded transformers model (by its class name)."""
    return spec_for_architecture(type(model).__name__)


__all__ = [
    "LLAMA_LINEAR_GROUPS",
    "ModelSpec",
    "SPECS",
    "SUPPORTED_ARCHITECTURES",
    "spec_for_architecture",
    "spec_for_model",
]
