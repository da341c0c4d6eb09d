"""LLaVA-1.5, LLaVA-NeXT and LLaVA-NeXT-Video: a vision tower and projector feeding a
Llama-style language model. Only the language model's decoder layers are ever changed."""
from .base import ModelSpec

_LANGUAGE_LAYERS = "model.language_model.layers"
_FROZEN = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.language_model.embed_tokens",
    "model.language_model.norm",
    "lm_head",
)

LLAVA = ModelSpec(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    layers=_LANGUAGE_LAYERS,
    text_config="text_config",
    frozen=_FROZEN,
    multimodal=True,
)

LLAVA_NEXT = ModelSpec(
    name="llava_next",
    architectures=("LlavaNextForConditionalGeneration",),
    layers=_LANGUAGE_LAYERS,
    text_config="text_config",
    frozen=_FROZEN + ("model.image_newline",),
    multimodal=True,
)

LLAVA_NEXT_VIDEO = ModelSpec(
    name="llava_next_video",
    architectures=("LlavaNextVideoForConditionalGeneration",),
    layers=_LANGUAGE_LAYERS,
    text_config="text_config",
    frozen=_FROZEN + ("model.image_newline", "model.vision_resampler"),
    multimodal=True,
)
