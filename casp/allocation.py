"""Stage 2: the optimal per-layer bit allocation.

1. Importance of each decoder layer from calibration data (``ImportancePass``):
   block influence BI_i = 1 - mean over tokens of cos(h_in, h_out) (default), or the
   relative change ||h_out - h_in|| / ||h_in||.
2. The budget: the average bits over the ORIGINAL dense parameter count of the quantized
   linears, everything stored counted (codes, per-group scales and zeros, group indices,
   the low-rank factors), so what the low-rank stage saved pays for higher-bit layers.
3. The solver minimises sum_i w_i n_i 2^(-2 b_i) (w_i the importance, n_i the weights the
   layer's width applies to) under the budget. The continuous optimum is
   b_i = b_avg + 0.5 log2(w_i / geometric mean of w) (clamped to the allowed range); the
   integer widths come from a multiple-choice knapsack over the allowed widths, solved by
   dynamic programming on conservatively rounded costs, then topped up greedily with exact
   costs, so the budget holds to the bit.
The result is a :class:`BitPlan`, a JSON file naming every module's bits and group size.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CaspError
from .layerwise import LayerContext, LayerPass, fingerprint
from .models import ModelSpec
from .quant.common import described_stored_bits, is_factor, quantizable_linears
from .quant.gptq import check_bits, effective_group_size, stored_bits

log = logging.getLogger("casp")

IMPORTANCE_METHODS = ("block_influence", "relative_change")
PLAN_FORMAT = "casp-bit-plan"
PLAN_VERSION = 1


# ----------------------------------------------------------------------------- importance

class ImportancePass(LayerPass):
    """Scores every layer; changes nothing. ``scores[i]`` after the walk."""

    name = "importance"

    def __init__(self, method: str = "block_influence"):
        if method not in IMPORTANCE_METHODS:
            raise CaspError(f"unknown importance {method!r}; use one of "
                            f"{', '.join(IMPORTANCE_METHODS)}")
        self.method = method
        self.scores: dict[int, float] = {}

    def settings(self) -> dict:
        return {"method": self.method}

    def process(self, ctx: LayerContext) -> None:
        outputs = ctx.forward()
        total, count = 0.0, 0
        for h_in, h_out in zip(ctx.inputs.hidden, outputs):
            a = h_in.reshape(-1, h_in.shape[-1]).double()
            b = h_out.reshape(-1, h_out.shape[-1]).double()
            if self.method == "block_influence":
                per_token = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
            else:
                per_token = (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
            total += per_token.sum().item()
            count += per_token.numel()
        self.scores[ctx.index] = total / max(count, 1)
        ctx.outputs = outputs


# ----------------------------------------------------------------------------- accounting

@dataclass
class QuantSetting:
    """How a module is stored: bits, group size (-1: per channel), group indices or not."""
    bits: int
    group_size: int
    g_idx: bool = False

    def cost(self, out_features: int, in_features: int) -> int:
        return stored_bits(out_features, in_features, self.bits, self.group_size, self.g_idx)

    def check(self, out_features: int, in_features: int, name: str = "the module") -> None:
        effective_group_size(in_features, self.group_size)

    def plan_entry(self) -> dict:
        """What a plan records of the setting besides its width."""
        return {"group_size": self.group_size}



def parse_codebook_map(text: str, quantizer: str = "aqlm") -> dict[int, object]:
    """'2=2x8,3=2x12' -> {2: AQLMSetting 2x8, 3: AQLMSetting 2x12}: the codebook setting
    each allocated width stands for; with ``quantizer`` "quip" the settings are QuIP#
    codebooks ('2=e8p12,3=e8p12rvq3b')."""
    from .quant.aqlm import AQLMSetting
    from .quant.e8p import QuIPSetting

    parse = QuIPSetting.parse if quantizer == "quip" else AQLMSetting.parse
    example = ("2=e8p12,3=e8p12rvq3b" if quantizer == "quip" else "2=2x8,3=2x12")
    result = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        width, sep, setting = item.partition("=")
        try:
            if not sep:
                raise ValueError
            result[int(width)] = parse(setting)
        except ValueError:
            raise CaspError(f"codebook map item {item!r} is not WIDTH=SETTING (e.g. {example})")
    if not result:
        raise CaspError(f"empty codebook map; give e.g. {example}")
    if quantizer == "quip":
        wrong = [(w, s) for w, s in result.items() if s.bits != w]
        if wrong:
            raise CaspError(f"codebook map: {wrong[0][1].name} stores {wrong[0][1].bits} bits, "
                            f"not {wrong[0][0]}; use 2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b")
    return result


def codebook_quantizer(codebooks: dict | None) -> str:
    """Which quantizer a codebook map is for ("gptq" when there is none)."""
    if not codebooks:
        return "gptq"
    return next(iter(codebooks.values())).quantizer


QUANTIZER_LABELS = {"gptq": "GPTQ", "aqlm": "AQLM", "quip": "QuIP#"}


def dense_shapes(model: nn.Module, spec: ModelSpec) -> list[tuple[int, int]]:
    """(out, in) of every quantized linear as it was before any low-rank factorisation."""
    from .lowrank import LowRankLinear

    shapes = []
    for layer in spec.decoder_layers(model):
        for name in spec.linears:
            m = layer.get_submodule(name)
            shapes.append((m.out_features, m.in_features) if isinstance(m, LowRankLinear)
                          else tuple(m.weight.shape))
    return shapes


def dense_parameters(model: nn.Module, spec: ModelSpec) -> int:
    """Parameters of the quantized linears before any low-rank factorisation."""
    return sum(out_f * in_f for out_f, in_f in dense_shapes(model, spec))


def average_bits(section: dict) -> float | None:
    """Average stored bits per original dense weight of the quantized linears, from a
    checkpoint's casp section; None when it holds no quantized modules."""
    modules = section.get("modules", {})
    stored, dense = 0, 0
    counted_parents = set()
    for name, d in modules.items():
        bits = described_stored_bits(d)
        if bits is None:
            continue
        stored += bits
        parent = name.rsplit(".", 1)[0]
        if is_factor(name) and modules.get(parent, {}).get("type") == "lowrank":
            if parent not in counted_parents:
                counted_parents.add(parent)
                dense += modules[parent]["in_features"] * modules[parent]["out_features"]
        else:
            dense += d["in_features"] * d["out_features"]
    return stored / dense if dense else None


