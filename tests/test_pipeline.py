"""run_stage and the CLI around it: atomic writes, resume, stale temporaries, options."""
import json
import os

import pytest
import torch

import casp
from casp.cli import main
from casp.data.calibration import CalibrationConfig
from casp.errors import CaspError
from casp.loading import load_pretrained
from casp.lowrank import LowRankPass
from casp.pipeline import output_already_done, progress_dir, run_stage
from tiny import save_tiny

CPU = torch.device("cpu")


@pytest.fixture
def tiny(tmp_path):
    return save_tiny("llama", tmp_path / "src", layers=4)


def calib(path):
    return CalibrationConfig(dataset=str(path), nsamples=8, seqlen=32, batch_size=4)


def hidden_entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_save_leaves_nothing(tmp_path, tiny, calib_txt, monkeypatch):
    loaded = load_pretrained(str(tiny))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(loaded.model), "save_pretrained", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        run_stage(loaded, "lowrank", [LowRankPass()], calib(calib_txt), CPU, output=out,
                  progress=False)
    assert not out.exists()
    # only the per-layer progress survives, so that a rerun resumes
    assert hidden_entries(tmp_path) == [progress_dir(out).name]


def test_interrupted_stage_resumes_and_cleans_up(tmp_path, tiny, calib_txt, monkeypatch):
    out = tmp_path / "out"
    real_process = LowRankPass.process
    calls = []
    crash = {"armed": True}

    def flaky(self, ctx):
        if ctx.index == 2 and crash["armed"]:
            crash["armed"] = False
            raise KeyboardInterrupt
        calls.append(ctx.index)
        real_process(self, ctx)

    monkeypatch.setattr(LowRankPass, "process", flaky)
    args = ["-q", "lowrank", "--model", str(tiny), "--output", str(out), "--dataset",
            str(calib_txt), "--nsamples", "8", "--seqlen", "32"]
    assert main(args) == 130                       # interrupted: a clear message, exit 130
    assert not out.exists() and progress_dir(out).is_dir()
    assert calls == [0, 1]
    calls.clear()
    assert main(args) == 0
    assert calls == [2, 3]                         # layers 0 and 1 came from the progress
    assert hidden_entries(tmp_path) == []          # progress removed once the checkpoint exists
    monkeypatch.setattr(LowRankPass, "process", real_process)
    reference = tmp_path / "ref"
    assert main(args[:5] + [str(reference)] + args[6:]) == 0
    a, b = casp.load_model(out), casp.load_model(reference)
    ids = torch.arange(6, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path, tiny, calib_txt):
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999"          # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.tmp-{os.getppid()}"   # another live save is left alone
    alive.mkdir()
    assert main(["-q", "lowrank", "--model", str(tiny), "--output", str(out), "--dataset",
                 str(calib_txt), "--nsamples", "8", "--seqlen", "32"]) == 0
    assert not dead.exists() and (out / "config.json").is_file()
    alive.rmdir()



def test_output_already_done_settles_the_output_before_loading(tmp_path, tiny, calib_txt):
    from casp.allocation.importance import ImportancePass

    first, second = tmp_path / "first", tmp_path / "second"
    config = calib(calib_txt)
    assert not output_already_done(str(tiny), first, "lowrank", [LowRankPass()], config, None)
    run_stage(load_pretrained(str(tiny)), "lowrank", [LowRankPass()], config, CPU,
              output=first, progress=False)
    assert output_already_done(str(tiny), first, "lowrank", [LowRankPass()], config, None)
    # another setting: the output holds a different result, refused unless overwriting
    for passes, layers in [([LowRankPass(compression=0.5)], None), ([LowRankPass()], [1])]:
        with pytest.raises(CaspError, match="already holds a different checkpoint"):
            output_already_done(str(tiny), first, "lowrank", passes, config, layers)
        assert not output_already_done(str(tiny), first, "lowrank", passes, config, layers,
                                       overwrite=True)
    # a checkpoint given as the model: its casp section is part of the key, as in run_stage
    run_stage(load_pretrained(str(first)), "importance", [ImportancePass()], config, CPU,
              output=second, progress=False)
    assert output_already_done(str(first), second, "importance", [ImportancePass()], config,
                               None)


@pytest.mark.parametrize("flags", [["--method", "plain"], ["--propagate", "original"],
                                   ["--offload-activations", "--batch-size", "3"],
                                   ["--layers", "1-2"]])
def test_cli_options_reach_the_checkpoint(tmp_path, tiny, calib_txt, flags):
    out = tmp_path / "out"
    assert main(["-q", "lowrank", "--model", str(tiny), "--output", str(out), "--dataset",
                 str(calib_txt), "--nsamples", "8", "--seqlen", "32", *flags]) == 0
    section = json.loads((out / "config.json").read_text())["casp"]
    settings = section["stages"][0]["settings"]
    lowrank = settings["passes"]["lowrank"]
    if "plain" in flags:
        assert lowrank["method"] == "plain"
    if "original" in flags:
        assert lowrank["propagate"] == "original"
    if "3" in flags:
        assert settings["calibration"]["batch_size"] == 3
    layers = {int(n.split(".")[2]) for n in section["modules"]}
    assert layers == ({1, 2} if "--layers" in flags else {0, 1, 2, 3})
    casp.load_model(out)


def test_lowrank_on_a_lowrank_checkpoint_is_refused(tmp_path, tiny, calib_txt, capsys):
    first = tmp_path / "first"
    base = ["-q", "lowrank", "--dataset", str(calib_txt), "--nsamples", "8", "--seqlen", "32"]
    assert main(base + ["--model", str(tiny), "--output", str(first)]) == 0
    code = main(base + ["--model", str(first), "--output", str(tmp_path / "second")])
    err = capsys.readouterr().err
    assert code == 2 and "already a LowRankLinear" in err
    assert not (tmp_path / "second").exists()


def test_bad_device_is_one_line(capsys, tiny, tmp_path):
    code = main(["ppl", "--model", str(tiny), "--device", "tpu9"])
    assert code == 2 and "unknown device 'tpu9'" in capsys.readouterr().err
