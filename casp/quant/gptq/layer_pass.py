"""GPTQ as a pass of the layer-wise engine: each linear at the bits and group size the plan
gives it, in true-sequential order (q/k factors and v, then the q/k up factors, then o,
then gate/up, then down), each group's Hessian taken from inputs that already went through
the quantized modules before it."""
from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass
from casp.options import group, positive, width
from casp.quant.gptq.linear import GPTQLinear
from casp.quant.gptq.quantize import GPTQResult, check_bits, gptq_quantize, weighted_error
from casp.quant.gptq.setting import QuantSetting
from casp.quant.layer_groups import layer_quantization_groups, quantize_in_order

log = logging.getLogger("casp")


class GPTQPass(LayerPass):
    """Args:
        bits, group_size: the setting of every module the plan does not name (-1 group size:
            one group per output channel).
        plan: {full module name: {"bits": b, "group_size": g}} (from a bit plan).
        plan_id: a short fingerprint of the plan, recorded in the checkpoint settings.
        act_order, static_groups, damp, block_size: GPTQ's options (see gptq_quantize).
        true_sequential: take each group's Hessian after quantizing the groups before it;
            off, every Hessian comes from the unquantized layer in one forward pass.
    """

    name = "gptq"

    def __init__(self, bits: int = 2, group_size: int = 128, plan: dict[str, dict] | None = None,
                 plan_id: str | None = None, act_order: bool = True, static_groups: bool = False,
                 damp: float = 0.01, block_size: int = 128, true_sequential: bool = True):
        check_bits(bits)
        if not 0 <= damp < 1:
            raise CaspError(f"dampening {damp} is outside [0, 1); the usual value is 0.01")
        self.bits, self.group_size = bits, group_size
        self.plan = dict(plan or {})
        self.plan_id = plan_id
        self.act_order, self.static_groups = act_order, static_groups
        self.damp, self.block_size, self.true_sequential = damp, block_size, true_sequential

    def settings(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "plan": self.plan_id,
                "act_order": self.act_order, "static_groups": self.static_groups,
                "damp": self.damp, "block_size": self.block_size,
                "true_sequential": self.true_sequential}

    def module_setting(self, full_name: str) -> tuple[int, int]:
        entry = self.plan.get(full_name, {})
        return int(entry.get("bits", self.bits)), int(entry.get("group_size", self.group_size))

    def process(self, ctx: LayerContext) -> None:
        groups = layer_quantization_groups(ctx.layer, ctx.spec, ctx.only)
        quantize_in_order(ctx, groups, self.true_sequential, self._quantize)

    def _quantize(self, ctx: LayerContext, name: str, gram) -> None:
        full = ctx.full_name(name)
        bits, group_size = self.module_setting(full)
        linear = ctx.module(name)
        hessian = (2 * gram.mean()).to(torch.float32)
        module, _ = quantize_linear(linear, hessian, QuantSetting(bits, group_size),
                                    act_order=self.act_order, static_groups=self.static_groups,
                                    damp=self.damp, block_size=self.block_size)
        # the layer's later forwards (the next groups' inputs, the outputs) reuse the
        # dequantized weight; moving the layer off the device drops it
        module.cache_weight()
        error = weighted_error(linear.weight.data.float(), module.dequantized_weight(), hessian)
        ctx.replace(name, module)
        ctx.changes[full]["relative_error"] = round(error, 6)


def quantize_linear(linear: nn.Linear, hessian: torch.Tensor, setting: QuantSetting,
                    act_order: bool = True, static_groups: bool = False, damp: float = 0.01,
                    block_size: int = 128) -> tuple[GPTQLinear, GPTQResult]:
    """One dense linear quantized with GPTQ at ``setting`` (its bits and group size; group
    indices follow from act-order), as the stored module and the algorithm's result."""
    result = gptq_quantize(linear.weight.data, hessian, setting.bits, setting.group_size,
                           act_order=act_order, static_groups=static_groups, damp=damp,
                           block_size=block_size)
    bias = linear.bias.data if linear.bias is not None else None
    return GPTQLinear.from_result(result, setting.bits, bias, linear.weight.dtype), result


PASS = GPTQPass
FLAGS = (
    ("--bits", dict(type=width, default=2,
                    help="bits of modules the plan does not name, 2-8 (default: 2)")),
    ("--group-size", dict(type=group, default=128,
                          help="group size of modules the plan does not name; -1 = per channel; "
                               "a size that does not divide the input leaves a shorter last "
                               "group (default: 128)")),
    ("--act-order", dict(action=argparse.BooleanOptionalAction, default=True,
                         help="quantize columns in order of decreasing Hessian diagonal "
                              "(default: on)")),
    ("--static-groups", dict(action="store_true",
                             help="with act-order, fix each group's grid on the original column "
                                  "order before quantizing (no group indices stored)")),
    ("--damp", dict(type=float, default=0.01,
                    help="dampening, a fraction of the mean Hessian diagonal (default: 0.01)")),
    ("--block-size", dict(type=positive, default=128,
                          help="columns per lazy update block (default: 128)")),
    ("--export-gptq", dict(default=None,
                           help="also write the standard GPTQ format (transformers / vLLM) to "
                                "this directory; needs one global setting, 2/4/8 bits, no "
                                "low-rank modules")),
)


def pass_from_flags(args, plan) -> GPTQPass:
    """The pass ``casp gptq`` runs: ``args`` its parsed flags, ``plan`` a BitPlan or None
    (refused when it counted group indices these flags do not store, or the reverse)."""
    if plan is not None:
        g_idx = args.act_order and not args.static_groups
        if plan.meta.get("g_idx", g_idx) != g_idx:
            raise CaspError(f"the plan counted {'no ' if not plan.meta['g_idx'] else ''}group "
                            "indices (act-order with dynamic groups) but these flags "
                            f"{'need' if g_idx else 'do not need'} them; pass the same "
                            "--act-order/--static-groups to casp allocate and casp gptq")
    return GPTQPass(bits=args.bits, group_size=args.group_size,
                    plan=plan.modules if plan else None,
                    plan_id=plan.fingerprint() if plan else None, act_order=args.act_order,
                    static_groups=args.static_groups, damp=args.damp,
                    block_size=args.block_size, true_sequential=args.true_sequential)


# the command's texts (after casp.quant.registry.STAGE3_DESCRIPTION in ``casp gptq --help``)
HELP = "stage 3: GPTQ quantization (uniform, or per module from a plan)"
PLAN_HELP = "bit plan from casp allocate (per-module bits)"
DESCRIPTION = ("GPTQ, layer by layer, and write a checkpoint of packed low-bit "
               "weights. Without --plan every module gets --bits/--group-size (the "
               "baseline); with --plan each gets the plan's setting (CASP_GPTQ).")