# ----------------------------------------------------------------------------- solver

@dataclass
class LayerChoice:
    """One layer as the solver sees it."""
    index: int
    importance: float
    weights: int                      # weights the layer's width applies to (n_i)
    costs: dict[int, int]             # width -> stored bits of the whole layer
    continuous_bits: float = 0.0
    bits: int = 0


def continuous_allocation(importance: np.ndarray, sizes: np.ndarray, mean_bits: float,
                          low: float, high: float) -> np.ndarray:
    """b_i = c + 0.5 log2(w_i), clamped to [low, high], with c set (by bisection) so that
    the size-weighted mean is ``mean_bits``."""
    logw = 0.5 * np.log2(np.maximum(importance, 1e-12))
    lo_c, hi_c = low - logw.max() - 1, high - logw.min() + 1
    for _ in range(200):
        c = (lo_c + hi_c) / 2
        b = np.clip(c + logw, low, high)
        if (b * sizes).sum() / sizes.sum() < mean_bits:
            lo_c = c
        else:
            hi_c = c
    return np.clip((lo_c + hi_c) / 2 + logw, low, high)


def model_error(layer: "LayerChoice", bits: int) -> float:
    """The block-influence model of a layer's error at ``bits``: w_i n_i 2^(-2 b)."""
    return layer.importance * layer.weights * 2.0 ** (-2 * bits)


def solve_widths(layers: list[LayerChoice], budget: int, resolution: int = 4000) -> None:
    """Choose each layer's width (``layer.bits``) minimising sum w_i n_i 2^(-2 b_i) with
    total cost <= ``budget`` bits. Raises when even the smallest widths do not fit."""
    options = [{b: (c, model_error(layer, b)) for b, c in layer.costs.items()}
               for layer in layers]
    for layer, b in zip(layers, solve_choices(options, budget, resolution)):
        layer.bits = b
    _order_by_importance(layers)


