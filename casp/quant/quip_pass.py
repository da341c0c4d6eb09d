"""QuIP# as passes of the layer-wise engine.

``HessianPass`` writes each layer's proxy Hessians E[x x^T] (one per distinct linear input)
to a directory: QuIP#'s offline Hessians, from the model as given (the quantize stage later
reads them instead of collecting its own).

``QuIPPass`` quantizes every linear with the codebook the plan gives it (or one global
codebook): in true-sequential order with Hessians taken after the modules before it were
quantized (the engine's default, as the other quantizers), or with the precomputed
Hessians of ``HessianPass``. Optionally the finished layer's sign vectors are fine-tuned
against the original layer's outputs (off by default, as in the paper).
"""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CaspError
from ..layerwise import LayerContext, LayerPass
from .common import (PlannedPass, checked_groups, finetune_layer, layer_linear_names,
                     quantize_in_order)
from .e8p import QuIPSetting
from .quip import quip_quantize
from .quip_linear import QuIPLinear

log = logging.getLogger("casp")
HESSIAN_INDEX = "hessians.json"


def _upper(n: int) -> torch.Tensor:
    """The upper triangle (diagonal included) of an n x n matrix, row by row: the packing of
    the stored Hessians."""
    return torch.ones(n, n, dtype=torch.bool).triu_()


def _layer_file(root: Path, index: int) -> Path:
    return root / f"layer_{index:03d}.safetensors"


class HessianPass(LayerPass):
    """Save E[x x^T] (float32, upper triangle packed row by row) of every distinct input of
    the linears the quantizers touch, one file per layer; linears fed the same tensor
    (q, k, v) share an entry. A layer whose file exists is kept (resume)."""

    name = "hessians"
    propagate = "original"

    def __init__(self, output: str | Path):
        self.output = Path(output)

    def settings(self) -> dict:
        return {"output": str(self.output)}

    def process(self, ctx: LayerContext) -> None:
        path = _layer_file(self.output, ctx.index)
        if path.exists():
            return
        names = layer_linear_names(ctx.layer, ctx.spec)
        grams = ctx.input_grams(names)
        tensors, aliases, seen = {}, {}, {}
        for name in names:
            gram = grams[name]
            if id(gram) in seen:
                aliases[name] = seen[id(gram)]
                continue
            seen[id(gram)] = name
            h = gram.mean().float().cpu()
            tensors[name] = h[_upper(h.shape[0])]
            aliases[name] = name
        self.output.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={
            "aliases": json.dumps(aliases),
            "tokens": json.dumps({n: grams[n].tokens for n in tensors})})
        tmp.replace(path)


def load_hessian(root: Path, index: int, name: str) -> torch.Tensor:
    """The Hessian of layer ``index``'s linear ``name`` written by :class:`HessianPass`."""
    from safetensors import safe_open

    path = _layer_file(root, index)
    if not path.exists():
        raise CaspError(f"no Hessians for layer {index} in {root}; run casp hessians (or "
                        "quip-sharp/scripts/hfize_*.sh) on this very model first")
    try:
        with safe_open(str(path), "pt") as fh:
            aliases = json.loads(fh.metadata()["aliases"])
            packed = fh.get_tensor(aliases[name]) if name in aliases else None
    except Exception as exc:                          # truncated or not a Hessian file
        raise CaspError(f"{path} is not a readable Hessian file ({str(exc)[:120]}); delete it "
                        "and rerun casp hessians, which recomputes the missing layers")
    if packed is None:
        raise CaspError(f"{root} has no Hessian for layer {index}'s {name}: it was computed on "
                        "another model (e.g. before the low-rank stage); recompute it")
    n = int(round(((8 * packed.numel() + 1) ** 0.5 - 1) / 2))
    h = torch.zeros(n, n, dtype=torch.float32)
    h[_upper(n)] = packed
    return h + torch.triu(h, 1).T


def model_identity(model: str) -> dict:
    """What identifies the weights Hessians are computed from: the model as given to
    --model (a resolved path, or the name) and the fingerprints of the casp stages that
    made it."""
    from ..checkpoint import read_casp_section

    path = Path(model)
    section = read_casp_section(path) if path.is_dir() else None
    stages = [s.get("fingerprint") for s in (section or {}).get("stages", [])]
    return {"source": str(path.resolve()) if path.exists() else model, "stages": stages}


def check_hessian_dir(root: Path, identity: dict, writing: bool) -> None:
    """Refuse Hessians of other weights: ``hessians.json`` in the directory records the
    model identity they were computed from (written with the first layer)."""
    record = root / HESSIAN_INDEX
    if not record.is_file():
        if writing:
            root.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"model": identity}, indent=1) + "\n")
            return
        raise CaspError(f"{root} has no {HESSIAN_INDEX}: it was not written by casp hessians; "
                        "compute the Hessians with casp hessians")
    found = json.loads(record.read_text()).get("model")
    if found != identity:
        what = "adds to" if writing else "uses"
        raise CaspError(f"{root} holds Hessians of other weights ({found.get('source')}, stages "
                        f"{found.get('stages')}); this run {what} {identity['source']} (stages "
                        f"{identity['stages']}): choose another directory or delete it")


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
        result = quip_quantize(linear.weight.data, hessian.to(linear.weight.device), setting,
                               sigma_reg=self.sigma_reg,
                               seed=self.seed + zlib.crc32(full.encode()) % 100_000)
        bias = linear.bias.data if linear.bias is not None else None
        module = QuIPLinear.from_result(result, bias, linear.weight.dtype)
        module.cache_weight()
        ctx.replace(name, module)
        ctx.changes[full]["relative_error"] = round(result.relative_error, 6)
        log.debug("%s: QuIP# %s, relative error %.4f", full, setting.name, result.relative_error)
