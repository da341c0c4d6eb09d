"""The stage-3 quantizers casp knows, one :class:`QuantizerSpec` each.

Everything outside a quantizer's own folder (casp/quant/<name>/) reaches it through its
spec: the command line builds ``casp <name>`` from its flags and pass factory, the bit
plan parses and prices its settings, the checkpoint counts its stored tensors and bits,
and loading rebuilds its modules. Adding a quantizer is one folder and one entry in
``QUANTIZERS`` (docs/extending.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from casp.errors import CaspError
from casp.lowrank import LowRankLinear
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
        pass_type: the layer pass; ``pass_type(plan=..., plan_id=...)`` runs with defaults.
        quantize_linear: ``(linear, hessian, setting) -> (module, result)``: one dense linear
            quantized at a setting (what the pass does to each linear).
        example_setting: a setting of this quantizer (tests, docs).
        flags: its own command-line flags, ``(flag, argparse keyword arguments)``.
        pass_from_flags: ``(args, plan) -> pass`` from the parsed flags and a BitPlan or None.
        search_options: flags the measured search passes on to ``pass_type`` (its other
            settings stay at their defaults there).
        default_codebooks: codebook quantizers: the setting each allocated width stands for,
            "WIDTH=SETTING,..." (None: the setting is bits and a group size).
        width_is_bits: a codebook's width must equal its stored bits per weight.
        budget_setting: ``text -> setting`` for a budget given as that quantizer's uniform
            setting (``casp allocate --budget 2x8``), None when ``text`` is not one.
        export: ``(loaded, output, overwrite) -> path`` writing the standard format, and
            the flag that asks for it.
        help, description, plan_help: the command's texts.
    """

    name: str
    label: str
    setting_type: type
    module_class: type
    pass_type: type
    quantize_linear: Callable
    example_setting: object
    flags: tuple
    pass_from_flags: Callable
    help: str
    description: str
    plan_help: str
    search_options: tuple[str, ...] = ()
    default_codebooks: str | None = None
    width_is_bits: bool = False
    budget_setting: Callable[[str], object] | None = None
    export: Callable | None = None
    export_flag: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def coded(self) -> bool:
        """Whether a width stands for a codebook setting (AQLM, QuIP#) rather than bits."""
        return self.default_codebooks is not None


def _aqlm_budget(text: str):
    return AQLMSetting.parse(text) if SETTING_PATTERN.match(text.strip()) else None


def _quip_budget(text: str):
    return QuIPSetting.parse(text) if text.strip().lower() in QUIP_SETTINGS else None


_STAGE3 = ("Quantize every linear of the language model's decoder layers (low-rank factors "
           "included) with ")

QUANTIZERS: dict[str, QuantizerSpec] = {spec.name: spec for spec in (
    QuantizerSpec(
        name="gptq", label="GPTQ", setting_type=QuantSetting, module_class=GPTQLinear,
        pass_type=gptq_pass.GPTQPass, quantize_linear=gptq_pass.quantize_linear,
        example_setting=QuantSetting(2, 128, g_idx=True), flags=gptq_pass.FLAGS,
        pass_from_flags=gptq_pass.pass_from_flags, search_options=("act_order", "static_groups"),
        export=gptq_export.export_gptq, export_flag="export_gptq",
        help="stage 3: GPTQ quantization (uniform, or per module from a plan)",
        description=_STAGE3 + "GPTQ, layer by layer, and write a checkpoint of packed low-bit "
                    "weights. Without --plan every module gets --bits/--group-size (the "
                    "baseline); with --plan each gets the plan's setting (CASP_GPTQ).",
        plan_help="bit plan from casp allocate (per-module bits)"),
    QuantizerSpec(
        name="aqlm", label="AQLM", setting_type=AQLMSetting, module_class=AQLMLinear,
        pass_type=aqlm_pass.AQLMPass, quantize_linear=aqlm_pass.quantize_linear,
        example_setting=AQLMSetting(2, 8), flags=aqlm_pass.FLAGS,
        pass_from_flags=aqlm_pass.pass_from_flags, default_codebooks="2=2x8,3=2x12,4=4x8",
        budget_setting=_aqlm_budget, export=aqlm_export.export_aqlm, export_flag="export_aqlm",
        help="stage 3: AQLM quantization (uniform, or per module from a plan)",
        description=_STAGE3 + "additive quantization (AQLM), layer by layer: residual k-means "
                    "initialisation, then rounds of Adam on codebooks and scales and a beam "
                    "search over the codes, until a round improves the layer output error by "
                    "less than --tolerance. Without --plan every module gets --codebooks (the "
                    "baseline); with --plan each gets the plan's setting (CASP_AQLM). The "
                    "checkpoint stores codes, codebooks and scales in the aqlm package's layout "
                    "and runs through its kernels.",
        plan_help="bit plan from casp allocate --quantizer aqlm (per-module codebooks)"),
    QuantizerSpec(
        name="quip", label="QuIP#", setting_type=QuIPSetting, module_class=QuIPLinear,
        pass_type=quip_pass.QuIPPass, quantize_linear=quip_pass.quantize_linear,
        example_setting=QUIP_SETTINGS["e8p12"], flags=quip_pass.FLAGS,
        pass_from_flags=quip_pass.pass_from_flags,
        default_codebooks="2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b", width_is_bits=True,
        budget_setting=_quip_budget,
        help="stage 3: QuIP# quantization (uniform, or per module from a plan)",
        description=_STAGE3 + "QuIP#: random-sign Hadamard incoherence on both sides of W and "
                    "H, then BlockLDLQ (blocks of 8 columns, LDL error feedback) onto an E8 "
                    "lattice codebook (E8P12: 2 bits; with a residual E8 codebook: 3 or 4 "
                    "bits). Without --plan every module gets --codebook (the baseline); with "
                    "--plan each gets the plan's codebook (CASP_QuIP#). The checkpoint stores "
                    "16-bit codes per 8 weights, one sign bit per input and output and a scale; "
                    "it runs from that packed form.",
        plan_help="bit plan from casp allocate --quantizer quip (per-module codebooks)"),
)}

QUANTIZER_LABELS = {name: spec.label for name, spec in QUANTIZERS.items()}
# every module type a checkpoint can hold besides dense linears
MODULE_CLASSES = (LowRankLinear, *(spec.module_class for spec in QUANTIZERS.values()))
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
