"""casp finetune (casp.quant.e2e): end-to-end fine-tuning of the continuous parameters of a
quantized checkpoint to the full-precision model's next-token distributions, for every
quantizer: the KL falls, the codes stay, the result reloads as trained, resume, bad input."""
import json

import pytest
import torch

from casp.checkpoint import load_checkpoint, read_casp_section
from casp.cli import main
from casp.data.calibration import CalibrationConfig, calibration_batches
from casp.loading import load_pretrained
from casp.quant.e2e import _mean_kl, finetune_end_to_end, quantized_modules
from tiny import save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
SETTINGS = {"gptq": ["--bits", "2", "--group-size", "32"], "aqlm": ["--codebook", "1x6g8"],
            "quip": ["--codebook", "e8p12"]}


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, calib_txt):
    root = tmp_path_factory.mktemp("e2e")
    return save_tiny("llama", root / "fp", layers=2), root, calib_txt


@pytest.mark.parametrize("quantizer", ["gptq", "aqlm", "quip"])
def test_finetuning_lowers_the_kl_and_keeps_the_codes(tiny, quantizer):
    src, root, calib_txt = tiny
    data = ["--dataset", calib_txt, *CALIB]
    q = root / f"{quantizer}-q"
    assert run(quantizer, "--model", src, "--output", q, *SETTINGS[quantizer], *data) == 0
    out = root / f"{quantizer}-ft"
    assert run("finetune", "--model", q, "--teacher", src, "--output", out, "--epochs", "3",
               "--lr", "3e-3", *data) == 0
    section = read_casp_section(out)
    result = section["stages"][-1]["settings"]["result"]
    assert section["stages"][-1]["stage"] == "finetune"
    assert result["kept"] and result["kl_after"] < 0.95 * result["kl_before"]
    # the reloaded checkpoint is the trained model: its KL is the one reported
    teacher = load_pretrained(str(src))
    batches = calibration_batches(teacher, CalibrationConfig(dataset=str(calib_txt),
                                                             nsamples=8, seqlen=32, batch_size=4))
    with torch.no_grad():
        targets = [teacher.model(**b).logits for b in batches]
    before = load_checkpoint(q).model
    after = load_checkpoint(out).model
    assert _mean_kl(after, targets, batches, torch.device("cpu")) == pytest.approx(
        result["kl_after"], rel=1e-3)
    assert _mean_kl(before, targets, batches, torch.device("cpu")) == pytest.approx(
        result["kl_before"], rel=1e-3)
    # codes unchanged, continuous parameters changed
    code_names = {"gptq": "qweight", "aqlm": "codes", "quip": "codes"}[quantizer]
    old, new = quantized_modules(before), quantized_modules(after)
    assert set(old) == set(new)
    for name in old:
        assert torch.equal(getattr(old[name], code_names), getattr(new[name], code_names))
    assert any(not torch.equal(old[n].dequantized_weight(), new[n].dequantized_weight())
               for n in old)


def test_finetuning_resumes_from_a_saved_epoch(tiny, tmp_path):
    src, root, calib_txt = tiny
    data = ["--dataset", calib_txt, *CALIB]
    q = tmp_path / "q"
    assert run("gptq", "--model", src, "--output", q, *SETTINGS["gptq"], *data) == 0
    cfg = CalibrationConfig(dataset=str(calib_txt), nsamples=8, seqlen=32, batch_size=4)
    teacher = load_pretrained(str(src))
    full = load_pretrained(str(q))
    batches = calibration_batches(full, cfg)
    state = tmp_path / "state.pt"
    whole = finetune_end_to_end(full.model, teacher.model, full.spec, batches, 2, 3e-3,
                                torch.device("cpu"), progress=False)
    # an interrupted run: one epoch saved, then a new process resumes at epoch 2
    first = load_pretrained(str(q))

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = torch.optim.Adam.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > len(batches):          # the second epoch's first step
            raise Stop
        return original(self, *a, **k)

    torch.optim.Adam.step = step
    try:
        with pytest.raises(Stop):
            finetune_end_to_end(first.model, teacher.model, first.spec, batches, 2, 3e-3,
                                torch.device("cpu"), state_file=state, progress=False)
    finally:
        torch.optim.Adam.step = original
    assert torch.load(state, weights_only=False)["epoch"] == 1
    resumed = load_pretrained(str(q))
    again = finetune_end_to_end(resumed.model, teacher.model, resumed.spec, batches, 2, 3e-3,
                                torch.device("cpu"), state_file=state, progress=False)
    assert again["kl_after"] == pytest.approx(whole["kl_after"], rel=1e-5)


def test_finetune_refuses_a_model_that_is_not_quantized(tiny, tmp_path, capsys):
    src, _, calib_txt = tiny
    assert run("finetune", "--model", src, "--output", tmp_path / "x", "--dataset", calib_txt,
               *CALIB) == 2
    assert "not a quantized casp checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
