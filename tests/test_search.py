"""The measured search (casp allocate --measured [--lowrank-options]): the knapsack over
arbitrary options, the output divergence it measures, the plan with its low-rank choice,
casp lowrank --plan, the quantizers with that plan, resume and bad input."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch

from casp.allocation import BitPlan, SettingRules, average_bits, solve_choices
from casp.checkpoint import load_checkpoint, read_casp_section
from casp.cli import main
from casp.data.calibration import CalibrationConfig, calibration_batches
from casp.errors import CaspError
from casp.layerwise import LayerContext, capture_layer_inputs
from casp.loading import load_pretrained
from casp.lowrank import LowRankLinear
from casp.quant.gptq.layer_pass import GPTQPass
from casp.allocation.search import SensitivityPass
from tiny import save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]


def run(*argv):
    return main([str(a) for a in argv])


# ----------------------------------------------------------------------------- the knapsack

def brute_force(options, budget):
    best = None
    for combo in itertools.product(*[list(o) for o in options]):
        cost = sum(o[k][0] for o, k in zip(options, combo))
        err = sum(o[k][1] for o, k in zip(options, combo))
        if cost <= budget and (best is None or err < best[0] - 1e-12):
            best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_over_arbitrary_options_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = []
    for _ in range(5):
        # options that are cheaper and better, dearer and worse, ...: no order assumed
        options.append({f"o{k}": (int(rng.integers(500, 4000)), float(rng.uniform(0, 1)))
                        for k in range(4)})
    cheapest = sum(min(c for c, _ in o.values()) for o in options)
    budget = int(cheapest + rng.uniform(0.2, 0.8) * (sum(max(c for c, _ in o.values())
                                                        for o in options) - cheapest))
    chosen = solve_choices(options, budget, resolution=20000)
    cost = sum(o[k][0] for o, k in zip(options, chosen))
    err = sum(o[k][1] for o, k in zip(options, chosen))
    assert cost <= budget
    assert err == pytest.approx(brute_force(options, budget)[0], rel=1e-9)


def test_knapsack_refuses_a_budget_below_the_cheapest_options():
    options = [{"a": (100, 1.0), "b": (200, 0.5)}, {"a": (100, 1.0)}]
    with pytest.raises(CaspError):
        solve_choices(options, 199)
    assert solve_choices(options, 300) == ["b", "a"]


# ----------------------------------------------------------------------------- the divergence

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, calib_txt):
    root = tmp_path_factory.mktemp("search")
    return save_tiny("llama", root / "llama", layers=3), calib_txt


def _context(src, calib_txt, index=1):
    """Layer ``index`` of a tiny llama with its inputs, as the engine gives it."""
    loaded = load_pretrained(str(src))
    cfg = CalibrationConfig(dataset=str(calib_txt), nsamples=8, seqlen=32, batch_size=4)
    batches = calibration_batches(loaded, cfg)
    device = torch.device("cpu")
    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, device)
    layers = loaded.spec.decoder_layers(loaded.model)
    with torch.no_grad():
        for i in range(index):
            outs = [layers[i](h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
            inputs.hidden = [o[0] if isinstance(o, tuple) else o for o in outs]
    ctx = LayerContext(index, layers[index], loaded.spec, inputs, device)
    return loaded, batches, ctx


def _search(loaded, **kw):
    rules = SettingRules(group_size=32)
    return SensitivityPass(loaded.model, lambda plan: GPTQPass(plan=plan), {}, rules, [2, 4],
                           [], **{"score": "kl", **kw})


@torch.no_grad()
def test_divergence_is_the_kl_of_the_whole_models_outputs(tiny_llama):
    src, calib_txt = tiny_llama
    loaded, batches, ctx = _context(src, calib_txt)
    search = _search(loaded, measure_batches=2)
    search._ensure_reference(ctx)
    assert search._divergence(ctx, ctx.layer) < 1e-7          # the layer unchanged: zero
    changed = copy.deepcopy(ctx.layer)
    changed.mlp.down_proj.weight.mul_(4.0)
    measured = search._divergence(ctx, changed)
    # the same divergence from two full forward passes of the model
    model = loaded.model
    ref = torch.cat([torch.log_softmax(model(**b).logits.float(), -1).reshape(-1, model.config.vocab_size)
                     for b in batches[:2]])
    layers = loaded.spec.decoder_layers(model)
    original = layers[1]
    layers[1] = changed
    try:
        new = torch.cat([torch.log_softmax(model(**b).logits.float(), -1).reshape(-1, model.config.vocab_size)
                         for b in batches[:2]])
    finally:
        layers[1] = original
    expected = float((ref.exp() * (ref - new)).sum(-1).mean())
    assert expected > 1e-5
    assert measured == pytest.approx(expected, rel=1e-3)


def test_more_bits_measure_a_smaller_divergence(tiny_llama):
    src, calib_txt = tiny_llama
    loaded, _, ctx = _context(src, calib_txt)
    search = _search(loaded, measure_batches=2)
    search.process(ctx)
    m = search.measured[1]
    assert set(m) == {"qk", "self_attn", "mlp"}
    for part in m.values():
        assert set(part) == {"dense@2", "dense@4"}
        assert part["dense@2"]["kl"] > 2 * part["dense@4"]["kl"] > 0
    # the layer itself is left as it was
    assert type(ctx.layer.self_attn.q_proj) is torch.nn.Linear


# ----------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def measured_run(tmp_path_factory, tiny_llama):
    """allocate --measured --lowrank-options at a budget dense layers cannot meet, then
    lowrank --plan and GPTQ with the plan."""
    src, calib_txt = tiny_llama
    root = tmp_path_factory.mktemp("measured")
    data = ["--dataset", calib_txt] + CALIB
    plan = root / "plan.json"
    # dense at the lowest width (2 bits, group 32, group indices) stores 3.22 bits here; the
    # cheapest options (75% low-rank everywhere) 2.94: 3.1 forces cuts
    assert run("allocate", "--model", src, "--output", plan, "--budget", "3.1", "--bits", "2,3",
               "--group-size", "32", "--measured", "--lowrank-options", "0.5,0.75",
               "--search-samples", "4", *data) == 0
    assert run("lowrank", "--model", src, "--plan", plan, "--output", root / "lr", *data) == 0
    assert run("gptq", "--model", root / "lr", "--plan", plan, "--output", root / "q", *data) == 0
    return src, root, plan, data


def test_measured_plan_chooses_low_rank_layers_and_meets_the_budget(measured_run):
    src, root, plan_path, _ = measured_run
    plan = BitPlan.load(plan_path)
    assert plan.meta["allocation"] == "measured"
    assert plan.achieved_bits <= 3.1
    chosen = [r for r in plan.layers if r["lowrank"] is not None]
    assert chosen, "the budget needs some low-rank layers"
    record = json.loads(plan_path.with_suffix(".measured.json").read_text())["layers"]
    rules = SettingRules(group_size=32, g_idx=True)
    for r in plan.layers:
        # three parts; W_q/W_k: widths 2, 3 dense or 50% / 75% low-rank (factors 3-bit)
        assert set(r["measured"]) == {"qk", "self_attn", "mlp"}
        assert set(r["measured"]["qk"]) == {"dense@2", "dense@3", "lowrank0.5@3", "lowrank0.75@3"}
        assert set(r["measured"]["mlp"]) == {"dense@2", "dense@3"}
        kl = sum(record[str(r["layer"])][u][label]["kl"] for u, label in r["units"].items())
        assert r["kl"] == pytest.approx(kl, abs=1e-8)
        # the layer's stored bits are what its modules in the plan cost
        names = [n for n in plan.modules if n.startswith(f"model.layers.{r['layer']}.")]
        assert r["stored_bits"] == sum(
            rules.setting(n, plan.modules[n]["bits"]).cost(*plan.modules[n]["shape"])
            for n in names)
    # no other choice of the measured options fits the budget with a smaller summed KL
    options = []
    for i in range(3):
        for unit, labelled in record[str(i)].items():
            options.append({label: (rules.layer_cost({n: tuple(x) for n, x in m["shapes"].items()},
                                                     int(label.rsplit("@", 1)[1])), m["kl"])
                            for label, m in labelled.items()})
    best = brute_force(options, int(3.1 * plan.meta["dense_parameters"]))
    assert sum(r["kl"] for r in plan.layers) == pytest.approx(best[0], abs=1e-7)
    # the measurements were kept beside the plan
    assert len(json.loads(plan_path.with_suffix(".measured.json").read_text())["layers"]) == 3
    assert plan_path.with_suffix(".png").stat().st_size > 1000


def test_lowrank_plan_factorises_exactly_the_chosen_modules(measured_run):
    src, root, plan_path, _ = measured_run
    plan = BitPlan.load(plan_path)
    ranks = plan.meta["lowrank"]["ranks"]
    section = read_casp_section(root / "lr")
    lowrank = {n: d["rank"] for n, d in section["modules"].items() if d["type"] == "lowrank"}
    assert lowrank == ranks
    model = load_checkpoint(root / "lr").model
    for r in plan.layers:
        q = model.model.layers[r["layer"]].self_attn.q_proj
        assert isinstance(q, LowRankLinear) == (r["lowrank"] is not None)


def test_quantized_checkpoint_follows_the_measured_plan(measured_run):
    src, root, plan_path, _ = measured_run
    plan = BitPlan.load(plan_path)
    section = read_casp_section(root / "q")
    quantized = {n: d for n, d in section["modules"].items() if d["type"] == "gptq"}
    assert set(quantized) == set(plan.modules)
    for name, d in quantized.items():
        assert d["bits"] == plan.modules[name]["bits"]
    assert average_bits(section) == pytest.approx(plan.achieved_bits)


def test_another_budget_reuses_the_measurements(measured_run, monkeypatch, tmp_path):
    src, root, plan_path, data = measured_run

    monkeypatch.setattr(SensitivityPass, "_quantized", lambda *a, **k: pytest.fail("measured"))
    out = tmp_path / "plan3.json"
    assert run("allocate", "--model", src, "--output", out, "--budget", "3.6", "--bits", "2,3",
               "--group-size", "32", "--measured", "--lowrank-options", "0.5,0.75",
               "--search-samples", "4", "--measurements",
               plan_path.with_suffix(".measured.json"), *data) == 0
    wider = BitPlan.load(out)
    assert 3.1 < wider.achieved_bits <= 3.6
    assert sum(r["kl"] for r in wider.layers) < sum(r["kl"] for r in BitPlan.load(plan_path).layers)


def test_measured_without_lowrank_options_and_a_new_output_folder(tiny_llama, tmp_path,
                                                                 capsys):
    """Widths only (no low-rank choice): the plan matches the original model; the plan's
    folder is created; casp lowrank --plan refuses a plan that cut nothing."""
    src, calib_txt = tiny_llama
    data = ["--dataset", calib_txt] + CALIB
    plan = tmp_path / "new" / "folder" / "plan.json"
    assert run("allocate", "--model", src, "--output", plan, "--budget", "3.6", "--bits", "2,3",
               "--group-size", "32", "--measured", "--search-samples", "4", *data) == 0
    p = BitPlan.load(plan)
    assert all(r["lowrank"] is None and set(r["measured"]["qk"]) == {"dense@2", "dense@3"}
               for r in p.layers)
    assert {p.modules[n]["bits"] for n in p.modules} == {2, 3} and p.achieved_bits <= 3.6
    assert run("gptq", "--model", src, "--plan", plan, "--output", tmp_path / "q", *data) == 0
    assert average_bits(read_casp_section(tmp_path / "q")) == pytest.approx(p.achieved_bits)
    assert run("lowrank", "--model", src, "--plan", plan, "--output", tmp_path / "lr",
               *data) == 2
    assert "chose no low-rank step" in capsys.readouterr().err
    assert not (tmp_path / "lr").exists()


def test_a_record_of_other_settings_is_not_reused(tiny_llama, tmp_path):
    src, calib_txt = tiny_llama
    loaded, _, ctx = _context(src, calib_txt)
    record = tmp_path / "m.json"
    first = _search(loaded, measure_batches=1, record=record)
    first.process(ctx)
    assert _search(loaded, measure_batches=1, record=record).measured.keys() == {1}
    assert _search(loaded, measure_batches=2, record=record).measured == {}
    other = _search(loaded, measure_batches=1, record=record, identity={"model": "another"})
    assert other.measured == {}


def test_measured_quip_plan_on_tiny_llava(tmp_path, calib_txt):
    """The LLaVA layout (its own final norm), QuIP# codebooks, factors at 4 bits."""
    src = save_tiny("llava", tmp_path / "llava", layers=2)
    data = ["--dataset", calib_txt] + CALIB
    plan = tmp_path / "plan.json"
    # under what uniform E8P12 stores (2.034 on this model): some W_q/W_k must be cut
    assert run("allocate", "--quantizer", "quip", "--model", src, "--output", plan, "--budget",
               "2.0", "--bits", "2,3", "--factor-bits", "2", "--measured",
               "--lowrank-options", "0.75", "--rank-multiple", "8", "--search-samples", "4",
               *data) == 0
    p = BitPlan.load(plan)
    assert p.achieved_bits <= 2.0
    # factors at 2 bits: the low-rank option of W_q/W_k at its one width
    assert all(set(r["measured"]["qk"]) == {"dense@2", "dense@3", "lowrank0.75@2"}
               for r in p.layers)
    assert p.meta["lowrank"]["ranks"]
    assert run("lowrank", "--model", src, "--plan", plan, "--output", tmp_path / "lr",
               *data) == 0
    assert run("quip", "--model", tmp_path / "lr", "--plan", plan, "--output", tmp_path / "q",
               *data) == 0
    section = read_casp_section(tmp_path / "q")
    assert average_bits(section) == pytest.approx(p.achieved_bits)


