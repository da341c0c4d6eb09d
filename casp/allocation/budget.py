"""Stage 2's accounting: what each module costs at a width, and the budget.

The budget is the average bits over the ORIGINAL dense parameter count of the quantized
linears, everything stored counted (codes, per-group scales and zeros, group indices,
codebooks, signs, the low-rank factors), so what the low-rank stage saved pays for
higher-bit layers. :class:`SettingRules` says how a module at a layer width is stored;
:func:`parse_budget` reads a budget given as bits or as a uniform baseline's setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from casp.errors import CaspError
from casp.models import ModelSpec
from casp.quant.gptq.quantize import check_bits
from casp.quant.gptq.setting import QuantSetting
from casp.quant.layer_groups import is_factor, quantizable_linears
from casp.quant.registry import (QUANTIZER_LABELS, QUANTIZERS, described_stored_bits,
                                 quantizer_of_setting)


def parse_codebook_map(text: str, quantizer: str = "aqlm") -> dict[int, object]:
    """'2=2x8,3=2x12' -> {2: AQLMSetting 2x8, 3: AQLMSetting 2x12}: the codebook setting
    each allocated width stands for, parsed by the quantizer's setting type (QuIP#:
    '2=e8p12,3=e8p12rvq3b')."""
    spec = QUANTIZERS[quantizer]
    example = spec.default_codebooks
    result = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        width, sep, setting = item.partition("=")
        try:
            if not sep:
                raise ValueError
            result[int(width)] = spec.setting_type.parse(setting)
        except ValueError:
            raise CaspError(f"codebook map item {item!r} is not WIDTH=SETTING (e.g. {example})")
    if not result:
        raise CaspError(f"empty codebook map; give e.g. {example}")
    if spec.width_is_bits:
        wrong = [(w, s) for w, s in result.items() if s.bits != w]
        if wrong:
            raise CaspError(f"codebook map: {wrong[0][1].name} stores {wrong[0][1].bits} bits, "
                            f"not {wrong[0][0]}; use {example}")
    return result


def codebook_quantizer(codebooks: dict | None) -> str:
    """Which quantizer a codebook map is for ("gptq" when there is none)."""
    if not codebooks:
        return "gptq"
    return quantizer_of_setting(next(iter(codebooks.values()))).name


def dense_shapes(model: nn.Module, spec: ModelSpec) -> list[tuple[int, int]]:
    """(out, in) of every quantized linear as it was before any low-rank factorisation."""
    from casp.lowrank import LowRankLinear

    shapes = []
    for layer in spec.decoder_layers(model):
        for name in spec.linears:
            m = layer.get_submodule(name)
            shapes.append((m.out_features, m.in_features) if isinstance(m, LowRankLinear)
                          else tuple(m.weight.shape))
    return shapes


def dense_parameters(model: nn.Module, spec: ModelSpec) -> int:
    """Parameters of the quantized linears before any low-rank factorisation."""
    return sum(out_f * in_f for out_f, in_f in dense_shapes(model, spec))


def average_bits(section: dict) -> float | None:
    """Average stored bits per original dense weight of the quantized linears, from a
    checkpoint's casp section; None when it holds no quantized modules."""
    modules = section.get("modules", {})
    stored, dense = 0, 0
    counted_parents = set()
    for name, d in modules.items():
        bits = described_stored_bits(d)
        if bits is None:
            continue
        stored += bits
        parent = name.rsplit(".", 1)[0]
        if is_factor(name) and modules.get(parent, {}).get("type") == "lowrank":
            if parent not in counted_parents:
                counted_parents.add(parent)
                dense += modules[parent]["in_features"] * modules[parent]["out_features"]
        else:
            dense += d["in_features"] * d["out_features"]
    return stored / dense if dense else None


