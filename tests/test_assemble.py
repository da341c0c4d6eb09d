"""casp allocate --measured --checkpoint: the quantized model assembled from the options the
measured search built (casp.allocation.assemble), without a second quantization."""
import json

import pytest
import torch

from casp.allocation import BitPlan, average_bits
from casp.allocation.search import SensitivityPass
from casp.checkpoint import load_checkpoint, read_casp_section
from casp.cli import main
from casp.loading import load_pretrained
from casp.lowrank import LowRankLinear
from tiny import save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
GPTQ = ["--bits", "2,3", "--group-size", "32", "--measured", "--lowrank-options", "0.5,0.75",
        "--search-samples", "4"]


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def assembled(tmp_path_factory, calib_txt):
    """One search with --checkpoint, and the usual recipe (lowrank --plan, gptq --plan) on
    the same plan."""
    root = tmp_path_factory.mktemp("assemble")
    src = save_tiny("llama", root / "llama", layers=3)
    data = ["--dataset", calib_txt] + CALIB
    plan = root / "plan.json"
    assert run("allocate", "--model", src, "--output", plan, "--budget", "3.1", *GPTQ,
               "--checkpoint", root / "asm", *data) == 0
    assert run("lowrank", "--model", src, "--plan", plan, "--output", root / "lr", *data) == 0
    assert run("gptq", "--model", root / "lr", "--plan", plan, "--output", root / "q",
               *data) == 0
    return src, root, plan, data


def test_assembled_checkpoint_follows_the_plan(assembled):
    src, root, plan_path, _ = assembled
    plan = BitPlan.load(plan_path)
    section = read_casp_section(root / "asm")
    quantized = {n: d for n, d in section["modules"].items() if d["type"] == "gptq"}
    assert set(quantized) == set(plan.modules)
    assert all(d["bits"] == plan.modules[n]["bits"] for n, d in quantized.items())
    ranks = {n: d["rank"] for n, d in section["modules"].items() if d["type"] == "lowrank"}
    assert ranks == plan.meta["lowrank"]["ranks"] and ranks
    assert average_bits(section) == pytest.approx(plan.achieved_bits)
    assert [s["stage"] for s in section["stages"]] == ["assemble"]
    model = load_checkpoint(root / "asm").model
    for r in plan.layers:
        q = model.model.layers[r["layer"]].self_attn.q_proj
        assert isinstance(q, LowRankLinear) == (r["lowrank"] is not None)