# ----------------------------------------------------------------------------- bad input

def test_bad_measured_input_is_refused(tiny_llama, tmp_path, capsys):
    src, calib_txt = tiny_llama
    data = ["--dataset", calib_txt] + CALIB
    base = ["allocate", "--model", src, "--output", tmp_path / "p.json", "--bits", "2,3",
            "--group-size", "32"]
    assert run(*base, "--budget", "3", "--lowrank-options", "0.75", *data) == 2
    assert "needs --measured" in capsys.readouterr().err
    assert run(*base, "--budget", "3", "--measured", "--lowrank-options", "1.5", *data) == 2
    assert "(0, 1)" in capsys.readouterr().err
    # an infeasible budget is refused before any measuring
    assert run(*base, "--budget", "2.1", "--measured", "--lowrank-options", "0.5", *data) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert not (tmp_path / "p.measured.json").exists() and not (tmp_path / "p.json").exists()
    # lowrank --plan with a plan that chose no low-rank step
    assert run(*base, "--budget", "3.5", *data) == 0
    assert run("lowrank", "--model", src, "--plan", tmp_path / "p.json", "--output",
               tmp_path / "lr", *data) == 2
    assert "chose no low-rank step" in capsys.readouterr().err
    # low-rank options on a model that is already low-rank
    assert run("lowrank", "--model", src, "--output", tmp_path / "lr2", *data) == 0
    assert run("allocate", "--model", tmp_path / "lr2", "--output", tmp_path / "p2.json",
               "--budget", "3", "--bits", "2,3", "--group-size", "32", "--measured",
               "--lowrank-options", "0.5", *data) == 2
    assert "already has low-rank modules" in capsys.readouterr().err


