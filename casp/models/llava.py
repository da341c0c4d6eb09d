"""LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision: a vision tower and projector
feeding a Llama-style language model (Qwen2 for OneVision). Only the language model's
decoder layers are ever changed."""
from casp.models.base import ModelSpec

_FROZEN = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.language_model.embed_tokens",
    "model.language_model.norm",
    "lm_head",
)


def _llava(name: str, architecture: str, also_frozen: tuple[str, ...] = ()) -> ModelSpec:
    """A LLaVA-layout spec; ``name`` is also the config's model_type."""
    return ModelSpec(name=name, architectures=(architecture,), model_types=(name,),
                     layers="model.language_model.layers", text_config="text_config",
                     frozen=_FROZEN + also_frozen, multimodal=True,
                     norm="model.language_model.norm")


LLAVA = _llava("llava", "LlavaForConditionalGeneration")
LLAVA_NEXT = _llava("llava_next", "LlavaNextForConditionalGeneration", ("model.image_newline",))
LLAVA_NEXT_VIDEO = _llava("llava_next_video", "LlavaNextVideoForConditionalGeneration",
                          ("model.image_newline", "model.vision_resampler"))
LLAVA_ONEVISION = _llava("llava_onevision", "LlavaOnevisionForConditionalGeneration",
                         ("model.image_newline",))
