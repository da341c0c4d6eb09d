"""Per-linear pruning ratios: how a model's decoder is split into blocks, what mean sparsity
a set of ratios gives, and the profile file ``casp prune --profile`` applies.

The seed paper's search space (its authors' code): the decoder layers in ``blocks``
consecutive groups (a remainder goes to the first blocks: 30 layers in 8 blocks are
4,4,4,4,4,4,3,3), one ratio per block, or one per linear type per block. Mean sparsity is
weighted by parameter count, with each linear's realized ratio (int(in * r) / in per row).

A profile file:

    {"format": "casp-prune-profile", "architecture": "LlamaForCausalLM", "layers": 30,
     "score": "ria", "target": 0.5, "mean_sparsity": 0.5003,
     "blocks": [[0, 1, 2, 3], ...], "block_ratios": [{"all": 0.475}, ...],
     "ratios": {"model.layers.0.self_attn.q_proj": 0.475, ...},
     "shapes": {"model.layers.0.self_attn.q_proj": [576, 576], ...}}
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from casp.errors import CaspError
from casp.models import ModelSpec
from casp.prune.masks import check_ratio
from casp.quant.layer_groups import layer_linear_names

FORMAT = "casp-prune-profile"


def split_blocks(n_layers: int, n_blocks: int) -> list[list[int]]:
    """Consecutive layers in ``n_blocks`` groups, the remainder one each to the first."""
    if not 1 <= n_blocks <= n_layers:
        raise CaspError(f"--blocks {n_blocks}: give 1 to {n_layers} (the model's layers)")
    size, extra = divmod(n_layers, n_blocks)
    blocks, start = [], 0
    for b in range(n_blocks):
        count = size + (b < extra)
        blocks.append(list(range(start, start + count)))
        start += count
    return blocks


def prunable_shapes(model: nn.Module, spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Every linear of the decoder layers by full name: (out, in); refuses modules that are
    not dense linears (an already pruned or quantized model)."""
    shapes = {}
    for index, layer in enumerate(spec.decoder_layers(model)):
        for name in layer_linear_names(layer, spec):
            w = layer.get_submodule(name).weight
            shapes[f"{spec.layer_prefix(index)}.{name}"] = (w.shape[0], w.shape[1])
    return shapes


def linear_type(full_name: str) -> str:
    """"model.layers.3.self_attn.q_proj" -> "q_proj"."""
    return full_name.rsplit(".", 1)[-1]


def realized(ratio: float, in_features: int) -> float:
    return int(in_features * ratio) / in_features


def mean_sparsity(ratios: dict[str, float], shapes: dict[str, tuple[int, int]]) -> float:
    """Parameter-weighted mean of the realized ratios over every linear of ``shapes``
    (a linear ``ratios`` does not name counts as dense)."""
    total = sum(o * i for o, i in shapes.values())
    pruned = sum(o * i * realized(ratios.get(n, 0.0), i) for n, (o, i) in shapes.items())
    return pruned / total


def ratios_from_blocks(block_ratios: list[dict[str, float]], blocks: list[list[int]],
                       shapes: dict[str, tuple[int, int]], spec: ModelSpec) -> dict[str, float]:
    """Each linear's ratio: its block's entry for its type, else the block's "all"."""
    ratios = {}
    for block, entry in zip(blocks, block_ratios):
        for index in block:
            prefix = spec.layer_prefix(index) + "."
            for name in shapes:
                if name.startswith(prefix):
                    ratios[name] = entry.get(linear_type(name), entry.get("all", 0.0))
    return ratios


def write_profile(path: str | Path, ratios: dict[str, float], shapes: dict, architecture: str,
                  n_layers: int, **extra) -> Path:
    path = Path(path)
    for name, r in ratios.items():
        check_ratio(r, f"ratio of {name}")
    data = {"format": FORMAT, "architecture": architecture, "layers": n_layers, **extra,
            "mean_sparsity": round(mean_sparsity(ratios, shapes), 6),
            "ratios": ratios, "shapes": {n: list(s) for n, s in shapes.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_profile(path: str | Path) -> dict:
    """A profile file's contents, refused with one line when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaspError(f"profile {path} does not exist; check the path (casp prune-search "
                        "writes one)")
    except json.JSONDecodeError as exc:
        raise CaspError(f"profile {path} is not JSON ({exc}); write it with casp prune-search")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CaspError(f"{path} is not a pruning profile (no \"format\": \"{FORMAT}\"); write "
                        "it with casp prune-search")
    for name, r in data.get("ratios", {}).items():
        check_ratio(float(r), f"{path}: ratio of {name}")
    return data


def profile_ratios(data: dict, shapes: dict[str, tuple[int, int]], architecture: str,
                   source: str = "the profile") -> dict[str, float]:
    """The ratios of a profile after checking it is for this model (architecture, layer
    count, every linear's name and shape)."""
    ratios = {n: float(r) for n, r in data.get("ratios", {}).items()}
    theirs = {n: tuple(s) for n, s in data.get("shapes", {}).items()}
    if data.get("architecture") != architecture or theirs != shapes:
        raise CaspError(f"{source} is for another model ({data.get('architecture')}, "
                        f"{data.get('layers')} layers, {len(theirs)} linears; this one is "
                        f"{architecture} with {len(shapes)} linears); search a profile for this "
                        "model with casp prune-search")
    return ratios