def test_fisher_score_estimates_the_exact_divergence(tiny_llama):
    """The second-order estimate from the output Fisher (casp.allocation.fisher) is close
    to the divergence measured by running the later layers, for every option of a layer,
    and orders them the same way; zero for the layer unchanged."""
    src, calib_txt = tiny_llama
    loaded, _, ctx = _context(src, calib_txt)
    search = _search(loaded, measure_batches=2, fisher_samples=64)
    search.process(ctx)
    measured = search.measured[1]
    # the MLP's change (most of this layer's divergence): within 20% (measured 0.93-0.98)
    for o in measured["mlp"].values():
        assert 0.8 < o["fisher"] / o["kl"] < 1.25
    # W_v/W_o: the diagonal misses the correlations of its change (measured 0.5-0.65)
    for o in measured["self_attn"].values():
        assert 0.35 < o["fisher"] / o["kl"] < 1.25
    # within a part the estimate orders the widths as the exact divergence does
    for part in measured.values():
        assert part["dense@2"]["fisher"] > part["dense@4"]["fisher"] >= 0


def test_fisher_search_runs_only_the_layer_per_option(tiny_llama, monkeypatch):
    """With the default (Fisher) score no option runs the layers after it, and the plan's
    score is the estimate."""
    src, calib_txt = tiny_llama
    loaded, _, ctx = _context(src, calib_txt)
    monkeypatch.setattr(SensitivityPass, "_divergence",
                        lambda *a, **k: pytest.fail("ran the later layers"))
    search = _search(loaded, measure_batches=2, score="fisher")
    search.process(ctx)
    for part in search.measured[1].values():
        for o in part.values():
            assert o["kl"] == o["fisher"] > 0


