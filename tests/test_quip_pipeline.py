"""The whole CASP_QuIP# pipeline on tiny random models: low-rank (ranks a multiple of 8),
allocate for QuIP#, QuIP# with the plan, reload and run from the packed form; offline
Hessians (hfize); resume; fine-tuning; bad input."""
import json
from pathlib import Path

import pytest
import torch

from casp.allocation import BitPlan, average_bits
from casp.checkpoint import checkpoint_size, load_checkpoint, read_casp_section
from casp.cli import main
from casp.quant.quip.linear import QuIPLinear
from casp.quant.quip.layer_pass import QuIPPass, load_hessian
from tiny import VOCAB, check_resume, save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
IDS = torch.tensor([[VOCAB.index(w) for w in "the cat is on the big red square".split()]])


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def casp_quip(tmp_path_factory, calib_txt):
    """lowrank -> allocate --quantizer quip -> quip --plan for a tiny llama and llava."""
    root = tmp_path_factory.mktemp("casp_quip")
    out = {}
    for kind in ("llama", "llava"):
        src = save_tiny(kind, root / kind, layers=3)
        data = ["--dataset", calib_txt] + CALIB
        assert run("lowrank", "--model", src, "--output", root / f"{kind}-lr",
                   "--compression", "0.5", "--rank-multiple", "8", *data) == 0
        assert run("allocate", "--quantizer", "quip", "--model", root / f"{kind}-lr",
                   "--output", root / f"{kind}-plan.json", "--budget", "2.4",
                   "--bits", "2,3,4", "--factor-bits", "0", *data) == 0
        assert run("quip", "--model", root / f"{kind}-lr", "--plan", root / f"{kind}-plan.json",
                   "--output", root / f"{kind}-q", *data) == 0
        out[kind] = (src, root / f"{kind}-lr", root / f"{kind}-plan.json", root / f"{kind}-q")
    return out


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_casp_quip_follows_the_plan_and_runs_from_the_packed_form(casp_quip, kind):
    src, lowrank, plan_path, quant = casp_quip[kind]
    plan = BitPlan.load(plan_path)
    assert plan.meta["quantizer"] == "quip"
    section = read_casp_section(quant)
    assert [s["stage"] for s in section["stages"]] == ["lowrank", "quip"]
    quantized = {n: d for n, d in section["modules"].items() if d["type"] == "quip"}
    assert set(quantized) == set(plan.modules)
    for name, d in quantized.items():
        assert d["codebook"] == plan.modules[name]["quip_codebook"]
        assert d["bits"] == plan.modules[name]["bits"]
    # the budget bought wider codebooks for some layers
    assert len({d["codebook"] for d in quantized.values()}) >= 2
    assert any(n.endswith("k_proj.up") for n in quantized)          # a rank-8 factor
    assert average_bits(section) == pytest.approx(plan.achieved_bits)
    assert plan.achieved_bits <= plan.meta["budget_bits"]
    size = checkpoint_size(quant)
    assert size["quantized_bytes"] == pytest.approx(size["claimed_quantized_bytes"], rel=0.02)

    model = load_checkpoint(quant).model
    modules = [m for m in model.modules() if isinstance(m, QuIPLinear)]
    assert len(modules) == len(quantized)
    assert all(m._cached is None for m in modules)           # runs from codes + transforms
    packed = model(input_ids=IDS).logits
    for m in modules:
        m.cache_weight()
    dense_logits = model(input_ids=IDS).logits
    assert torch.allclose(packed, dense_logits, atol=1e-4)
    reference = load_checkpoint(lowrank).model(input_ids=IDS).logits
    rel = ((packed - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.5


def test_budget_e8p12_is_what_uniform_e8p12_stores(casp_quip, calib_txt, tmp_path):
    from casp.quant.layer_groups import quantizable_linears

    src, lowrank = casp_quip["llama"][:2]
    assert run("allocate", "--quantizer", "quip", "--model", lowrank, "--output",
               tmp_path / "p.json", "--budget", "e8p12", "--bits", "2,3", "--factor-bits", "0",
               "--dataset", calib_txt, *CALIB) == 0
    plan = BitPlan.load(tmp_path / "p.json")
    from casp.loading import load_pretrained

    loaded = load_pretrained(str(src), dtype="float32", device="cpu")
    shapes = [l.weight.shape for l in quantizable_linears(loaded.model, loaded.spec).values()]
    uniform = sum(o * i * 2 + o + i + 32 for o, i in shapes)
    assert plan.meta["budget_bits"] == pytest.approx(uniform / sum(o * i for o, i in shapes))


def test_uniform_quip_with_offline_hessians(casp_quip, calib_txt, tmp_path):
    """hfize: Hessians of the model as given, then QuIP# from them; equal to collecting them
    in the pass when nothing before a module changed its input (non-true-sequential)."""
    src = casp_quip["llama"][0]
    data = ["--dataset", calib_txt, *CALIB]
    assert run("hessians", "--model", src, "--output", tmp_path / "h", *data) == 0
    files = sorted((tmp_path / "h").glob("layer_*.safetensors"))
    assert len(files) == 3
    h = load_hessian(tmp_path / "h", 0, "self_attn.k_proj")
    assert torch.equal(h, load_hessian(tmp_path / "h", 0, "self_attn.q_proj"))   # shared input
    assert torch.allclose(h, h.T) and torch.linalg.eigvalsh(h.double()).min() > -1e-5
    assert run("quip", "--model", src, "--output", tmp_path / "q", "--hessians", tmp_path / "h",
               *data) == 0
    section = read_casp_section(tmp_path / "q")
    assert {d["codebook"] for d in section["modules"].values()} == {"e8p12"}
    assert len(section["modules"]) == 3 * 7
    # layer 0's Hessians do not depend on quantization order: same result either way
    assert run("quip", "--model", src, "--output", tmp_path / "q2", "--no-true-sequential",
               "--layers", "0", *data) == 0
    a = load_checkpoint(tmp_path / "q").model.state_dict()
    b = load_checkpoint(tmp_path / "q2").model.state_dict()
    key = "model.layers.0.mlp.down_proj.codes"
    assert torch.equal(a[key], b[key])


def test_hessians_of_another_model_are_refused(casp_quip, calib_txt, tmp_path, capsys):
    src, lowrank = casp_quip["llama"][:2]
    data = ["--dataset", calib_txt, *CALIB]
    assert run("hessians", "--model", src, "--output", tmp_path / "h", "--layers", "0",
               *data) == 0
    code = run("quip", "--model", lowrank, "--output", tmp_path / "q", "--hessians",
               tmp_path / "h", "--layers", "0", *data)
    err = capsys.readouterr().err
    assert code == 2 and "holds Hessians of other weights" in err and err.count("casp: error") == 1
    assert not (tmp_path / "q").exists()
    # nor are another model's Hessians added to the directory
    assert run("hessians", "--model", lowrank, "--output", tmp_path / "h", *data) == 2
    assert "holds Hessians of other weights" in capsys.readouterr().err
    assert not (tmp_path / "h" / "layer_001.safetensors").exists()
    # names it lacks (a record edited by hand) are refused too
    record = json.loads((tmp_path / "h" / "hessians.json").read_text())
    record["model"]["source"] = str(Path(lowrank).resolve())
    record["model"]["stages"] = [s["fingerprint"] for s in read_casp_section(lowrank)["stages"]]
    (tmp_path / "h" / "hessians.json").write_text(json.dumps(record))
    code = run("quip", "--model", lowrank, "--output", tmp_path / "q", "--hessians",
               tmp_path / "h", "--layers", "0", *data)
    assert code == 2 and "no Hessian for layer 0" in capsys.readouterr().err
    (tmp_path / "h" / "hessians.json").unlink()
    # a truncated file is refused with the fix
    assert run("hessians", "--model", src, "--output", tmp_path / "h", "--layers", "0",
               *data) == 0
    layer0 = tmp_path / "h" / "layer_000.safetensors"
    layer0.write_bytes(layer0.read_bytes()[:100])
    code = run("quip", "--model", src, "--output", tmp_path / "q", "--hessians",
               tmp_path / "h", "--layers", "0", *data)
    err = capsys.readouterr().err
    assert code == 2 and "not a readable Hessian file" in err and "rerun casp hessians" in err
    assert not (tmp_path / "q").exists()


def test_interrupted_quip_resumes_from_the_last_finished_layer(casp_quip, calib_txt, tmp_path,
                                                               monkeypatch):
    src = casp_quip["llama"][0]
    argv = ["quip", "--model", src, "--output", tmp_path / "q", "--codebook", "e8p12rvq3b",
            "--dataset", calib_txt, *CALIB]
    check_resume(run, QuIPPass, argv, 4, tmp_path, monkeypatch)


def test_block_finetuning_never_makes_a_layer_worse(casp_quip, calib_txt, tmp_path):
    src = casp_quip["llama"][0]
    out = tmp_path / "ft"
    assert run("quip", "--model", src, "--output", out, "--finetune-steps", "3",
               "--finetune-lr", "1e-2", "--dataset", calib_txt, *CALIB) == 0
    modules = read_casp_section(out)["modules"]
    pairs = {tuple(d["finetune_mse"]) for d in modules.values()}
    assert len(pairs) == 3                                   # one record per layer
    assert all(after <= before for before, after in pairs)
    assert any(after < before for before, after in pairs)
    improved = [d for d in modules.values() if d["finetune_mse"][1] < d["finetune_mse"][0]]
    assert all(d["real_signs"] for d in improved)            # stored as fp16 vectors
    size = checkpoint_size(out)
    assert size["quantized_bytes"] == pytest.approx(size["claimed_quantized_bytes"], rel=0.02)
    load_checkpoint(out).model(input_ids=IDS)


@pytest.mark.parametrize("argv, message", [
    (["--codebook", "e8p13"], "QuIP# codebook 'e8p13' is unknown"),
    (["--sigma-reg", "-1"], "sigma-reg"),
    (["--hessians", "/nonexistent/h"], "does not exist"),
])
def test_bad_quip_flags(casp_quip, calib_txt, tmp_path, capsys, argv, message):
    src = casp_quip["llama"][0]
    code = run("quip", "--model", src, "--output", tmp_path / "x", "--dataset", calib_txt,
               *CALIB, *argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("casp: error") == 1
    assert not (tmp_path / "x").exists()


def test_plans_of_other_quantizers_and_bad_maps_are_refused(casp_quip, calib_txt, tmp_path,
                                                            capsys):
    src, lowrank, plan = casp_quip["llama"][:3]
    data = ["--dataset", calib_txt, *CALIB]
    assert run("aqlm", "--model", lowrank, "--plan", plan, "--output", tmp_path / "a",
               *data) == 2
    assert "plan for quip, not AQLM" in capsys.readouterr().err
    assert run("allocate", "--model", lowrank, "--output", tmp_path / "g.json", "--budget",
               "3.5", *data) == 0
    assert run("quip", "--model", lowrank, "--plan", tmp_path / "g.json", "--output",
               tmp_path / "q", *data) == 2
    assert "plan for gptq, not QUIP" in capsys.readouterr().err
    assert run("allocate", "--quantizer", "quip", "--model", lowrank, "--output",
               tmp_path / "p.json", "--budget", "e8p12", "--codebooks", "2=e8p12rvq3b",
               "--bits", "2", *data) == 2
    assert "stores 3 bits, not 2" in capsys.readouterr().err
    assert run("allocate", "--quantizer", "quip", "--model", lowrank, "--output",
               tmp_path / "p.json", "--budget", "1.5", "--bits", "2,3", *data) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_factor_ranks_must_be_multiples_of_8(calib_txt, tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "src", layers=2)
    data = ["--dataset", calib_txt, *CALIB]
    assert run("lowrank", "--model", src, "--output", tmp_path / "lr", "--compression", "0.6",
               *data) == 0
    ranks = {d["rank"] for d in read_casp_section(tmp_path / "lr")["modules"].values()}
    assert any(r % 8 for r in ranks)
    assert run("quip", "--model", tmp_path / "lr", "--output", tmp_path / "q", *data) == 2
    assert "--rank-multiple 8" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quip_checkpoint_cannot_be_quantized_again(casp_quip, calib_txt, tmp_path, capsys):
    quant = casp_quip["llama"][3]
    assert run("quip", "--model", quant, "--output", tmp_path / "qq", "--dataset", calib_txt,
               *CALIB) == 2
    assert "already quantized" in capsys.readouterr().err
