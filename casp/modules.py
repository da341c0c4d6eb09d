"""The modules casp puts in place of a dense linear, by the type name checkpoints record.

Each such module can ``describe()`` itself as a small JSON-able dict and be rebuilt, empty,
``from_description``. The checkpoint's ``casp.modules`` section and the per-layer resume
state are both lists of these descriptions, so rebuilding a model is one loop.
"""
from __future__ import annotations

import torch
from torch import nn

from casp.errors import CaspError

# type name -> class; filled by ``@register_module_type`` when a module class is defined
# (casp.quant.registry imports every built-in one: import it before rebuilding a model)
MODULE_TYPES: dict[str, type] = {}


def register_module_type(cls):
    MODULE_TYPES[cls.type_name] = cls
    return cls


def build_module(description: dict, dtype: torch.dtype | None = None) -> nn.Module:
    kind = description.get("type")
    if kind not in MODULE_TYPES:
        raise CaspError(f"unknown module type {kind!r} in checkpoint; it was written by a newer "
                        f"casp (known: {', '.join(MODULE_TYPES)}): upgrade casp")
    return MODULE_TYPES[kind].from_description(description, dtype)


def replace_modules(root: nn.Module, descriptions: dict[str, dict], dtype: torch.dtype | None,
                    prefix: str = "") -> None:
    """Install uninitialised modules described by ``descriptions`` (names relative to
    ``root`` after stripping ``prefix``), in ``dtype`` or the default dtype."""
    for name, description in descriptions.items():
        if prefix:
            if not name.startswith(prefix + "."):
                continue
            name = name[len(prefix) + 1:]
        root.set_submodule(name, build_module(description, dtype))