def test_without_lowrank_solves_the_same_measurements_densely(measured_run, tmp_path):
    src, root, plan_path, data = measured_run
    out = tmp_path / "dense.json"
    assert run("allocate", "--model", src, "--output", out, "--budget", "3.6", "--bits", "2,3",
               "--group-size", "32", "--measured", "--lowrank-options", "0.5,0.75",
               "--without-lowrank", "--search-samples", "4", "--measurements",
               plan_path.with_suffix(".measured.json"), *data) == 0
    plan = BitPlan.load(out)
    assert all(r["lowrank"] is None for r in plan.layers)
    assert all(label.startswith("dense") for r in plan.layers for label in r["units"].values())
    assert not plan.meta["lowrank"]["ranks"] and plan.achieved_bits <= 3.6


def test_calibrated_score_measures_one_option_per_family(tiny_llama, monkeypatch):
    """The default score: per part and family (dense at every width) the lowest width is
    measured exactly, the others' Fisher estimates scaled by that ratio."""
    src, calib_txt = tiny_llama
    loaded, _, ctx = _context(src, calib_txt)
    calls = []
    exact = SensitivityPass._divergence

    def counted(self, ctx, layer):
        calls.append(layer)
        return exact(self, ctx, layer)

    monkeypatch.setattr(SensitivityPass, "_divergence", counted)
    search = _search(loaded, measure_batches=2, score="calibrated")
    search.process(ctx)
    assert len(calls) == 3                                   # one per part
    for part in search.measured[1].values():
        low, high = part["dense@2"], part["dense@4"]
        assert low["kl"] == low["exact"] > 0
        assert high["kl"] == pytest.approx(high["fisher"] * low["exact"] / low["fisher"])


