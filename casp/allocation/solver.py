"""Stage 2's solver: the per-layer widths that minimise the modelled error at the budget.

The model of a layer's error at b bits is w_i n_i 2^(-2 b) (w_i the importance, n_i the
weights the layer's width applies to). The continuous optimum is
b_i = b_avg + 0.5 log2(w_i / geometric mean of w) (clamped to the allowed range); the
integer widths come from a multiple-choice knapsack over the allowed widths
(:func:`solve_choices`, which also serves the measured search's arbitrary options), solved by
dynamic programming on conservatively rounded costs, then topped up greedily with exact
costs, so the budget holds to the bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from casp.errors import CaspError


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
