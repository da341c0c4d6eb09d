"""Attention sparsity and the low-rank W_q/W_k attention error (casp sparsity), on tiny
random Llama and LLaVA models."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from casp.cli import main
from casp.data.calibration import CalibrationConfig, calibration_batches
from casp.errors import CaspError
from casp.eval.attention_sparsity import (LowRankQK, SparsityConfig, analyse_batches, attention_maps,
                                attention_sparsity, check_same_base, load_lowrank_qk)
from casp.loading import load_pretrained
from casp.lowrank import LowRankLinear, LowRankPass, whitened_svd
from casp.models import spec_for_model
from casp.pipeline import run_stage
from tiny import build_model, save_tiny

CPU = torch.device("cpu")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("casp: error:")]


@pytest.fixture(scope="module")
def instruct_json(tmp_path_factory):
    """Four LLaVA-Instruct records with small random images."""
    root = tmp_path_factory.mktemp("instruct")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    records = []
    for i, (q, a) in enumerate([("what shape is this", "circle"), ("what color is it", "red"),
                                ("is the shape big", "small"), ("what is in the image",
                                                                "a blue square")]):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 64 - 6 * i, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{q} the cat"},
                                          {"from": "gpt", "value": a}]})
    path = root / "instruct.json"
    path.write_text(json.dumps(records))
    return path


def make_lowrank(kind, root, calib_txt, compression=0.75, seed=0):
    """A tiny original model and its casp lowrank checkpoint."""
    src = save_tiny(kind, root / f"{kind}-{seed}", seed=seed, context=128)
    loaded = load_pretrained(str(src))
    calib = CalibrationConfig(dataset=str(calib_txt), nsamples=8, seqlen=32, batch_size=4)
    out = root / f"{kind}-{seed}-lowrank"
    run_stage(loaded, "lowrank", [LowRankPass(compression=compression)], calib, CPU, output=out,
              progress=False)
    return src, out


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, calib_txt):
    return make_lowrank("llama", tmp_path_factory.mktemp("llama"), calib_txt)


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory, calib_txt):
    return make_lowrank("llava", tmp_path_factory.mktemp("llava"), calib_txt)


def text_inputs(batch=2, tokens=20):
    ids = torch.stack([torch.arange(6, 6 + tokens) + 3 * b for b in range(batch)])
    return {"input_ids": ids}


def llava_inputs():
    gen = torch.Generator().manual_seed(0)
    image_tokens = torch.full((1, 4), 4)        # <image> expands to 4 tokens at 28 x 28
    ids = torch.cat([image_tokens, torch.arange(6, 26).unsqueeze(0)], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=gen)}


# --------------------------------------------------------------------------------------------
# the attention maps from Q and K

@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llava"])
def test_qk_attention_equals_eager_output_attentions(kind):
    model = build_model(kind)
    model.set_attn_implementation("eager")
    inputs = llava_inputs() if kind == "llava" else text_inputs()
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True, use_cache=False).attentions
    spec = spec_for_model(model)
    got = attention_maps(model, spec, inputs)          # eager: from the additive float mask
    assert len(got) == len(expected) == 3
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    model.set_attn_implementation("sdpa")              # SDPA passes no mask: plain causal
    for mine, theirs in zip(attention_maps(model, spec, inputs), expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_sparsity_of_a_hand_made_attention_matrix():
    probs = torch.tensor([[1.00, 0.00, 0.00],
                          [0.97, 0.03, 0.00],
                          [0.50, 0.48, 0.02]])
    # relative 0.1: row limits 0.1/1, 0.1/2, 0.1/3 -> 0.03 and 0.02 negligible, of 6 valid
    assert attention_sparsity(probs) == pytest.approx(2 / 6)
    assert attention_sparsity(probs, threshold=0.025, mode="absolute") == pytest.approx(1 / 6)
    assert attention_sparsity(probs, threshold=0.01, mode="absolute") == 0.0
    # masked entries never count, however small; heads pool
    two_heads = torch.stack([probs, torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.9, 0.05, 0.05]])])
    assert attention_sparsity(two_heads) == pytest.approx(2 / 12)
    custom = torch.tensor([[True, False, False], [True, True, False], [False, True, True]])
    # row 2 now has 2 valid entries (0.48, 0.02): limit 0.05 -> 0.02 negligible; row 1: 0.03
    assert attention_sparsity(probs, custom) == pytest.approx(2 / 5)
    with pytest.raises(CaspError, match="threshold mode"):
        attention_sparsity(probs, mode="percent")


# --------------------------------------------------------------------------------------------
# the layer-wise analysis

def qk_of(model, spec, make):
    q_name, k_name = spec.lowrank_targets
    layers = spec.decoder_layers(model)
    return LowRankQK(source="test", architecture=type(model).__name__,
                     q_proj=[make(layer.get_submodule(q_name)) for layer in layers],
                     k_proj=[make(layer.get_submodule(k_name)) for layer in layers],
                     ranks=[{"q": None, "k": None}] * len(layers),
                     embedding_rows=torch.zeros(1))


def identity_factors(linear):
    """up = W, down = I: a low-rank module whose output is bit-identical to the linear's."""
    eye = torch.eye(linear.in_features)
    bias = linear.bias.data if linear.bias is not None else None
    return LowRankLinear.from_factors(linear.weight.data.clone(), eye, bias, torch.float32)