# ----------------------------------------------------------------------------- fewer widths

def test_anchor_layers_spread_from_first_to_last():
    from casp.allocation.search import anchor_layers

    assert anchor_layers(30, 3) == [0, 14, 29]
    assert anchor_layers(30, 1) == [0]
    assert anchor_layers(4, 9) == [0, 1, 2, 3]
    assert anchor_layers(7, 4) == [0, 2, 4, 6]


def test_extrapolated_widths_follow_the_anchor_layers_ratios():
    """Anchors 0 and 2 measured at 2, 3 and 4 bits, layer 1 at 3 only: its 2- and 4-bit
    scores are its 3-bit one times the geometric mean of the anchors' ratios; measured
    options are left as they are; a family with no anchor at a width is an error."""
    from casp.allocation.search import extrapolate_widths

    def opt(kl):
        return {"kl": kl, "fisher": kl / 2, "shapes": {"m": [8, 8]}, "ranks": {}}

    full = {w: opt(v) for w, v in ((2, 8.0), (3, 2.0), (4, 1.0))}
    other = {w: opt(v) for w, v in ((2, 18.0), (3, 2.0), (4, 0.25))}
    measured = {0: {"mlp": {f"dense@{w}": o for w, o in full.items()},
                    "qk": {"lowrank0.5@3": opt(1.0)}},
                1: {"mlp": {"dense@3": opt(5.0)}, "qk": {"lowrank0.5@3": opt(3.0)}},
                2: {"mlp": {f"dense@{w}": o for w, o in other.items()},
                    "qk": {"lowrank0.5@3": opt(1.0)}}}
    out = extrapolate_widths(measured, [2, 3, 4])
    mlp = out[1]["mlp"]
    assert mlp["dense@3"] == measured[1]["mlp"]["dense@3"]
    assert mlp["dense@2"]["kl"] == pytest.approx(5.0 * (4.0 * 9.0) ** 0.5)      # ratios 4, 9
    assert mlp["dense@4"]["kl"] == pytest.approx(5.0 * (0.5 * 0.125) ** 0.5)
    assert mlp["dense@2"]["fisher"] == pytest.approx(2.5 * 6.0)
    assert mlp["dense@4"]["extrapolated"] and "extrapolated" not in mlp["dense@3"]
    assert set(out[1]["qk"]) == {"lowrank0.5@3"}          # measured at one width anywhere
    assert out[0] == measured[0]
    with pytest.raises(CaspError, match="anchor"):
        extrapolate_widths({0: {"mlp": {"dense@2": opt(1.0)}},
                            1: {"mlp": {"dense@3": opt(1.0)}}}, [2, 3])