@dataclass
class SettingRules:
    """How a module at a layer width is stored: the layer's dense linears at ``group_size``
    (or the codebook of the width), low-rank factors at ``factor_bits`` (None: the layer's
    width) and ``factor_group_size``."""
    group_size: int = 128
    factor_bits: int | None = 3
    factor_group_size: int = -1
    g_idx: bool = False
    codebooks: dict[int, object] | None = None

    @property
    def quantizer(self) -> str:
        return codebook_quantizer(self.codebooks)

    def width(self, name: str, layer_width: int) -> int:
        return self.factor_bits if is_factor(name) and self.factor_bits is not None else layer_width

    def setting(self, name: str, layer_width: int):
        width = self.width(name, layer_width)
        if self.codebooks is not None:
            return self.codebooks[width]
        group = self.factor_group_size if is_factor(name) and self.factor_bits is not None \
            else self.group_size
        return QuantSetting(width, group, self.g_idx)

    def entry(self, name: str, layer_width: int, shape) -> dict:
        """The plan's entry of a module."""
        return {"bits": self.width(name, layer_width),
                **self.setting(name, layer_width).plan_entry(), "shape": list(shape)}

    def layer_cost(self, shapes: dict[str, tuple[int, int]], layer_width: int) -> int:
        """Stored bits of a layer's modules ({name: (out, in)}) at ``layer_width``."""
        return sum(self.setting(n, layer_width).cost(*shape) for n, shape in shapes.items())

    def check(self, allowed: list[int]) -> None:
        """Refuse widths without a setting before any work."""
        for b in allowed:
            check_bits(b)
        if self.factor_bits is not None:
            check_bits(self.factor_bits)
        if self.codebooks is None:
            return
        label = QUANTIZER_LABELS[self.quantizer]
        lacking = [b for b in allowed + ([self.factor_bits] if self.factor_bits else [])
                   if b not in self.codebooks]
        if lacking:
            example = QUANTIZERS[self.quantizer].default_codebooks
            raise CaspError(f"no {label} codebook setting for {lacking[0]} bits; add it to the "
                            f"codebook map (e.g. --codebooks {example})")

    def meta(self) -> dict:
        return {"group_size": self.group_size, "factor_bits": self.factor_bits,
                "factor_group_size": self.factor_group_size, "g_idx": self.g_idx,
                "quantizer": self.quantizer,
                **({"codebooks": {str(b): s.name for b, s in sorted(self.codebooks.items())}}
                   if self.codebooks is not None else {})}

    def budget_error(self, budget: float, allowed: list[int], lowest: float) -> CaspError:
        label = QUANTIZER_LABELS[self.quantizer]
        what = (f"{label} {self.codebooks[allowed[0]].name}" if self.codebooks is not None
                else f"group {self.group_size}")
        return CaspError(f"budget {budget} bits cannot be met: the smallest allowed width "
                         f"({allowed[0]} bits, {what}) already needs {lowest:.4f} "
                         "average bits; raise --budget or allow fewer bits")


def modules_by_layer(model: nn.Module, spec: ModelSpec) -> list[dict[str, nn.Linear]]:
    """The quantizable linears of each decoder layer, by full name, in processing order."""
    layers: list[dict[str, nn.Linear]] = [{} for _ in spec.decoder_layers(model)]
    for name, lin in quantizable_linears(model, spec).items():
        layers[int(name[len(spec.layers) + 1:].split(".")[0])][name] = lin
    return layers


def uniform_average_bits(model: nn.Module, spec: ModelSpec, bits: int, group_size: int,
                         g_idx: bool = False, dense: bool = False) -> float:
    """Average bits of GPTQ on every linear at one setting (the uniform baseline). With
    ``dense``, low-rank modules count as the dense linears they replaced: the budget of the
    uniform baseline on the original model."""
    return uniform_setting_bits(model, spec, QuantSetting(bits, group_size, g_idx), dense)


def uniform_setting_bits(model: nn.Module, spec: ModelSpec, setting, dense: bool = False
                         ) -> float:
    """Average bits of storing every quantized linear with ``setting`` (anything with a
    ``cost(out, in)``: a GPTQ QuantSetting, an AQLMSetting or a QuIPSetting)."""
    if dense:
        total = sum(setting.cost(*shape) for shape in dense_shapes(model, spec))
    else:
        total = sum(setting.cost(*l.weight.shape)
                    for l in quantizable_linears(model, spec).values())
    return total / dense_parameters(model, spec)


def parse_budget(text: str) -> tuple[float | None, tuple[int, int] | None]:
    """A budget is a number of average bits (2.25), BITS@GROUP (2@128, 3@-1): the average
    bits of uniform GPTQ at that setting on the original dense model, or an AQLM setting
    (2x8, 1x16, 2x8g8) or QuIP# codebook (e8p12): what uniform AQLM / QuIP# at that
    setting stores on the dense model (the second element is then the setting)."""
    for spec in QUANTIZERS.values():
        setting = spec.budget_setting(text) if spec.budget_setting else None
        if setting is not None:
            return None, setting
    if "@" in text:
        bits, _, group = text.partition("@")
        try:
            return None, (int(bits), int(group))
        except ValueError:
            pass
    else:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and 1.0 <= value <= 16.0:
            return value, None
    raise CaspError(f"budget {text!r} is not average bits in 1-16 (e.g. 2.25), BITS@GROUP "
                    "(e.g. 2@128: the bits of uniform 2-bit group-128 GPTQ), an AQLM setting "
                    "(e.g. 2x8: the bits of uniform AQLM 2x8) or a QuIP# codebook (e.g. e8p12)")
