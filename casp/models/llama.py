"""Llama and Llama-like decoder-only models (grouped-query attention included)."""
from casp.models.base import ModelSpec

LLAMA = ModelSpec(
    name="llama",
    # Mistral and Qwen2 share Llama's layer layout and module names.
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers",
    text_config="",
    frozen=("model.embed_tokens", "model.norm", "lm_head"),
)