def full_rank_svd(linear):
    gram = torch.eye(linear.in_features, dtype=torch.float64)
    up, down = whitened_svd(linear.weight.data, gram, min(linear.weight.shape))
    return LowRankLinear.from_factors(up, down, None, torch.float32)


def test_engine_sparsity_equals_eager_and_mse_vanishes_for_exact_factors(tmp_path, calib_txt):
    src = save_tiny("llama", tmp_path / "llama", context=128)
    loaded = load_pretrained(str(src))
    batches = calibration_batches(loaded, CalibrationConfig(dataset=str(calib_txt), nsamples=3,
                                                            seqlen=24, batch_size=1))
    eager = build_model("llama", context=128)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = [eager(**b, output_attentions=True, use_cache=False).attentions for b in batches]
    exact = qk_of(loaded.model, loaded.spec, identity_factors)
    result = analyse_batches(loaded, exact, batches, CPU, 0.1, "relative", "text", progress=False)
    assert result["samples"] == 3 and result["tokens"] == 72
    for layer in range(3):
        expected = attention_sparsity(torch.cat([m[layer] for m in maps]))
        assert result["per_layer"]["sparsity"][layer] == pytest.approx(expected, abs=1e-12)
    assert result["per_layer"]["mse"] == [0.0, 0.0, 0.0]
    assert len(result["per_sample"]["mse"]) == 3 and len(result["per_sample"]["mse"][0]) == 3
    # full-rank SVD factors: exact up to float rounding
    svd = qk_of(loaded.model, loaded.spec, full_rank_svd)
    result = analyse_batches(loaded, svd, batches, CPU, 0.1, "relative", "text", progress=False)
    assert max(result["per_layer"]["mse"]) < 1e-12


def test_head_chunks_give_the_same_result(llama_pair, calib_txt, monkeypatch):
    """Long samples are processed a few heads at a time (grouped-query KV heads mapped per
    query head); one head per chunk gives the same numbers as all heads at once."""
    from casp.eval import attention_sparsity as sparsity

    src, lowrank_dir = llama_pair
    loaded = load_pretrained(str(src))
    lowrank = load_lowrank_qk(str(lowrank_dir))
    batches = calibration_batches(loaded, CalibrationConfig(dataset=str(calib_txt), nsamples=2,
                                                            seqlen=24, batch_size=1))
    whole = analyse_batches(loaded, lowrank, batches, CPU, 0.1, "relative", "t", progress=False)
    monkeypatch.setattr(sparsity, "ATTENTION_CHUNK_BYTES", 1)
    assert [len(c) for c in sparsity.head_chunks(4, 24)] == [1, 1, 1, 1]
    chunked = analyse_batches(loaded, lowrank, batches, CPU, 0.1, "relative", "t",
                              progress=False)
    assert chunked["per_layer"]["sparsity"] == whole["per_layer"]["sparsity"]
    for a, b in zip(chunked["per_layer"]["mse"], whole["per_layer"]["mse"]):
        assert a == pytest.approx(b, rel=1e-6)


def test_mse_grows_when_the_rank_is_cut(llama_pair, calib_txt):
    src, lowrank_dir = llama_pair
    loaded = load_pretrained(str(src))
    lowrank = load_lowrank_qk(str(lowrank_dir))
    check_same_base(lowrank, loaded)
    assert lowrank.ranks[0] == {"q": 8, "k": 5}         # 75% of 64x64 and 32x64 removed
    batches = calibration_batches(loaded, CalibrationConfig(dataset=str(calib_txt), nsamples=2,
                                                            seqlen=24, batch_size=1))
    result = analyse_batches(loaded, lowrank, batches, CPU, 0.1, "relative", "text",
                             progress=False)
    assert all(m > 0 for m in result["per_layer"]["mse"])
    assert all(0 <= s <= 1 for s in result["per_layer"]["sparsity"])


# --------------------------------------------------------------------------------------------
# the command

