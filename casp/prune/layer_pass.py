"""Pruning as a pass of the layer-wise engine: each linear of a layer, in true-sequential
order, pruned by a score (magnitude, Wanda, the seed paper's) or by SparseGPT, its statistics
from inputs that already went through the pruned linears before it (as the quantizers do).

``store="sparse"`` puts a :class:`SparseLinear` in place (a checkpoint that is really
smaller); ``store="masked"`` zeroes the dense weights in place (the search's trials)."""
from __future__ import annotations

import torch

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass
from casp.prune.masks import SCORES, Pattern, check_ratio, keep_mask, weight_scores
from casp.prune.sparse_linear import SparseLinear
from casp.prune.sparsegpt import sparsegpt_prune
from casp.quant.layer_groups import layer_quantization_groups, quantize_in_order

METHODS = (*SCORES, "sparsegpt")


def weighted_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor
                   ) -> float:
    """tr(D H D^T) / tr(W H W^T), D = W - W': the layer-wise output error, relative."""
    d = (original - pruned).float()
    w = original.float()
    h = hessian.float()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


class PrunePass(LayerPass):
    """Args:
        method: "magnitude", "wanda", "ria" (the seed paper's score) or "sparsegpt".
        ratio: unstructured ratio of every linear ``ratios`` does not name.
        nm: (N, M): N of every M consecutive weights of a row zeroed (instead of ratios).
        ratios: {full linear name: ratio} (a profile).
        profile_id: a short fingerprint of ``ratios``, recorded in the settings.
        store: "sparse" (SparseLinear modules) or "masked" (dense weights zeroed in place).
        damp, block_size: SparseGPT's options.
    """

    name = "prune"

    def __init__(self, method: str = "wanda", ratio: float = 0.5,
                 nm: tuple[int, int] | None = None, ratios: dict[str, float] | None = None,
                 profile_id: str | None = None, store: str = "sparse", damp: float = 0.01,
                 block_size: int = 128):
        if method not in METHODS:
            raise CaspError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")
        if store not in ("sparse", "masked"):
            raise CaspError(f"store {store!r}: use sparse or masked")
        if nm is not None and ratios:
            raise CaspError("give N:M or a profile of ratios, not both")
        check_ratio(ratio)
        self.method, self.ratio, self.nm = method, ratio, nm
        self.ratios = dict(ratios or {})
        self.profile_id, self.store = profile_id, store
        self.damp, self.block_size = damp, block_size

    def settings(self) -> dict:
        return {"method": self.method, "ratio": self.ratio,
                "nm": list(self.nm) if self.nm else None, "profile": self.profile_id,
                "store": self.store, "damp": self.damp, "block_size": self.block_size}

    def pattern(self, full_name: str) -> Pattern:
        if self.nm:
            return Pattern(n=self.nm[0], m=self.nm[1])
        return Pattern(ratio=self.ratios.get(full_name, self.ratio))

    def process(self, ctx: LayerContext) -> None:
        groups = layer_quantization_groups(ctx.layer, ctx.spec, ctx.only)
        quantize_in_order(ctx, groups, True, self._prune)

    def _prune(self, ctx: LayerContext, name: str, gram) -> None:
        full = ctx.full_name(name)
        pattern = self.pattern(full)
        linear = ctx.module(name)
        weight = linear.weight.data
        hessian = (2 * gram.mean()).to(torch.float32)
        if pattern.sparsity == 0:
            return
        if self.method == "sparsegpt":
            pruned, keep = sparsegpt_prune(weight, hessian, pattern, self.damp, self.block_size)
        else:
            scores = weight_scores(weight, self.method, gram.gram.diagonal(), gram.tokens)
            keep = keep_mask(scores, pattern)
            pruned = weight.float() * keep
        error = weighted_error(weight, pruned, hessian)
        pruned = pruned.to(weight.dtype)
        if self.store == "masked":
            weight.copy_(pruned)
            ctx.changes[full] = {"type": "masked", "sparsity": 1 - float(keep.float().mean())}
        else:
            bias = linear.bias.data if linear.bias is not None else None
            ctx.replace(name, SparseLinear.from_weight(pruned, keep, bias, pattern.describe()))
        ctx.changes[full]["relative_error"] = round(error, 6)
