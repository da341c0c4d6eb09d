"""Architecture registry: one short declarative spec per supported architecture."""
from __future__ import annotations

from casp.errors import CaspError
from casp.models.base import LLAMA_LINEAR_GROUPS, ModelSpec
from casp.models.llama import LLAMA
from casp.models.llava import LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO

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


# model_type -> class, for configs that do not name their architecture (GGUF files).
_CLASS_FOR_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}

def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", "")
    if model_type in _CLASS_FOR_MODEL_TYPE:
        return _CLASS_FOR_MODEL_TYPE[model_type]
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
