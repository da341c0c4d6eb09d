"""Stage 2: the budget solver (met to the bit, monotone in importance, optimal on small
cases, infeasible budgets refused) and the plan file."""
import itertools
import math

import numpy as np
import pytest

from casp.allocation import (BitPlan, LayerChoice, continuous_allocation, solve_widths,
                             uniform_average_bits)
from casp.errors import CaspError


def layers_for(importance, weights=1000, widths=(2, 3, 4), overhead=50):
    return [LayerChoice(i, w, weights, {b: weights * b + overhead for b in widths})
            for i, w in enumerate(importance)]


def objective(layers):
    return sum(l.importance * l.weights * 2.0 ** (-2 * l.bits) for l in layers)


def total(layers):
    return sum(l.costs[l.bits] for l in layers)


@pytest.mark.parametrize("seed", range(5))
def test_budget_met_to_the_bit_and_nothing_left_to_spend(seed):
    rng = np.random.default_rng(seed)
    layers = layers_for(rng.uniform(0.01, 1.0, 12).tolist())
    budget = int(12 * (1000 * 2.6 + 50))
    solve_widths(layers, budget)
    assert total(layers) <= budget
    # no single upgrade still fits: the budget is used as far as the widths allow
    for l in layers:
        up = [b for b in l.costs if b > l.bits]
        if up:
            assert total(layers) + l.costs[min(up)] - l.costs[l.bits] > budget


@pytest.mark.parametrize("seed", range(5))
def test_more_important_layers_never_get_fewer_bits(seed):
    rng = np.random.default_rng(seed)
    layers = layers_for(rng.uniform(0.0, 1.0, 20).tolist())
    solve_widths(layers, int(20 * (1000 * 2.9 + 50)))
    ranked = sorted(layers, key=lambda l: l.importance)
    assert all(a.bits <= b.bits for a, b in zip(ranked, ranked[1:]))
    assert len({l.bits for l in layers}) > 1


def test_solver_matches_brute_force_on_small_problems():
    rng = np.random.default_rng(7)
    for trial in range(6):
        imp = rng.uniform(0.01, 1, 5).tolist()
        sizes = rng.integers(500, 3000, 5).tolist()
        layers = [LayerChoice(i, w, n, {b: n * b + 40 for b in (2, 3, 4)})
                  for i, (w, n) in enumerate(zip(imp, sizes))]
        budget = int(sum(sizes) * rng.uniform(2.2, 3.6)) + 200
        solve_widths(layers, budget)
        best = min((sum(l.importance * l.weights * 2.0 ** (-2 * b) for l, b in zip(layers, combo)),
                    combo) for combo in itertools.product((2, 3, 4), repeat=5)
                   if sum(l.costs[b] for l, b in zip(layers, combo)) <= budget)
        assert total(layers) <= budget
        assert objective(layers) == pytest.approx(best[0], rel=1e-9)


def test_infeasible_budget_is_refused():
    layers = layers_for([1.0, 0.5])
    with pytest.raises(CaspError):
        solve_widths(layers, 2 * (1000 * 2 + 50) - 1)


def test_continuous_optimum_follows_the_log_formula():
    w = np.array([1.0, 4.0, 0.25, 1.0])
    sizes = np.ones(4)
    b = continuous_allocation(w, sizes, 3.0, 0.0, 16.0)
    geo = math.exp(np.log(w).mean())
    expected = 3.0 + 0.5 * np.log2(w / geo)
    assert np.allclose(b, expected, atol=1e-6)
    clamped = continuous_allocation(w, sizes, 3.0, 2.0, 4.0)
    assert clamped.min() >= 2.0 and clamped.max() <= 4.0
    assert clamped.mean() == pytest.approx(3.0, abs=1e-6)


def test_plan_file_errors(tmp_path):
    with pytest.raises(CaspError, match="does not exist"):
        BitPlan.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CaspError, match="not JSON"):
        BitPlan.load(bad)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(CaspError, match="not a casp bit plan"):
        BitPlan.load(other)
    wide = tmp_path / "wide.json"
    wide.write_text('{"format": "casp-bit-plan", "modules": {"a": {"bits": 9, "group_size": 128}}}')
    with pytest.raises(CaspError, match="2 to 8"):
        BitPlan.load(wide)


def test_uniform_average_bits_counts_overheads():
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny import build_model
    from casp.models import spec_for_model

    model = build_model("llama", layers=2)   # hidden 64, intermediate 128
    spec = spec_for_model(model)
    # per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128
    dense = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    groups_bits = 2 * 32 * (64 + 32 + 32 + 64 + 128 + 128 + 64 * 2)  # down has 2 groups of 64
    assert uniform_average_bits(model, spec, 2, 64) == pytest.approx(
        (dense * 2 + groups_bits) / dense)