def test_first_layer_inputs_match_the_usual_recipe(assembled):
    """Layer 0's inputs are the same for the full-precision and the quantized model, so the
    modules fed the layer's normalised input (q, k, v or their down factors) are the very
    ones the usual recipe writes; modules after them differ (the recipe's Hessians follow
    the quantized modules before), and the models stay close."""
    src, root, plan_path, data = assembled
    asm = load_checkpoint(root / "asm").model
    ref = load_checkpoint(root / "q").model
    a0, r0 = asm.model.layers[0].self_attn, ref.model.layers[0].self_attn
    firsts = []
    for name in ("q_proj", "k_proj", "v_proj"):
        m = getattr(a0, name)
        firsts.append(f"{name}.down" if isinstance(m, LowRankLinear) else name)
    for name in firsts:
        a, r = a0.get_submodule(name), r0.get_submodule(name)
        assert torch.equal(a.dequantized_weight(), r.dequantized_weight()), name
    # somewhere later the two differ: the assembly did not just rerun the recipe
    differs = [n for n, m in asm.named_modules() if hasattr(m, "dequantized_weight")
               and not torch.equal(m.dequantized_weight(),
                                   ref.get_submodule(n).dequantized_weight())]
    assert differs
    # both quantized models are about as far from the full-precision one
    fp = load_pretrained(str(src)).model
    ids = torch.randint(0, asm.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lf = torch.log_softmax(fp(ids).logits, -1)
        kl = [float((lf.exp() * (lf - torch.log_softmax(m(ids).logits, -1))).sum(-1).mean())
              for m in (asm, ref)]
    print("KL to fp: assembled %.4f, recipe %.4f" % tuple(kl))
    assert 0 < kl[0] < 2 * kl[1]


def test_another_budget_assembles_without_quantizing(assembled, monkeypatch, tmp_path):
    src, root, plan_path, data = assembled
    monkeypatch.setattr(SensitivityPass, "_quantized", lambda *a, **k: pytest.fail("measured"))
    out = tmp_path / "plan.json"
    assert run("allocate", "--model", src, "--output", out, "--budget", "3.6", *GPTQ,
               "--measurements", plan_path.with_suffix(".measured.json"), "--checkpoint",
               tmp_path / "asm", *data) == 0
    plan = BitPlan.load(out)
    assert average_bits(read_casp_section(tmp_path / "asm")) == pytest.approx(plan.achieved_bits)
    assert plan.achieved_bits > BitPlan.load(plan_path).achieved_bits


def test_extrapolated_options_are_quantized_while_assembling(tmp_path, calib_txt, capsys):
    """--measure-widths 3 with 2 anchors: layer 1 is built at 3 bits only; at a budget near
    2 bits its parts take 2 bits, which the assembly quantizes itself."""
    src = save_tiny("llama", tmp_path / "llama", layers=3)
    data = ["--dataset", calib_txt] + CALIB
    plan = tmp_path / "plan.json"
    assert run("allocate", "--model", src, "--output", plan, "--budget", "3.3", "--bits", "2,3",
               "--group-size", "32", "--measured", "--measure-widths", "3", "--anchor-layers",
               "2", "--search-samples", "4", "--checkpoint", tmp_path / "asm", *data) == 0
    p = BitPlan.load(plan)
    assert "dense@2" in p.layers[1]["units"].values()
    out = capsys.readouterr().out
    built = int(out.split("quantized model written to")[1].split("(")[1].split()[0])
    assert built == sum(l == "dense@2" for l in p.layers[1]["units"].values())
    section = read_casp_section(tmp_path / "asm")
    assert average_bits(section) == pytest.approx(p.achieved_bits)
    options = json.loads((tmp_path / "plan.measured.json.options" / "layer_001.json").read_text())
    assert set(options["options"]["mlp"]) == {"dense@3"}
    load_checkpoint(tmp_path / "asm")
    # at wider budgets layer 1 mixes parts as built (3 bits) with parts quantized here
    mixed = 0
    for budget in ("3.5", "3.7", "3.9"):
        out = tmp_path / f"plan{budget}.json"
        assert run("allocate", "--model", src, "--output", out, "--budget", budget, "--bits",
                   "2,3", "--group-size", "32", "--measured", "--measure-widths", "3",
                   "--anchor-layers", "2", "--search-samples", "4", "--measurements",
                   tmp_path / "plan.measured.json", "--checkpoint", tmp_path / f"asm{budget}",
                   *data) == 0
        p = BitPlan.load(out)
        widths = set(p.layers[1]["units"].values())
        mixed += widths == {"dense@2", "dense@3"}
        section = read_casp_section(tmp_path / f"asm{budget}")
        assert average_bits(section) == pytest.approx(p.achieved_bits)
        assert {n: d["bits"] for n, d in section["modules"].items()} == {
            n: e["bits"] for n, e in p.modules.items()}
        load_checkpoint(tmp_path / f"asm{budget}")
    assert mixed


def test_bad_checkpoint_input_is_refused(tmp_path, calib_txt, capsys):
    src = save_tiny("llama", tmp_path / "llama", layers=2)
    data = ["--dataset", calib_txt] + CALIB
    assert run("allocate", "--model", src, "--output", tmp_path / "p.json", "--budget", "3",
               "--checkpoint", tmp_path / "asm", *data) == 2
    assert "--checkpoint needs --measured" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run("allocate", "--model", src, "--output", tmp_path / "p.json", "--budget", "3",
               *GPTQ, "--checkpoint", tmp_path / "full", *data) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_extrapolated_low_rank_options_get_their_full_precision_factors(tmp_path, calib_txt):
    """Low-rank options at a width the search extrapolated: the kept full-precision factors
    are installed and quantized while assembling, as the plan says."""
    src = save_tiny("llama", tmp_path / "llama", layers=3)
    data = ["--dataset", calib_txt] + CALIB
    plan = tmp_path / "plan.json"
    assert run("allocate", "--model", src, "--output", plan, "--budget", "2.93", "--bits", "2,3",
               "--group-size", "32", "--factor-bits", "0", "--measured", "--lowrank-options",
               "0.75", "--measure-widths", "3", "--anchor-layers", "2", "--search-samples", "4",
               "--checkpoint", tmp_path / "asm", *data) == 0
    p = BitPlan.load(plan)
    assert p.layers[1]["units"]["qk"] == "lowrank0.75@2"         # not built: layer 1 at 3 only
    section = read_casp_section(tmp_path / "asm")
    assert {n: d["bits"] for n, d in section["modules"].items() if d["type"] == "gptq"} == {
        n: e["bits"] for n, e in p.modules.items()}
    ranks = {n: d["rank"] for n, d in section["modules"].items() if d["type"] == "lowrank"}
    assert ranks == p.meta["lowrank"]["ranks"]
    assert average_bits(section) == pytest.approx(p.achieved_bits)
    q = load_checkpoint(tmp_path / "asm").model.model.layers[1].self_attn.q_proj
    assert isinstance(q, LowRankLinear)
