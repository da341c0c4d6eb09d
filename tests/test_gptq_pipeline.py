"""The whole CASP_GPTQ pipeline on tiny random models: low-rank, allocate, GPTQ with the plan,
reload; the baseline; exports; resume; bad input."""
import json

import pytest
import torch

from casp.allocation import BitPlan, average_bits
from casp.checkpoint import checkpoint_size, load_checkpoint, read_casp_section
from casp.cli import main
from casp.quant.gptq.export import dequantize_gptq_tensors, export_gptq
from casp.quant.gptq.layer_pass import GPTQPass
from casp.quant.gptq.linear import GPTQLinear
from tiny import VOCAB, check_resume, save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def casp_gptq(tmp_path_factory, calib_txt):
    """lowrank -> allocate -> gptq for a tiny llama and a tiny llava."""
    root = tmp_path_factory.mktemp("casp_gptq")
    out = {}
    for kind in ("llama", "llava"):
        src = save_tiny(kind, root / kind, layers=3)
        data = ["--dataset", calib_txt] + CALIB
        assert run("lowrank", "--model", src, "--output", root / f"{kind}-lr",
                   "--compression", "0.5", *data) == 0
        assert run("allocate", "--model", root / f"{kind}-lr", "--output",
                   root / f"{kind}-plan.json", "--budget", "4.6", "--bits", "2,3,4",
                   "--group-size", "32", *data) == 0
        assert run("gptq", "--model", root / f"{kind}-lr", "--plan", root / f"{kind}-plan.json",
                   "--output", root / f"{kind}-q", *data) == 0
        out[kind] = (src, root / f"{kind}-lr", root / f"{kind}-plan.json", root / f"{kind}-q")
    return out


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_casp_gptq_checkpoint_follows_the_plan_and_reloads(casp_gptq, kind):
    src, lowrank, plan_path, quant = casp_gptq[kind]
    plan = BitPlan.load(plan_path)
    assert plan_path.with_suffix(".png").stat().st_size > 1000
    section = read_casp_section(quant)
    assert [s["stage"] for s in section["stages"]] == ["lowrank", "gptq"]
    quantized = {n: d for n, d in section["modules"].items() if d["type"] == "gptq"}
    assert set(quantized) == set(plan.modules)
    for name, d in quantized.items():
        assert d["bits"] == plan.modules[name]["bits"]
    # factors are quantized (per channel, 3 bits by default) and layers got more than one width
    assert any(n.endswith("q_proj.down") for n in quantized)
    assert {plan.modules[n]["bits"] for n in quantized if n.endswith("q_proj.down")} == {3}
    assert average_bits(section) == pytest.approx(plan.achieved_bits)
    assert plan.achieved_bits <= 4.6
    # the reloaded model runs from the packed weights and reproduces the dequantized ones
    loaded = load_checkpoint(quant)
    model = loaded.model
    modules = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(modules) == len(quantized)
    ids = torch.tensor([[VOCAB.index(w) for w in "the cat is on the big red square".split()]])
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    reference = load_checkpoint(lowrank).model
    ref_logits = reference(input_ids=ids).logits
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert 0 < rel < 0.5
    # stored quantized tensors are what the bits claim
    size = checkpoint_size(quant)
    assert size["quantized_bytes"] == pytest.approx(size["claimed_quantized_bytes"], rel=0.01)


def test_same_command_twice_does_nothing(casp_gptq, calib_txt, capsys):
    src, lowrank, plan_path, quant = casp_gptq["llama"]
    before = (quant / "model.safetensors").stat().st_mtime_ns
    assert run("gptq", "--model", lowrank, "--plan", plan_path, "--output", quant,
               "--dataset", calib_txt, *CALIB) == 0
    assert "already done" in capsys.readouterr().out
    assert (quant / "model.safetensors").stat().st_mtime_ns == before