SETTINGS_KEYS = {"model", "lowrank", "threshold", "threshold_mode", "date", "text",
                 "image_text", "sparsity_definition", "mse_definition"}


def check_kind(data, layers, samples):
    assert data["samples"] == samples
    for key in ("sparsity", "mse"):
        assert len(data["per_layer"][key]) == layers
        assert len(data["per_sample"][key]) == layers
        assert all(len(row) == samples for row in data["per_sample"][key])
        assert np.isfinite(data["mean"][key])
    assert all(0 <= s <= 1 for s in data["per_layer"]["sparsity"])
    assert all(m > 0 for m in data["per_layer"]["mse"])


def test_cli_text(llama_pair, calib_txt, tmp_path, capsys):
    src, lowrank_dir = llama_pair
    out = tmp_path / "assets"
    code = main(["-q", "sparsity", "--model", str(src), "--lowrank", str(lowrank_dir),
                 "--dataset", str(calib_txt), "--nsamples", "3", "--seqlen", "24",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / f"attention_sparsity_{lowrank_dir.name}.json").read_text())
    assert SETTINGS_KEYS <= report["settings"].keys()
    assert report["settings"]["text"]["nsamples"] == 3 and report["settings"]["image_text"] is None
    assert report["layers"] == 3 and "image_text" not in report
    check_kind(report["text"], 3, 3)
    png = out / f"attention_sparsity_{lowrank_dir.name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([png.name, png.with_suffix(".json").name])   # no temporaries
    assert "text: 3 samples" in capsys.readouterr().out


def test_cli_text_and_images(llava_pair, calib_txt, instruct_json, tmp_path):
    src, lowrank_dir = llava_pair
    out = tmp_path / "assets"
    code = main(["-q", "sparsity", "--model", str(src), "--lowrank", str(lowrank_dir),
                 "--dataset", str(calib_txt), "--nsamples", "2", "--seqlen", "16",
                 "--mm-data", str(instruct_json), "--mm-samples", "3", "--out", str(out),
                 "--name", "tiny-llava", "--threshold", "0.02", "--threshold-mode", "absolute"])
    assert code == 0
    report = json.loads((out / "attention_sparsity_tiny-llava.json").read_text())
    assert report["settings"]["threshold"] == 0.02
    assert report["settings"]["image_text"]["nsamples"] == 3
    check_kind(report["text"], 3, 2)
    check_kind(report["image_text"], 3, 3)
    assert report["image_text"]["visual_token_fraction"] > 0
    assert report["text"]["visual_token_fraction"] == 0
    assert (out / "attention_sparsity_tiny-llava.png").is_file()


def test_bad_inputs(llama_pair, llava_pair, calib_txt, instruct_json, tmp_path, capsys):
    llama_src, llama_lowrank = llama_pair
    llava_src, llava_lowrank = llava_pair
    out = tmp_path / "out"
    common = ["--dataset", calib_txt, "--nsamples", "2", "--seqlen", "16", "--out", out]

    def refused(model, lowrank, *extra, match):
        code, lines = run_cli(capsys, "-q", "sparsity", "--model", model, "--lowrank", lowrank,
                              *common, *extra)
        assert code == 2 and len(lines) == 1 and match in lines[0], lines

    refused(llama_src, tmp_path / "nope", match="does not exist")
    refused(tmp_path / "nope", llama_lowrank, match="does not exist")
    refused(llama_src, llama_src, match="not a casp checkpoint")
    not_lowrank = tmp_path / "not-lowrank"
    shutil.copytree(llama_lowrank, not_lowrank)
    cfg = json.loads((not_lowrank / "config.json").read_text())
    cfg["casp"]["modules"] = {}
    (not_lowrank / "config.json").write_text(json.dumps(cfg))
    refused(llama_src, not_lowrank, match="has no low-rank modules")
    refused(llama_src, llama_lowrank, "--mm-data", instruct_json, match="needs a multimodal")
    refused(llava_src, llama_lowrank, match="is a LlavaForConditionalGeneration but")
    other = save_tiny("llama", tmp_path / "other-llama", seed=1, context=128)
    refused(other, llama_lowrank, match="embeddings differ")
    refused(llama_lowrank, llama_lowrank, match="not a dense linear")
    refused(llava_src, llava_lowrank, "--mm-data", instruct_json, "--mm-samples", "9",
            match="lower --mm-samples")
    refused(llama_src, llama_lowrank, "--threshold", "0", match="out of range")
    refused(llama_src, llama_lowrank, "--name", "a/b", match="--name")
    assert not out.exists()


def test_config_refuses_a_file_as_output_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaspError, match="is a file"):
        SparsityConfig(model=str(tmp_path), lowrank=str(tmp_path),
                       out=str(tmp_path / "file")).check()
