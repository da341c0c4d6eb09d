"""AQLM as a pass of the layer-wise engine: every linear with the codebook setting the plan
gives it (or one global setting), in true-sequential order, each Hessian from inputs that
already went through the quantized modules before it; optionally the finished layer's
codebooks and scales are fine-tuned against the original layer's outputs."""
from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass
from casp.options import positive
from casp.quant.aqlm.linear import AQLMLinear
from casp.quant.aqlm.quantize import AQLMResult, AQLMSetting, aqlm_quantize
from casp.quant.finetune import finetune_flags, finetune_layer
from casp.quant.layer_groups import PlannedPass, checked_groups, quantize_in_order

log = logging.getLogger("casp")


class AQLMPass(PlannedPass, LayerPass):
    """Args:
        setting: the codebook setting of every module the plan does not name.
        plan: {full module name: {"codebooks": "2x8", "group_size": 8, ...}} (a bit plan
            made with ``casp allocate --quantizer aqlm``).
        plan_id: a short fingerprint of the plan, recorded in the checkpoint settings.
        beam_size, max_rounds, steps_per_round, lr, tolerance, kmeans_iterations,
        kmeans_max_points: see
            :func:`casp.quant.aqlm.quantize.aqlm_quantize`.
        true_sequential: take each group's Hessian after quantizing the groups before it.
        finetune_steps, finetune_lr: Adam steps over the calibration batches fitting the
            quantized layer's codebooks and scales to the original layer's outputs
            (0: off, the paper's default).
        seed: k-means seed (each module mixes in its name).
    """

    name = "aqlm"
    setting_type, plan_key, label = AQLMSetting, "codebooks", "AQLM"

    def __init__(self, setting: AQLMSetting | str = "2x8", plan: dict[str, dict] | None = None,
                 plan_id: str | None = None, beam_size: int = 1, max_rounds: int = 100,
                 steps_per_round: int = 100, lr: float = 1e-4, tolerance: float = 0.01,
                 kmeans_iterations: int = 20, kmeans_max_points: int = 256,
                 true_sequential: bool = True,
                 finetune_steps: int = 0, finetune_lr: float = 1e-4, seed: int = 0):
        self.setting = AQLMSetting.parse(setting) if isinstance(setting, str) else setting
        if beam_size < 1 or max_rounds < 0 or steps_per_round < 0 or finetune_steps < 0:
            raise CaspError("beam size must be >= 1 and rounds/steps >= 0")
        if not 0 <= tolerance < 1:
            raise CaspError(f"relative tolerance {tolerance} is outside [0, 1); the usual value "
                            "is 0.01")
        self.use_plan(plan, plan_id)
        self.beam_size, self.max_rounds, self.steps_per_round = beam_size, max_rounds, steps_per_round
        self.lr, self.tolerance, self.kmeans_iterations = lr, tolerance, kmeans_iterations
        self.kmeans_max_points = kmeans_max_points
        self.true_sequential = true_sequential
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        self.seed = seed

    def settings(self) -> dict:
        return {"setting": self.setting.name, "plan": self.plan_id, "beam_size": self.beam_size,
                "max_rounds": self.max_rounds, "steps_per_round": self.steps_per_round,
                "lr": self.lr, "tolerance": self.tolerance,
                "kmeans_iterations": self.kmeans_iterations,
                "kmeans_max_points": self.kmeans_max_points,
                "true_sequential": self.true_sequential, "finetune_steps": self.finetune_steps,
                "finetune_lr": self.finetune_lr, "seed": self.seed}

    def process(self, ctx: LayerContext) -> None:
        groups = checked_groups(ctx, self.module_setting)
        targets = ctx.forward() if self.finetune_steps else None
        quantize_in_order(ctx, groups, self.true_sequential, self._quantize)
        if targets is not None:
            finetune_layer(ctx, [n for g in groups for n in g], targets, self.finetune_steps,
                           self.finetune_lr, "codebooks and scales")

    def _quantize(self, ctx: LayerContext, name: str, gram) -> None:
        full = ctx.full_name(name)
        setting = self.module_setting(full)
        linear = ctx.module(name)
        hessian = (2 * gram.mean()).to(torch.float32)
        module, result = quantize_linear(
            linear, hessian, setting, beam_size=self.beam_size, max_rounds=self.max_rounds,
            steps_per_round=self.steps_per_round, lr=self.lr, tolerance=self.tolerance,
            kmeans_iterations=self.kmeans_iterations, kmeans_max_points=self.kmeans_max_points,
            seed=self.seed + zlib.crc32(full.encode()) % 100_000)
        module.cache_weight()
        ctx.replace(name, module)
        ctx.changes[full]["relative_error"] = round(result.relative_error, 6)
        ctx.changes[full]["rounds"] = result.rounds
        log.debug("%s: AQLM %s, relative error %.4f after %d rounds", full, setting.name,
                  result.relative_error, result.rounds)


