"""What every quantizer pass shares: which linears of a layer it quantizes, in which order,
and what settings the plan gives each."""
from __future__ import annotations

from torch import nn

from ..errors import CaspError
from ..lowrank import LowRankLinear
from ..models import ModelSpec


def layer_quantization_groups(layer: nn.Module, spec: ModelSpec) -> list[list[str]]:
    """The linears of one decoder layer to quantize, in true-sequential order, names
    relative to the layer. A low-rank module contributes its two factors: ``down`` with
    the module's group (it sees the same input) and ``up`` in a group right after (its input
    is ``down``'s output)."""
    groups: list[list[str]] = []
    for group in spec.linear_groups:
        first, follow = [], []
        for name in group:
            module = layer.get_submodule(name)
            if isinstance(module, LowRankLinear):
                for part, bucket in (("down", first), ("up", follow)):
                    _check_dense(module.get_submodule(part), f"{name}.{part}")
                    bucket.append(f"{name}.{part}")
            else:
                _check_dense(module, name)
                first.append(name)
        groups.append(first)
        if follow:
            groups.append(follow)
    return groups


def _check_dense(module: nn.Module, name: str) -> None:
    if type(module) is not nn.Linear:
        raise CaspError(f"{name} is already a {type(module).__name__}, not a dense linear: the "
                        "model is already quantized; quantize the original or low-rank checkpoint")


def quantizable_linears(model: nn.Module, spec: ModelSpec) -> dict[str, nn.Linear]:
    """Every linear the quantizers touch, by full module name, in processing order."""
    result: dict[str, nn.Linear] = {}
    for index, layer in enumerate(spec.decoder_layers(model)):
        prefix = spec.layer_prefix(index)
        for group in layer_quantization_groups(layer, spec):
            for name in group:
                result[f"{prefix}.{name}"] = layer.get_submodule(name)
    return result


def quantize_in_order(ctx, groups: list[list[str]], true_sequential: bool, quantize) -> None:
    """Call ``quantize(ctx, name, gram)`` for every linear of ``groups`` in order. With
    ``true_sequential`` each group's input Gram matrices are taken after the groups before
    it were quantized (they see the quantized modules' outputs); otherwise all come from one
    forward pass of the layer as it was."""
    if not true_sequential:
        grams = ctx.input_grams([n for g in groups for n in g])
    for group in groups:
        if true_sequential:
            grams = ctx.input_grams(group)
        for name in group:
            quantize(ctx, name, grams[name])


def described_stored_bits(d: dict) -> int | None:
    """Stored bits of a quantized module from its checkpoint description (None: the
    module is not a quantized one)."""
    if d.get("type") == "gptq":
        from .gptq import described_bits
        return described_bits(d)
    if d.get("type") == "aqlm":
        from .aqlm import described_bits
        return described_bits(d)
    return None


def is_factor(name: str) -> bool:
    """Whether a quantizable module name is a low-rank factor."""
    return name.endswith(".down") or name.endswith(".up")