def test_plan_of_another_model_is_refused(casp_gptq, calib_txt, tmp_path, capsys):
    src, lowrank, plan_path, _ = casp_gptq["llama"]
    # the plan was made for the low-rank model: the original has no factors
    code = run("gptq", "--model", src, "--plan", plan_path, "--output", tmp_path / "x",
               "--dataset", calib_txt, *CALIB)
    err = capsys.readouterr().err
    assert code == 2 and "does not match" in err and err.count("casp: error") == 1
    assert not (tmp_path / "x").exists()
    assert not any(p.name.startswith(".x") for p in tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--bits", "9"], "outside 2-8"),
    (["--bits", "1"], "outside 2-8"),
    (["--group-size", "0"], "group size 0 is invalid"),
    (["--damp", "2"], "dampening"),
])
def test_bad_gptq_flags(casp_gptq, calib_txt, tmp_path, capsys, argv, message):
    src = casp_gptq["llama"][0]
    code = run("gptq", "--model", src, "--output", tmp_path / "x", "--dataset", calib_txt,
               *CALIB, *argv)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_allocate_refuses_budgets_it_cannot_meet(casp_gptq, calib_txt, tmp_path, capsys):
    lowrank = casp_gptq["llama"][1]
    code = run("allocate", "--model", lowrank, "--output", tmp_path / "p.json", "--budget", "2.5",
               "--group-size", "32", "--dataset", calib_txt, *CALIB)
    err = capsys.readouterr().err
    assert code == 2 and "cannot be met" in err and "already needs" in err
    assert not (tmp_path / "p.json").exists()
    assert run("allocate", "--model", lowrank, "--output", tmp_path / "p.json", "--budget", "3",
               "--bits", "2,9", "--dataset", calib_txt, *CALIB) == 2
    assert "outside 2-8" in capsys.readouterr().err


def test_quantized_checkpoint_cannot_be_quantized_again(casp_gptq, calib_txt, tmp_path, capsys):
    quant = casp_gptq["llama"][3]
    code = run("gptq", "--model", quant, "--output", tmp_path / "x", "--dataset", calib_txt,
               *CALIB)
    assert code == 2 and "already quantized" in capsys.readouterr().err


def test_uniform_baseline_and_standard_gptq_export(casp_gptq, calib_txt, tmp_path):
    src = casp_gptq["llama"][0]
    out = tmp_path / "q4"
    assert run("gptq", "--model", src, "--output", out, "--bits", "4", "--group-size", "32",
               "--dataset", calib_txt, *CALIB, "--export-gptq", tmp_path / "std") == 0
    loaded = load_checkpoint(out)
    section = read_casp_section(out)
    assert {d["bits"] for d in section["modules"].values()} == {4}
    # 4 bits + 32 bits of scale and zero per 32 weights + 16-bit group indices per column
    assert 5.0 < average_bits(section) < 5.3
    std = tmp_path / "std"
    cfg = json.loads((std / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["desc_act"]
    assert "casp" not in cfg
    from safetensors.torch import load_file

    tensors = load_file(std / "model.safetensors")
    for name, module in loaded.model.named_modules():
        if isinstance(module, GPTQLinear):
            parts = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            assert parts["qweight"].dtype == torch.int32
            assert parts["qweight"].shape == (module.in_features * 4 // 32, module.out_features)
            assert torch.equal(dequantize_gptq_tensors(parts, 4), module.dequantized_weight())


def test_export_refuses_mixed_settings_and_lowrank(casp_gptq, tmp_path):
    loaded = load_checkpoint(casp_gptq["llama"][3])
    with pytest.raises(Exception, match="low-rank"):
        export_gptq(loaded, tmp_path / "std")


def test_interrupted_gptq_resumes_from_the_last_finished_layer(casp_gptq, calib_txt, tmp_path,
                                                               monkeypatch):
    src = casp_gptq["llama"][0]
    argv = ["gptq", "--model", src, "--output", tmp_path / "q", "--bits", "3", "--group-size",
            "32", "--dataset", calib_txt, *CALIB]
    check_resume(run, GPTQPass, argv, 4, tmp_path, monkeypatch)
