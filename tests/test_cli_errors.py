"""Bad input: one clear line, a non-zero exit, nothing half-written."""
import json

import pytest
import transformers

import casp
from casp.cli import main
from casp.errors import CaspError
from tiny import save_tiny


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("casp: error:")]


def lowrank_args(model, out, calib, *extra):
    return ["-q", "lowrank", "--model", str(model), "--output", str(out), "--dataset",
            str(calib), "--nsamples", "4", "--seqlen", "32", *extra]


@pytest.fixture
def tiny_llama(tmp_path):
    return save_tiny("llama", tmp_path / "llama", context=64)


def assert_clean(parent):
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


def test_missing_model_path(capsys, tmp_path, calib_txt):
    code, lines = run_cli(capsys, *lowrank_args(tmp_path / "nope", tmp_path / "out", calib_txt))
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(capsys, tmp_path, calib_txt):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(tmp_path / "gpt2")
    code, lines = run_cli(capsys, *lowrank_args(tmp_path / "gpt2", tmp_path / "out", calib_txt))
    assert code == 2 and len(lines) == 1
    assert "unsupported architecture 'GPT2LMHeadModel'" in lines[0]
    assert "LlavaNextVideoForConditionalGeneration" in lines[0]


@pytest.mark.parametrize("ratio", ["1.5", "0", "1", "-0.2", "abc"])
def test_ratio_outside_unit_interval(capsys, tmp_path, tiny_llama, calib_txt, ratio):
    code, lines = run_cli(capsys, *lowrank_args(tiny_llama, tmp_path / "out", calib_txt,
                                                "--compression", ratio))
    assert code == 2 and len(lines) == 1 and "(0, 1)" in lines[0]


def test_seqlen_longer_than_context(capsys, tmp_path, tiny_llama, calib_txt):
    args = lowrank_args(tiny_llama, tmp_path / "out", calib_txt)
    args[args.index("--seqlen") + 1] = "128"
    code, lines = run_cli(capsys, *args)
    assert code == 2 and len(lines) == 1 and "longer than the model's context (64" in lines[0]


def test_calibration_text_too_short(capsys, tmp_path, tiny_llama):
    short = tmp_path / "short.txt"
    short.write_text("the cat is red and the dog is blue")
    code, lines = run_cli(capsys, *lowrank_args(tiny_llama, tmp_path / "out", short))
    assert code == 2 and len(lines) == 1 and "calibration text too short" in lines[0]
    assert not (tmp_path / "out").exists()
    assert_clean(tmp_path)


def test_output_holding_a_different_checkpoint(capsys, tmp_path, tiny_llama, calib_txt):
    out = tmp_path / "out"
    assert main(lowrank_args(tiny_llama, out, calib_txt)) == 0
    config_before = (out / "config.json").read_text()
    # the same command again: nothing to do
    assert main(lowrank_args(tiny_llama, out, calib_txt)) == 0
    assert "already done" in capsys.readouterr().out
    # different settings into the same directory: refused, directory untouched
    code, lines = run_cli(capsys, *lowrank_args(tiny_llama, out, calib_txt, "--compression", "0.5"))
    assert code == 2 and len(lines) == 1 and "already holds a different checkpoint" in lines[0]
    assert (out / "config.json").read_text() == config_before
    # --overwrite replaces it
    assert main(lowrank_args(tiny_llama, out, calib_txt, "--compression", "0.5",
                             "--overwrite")) == 0
    modules = json.loads((out / "config.json").read_text())["casp"]["modules"].values()
    assert {d["rank"] for d in modules} == {16, 10}
    assert all(0 < d["relative_error"] < 1 for d in modules)
    assert_clean(tmp_path)


def test_non_checkpoint_files_are_not_overwritten(capsys, tmp_path, tiny_llama, calib_txt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, lines = run_cli(capsys, *lowrank_args(tiny_llama, out, calib_txt))
    assert code == 2 and "already holds" in lines[0]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.fixture
def checkpoint(tmp_path, tiny_llama, calib_txt):
    out = tmp_path / "ckpt"
    assert main(lowrank_args(tiny_llama, out, calib_txt)) == 0
    return out


def test_truncated_weights_are_reported(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CaspError, match="corrupt or partial"):
        casp.load_model(checkpoint)


def test_missing_factor_tensor_is_reported(checkpoint):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.self_attn.k_proj.up.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CaspError, match="corrupt or partial.*k_proj.up.weight"):
        casp.load_model(checkpoint)


def test_missing_weights_and_non_checkpoints(checkpoint, tmp_path, tiny_llama, capsys):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CaspError, match="no model.safetensors"):
        casp.load_model(checkpoint)
    with pytest.raises(CaspError, match="not a casp checkpoint"):
        casp.load_model(tiny_llama)
    with pytest.raises(CaspError, match="does not exist"):
        casp.load_model(tmp_path / "nowhere")
    (checkpoint / "config.json").write_text("{ not json")
    code, lines = run_cli(capsys, "info", str(checkpoint))
    assert code == 2 and len(lines) == 1 and "not valid JSON" in lines[0]


def test_bad_ranks_file(capsys, tmp_path, tiny_llama, calib_txt):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"model.layers.9.self_attn.q_proj": 4}))
    code, lines = run_cli(capsys, *lowrank_args(tiny_llama, tmp_path / "out", calib_txt,
                                                "--ranks", str(ranks)))
    assert code == 2 and "does not have" in lines[0]


def test_per_module_ranks(tmp_path, tiny_llama, calib_txt):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"model.layers.0.self_attn.q_proj": 5,
                                 "model.layers.2.self_attn.k_proj": 64}))   # 64 saves nothing
    out = tmp_path / "out"
    assert main(lowrank_args(tiny_llama, out, calib_txt, "--ranks", str(ranks))) == 0
    modules = json.loads((out / "config.json").read_text())["casp"]["modules"]
    assert modules["model.layers.0.self_attn.q_proj"]["rank"] == 5
    assert modules["model.layers.1.self_attn.q_proj"]["rank"] == 8     # default 75%: 64x64 -> 8
    assert "model.layers.2.self_attn.k_proj" not in modules            # kept dense
    model = casp.load_model(out)
    assert type(model.model.layers[2].self_attn.k_proj).__name__ == "Linear"