def quantize_linear(linear: nn.Linear, hessian: torch.Tensor, setting: AQLMSetting, **options
                    ) -> tuple[AQLMLinear, AQLMResult]:
    """One dense linear quantized with AQLM at ``setting`` (``options``: those of
    :func:`casp.quant.aqlm.quantize.aqlm_quantize`), as the stored module and the result."""
    result = aqlm_quantize(linear.weight.data, hessian, setting, **options)
    bias = linear.bias.data if linear.bias is not None else None
    return AQLMLinear.from_result(result, bias, linear.weight.dtype), result


PASS = AQLMPass
FLAGS = (
    ("--codebooks", dict(default="2x8",
                         help="setting of modules the plan does not name: M codebooks of 2^B "
                              "entries, MxB (2x8: 2 bits, the fast-kernel setting; 1x16: AQLM's "
                              "best 2-bit; 2x12: 3 bits) (default: 2x8)")),
    ("--in-group-size", dict(type=positive, default=8,
                             help="consecutive input weights coded together (default: 8)")),
    ("--beam-size", dict(type=positive, default=1,
                         help="hypotheses per row in the code search; 1 = greedy (default: 1)")),
    ("--max-rounds", dict(type=int, default=100,
                          help="at most this many rounds of codebook updates + code search "
                               "(default: 100; the tolerance usually stops earlier)")),
    ("--steps-per-round", dict(type=int, default=100,
                               help="Adam steps on codebooks and scales per round (default: 100)")),
    ("--lr", dict(type=float, default=1e-4,
                  help="Adam learning rate, betas (0, 0.95) (default: 1e-4)")),
    ("--tolerance", dict(type=float, default=0.01,
                         help="stop when a round lowers the relative error by less than this "
                              "fraction (default: 0.01)")),
    ("--kmeans-iterations", dict(type=int, default=20,
                                 help="Lloyd iterations of each codebook's k-means "
                                      "initialisation (default: 20)")),
    ("--kmeans-max-points", dict(type=int, default=256,
                                 help="k-means fits at most this many weight groups per codebook "
                                      "entry (0 = all; default: 256)")),
    *finetune_flags("codebooks and scales"),
    ("--init-seed", dict(type=int, default=0,
                         help="seed of the k-means initialisation (default: 0)")),
    ("--export-aqlm", dict(default=None,
                           help="also write the standard HF AQLM format (stock transformers + "
                                "aqlm load it) to this directory; needs one global setting and "
                                "no low-rank modules")),
)


def pass_from_flags(args, plan) -> AQLMPass:
    """The pass ``casp aqlm`` runs: ``args`` its parsed flags, ``plan`` a BitPlan or None."""
    return AQLMPass(AQLMSetting.parse(args.codebooks, args.in_group_size),
                    plan=plan.modules if plan else None,
                    plan_id=plan.fingerprint() if plan else None, beam_size=args.beam_size,
                    max_rounds=args.max_rounds, steps_per_round=args.steps_per_round,
                    lr=args.lr, tolerance=args.tolerance,
                    kmeans_iterations=args.kmeans_iterations,
                    kmeans_max_points=args.kmeans_max_points,
                    true_sequential=args.true_sequential, finetune_steps=args.finetune_steps,
                    finetune_lr=args.finetune_lr, seed=args.init_seed)


# the command's texts (after casp.quant.registry.STAGE3_DESCRIPTION in ``casp aqlm --help``)
HELP = "stage 3: AQLM quantization (uniform, or per module from a plan)"
PLAN_HELP = "bit plan from casp allocate --quantizer aqlm (per-module codebooks)"
DESCRIPTION = ("additive quantization (AQLM), layer by layer: residual k-means "
               "initialisation, then rounds of Adam on codebooks and scales and a beam "
               "search over the codes, until a round improves the layer output error by "
               "less than --tolerance. Without --plan every module gets --codebooks (the "
               "baseline); with --plan each gets the plan's setting (CASP_AQLM). The "
               "checkpoint stores codes, codebooks and scales in the aqlm package's layout "
               "and runs through its kernels.")
