"""QuIP# as a pass of the layer-wise engine.

``QuIPPass`` quantizes every linear with the codebook the plan gives it (or one global
codebook): in true-sequential order with Hessians taken after the modules before it were
quantized (the engine's default, as the other quantizers), or with the precomputed
Hessians of ``HessianPass``. Optionally the finished layer's sign vectors are fine-tuned
against the original layer's outputs (off by default, as in the paper).
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch
from torch import nn

from casp.errors import CaspError
from casp.identity import model_identity
from casp.layerwise import LayerContext, LayerPass
from casp.quant.finetune import finetune_flags, finetune_layer
from casp.quant.layer_groups import PlannedPass, checked_groups, quantize_in_order
from casp.quant.quip.hessians import check_hessian_dir, load_hessian
from casp.quant.quip.linear import QuIPLinear
from casp.quant.quip.quantize import QuIPResult, quip_quantize
from casp.quant.quip.setting import QuIPSetting

log = logging.getLogger("casp")
class QuIPPass(PlannedPass, LayerPass):
    """Args:
        codebook: the codebook of every module the plan does not name (e8p12: 2 bits,
            e8p12rvq3b: 3 bits, e8p12rvq4b: 4 bits).
        plan: {full module name: {"quip_codebook": ..., "bits": ...}} from
            ``casp allocate --quantizer quip``.
        plan_id: the plan's fingerprint, recorded in the checkpoint settings.
        hessians: a directory written by :class:`HessianPass` (None: collect the Hessians in
            this pass).
        sigma_reg: damping added to the diagonal of the normalised Hessian.
        true_sequential: (own Hessians only) take each group's Hessian after quantizing the
            groups before it.
        finetune_steps, finetune_lr: Adam epochs over the calibration batches fitting the
            finished layer's sign vectors (made real-valued, stored as fp16) to the original
            layer's outputs (0: off, the paper's default).
        seed: random signs' seed (each module mixes in its name).
    """

    name = "quip"
    setting_type, plan_key, label = QuIPSetting, "quip_codebook", "QuIP#"

    def __init__(self, codebook: QuIPSetting | str = "e8p12", plan: dict[str, dict] | None = None,
                 plan_id: str | None = None, hessians: str | Path | None = None,
                 sigma_reg: float = 0.01, true_sequential: bool = True,
                 finetune_steps: int = 0, finetune_lr: float = 1e-4, seed: int = 0):
        self.setting = QuIPSetting.parse(codebook) if isinstance(codebook, str) else codebook
        if not 0 <= sigma_reg < 10:
            raise CaspError(f"--sigma-reg {sigma_reg} is outside [0, 10); QuIP#'s value is 0.01")
        if finetune_steps < 0:
            raise CaspError("--finetune-steps must be >= 0")
        self.use_plan(plan, plan_id)
        self.hessians = Path(hessians) if hessians else None
        if self.hessians is not None and not self.hessians.is_dir():
            raise CaspError(f"Hessian directory {self.hessians} does not exist; compute it with "
                            "casp hessians (quip-sharp/scripts/hfize_*.sh)")
        self.sigma_reg, self.true_sequential = sigma_reg, true_sequential
        self.finetune_steps, self.finetune_lr, self.seed = finetune_steps, finetune_lr, seed

    def settings(self) -> dict:
        return {"codebook": self.setting.name, "plan": self.plan_id,
                "hessians": str(self.hessians) if self.hessians else None,
                "sigma_reg": self.sigma_reg,
                # with offline Hessians the order of quantization changes nothing
                "true_sequential": None if self.hessians else self.true_sequential,
                "finetune_steps": self.finetune_steps, "finetune_lr": self.finetune_lr,
                "seed": self.seed}

    def process(self, ctx: LayerContext) -> None:
        groups = checked_groups(ctx, self.module_setting)
        targets = ctx.forward() if self.finetune_steps else None
        if self.hessians is not None:
            for group in groups:
                for name in group:
                    self._quantize(ctx, name, load_hessian(self.hessians, ctx.index, name))
        else:
            quantize_in_order(ctx, groups, self.true_sequential,
                              lambda c, n, gram: self._quantize(c, n, gram.mean()))
        if targets is not None:
            finetune_layer(ctx, [n for g in groups for n in g], targets, self.finetune_steps,
                           self.finetune_lr, "sign vectors")

    def _quantize(self, ctx: LayerContext, name: str, hessian: torch.Tensor) -> None:
        full = ctx.full_name(name)
        setting = self.module_setting(full)
        linear = ctx.module(name)
        if hessian.shape[0] != linear.weight.shape[1]:
            raise CaspError(f"the Hessian of {full} is {hessian.shape[0]}-dimensional but the "
                            f"module has {linear.weight.shape[1]} inputs: it was computed on "
                            "another model; recompute it")
        module, result = quantize_linear(linear, hessian.to(linear.weight.device), setting,
                                         sigma_reg=self.sigma_reg,
                                         seed=self.seed + zlib.crc32(full.encode()) % 100_000)
        module.cache_weight()
        ctx.replace(name, module)
        ctx.changes[full]["relative_error"] = round(result.relative_error, 6)
        log.debug("%s: QuIP# %s, relative error %.4f", full, setting.name, result.relative_error)


def quantize_linear(linear: nn.Linear, hessian: torch.Tensor, setting: QuIPSetting,
                    sigma_reg: float = 0.01, seed: int = 0) -> tuple[QuIPLinear, QuIPResult]:
    """One dense linear quantized with QuIP# at ``setting`` (a codebook), as the stored
    module and the algorithm's result."""
    result = quip_quantize(linear.weight.data, hessian, setting, sigma_reg=sigma_reg, seed=seed)
    bias = linear.bias.data if linear.bias is not None else None
    return QuIPLinear.from_result(result, bias, linear.weight.dtype), result


