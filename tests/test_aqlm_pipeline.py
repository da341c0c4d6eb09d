"""The whole CASP_AQLM pipeline on tiny random models: low-rank (ranks multiple of the AQLM
group), allocate for AQLM, AQLM with the plan, reload through the aqlm kernels; the
baseline and its HF AQLM export loaded by stock transformers; resume; fine-tuning; bad
input."""
import json

import pytest
import torch

from casp.allocation import BitPlan, average_bits
from casp.checkpoint import checkpoint_size, load_checkpoint, read_casp_section
from casp.cli import main
from casp.quant.aqlm.linear import AQLMLinear, serial_numba
from casp.quant.aqlm.layer_pass import AQLMPass
from tiny import VOCAB, check_resume, save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
FAST = ["--max-rounds", "2", "--steps-per-round", "5", "--kmeans-iterations", "5"]
# codebooks small enough for 64-wide matrices (a 2x8 codebook alone is 16 bits per weight)
SMALL_MAP = "2=2x4g4,3=3x4g4,4=4x4g4"
IDS = torch.tensor([[VOCAB.index(w) for w in "the cat is on the big red square".split()]])


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def casp_aqlm(tmp_path_factory, calib_txt):
    """lowrank -> allocate --quantizer aqlm -> aqlm --plan for a tiny llama and llava."""
    root = tmp_path_factory.mktemp("casp_aqlm")
    out = {}
    for kind in ("llama", "llava"):
        src = save_tiny(kind, root / kind, layers=3)
        data = ["--dataset", calib_txt] + CALIB
        assert run("lowrank", "--model", src, "--output", root / f"{kind}-lr",
                   "--compression", "0.5", "--rank-multiple", "8", *data) == 0
        assert run("allocate", "--quantizer", "aqlm", "--model", root / f"{kind}-lr",
                   "--output", root / f"{kind}-plan.json", "--budget", "5.3", "--bits", "2,3,4",
                   "--codebooks", SMALL_MAP, "--factor-bits", "0", *data) == 0
        assert run("aqlm", "--model", root / f"{kind}-lr", "--plan", root / f"{kind}-plan.json",
                   "--output", root / f"{kind}-q", *FAST, *data) == 0
        out[kind] = (src, root / f"{kind}-lr", root / f"{kind}-plan.json", root / f"{kind}-q")
    return out


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_casp_aqlm_follows_the_plan_and_reloads(casp_aqlm, kind):
    src, lowrank, plan_path, quant = casp_aqlm[kind]
    plan = BitPlan.load(plan_path)
    assert plan.meta["quantizer"] == "aqlm"
    section = read_casp_section(quant)
    assert [s["stage"] for s in section["stages"]] == ["lowrank", "aqlm"]
    quantized = {n: d for n, d in section["modules"].items() if d["type"] == "aqlm"}
    assert set(quantized) == set(plan.modules)
    for name, d in quantized.items():
        assert f"{d['num_codebooks']}x{d['nbits_per_codebook']}" == plan.modules[name]["codebooks"]
    # per-module settings in one model: the budget bought more than one setting
    assert len({d["num_codebooks"] for d in quantized.values()}) >= 2
    assert any(n.endswith("k_proj.up") for n in quantized)          # rank 8 factor, group 4
    assert average_bits(section) == pytest.approx(plan.achieved_bits)
    assert plan.achieved_bits <= 5.3
    size = checkpoint_size(quant)
    assert size["quantized_bytes"] == pytest.approx(size["claimed_quantized_bytes"], rel=0.01)

    model = load_checkpoint(quant).model
    modules = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    assert len(modules) == len(quantized)
    kernel = model(input_ids=IDS).logits                   # through the aqlm package
    for m in modules:
        m.cache_weight()
    dequantized = model(input_ids=IDS).logits              # our own reference
    assert torch.allclose(kernel, dequantized, atol=1e-4)
    reference = load_checkpoint(lowrank).model(input_ids=IDS).logits
    rel = ((kernel - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.5


def test_uniform_2x8_baseline_runs_on_the_numba_kernel_and_exports_for_transformers(
        casp_aqlm, calib_txt, tmp_path):
    import transformers

    src = casp_aqlm["llama"][0]
    out, hf = tmp_path / "q", tmp_path / "hf"
    assert run("aqlm", "--model", src, "--output", out, "--codebooks", "2x8", *FAST,
               "--dataset", calib_txt, *CALIB, "--export-aqlm", hf) == 0
    section = read_casp_section(out)
    assert {(d["num_codebooks"], d["nbits_per_codebook"]) for d in section["modules"].values()} \
        == {(2, 8)}
    model = load_checkpoint(out).model
    kernel = model(input_ids=IDS).logits                   # numba LUT kernel (8-bit codebooks)
    for m in model.modules():
        if isinstance(m, AQLMLinear):
            m.cache_weight()
    dequantized = model(input_ids=IDS).logits
    assert torch.allclose(kernel, dequantized, atol=1e-4)

    cfg = json.loads((hf / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["num_codebooks"], q["nbits_per_codebook"], q["in_group_size"]) \
        == ("aqlm", 2, 8, 8)
    assert "lm_head" in q["linear_weights_not_to_quantize"] and "casp" not in cfg
    with serial_numba():
        stock = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        from aqlm import QuantizedLinear

        assert isinstance(stock.model.layers[0].mlp.down_proj, QuantizedLinear)
        assert not isinstance(stock.lm_head, QuantizedLinear)
        theirs = stock(input_ids=IDS).logits
    assert torch.allclose(theirs, dequantized, atol=1e-4)


def test_export_refuses_lowrank_and_mixed_settings(casp_aqlm, tmp_path):
    from casp.quant.aqlm.export import export_aqlm

    with pytest.raises(Exception, match="low-rank"):
        export_aqlm(load_checkpoint(casp_aqlm["llama"][3]), tmp_path / "hf")


def test_interrupted_aqlm_resumes_from_the_last_finished_layer(casp_aqlm, calib_txt, tmp_path,
                                                               monkeypatch):
    src = casp_aqlm["llama"][0]
    argv = ["aqlm", "--model", src, "--output", tmp_path / "q", "--codebooks", "2x4",
            "--in-group-size", "4", *FAST, "--dataset", calib_txt, *CALIB]
    check_resume(run, AQLMPass, argv, 4, tmp_path, monkeypatch)


def test_block_finetuning_never_makes_a_layer_worse(casp_aqlm, calib_txt, tmp_path):
    src = casp_aqlm["llama"][0]
    out = tmp_path / "ft"
    assert run("aqlm", "--model", src, "--output", out, "--codebooks", "1x4", "--in-group-size",
               "4", *FAST, "--finetune-steps", "3", "--finetune-lr", "1e-3",
               "--dataset", calib_txt, *CALIB) == 0
    modules = read_casp_section(out)["modules"]
    pairs = {tuple(d["finetune_mse"]) for d in modules.values()}
    assert len(pairs) == 3                                   # one record per layer
    assert all(after <= before for before, after in pairs)
    assert any(after < before for before, after in pairs)
    load_checkpoint(out).model(input_ids=IDS)


@pytest.mark.parametrize("argv, message", [
    (["--codebooks", "2x17"], "cannot run on the aqlm kernels"),
    (["--codebooks", "2y8"], "is not MxB"),
    (["--codebooks", "2x8", "--in-group-size", "5"], "does not divide"),
    (["--tolerance", "1.5"], "tolerance"),
])
def test_bad_aqlm_flags(casp_aqlm, calib_txt, tmp_path, capsys, argv, message):
    src = casp_aqlm["llama"][0]
    code = run("aqlm", "--model", src, "--output", tmp_path / "x", "--dataset", calib_txt,
               *CALIB, *FAST, *argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("casp: error") == 1
    assert not (tmp_path / "x").exists()


def test_factor_ranks_must_fit_the_group(calib_txt, tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "src", layers=2)
    data = ["--dataset", calib_txt, *CALIB]
    assert run("lowrank", "--model", src, "--output", tmp_path / "lr", "--compression", "0.5",
               *data) == 0                          # k_proj rank 10: 8 does not divide it
    code = run("aqlm", "--model", tmp_path / "lr", "--output", tmp_path / "q", *FAST, *data)
    err = capsys.readouterr().err
    assert code == 2 and "--rank-multiple 8" in err and not (tmp_path / "q").exists()


def test_plans_are_tied_to_their_quantizer(casp_aqlm, calib_txt, tmp_path, capsys):
    src, lowrank, plan_path, _ = casp_aqlm["llama"]
    code = run("gptq", "--model", lowrank, "--plan", plan_path, "--output", tmp_path / "g",
               "--dataset", calib_txt, *CALIB)
    assert code == 2 and "plan for aqlm" in capsys.readouterr().err
    gptq_plan = tmp_path / "gplan.json"
    assert run("allocate", "--model", lowrank, "--output", gptq_plan, "--budget", "4",
               "--group-size", "32", "--dataset", calib_txt, *CALIB) == 0
    code = run("aqlm", "--model", lowrank, "--plan", gptq_plan, "--output", tmp_path / "a",
               "--dataset", calib_txt, *CALIB)
    assert code == 2 and "not AQLM" in capsys.readouterr().err
    # a plan made for the low-rank model does not fit the original
    code = run("aqlm", "--model", src, "--plan", plan_path, "--output", tmp_path / "b",
               "--dataset", calib_txt, *CALIB)
    assert code == 2 and "does not match" in capsys.readouterr().err


def test_allocate_for_aqlm_counts_codebooks_and_refuses_what_cannot_fit(casp_aqlm, calib_txt,
                                                                        tmp_path, capsys):
    lowrank = casp_aqlm["llama"][1]
    data = ["--dataset", calib_txt, *CALIB]
    # the uniform 2x8 budget: a 2x8 codebook (65,536 bits) dwarfs these matrices, and the
    # factors add codebooks of their own, so the low-rank model cannot meet it
    code = run("allocate", "--quantizer", "aqlm", "--model", lowrank, "--output",
               tmp_path / "p.json", "--budget", "2x8", "--codebooks", "2=2x8,3=2x12", "--bits",
               "2,3", *data)
    err = capsys.readouterr().err
    assert code == 2 and "cannot be met" in err and "AQLM 2x8" in err
    assert not (tmp_path / "p.json").exists()
    code = run("allocate", "--quantizer", "aqlm", "--model", lowrank, "--output",
               tmp_path / "p.json", "--budget", "9", "--codebooks", "2=2x8", "--bits", "2,3",
               *data)
    assert code == 2 and "no AQLM codebook setting for 3 bits" in capsys.readouterr().err


def test_aqlm_checkpoint_cannot_be_quantized_again(casp_aqlm, calib_txt, tmp_path, capsys):
    code = run("aqlm", "--model", casp_aqlm["llama"][3], "--output", tmp_path / "x",
               "--dataset", calib_txt, *CALIB)
    assert code == 2 and "already quantized" in capsys.readouterr().err
