"""Block fine-tuning of a finished layer (AQLM's and QuIP#'s optional last step): Adam on the
continuous parameters of the quantized modules (codebooks and scales, or real-valued sign
vectors; the codes stay fixed) against the original layer's outputs, kept only if the
layer's output error falls."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("casp")


def finetune_layer(ctx, names: list[str], targets: list[torch.Tensor], steps: int, lr: float,
                   what: str) -> None:
    """Block fine-tuning: Adam on the continuous parameters the quantized modules ``names``
    expose (``begin_training()``; codes stay fixed) against the original layer's outputs
    ``targets``, mean squared error over the calibration batches, ``steps`` epochs. The
    result is kept only if the layer's output error, with the values as they will be
    stored (``trained_as_stored()``), fell."""
    modules = [ctx.module(n) for n in names]
    frozen = [p for p in ctx.layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for m in modules for p in m.begin_training()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))

    def layer_error() -> float:
        with torch.no_grad():
            outs = ctx.forward()
        return sum(float(((o - t) ** 2).mean()) for o, t in zip(outs, targets)) / len(outs)

    before = layer_error()
    kept = True
    try:
        for _ in range(steps):
            for j, target in enumerate(targets):
                with torch.enable_grad():
                    out = ctx.run_batch(j)
                    loss = torch.nn.functional.mse_loss(out.float(),
                                                        target.to(ctx.device).float())
                    opt.zero_grad()
                    loss.backward()
                opt.step()
        for m in modules:
            m.trained_as_stored()
        after = layer_error()
        kept = after < before
    finally:
        for m in modules:
            m.end_training(keep=kept)
        for p in frozen:
            p.requires_grad_(True)
    if not kept:
        after = before
    log.info("layer %d fine-tuned: output MSE %.4g -> %.4g%s", ctx.index, before, after,
             "" if kept else f" (no gain: kept the {what} before fine-tuning)")
    for n, m in zip(names, modules):
        ctx.changes[ctx.full_name(n)].update(m.describe())      # what is stored may change
        ctx.changes[ctx.full_name(n)]["finetune_mse"] = [before, after]


def finetune_flags(what: str) -> tuple:
    """The command-line flags of block fine-tuning (AQLM, QuIP#), ``what`` naming the
    parameters it trains."""
    return (
        ("--finetune-steps", dict(
            type=int, default=0,
            help=f"passes over the calibration batches fine-tuning each finished layer's "
                 f"{what} to the original layer's outputs (default: 0 = off, as the paper)")),
        ("--finetune-lr", dict(type=float, default=1e-4,
                               help="Adam learning rate of the layer fine-tuning (default: 1e-4)")),
    )
