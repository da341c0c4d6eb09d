"""The stage-3 quantizers casp knows, one :class:`QuantizerSpec` each.

Everything outside a quantizer's own folder (casp/quant/<name>/) reaches it through its
spec: the command line builds ``casp <name>`` from its flags and pass factory, the bit
plan parses and prices its settings, the checkpoint counts its stored tensors and bits,
and loading rebuilds its modules. Adding a quantizer is one folder and one entry in
``QUANTIZERS`` (docs/extending.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from casp.errors import CaspError
from casp.lowrank import LowRankLinear
from casp.prune.sparse_linear import SparseLinear
from casp.quant.aqlm import export as aqlm_export
from casp.quant.aqlm import layer_pass as aqlm_pass
from casp.quant.aqlm.linear import AQLMLinear
from casp.quant.aqlm.setting import SETTING_PATTERN, AQLMSetting
from casp.quant.gptq import export as gptq_export
from casp.quant.gptq import layer_pass as gptq_pass
from casp.quant.gptq.linear import GPTQLinear
from casp.quant.gptq.setting import QuantSetting
from casp.quant.quip import layer_pass as quip_pass
from casp.quant.quip.linear import QuIPLinear
from casp.quant.quip.setting import SETTINGS as QUIP_SETTINGS
from casp.quant.quip.setting import QuIPSetting

STAGE3_DESCRIPTION = ("Quantize every linear of the language model's decoder layers "
                      "(low-rank factors included) with ")


@dataclass(frozen=True)
class QuantizerSpec:
    """What casp needs to know of one quantizer.

    Attributes:
        name: the command (``casp gptq``), the plan's ``quantizer`` and the pass name.
        label: how tables and messages name it ("QuIP#").
        setting_type: how one module is stored (``cost(out, in)``, ``check(out, in, name)``,
            ``plan_entry()``; codebook quantizers also ``parse(text)`` and
            ``from_plan_entry(entry)``).
        module_class: the stored module it writes (its ``type_name`` in checkpoints, its
            ``stored_tensors`` and ``described_bits(description)``).
        layer_pass: the module of its engine pass, which defines the pass class
            (``PASS``), ``quantize_linear(linear, hessian, setting) -> (module, result)``,
            the command's flags (``FLAGS``: ``(flag, argparse keyword arguments)``),
            ``pass_from_flags(args, plan)`` and the command's texts (``HELP``,
            ``DESCRIPTION``, ``PLAN_HELP``).
        example_setting: a setting of this quantizer (tests, docs).
        search_options: flags the measured search passes on to the pass (its other settings
            stay at their defaults there).
        default_codebooks: codebook quantizers: the setting each allocated width stands for,
            "WIDTH=SETTING,..." (None: the setting is bits and a group size).
        width_is_bits: a codebook's width must equal its stored bits per weight.
        budget_setting: ``text -> setting`` for a budget given as that quantizer's uniform
            setting (``casp allocate --budget 2x8``), None when ``text`` is not one.
        export, export_flag: ``(loaded, output, overwrite) -> path`` writing the standard
            format, and the flag (attribute name) that asks for it.
    """

    name: str
    label: str
    setting_type: type
    module_class: type
    layer_pass: ModuleType
    example_setting: object
    search_options: tuple[str, ...] = ()
    default_codebooks: str | None = None
    width_is_bits: bool = False
    budget_setting: Callable[[str], object] | None = None
    export: Callable | None = None
    export_flag: str | None = None

    @property
    def coded(self) -> bool:
        """Whether a width stands for a codebook setting (AQLM, QuIP#) rather than bits."""
        return self.default_codebooks is not None

    @property
    def pass_type(self) -> type:
        return self.layer_pass.PASS

    def quantize_linear(self, linear, hessian, setting, **options):
        return self.layer_pass.quantize_linear(linear, hessian, setting, **options)

    def pass_from_flags(self, args, plan):
        return self.layer_pass.pass_from_flags(args, plan)

    @property
    def flags(self) -> tuple:
        return self.layer_pass.FLAGS

    @property
    def help(self) -> str:
        return self.layer_pass.HELP

    @property
    def plan_help(self) -> str:
        return self.layer_pass.PLAN_HELP

    @property
    def description(self) -> str:
        return STAGE3_DESCRIPTION + self.layer_pass.DESCRIPTION


def _aqlm_budget(text: str):
    return AQLMSetting.parse(text) if SETTING_PATTERN.match(text.strip()) else None


def _quip_budget(text: str):
    return QuIPSetting.parse(text) if text.strip().lower() in QUIP_SETTINGS else None


QUANTIZERS: dict[str, QuantizerSpec] = {spec.name: spec for spec in (
    QuantizerSpec("gptq", "GPTQ", QuantSetting, GPTQLinear, gptq_pass,
                  example_setting=QuantSetting(2, 128, g_idx=True),
                  search_options=("act_order", "static_groups"),
                  export=gptq_export.export_gptq, export_flag="export_gptq"),
    QuantizerSpec("aqlm", "AQLM", AQLMSetting, AQLMLinear, aqlm_pass,
                  example_setting=AQLMSetting(2, 8), default_codebooks="2=2x8,3=2x12,4=4x8",
                  budget_setting=_aqlm_budget, export=aqlm_export.export_aqlm,
                  export_flag="export_aqlm"),
    QuantizerSpec("quip", "QuIP#", QuIPSetting, QuIPLinear, quip_pass,
                  example_setting=QUIP_SETTINGS["e8p12"], width_is_bits=True,
                  default_codebooks="2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b",
                  budget_setting=_quip_budget),
)}

QUANTIZER_LABELS = {name: spec.label for name, spec in QUANTIZERS.items()}
# every module type a checkpoint can hold besides dense linears
MODULE_CLASSES = (LowRankLinear, SparseLinear, *(spec.module_class for spec in QUANTIZERS.values()))
QUANTIZED_TENSOR_SUFFIXES = tuple(f".{t}" for spec in QUANTIZERS.values()
                                  for t in spec.module_class.stored_tensors)


def quantizer(name: str) -> QuantizerSpec:
    if name not in QUANTIZERS:
        raise CaspError(f"unknown quantizer {name!r}; use one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name]


def quantizer_of_setting(setting) -> QuantizerSpec:
    """The quantizer a module setting (QuantSetting, AQLMSetting, QuIPSetting) is for."""
    for spec in QUANTIZERS.values():
        if isinstance(setting, spec.setting_type):
            return spec
    raise TypeError(f"{type(setting).__name__} is no quantizer's setting")


def described_stored_bits(description: dict) -> int | None:
    """Stored bits of a quantized module from its checkpoint description (None: the module
    is not a quantized one)."""
    for spec in QUANTIZERS.values():
        if description.get("type") == spec.module_class.type_name:
            return spec.module_class.described_bits(description)
    return None
