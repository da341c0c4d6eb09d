"""Architecture registry: one short declarative spec per supported architecture."""
from __future__ import annotations

from casp.errors import CaspError
from casp.models.base import LLAMA_LINEAR_GROUPS, ModelSpec
from casp.models.llama import LLAMA
from casp.models.llava import LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO, LLAVA_ONEVISION

SPECS: tuple[ModelSpec, ...] = (LLAMA, LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO, LLAVA_ONEVISION)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for s in SPECS for a in s.architectures)


def spec_for_architecture(architecture: str) -> ModelSpec:
    for spec in SPECS:
        if architecture in spec.architectures:
            return spec
    raise CaspError(
        f"unsupported architecture {architecture!r}; casp supports: "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


# model_type -> class, for configs that do not name their architecture (GGUF files)
CLASS_FOR_MODEL_TYPE: dict[str, str] = {
    model_type: arch for spec in SPECS for arch, model_type in zip(spec.architectures,
                                                                   spec.model_types)}


def architecture_of(config) -> str:
    """The class name a config is for: its ``architectures``, or its ``model_type``'s."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", "")
    if model_type in CLASS_FOR_MODEL_TYPE:
        return CLASS_FOR_MODEL_TYPE[model_type]
    return model_type or "unknown"


def spec_for_model(model) -> ModelSpec:
    """The spec of a loaded transformers model (by its class name)."""
    return spec_for_architecture(type(model).__name__)


__all__ = [
    "LLAMA_LINEAR_GROUPS",
    "ModelSpec",
    "SPECS",
    "SUPPORTED_ARCHITECTURES",
    "architecture_of",
    "spec_for_architecture",
    "spec_for_model",
]