def solve_choices(options: list[dict], budget: int, resolution: int = 4000) -> list:
    """The multiple-choice knapsack: one option per layer, ``options[i]`` mapping each of
    layer i's options to (stored bits, error), minimising the summed error with the summed
    bits <= ``budget``. Dynamic programming on costs rounded up to ``budget / resolution``,
    then topped up with exact costs. Raises CaspError("budget_too_small") when even the
    cheapest options do not fit."""
    if sum(min(c for c, _ in opts.values()) for opts in options) > budget:
        raise CaspError("budget_too_small")
    unit = max(budget / resolution, 1.0)
    slots = int(budget // unit)
    inf = float("inf")
    best = np.full(slots + 1, inf)
    best[0] = 0.0
    keys = [list(opts) for opts in options]
    choice = np.zeros((len(options), slots + 1), dtype=np.int64)
    for li, opts in enumerate(options):
        new = np.full(slots + 1, inf)
        for ki, key in enumerate(keys[li]):
            cost, err = opts[key]
            c = int(math.ceil(cost / unit))
            if c > slots:
                continue
            cand = np.full(slots + 1, inf)
            cand[c:] = best[:slots + 1 - c] + err
            better = cand < new
            new[better] = cand[better]
            choice[li][better] = ki
        best = new
    chosen = []
    if not np.isfinite(best).any():
        # the rounding of costs can exclude a barely feasible solution: start from the cheapest
        chosen = [min(opts, key=lambda k: opts[k][0]) for opts in options]
    else:
        slot = int(np.argmin(best))
        for li in range(len(options) - 1, -1, -1):
            key = keys[li][choice[li][slot]]
            chosen.append(key)
            slot -= int(math.ceil(options[li][key][0] / unit))
        chosen.reverse()
    _top_up(options, chosen, budget)
    return chosen


def _top_up(options: list[dict], chosen: list, budget: int) -> None:
    """Spend what the rounded costs left over: switch a layer to a better option, best error
    reduction per extra bit first, while the exact total still fits."""
    total = sum(opts[k][0] for opts, k in zip(options, chosen))
    while True:
        best, best_gain = None, 0.0
        for li, opts in enumerate(options):
            cost, err = opts[chosen[li]]
            for key, (c, e) in opts.items():
                extra = c - cost
                if e >= err or total + extra > budget:
                    continue
                gain = (err - e) / max(extra, 1)
                if gain > best_gain:
                    best, best_gain = (li, key, extra), gain
        if best is None:
            return
        li, key, extra = best
        chosen[li], total = key, total + extra


def _order_by_importance(layers: list[LayerChoice]) -> None:
    """Among layers of identical cost tables, the more important never gets fewer bits
    (swapping widths between them keeps the cost and can only lower the objective)."""
    classes: dict[tuple, list[LayerChoice]] = {}
    for layer in layers:
        classes.setdefault((layer.weights, tuple(sorted(layer.costs.items()))), []).append(layer)
    for members in classes.values():
        widths = sorted((l.bits for l in members), reverse=True)
        for layer, b in zip(sorted(members, key=lambda l: -l.importance), widths):
            layer.bits = b


# ----------------------------------------------------------------------------- the plan

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


@dataclass
class SettingRules:
    """How a module at a layer width is stored: the layer's dense linears at ``group_size``
    (or the codebook of the width), low-rank factors at ``factor_bits`` (None: the layer's
    width) and ``factor_group_size``."""
    group_size: int = 128
    factor_bits: int | None = 3
    factor_group_size: int = -1
    g_idx: bool = False
    codebooks: dict[int, object] | None = None

    @property
    def quantizer(self) -> str:
        return codebook_quantizer(self.codebooks)

    def width(self, name: str, layer_width: int) -> int:
        return self.factor_bits if is_factor(name) and self.factor_bits is not None else layer_width

    def setting(self, name: str, layer_width: int):
        width = self.width(name, layer_width)
        if self.codebooks is not None:
            return self.codebooks[width]
        group = self.factor_group_size if is_factor(name) and self.factor_bits is not None \
            else self.group_size
        return QuantSetting(width, group, self.g_idx)

    def entry(self, name: str, layer_width: int, shape) -> dict:
        """The plan's entry of a module."""
        return {"bits": self.width(name, layer_width),
                **self.setting(name, layer_width).plan_entry(), "shape": list(shape)}

    def layer_cost(self, shapes: dict[str, tuple[int, int]], layer_width: int) -> int:
        """Stored bits of a layer's modules ({name: (out, in)}) at ``layer_width``."""
        return sum(self.setting(n, layer_width).cost(*shape) for n, shape in shapes.items())

    def check(self, allowed: list[int]) -> None:
        """Refuse widths without a setting before any work."""
        for b in allowed:
            check_bits(b)
        if self.factor_bits is not None:
            check_bits(self.factor_bits)
        if self.codebooks is None:
            return
        label = QUANTIZER_LABELS[self.quantizer]
        lacking = [b for b in allowed + ([self.factor_bits] if self.factor_bits else [])
                   if b not in self.codebooks]
        if lacking:
            example = ("2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b" if self.quantizer == "quip"
                       else "2=2x8,3=2x12,4=4x8")
            raise CaspError(f"no {label} codebook setting for {lacking[0]} bits; add it to the "
                            f"codebook map (e.g. --codebooks {example})")

    def meta(self) -> dict:
        return {"group_size": self.group_size, "factor_bits": self.factor_bits,
                "factor_group_size": self.factor_group_size, "g_idx": self.g_idx,
                "quantizer": self.quantizer,
                **({"codebooks": {str(b): s.name for b, s in sorted(self.codebooks.items())}}
                   if self.codebooks is not None else {})}

    def budget_error(self, budget: float, allowed: list[int], lowest: float) -> CaspError:
        label = QUANTIZER_LABELS[self.quantizer]
        what = (f"{label} {self.codebooks[allowed[0]].name}" if self.codebooks is not None
                else f"group {self.group_size}")
        return CaspError(f"budget {budget} bits cannot be met: the smallest allowed width "
                         f"({allowed[0]} bits, {what}) already needs {lowest:.4f} "
                         "average bits; raise --budget or allow fewer bits")


def modules_by_layer(model: nn.Module, spec: ModelSpec) -> list[dict[str, nn.Linear]]:
    """The quantizable linears of each decoder layer, by full name, in processing order."""
    layers: list[dict[str, nn.Linear]] = [{} for _ in spec.decoder_layers(model)]
    for name, lin in quantizable_linears(model, spec).items():
        layers[int(name[len(spec.layers) + 1:].split(".")[0])][name] = lin
    return layers


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


def uniform_average_bits(model: nn.Module, spec: ModelSpec, bits: int, group_size: int,
                         g_idx: bool = False, dense: bool = False) -> float:
    """Average bits of GPTQ on every linear at one setting (the uniform baseline). With
    ``dense``, low-rank modules count as the dense linears they replaced: the budget of the
    uniform baseline on the original model."""
    return uniform_setting_bits(model, spec, QuantSetting(bits, group_size, g_idx), dense)


def uniform_setting_bits(model: nn.Module, spec: ModelSpec, setting, dense: bool = False
                         ) -> float:
    """Average bits of storing every quantized linear with ``setting`` (anything with a
    ``cost(out, in)``: a GPTQ QuantSetting, an AQLMSetting or a QuIPSetting)."""
    if dense:
        total = sum(setting.cost(*shape) for shape in dense_shapes(model, spec))
    else:
        total = sum(setting.cost(*l.weight.shape)
                    for l in quantizable_linears(model, spec).values())
    return total / dense_parameters(model, spec)


def parse_budget(text: str) -> tuple[float | None, tuple[int, int] | None]:
    """A budget is a number of average bits (2.25), BITS@GROUP (2@128, 3@-1): the average
    bits of uniform GPTQ at that setting on the original dense model, or an AQLM setting
    (2x8, 1x16, 2x8g8) or QuIP# codebook (e8p12): what uniform AQLM / QuIP# at that
    setting stores on the dense model (the second element is then the setting)."""
    from .quant.aqlm import SETTING_PATTERN, AQLMSetting
    from .quant.e8p import SETTINGS as QUIP_SETTINGS, QuIPSetting

    if SETTING_PATTERN.match(text.strip()):
        return None, AQLMSetting.parse(text)
    if text.strip().lower() in QUIP_SETTINGS:
        return None, QuIPSetting.parse(text)
    if "@" in text:
        bits, _, group = text.partition("@")
        try:
            return None, (int(bits), int(group))
        except ValueError:
            pass
    else:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and 1.0 <= value <= 16.0:
            return value, None
    raise CaspError(f"budget {text!r} is not average bits in 1-16 (e.g. 2.25), BITS@GROUP "
                    "(e.g. 2@128: the bits of uniform 2-bit group-128 GPTQ), an AQLM setting "
                    "(e.g. 2x8: the bits of uniform AQLM 2x8) or a QuIP# codebook (e.g. e8p12)")


def format_plan_table(plan: BitPlan) -> str:
    lines = ["| layer | importance | continuous bits | bits |", "|---|---|---|---|"]
    for row in plan.layers:
        lines.append(f"| {row['layer']} | {row['importance']:.4f} | {row['continuous_bits']:.2f} "
                     f"| {row['bits']} |")
    m = plan.meta
    books = m.get("codebooks")
    if books:
        label = QUANTIZER_LABELS[m.get("quantizer", "aqlm")]
        factors = ("same as the layer" if m["factor_bits"] is None else
                   f"{m['factor_bits']} bits = {label} {books[str(m['factor_bits'])]}")
        setting = f"{label} " + ", ".join(f"{b} bits = {s}" for b, s in books.items())
    else:
        factors = ("same as the layer" if m["factor_bits"] is None else
                   f"{m['factor_bits']} bits, group {m['factor_group_size']}")
        setting = f"group {m['group_size']}"
    lines.append("")
    lines.append(f"budget {m['budget_bits']} bits; achieved {m['achieved_bits']:.4f} average bits "
                 f"over {m['dense_parameters']:,} original dense weights ({setting}, overheads "
                 f"included); low-rank factors: {factors}")
    return "\n".join(lines)


def plot_plan(plan: BitPlan, path: str | Path) -> Path:
    """Bar chart of bits per layer with the importance score (or, for a measured plan, the
    measured divergence of each layer's choice) on a second axis; low-rank layers hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = plan.meta.get("allocation") == "measured"
    idx = [r["layer"] for r in plan.layers]
    fig, ax = plt.subplots(figsize=(max(6, len(idx) * 0.25), 3.5))
    bars = ax.bar(idx, [r["bits"] for r in plan.layers], color="#4a7ab5", label="bits (integer)")
    if measured:
        for bar, r in zip(bars, plan.layers):
            if r.get("lowrank") is not None:
                bar.set_hatch("//")
                bar.set_facecolor("#8fb0d9")
        ax.bar([], [], color="#8fb0d9", hatch="//", label="low-rank W_q/W_k")
    else:
        ax.plot(idx, [r["continuous_bits"] for r in plan.layers], "k.--", lw=0.8,
                label="continuous optimum")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(plan.meta["allowed_bits"]) + 1)
    ax2 = ax.twinx()
    values = [max(r["kl"], 1e-12) if measured else r["importance"] for r in plan.layers]
    what = "KL of the choice" if measured else "importance"
    ax2.plot(idx, values, color="#c0504d", lw=1.2, label=what)
    ax2.set_yscale("log")
    ax2.set_ylabel(what)
    ax.set_title(f"{'measured ' if measured else ''}bit plan: "
                 f"{plan.meta['achieved_bits']:.3f} average bits (budget {plan.meta['budget_bits']})")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
