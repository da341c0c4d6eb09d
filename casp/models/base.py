"""The declarative description of an architecture that the rest of casp works from."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Linears of a Llama-style decoder layer, in true-sequential order: each group only sees
# inputs that the groups before it have already produced.
LLAMA_LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ModelSpec:
    """Where things are in one architecture.

    Attributes:
        architectures: the ``config.architectures`` class names this spec describes.
        model_types: the ``config.model_type`` of each of ``architectures`` (same order): how
            a config that names no architecture (a GGUF file's) finds its class.
        layers: dotted path of the language model's decoder layer list.
        text_config: attribute of the config that holds the language model's config
            ("" when the config itself is the text config).
        linear_groups: the linears of one decoder layer (relative to the layer) in
            true-sequential order.
        lowrank_targets: the linears stage 1 factorises (W_q and W_k).
        frozen: modules that no stage ever changes (vision tower, projector, embeddings,
            lm_head, final norm).
        multimodal: whether the model takes images or video besides text.
        norm, head: the language model's final norm and output projection (what turns the
            last decoder layer's output into logits).
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: str
    text_config: str
    frozen: tuple[str, ...]
    multimodal: bool = False
    linear_groups: tuple[tuple[str, ...], ...] = LLAMA_LINEAR_GROUPS
    lowrank_targets: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    norm: str = "model.norm"
    head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def text_config_of(self, config):
        return getattr(config, self.text_config) if self.text_config else config