PASS = QuIPPass
FLAGS = (
    ("--codebook", dict(default="e8p12",
                        help="codebook of modules the plan does not name: e8p12 (2 bits), "
                             "e8p12rvq3b (E8P12 + a 1-bit E8 residual: 3 bits), e8p12rvq4b "
                             "(E8P12 + an E8P12 residual: 4 bits) (default: e8p12)")),
    ("--hessians", dict(default=None,
                        help="directory from casp hessians (QuIP#'s offline Hessians of the model "
                             "as given); default: collect them in this pass, after the modules "
                             "before each one were quantized (see --true-sequential)")),
    ("--sigma-reg", dict(type=float, default=0.01,
                         help="damping added to the diagonal of the Hessian normalised to mean "
                              "diagonal 1 (default: 0.01)")),
    *finetune_flags("sign vectors (made real-valued, stored in fp16)"),
    ("--sign-seed", dict(type=int, default=0,
                         help="seed of the random sign vectors (default: 0)")),
)


def pass_from_flags(args, plan) -> QuIPPass:
    """The pass ``casp quip`` runs: ``args`` its parsed flags, ``plan`` a BitPlan or None;
    offline Hessians are refused unless they are of the model given."""
    quip = QuIPPass(args.codebook, plan=plan.modules if plan else None,
                    plan_id=plan.fingerprint() if plan else None, hessians=args.hessians,
                    sigma_reg=args.sigma_reg, true_sequential=args.true_sequential,
                    finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                    seed=args.sign_seed)
    if quip.hessians is not None:        # the pass checked it exists; now whose they are
        check_hessian_dir(quip.hessians, model_identity(args.model), writing=False)
    return quip


# the command's texts (after casp.quant.registry.STAGE3_DESCRIPTION in ``casp quip --help``)
HELP = "stage 3: QuIP# quantization (uniform, or per module from a plan)"
PLAN_HELP = "bit plan from casp allocate --quantizer quip (per-module codebooks)"
DESCRIPTION = ("QuIP#: random-sign Hadamard incoherence on both sides of W and "
               "H, then BlockLDLQ (blocks of 8 columns, LDL error feedback) onto an E8 "
               "lattice codebook (E8P12: 2 bits; with a residual E8 codebook: 3 or 4 "
               "bits). Without --plan every module gets --codebook (the baseline); with "
               "--plan each gets the plan's codebook (CASP_QuIP#). The checkpoint stores "
               "16-bit codes per 8 weights, one sign bit per input and output and a scale; "
               "it runs from that packed form.")
