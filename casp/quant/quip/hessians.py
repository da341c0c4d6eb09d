"""QuIP#'s offline Hessians: each layer's proxy Hessians E[x x^T] (one per distinct linear
input), written to a directory from the model as given, by ``HessianPass``; the quantize
stage later reads them (``load_hessian``) instead of collecting its own. The directory
records whose weights they are (casp.identity.model_identity) and refuses others."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass
from casp.quant.layer_groups import layer_linear_names

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
