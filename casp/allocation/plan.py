"""Stage 2: the bit plan, and the block-influence allocation that makes one.

:func:`allocate` turns per-layer importance scores (casp.allocation.importance) into one
width per layer at the budget (casp.allocation.budget, casp.allocation.solver). The result
is a :class:`BitPlan`, a JSON file naming every module's bits and setting, read by the
stage-3 quantizers.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from casp.allocation.budget import SettingRules, dense_parameters, modules_by_layer
from casp.allocation.solver import LayerChoice, continuous_allocation, solve_widths
from casp.errors import CaspError
from casp.identity import fingerprint
from casp.models import ModelSpec
from casp.quant.gptq.quantize import check_bits
from casp.quant.layer_groups import is_factor, quantizable_linears

log = logging.getLogger("casp")

PLAN_FORMAT = "casp-bit-plan"
PLAN_VERSION = 1

@dataclass
class BitPlan:
    """Every quantized module's bits and group size, and how they were chosen."""
    modules: dict[str, dict]
    layers: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def achieved_bits(self) -> float:
        return self.meta["achieved_bits"]

    def fingerprint(self) -> str:
        return fingerprint(self.modules)

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **self.meta,
                "layers": self.layers, "modules": self.modules}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BitPlan":
        path = Path(path)
        if not path.is_file():
            raise CaspError(f"plan file {path} does not exist; write one with casp allocate")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CaspError(f"plan file {path} is not JSON ({exc}); write it again with casp "
                            "allocate")
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise CaspError(f"{path} is not a casp bit plan; write one with casp allocate")
        modules = data.pop("modules", None)
        layers = data.pop("layers", [])
        if not isinstance(modules, dict) or not modules:
            raise CaspError(f"plan file {path} names no modules; write it again with casp allocate")
        for name, entry in modules.items():
            try:
                check_bits(entry["bits"])
                int(entry["group_size"])
            except (KeyError, TypeError, ValueError):
                raise CaspError(f"plan file {path}: module {name} needs integer 'bits' and "
                                "'group_size'")
        return cls(modules=modules, layers=layers, meta=data)

    def check_matches(self, model: nn.Module, spec: ModelSpec, source: str = "the model") -> None:
        """The plan must name exactly the model's quantizable linears, with their shapes."""
        linears = quantizable_linears(model, spec)
        missing = [n for n in linears if n not in self.modules]
        extra = [n for n in self.modules if n not in linears]
        if missing or extra:
            example = (missing or extra)[0]
            what = "lacks" if missing else "names a module the model does not have:"
            raise CaspError(f"the plan does not match {source}: it {what} {example} "
                            f"({len(missing)} missing, {len(extra)} unknown); make the plan from "
                            "this very checkpoint with casp allocate")
        for name, linear in linears.items():
            shape = self.modules[name].get("shape")
            if shape is not None and list(shape) != list(linear.weight.shape):
                raise CaspError(f"the plan does not match {source}: {name} is "
                                f"{list(linear.weight.shape)} in the model, {shape} in the plan; "
                                "make the plan from this very checkpoint")


def allocate(model: nn.Module, spec: ModelSpec, importance: dict[int, float], budget: float,
             allowed_bits: list[int], group_size: int = 128, factor_bits: int | None = 3,
             factor_group_size: int = -1, g_idx: bool = False,
             codebooks: dict[int, object] | None = None) -> BitPlan:
    """Solve the allocation for ``model`` (original or low-rank) at ``budget`` average bits.

    Each layer gets one width from ``allowed_bits`` for its dense linears (group
    ``group_size``); low-rank factors get ``factor_bits`` (per channel by default, as the
    official code does), or the layer's width when ``factor_bits`` is None. With
    ``codebooks`` (width -> AQLM setting or QuIP# codebook) the plan is for that quantizer:
    a module at width b is stored with ``codebooks[b]`` and costs what that setting stores.
    """
    if not allowed_bits:
        raise CaspError("no allowed bit widths; give e.g. --bits 2,3,4")
    rules = SettingRules(group_size, factor_bits, factor_group_size, g_idx, codebooks)
    allowed = sorted(set(allowed_bits))
    rules.check(allowed)
    dense = dense_parameters(model, spec)
    by_layer = modules_by_layer(model, spec)
    missing = [i for i in range(len(by_layer)) if i not in importance]
    if missing:
        raise CaspError(f"no importance score for layer {missing[0]}")
    for modules in by_layer:
        for name, lin in modules.items():
            for b in allowed:
                rules.setting(name, b).check(*lin.weight.shape, name=name)      # validates

    choices = []
    for i, modules in enumerate(by_layer):
        shapes = {n: tuple(lin.weight.shape) for n, lin in modules.items()}
        costs = {b: rules.layer_cost(shapes, b) for b in allowed}
        weights = sum(lin.weight.numel() for n, lin in modules.items()
                      if factor_bits is None or not is_factor(n))
        choices.append(LayerChoice(i, float(importance[i]), weights, costs))

    budget_total = int(math.floor(budget * dense))
    try:
        solve_widths(choices, budget_total)
    except CaspError:
        lowest = sum(min(c.costs.values()) for c in choices) / dense
        raise rules.budget_error(budget, allowed, lowest)
    if all(c.bits == allowed[-1] for c in choices):
        log.warning("budget %.4f exceeds what the widest allowed width uses; every layer gets "
                    "%d bits", budget, allowed[-1])

    # the continuous optimum, for reference: mean width the budget leaves for the layers'
    # own weights once overheads and fixed-width factors are paid (estimated at the mean
    # width)
    sizes = np.array([c.weights for c in choices], dtype=np.float64)
    overhead = sum(c.costs[allowed[0]] - allowed[0] * c.weights for c in choices)
    mean_bits = (budget_total - overhead) / sizes.sum()
    cont = continuous_allocation(np.array([c.importance for c in choices]), sizes, mean_bits,
                                 float(allowed[0]), float(allowed[-1]))
    for c, b in zip(choices, cont):
        c.continuous_bits = float(b)

    modules, layers_out, total = {}, [], 0
    for c in choices:
        for n, lin in by_layer[c.index].items():
            modules[n] = rules.entry(n, c.bits, lin.weight.shape)
        total += c.costs[c.bits]
        layers_out.append({"layer": c.index, "importance": round(c.importance, 6),
                           "continuous_bits": round(c.continuous_bits, 4), "bits": c.bits,
                           "stored_bits": c.costs[c.bits]})
    meta = plan_meta(budget, total, dense, allowed, rules, model)
    return BitPlan(modules=modules, layers=layers_out, meta=meta)


def plan_meta(budget: float, total: int, dense: int, allowed: list[int], rules: SettingRules,
              model: nn.Module) -> dict:
    return {"budget_bits": budget, "achieved_bits": total / dense, "stored_bits": total,
            "dense_parameters": dense, "allowed_bits": allowed, **rules.meta(),
            "architecture": type(model).__name__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