def test_search_at_some_widths_measures_anchors_fully(tiny_llama, tmp_path):
    """--measure-widths 3 with 2 anchor layers on a 3-layer model: layers 0 and 2 at every
    width, layer 1 at 3 bits only (one quantization instead of three), and the plan is
    solved on all three widths."""
    src, calib_txt = tiny_llama
    plan = tmp_path / "plan.json"
    data = ["--dataset", calib_txt] + CALIB
    assert run("allocate", "--model", src, "--output", plan, "--budget", "3.5", "--bits",
               "2,3,4", "--group-size", "32", "--measured", "--measure-widths", "3",
               "--anchor-layers", "2", "--search-samples", "4", *data) == 0
    record = json.loads(plan.with_suffix(".measured.json").read_text())["layers"]
    assert set(record["1"]["mlp"]) == {"dense@3"}
    assert set(record["0"]["mlp"]) == set(record["2"]["mlp"]) == {"dense@2", "dense@3",
                                                                   "dense@4"}
    saved = BitPlan.load(plan)
    assert set(saved.layers[1]["measured"]["mlp"]) == {"dense@2", "dense@3", "dense@4"}
    assert saved.achieved_bits <= 3.5
    assert run("allocate", "--model", src, "--output", tmp_path / "bad.json", "--budget", "3.5",
               "--bits", "2,3", "--measured", "--measure-widths", "4", *data) == 2


# ----------------------------------------------------------------------------- fewer exact runs

def test_spread_calibration_scales_by_the_calibrated_layers_ratios():
    """Layers 0 and 2 calibrated (ratios exact / fisher 2 and 8 for the MLP, 0.5 for the
    low-rank family), layer 1 only estimated: its estimates times the geometric mean of the
    same part and family's ratios (4 and 0.5); calibrated layers are left as they are; a
    family no layer measured exactly is an error."""
    from casp.allocation.search import spread_calibration

    def opt(fisher, exact=None, **extra):
        o = {"kl": fisher if exact is None else exact, "fisher": fisher,
             "shapes": {"m": [8, 8]}, "ranks": {}, **extra}
        if exact is not None:
            o["exact"] = exact
        return o

    measured = {0: {"mlp": {"dense@2": opt(1.0, 2.0), "dense@3": opt(0.5)},
                    "qk": {"lowrank0.5@2": opt(4.0, 2.0)}},
                1: {"mlp": {"dense@2": opt(3.0, uncalibrated=True),
                            "dense@3": opt(1.0, uncalibrated=True)},
                    "qk": {"lowrank0.5@2": opt(6.0, uncalibrated=True)}},
                2: {"mlp": {"dense@2": opt(1.0, 8.0)}, "qk": {"lowrank0.5@2": opt(1.0, 0.5)}}}
    out = spread_calibration(measured)
    assert out[1]["mlp"]["dense@2"]["kl"] == pytest.approx(12.0)
    assert out[1]["mlp"]["dense@3"]["kl"] == pytest.approx(4.0)
    assert out[1]["qk"]["lowrank0.5@2"]["kl"] == pytest.approx(3.0)
    assert "uncalibrated" not in out[1]["mlp"]["dense@2"]
    assert out[0] == measured[0] and out[2] == measured[2]
    with pytest.raises(CaspError, match="--calibrate-layers"):
        spread_calibration({0: {"mlp": {"dense@2": opt(1.0, uncalibrated=True)}}})


