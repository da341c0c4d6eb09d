"""What every quantizer pass shares: which linears of a layer it quantizes, in which order
(true-sequential groups), and what setting the plan gives each."""
from __future__ import annotations

import logging

from torch import nn

from casp.errors import CaspError
from casp.lowrank import LowRankLinear
from casp.models import ModelSpec

log = logging.getLogger("casp")


def layer_quantization_groups(layer: nn.Module, spec: ModelSpec,
                              only: tuple[str, ...] | None = None) -> list[list[str]]:
    """The linears of one decoder layer to quantize, in true-sequential order, names
    relative to the layer. A low-rank module contributes its two factors: ``down`` with
    the module's group (it sees the same input) and ``up`` in a group right after (its input
    is ``down``'s output). ``only`` keeps just the linears of those modules (the measured
    search quantizes the low-rank factors alone)."""
    groups: list[list[str]] = []
    for group in spec.linear_groups:
        first, follow = [], []
        for name in group:
            if only is not None and name not in only:
                continue
            module = layer.get_submodule(name)
            if isinstance(module, LowRankLinear):
                for part, bucket in (("down", first), ("up", follow)):
                    _check_dense(module.get_submodule(part), f"{name}.{part}")
                    bucket.append(f"{name}.{part}")
            else:
                _check_dense(module, name)
                first.append(name)
        if first:
            groups.append(first)
        if follow:
            groups.append(follow)
    return groups


def layer_linear_names(layer: nn.Module, spec: ModelSpec,
                       only: tuple[str, ...] | None = None) -> list[str]:
    """The linears of :func:`layer_quantization_groups`, flattened in the same order."""
    return [name for group in layer_quantization_groups(layer, spec, only) for name in group]


def _check_dense(module: nn.Module, name: str) -> None:
    if type(module) is not nn.Linear:
        raise CaspError(f"{name} is already a {type(module).__name__}, not a dense linear: the "
                        "model is already quantized; quantize the original or low-rank checkpoint")


def quantizable_linears(model: nn.Module, spec: ModelSpec) -> dict[str, nn.Linear]:
    """Every linear the quantizers touch, by full module name, in processing order."""
    result: dict[str, nn.Linear] = {}
    for index, layer in enumerate(spec.decoder_layers(model)):
        prefix = spec.layer_prefix(index)
        for name in layer_linear_names(layer, spec):
            result[f"{prefix}.{name}"] = layer.get_submodule(name)
    return result


class PlannedPass:
    """What a codebook quantizer pass shares about its bit plan: each module's setting is
    the plan's entry (``plan_key``, parsed by ``setting_type.from_plan_entry``) or the
    pass's own ``self.setting``. Mixed into a LayerPass."""

    setting_type: type
    plan_key: str
    label: str

    def use_plan(self, plan: dict[str, dict] | None, plan_id: str | None) -> None:
        """Take the plan, refusing one made for another quantizer."""
        self.plan = dict(plan or {})
        self.plan_id = plan_id
        for name, entry in self.plan.items():
            if self.plan_key not in entry:
                raise CaspError(f"the plan gives {name} no {self.label} codebook (it was made "
                                "for another quantizer); make it with casp allocate "
                                f"--quantizer {self.name}")

    def module_setting(self, full_name: str):
        entry = self.plan.get(full_name)
        return self.setting_type.from_plan_entry(entry) if entry else self.setting


def checked_groups(ctx, module_setting) -> list[list[str]]:
    """The layer's quantization groups, after checking every module's shape against the
    setting ``module_setting(full name)`` gives it (bad shapes refused before any work)."""
    groups = layer_quantization_groups(ctx.layer, ctx.spec, ctx.only)
    for group in groups:
        for name in group:
            module_setting(ctx.full_name(name)).check(*ctx.module(name).weight.shape,
                                                      name=ctx.full_name(name))
    return groups


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


def is_factor(name: str) -> bool:
    """Whether a quantizable module name is a low-rank factor."""
    return name.endswith(".down") or name.endswith(".up")