def test_calibrate_layers_runs_the_later_layers_in_those_layers_only(tiny_llama, tmp_path,
                                                                    monkeypatch, capsys):
    """--calibrate-layers 2 on a 3-layer model: the exact runs in layers 0 and 2 only (one
    per part), layer 1 estimated and marked; the plan is solved on the scaled estimates
    and meets the budget; the flag without the calibrated score is refused."""
    src, calib_txt = tiny_llama
    calls = []
    exact = SensitivityPass._divergence

    def counted(self, ctx, layer):
        calls.append(ctx.index)
        return exact(self, ctx, layer)

    monkeypatch.setattr(SensitivityPass, "_divergence", counted)
    plan = tmp_path / "plan.json"
    data = ["--dataset", calib_txt] + CALIB
    assert run("allocate", "--model", src, "--output", plan, "--budget", "3.5", "--bits",
               "2,3,4", "--group-size", "32", "--measured", "--calibrate-layers", "2",
               "--search-samples", "4", *data) == 0
    assert sorted(set(calls)) == [0, 2] and calls.count(0) == calls.count(2) == 3
    record = json.loads(plan.with_suffix(".measured.json").read_text())
    assert record["settings"]["calibrate_layers"] == 2
    assert all(o.get("uncalibrated") for r in record["layers"]["1"].values() for o in r.values())
    assert not any("exact" in o for r in record["layers"]["1"].values() for o in r.values())
    saved = BitPlan.load(plan)
    assert saved.achieved_bits <= 3.5
    assert run("allocate", "--model", src, "--output", tmp_path / "bad.json", "--budget", "3.5",
               "--bits", "2,3", "--measured", "--search-score", "kl", "--calibrate-layers", "2",
               *data) == 2
    assert "--calibrate-layers needs" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_quantizer_flags_reach_every_option_and_the_record(tiny_llama, tmp_path, monkeypatch,
                                                           capsys):
    """--quantizer-flags are parsed by casp gptq's own flags and build every option the
    search quantizes (damp 0.2 here, not the default 0.01), while allocate's shared flags
    win; they enter the record's settings (another value is not reused); a flag the
    quantizer does not know is refused before any work, naming the quantizer."""
    import casp.quant.gptq.layer_pass as gptq_layer_pass

    src, calib_txt = tiny_llama
    seen = []
    init = gptq_layer_pass.GPTQPass.__init__

    def spy(self, *a, **k):
        seen.append((k.get("damp"), k.get("act_order"), k.get("block_size")))
        init(self, *a, **k)

    monkeypatch.setattr(gptq_layer_pass.GPTQPass, "__init__", spy)
    plan = tmp_path / "plan.json"
    data = ["--dataset", calib_txt] + CALIB
    base = ["allocate", "--model", src, "--budget", "3.5", "--bits", "2,3", "--group-size",
            "32", "--measured", "--search-samples", "4", "--no-act-order", *data]
    assert run(*base, "--output", plan, "--quantizer-flags",
               "--damp 0.2 --block-size 16 --act-order") == 0
    assert seen and set(seen) == {(0.2, False, 16)}
    record = json.loads(plan.with_suffix(".measured.json").read_text())
    assert record["settings"]["quantizer"]["flags"] == "--damp 0.2 --block-size 16 --act-order"
    assert run(*base, "--output", tmp_path / "bad.json", "--quantizer-flags",
               "--steps-per-round 10") == 2
    err = capsys.readouterr().err
    assert "--quantizer-flags" in err and "casp gptq" in err and "--steps-per-round" in err
    assert not (tmp_path / "bad.json").exists()
    assert not (tmp_path / "bad.measured.json").exists()
