"""LLaVA-OneVision (Qwen2 language model, SigLIP vision tower) through the whole pipeline on
a tiny random model, from the command line: low-rank W_q/W_k, a plan for each quantizer,
GPTQ, AQLM and QuIP# with their plans; every checkpoint reloads, runs from its packed form
with the logits of its dequantized weights, and leaves the vision side untouched."""
import pytest
import torch

import casp
from casp.checkpoint import read_casp_section
from casp.cli import main
from casp.loading import load_pretrained
from casp.models import architecture_of, spec_for_architecture
from casp.quant.stored import StoredLinear
from tiny import dense_copy, save_tiny

PLANS = {   # quantizer -> (allocate flags, quantizer flags), small and fast
    "gptq": (["--budget", "2@32", "--bits", "2,3", "--group-size", "32"], ["--group-size", "32"]),
    "aqlm": (["--quantizer", "aqlm", "--budget", "2x4g4", "--bits", "2,3",
              "--codebooks", "2=2x4g4,3=3x4g4", "--factor-bits", "0"],
             ["--codebooks", "2x4", "--in-group-size", "4", "--max-rounds", "2",
              "--steps-per-round", "5"]),
    "quip": (["--quantizer", "quip", "--budget", "e8p12", "--bits", "2,3"], []),
}


def run(*argv):
    return main(["-q", *[str(a) for a in argv]])


@pytest.fixture(scope="module")
def onevision(tmp_path_factory, calib_txt):
    root = tmp_path_factory.mktemp("onevision")
    src = save_tiny("llava_onevision", root / "src")
    calib = ["--dataset", calib_txt, "--nsamples", "4", "--seqlen", "32", "--batch-size", "2"]
    assert run("lowrank", "--model", src, "--output", root / "lowrank", "--compression", "0.5",
               "--rank-multiple", "8", *calib) == 0
    for quantizer, (plan_flags, flags) in PLANS.items():
        plan = root / f"{quantizer}.plan.json"
        assert run("allocate", "--model", root / "lowrank", "--output", plan, *plan_flags,
                   *calib) == 0, quantizer
        assert run(quantizer, "--model", root / "lowrank", "--plan", plan, "--output",
                   root / quantizer, *flags, *calib) == 0, quantizer
    return root


def test_spec_and_model_type():
    spec = spec_for_architecture("LlavaOnevisionForConditionalGeneration")
    assert spec.name == "llava_onevision" and spec.multimodal
    assert architecture_of(type("Config", (), {"model_type": "llava_onevision"})()) == \
        "LlavaOnevisionForConditionalGeneration"


def test_lowrank_checkpoint_reloads_with_identical_logits(onevision):
    src = load_pretrained(str(onevision / "src")).model
    lowrank = casp.load_model(onevision / "lowrank")
    section = read_casp_section(onevision / "lowrank")
    assert {d["type"] for d in section["modules"].values()} == {"lowrank"}
    assert all(".language_model.layers." in n for n in section["modules"])
    ids = torch.arange(6, 30).unsqueeze(0)
    with torch.no_grad():
        before, after = src(input_ids=ids).logits, lowrank(input_ids=ids).logits
        again = casp.load_model(onevision / "lowrank")(input_ids=ids).logits
    assert torch.equal(after, again)                    # the round trip is exact
    rel = ((after - before).norm() / before.norm()).item()
    assert 0 < rel < 0.5
    # the vision tower and projector are the source's, bit for bit
    frozen = {k: v for k, v in src.state_dict().items() if ".language_model." not in k
              and not k.startswith("lm_head")}
    now = lowrank.state_dict()
    assert frozen and all(torch.equal(v, now[k]) for k, v in frozen.items())


@pytest.mark.parametrize("quantizer", list(PLANS))
def test_quantized_checkpoints_reload_and_run_from_the_packed_form(onevision, quantizer):
    path = onevision / quantizer
    section = read_casp_section(path)
    assert [s["stage"] for s in section["stages"]] == ["lowrank", quantizer]
    quantized = {n for n, d in section["modules"].items() if d["type"] == quantizer}
    assert any(n.endswith("q_proj.down") for n in quantized)          # factors quantized too
    assert all(".language_model." in n for n in quantized)            # never the vision side
    model = casp.load_model(path)
    assert sum(isinstance(m, StoredLinear) for m in model.modules()) == len(quantized)
    ids = torch.arange(6, 30).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids).logits
        again = casp.load_model(path)(input_ids=ids).logits
        expected = dense_copy(model)(input_ids=ids).logits
        before = casp.load_model(onevision / "lowrank")(input_ids=ids).logits
    assert torch.equal(packed, again)
    assert torch.allclose(packed, expected, atol=1e-4)
    rel = ((packed - before).norm() / before.norm()).item()
    assert 0 < rel < 1.0, rel          # 2-3 bits on a random model: changed, not unrelated


def test_stage1_script_has_the_hub_defaults(tmp_path):
    """SVD/scripts/svd_onevision.sh: the OneVision hub model and the paper's stage-1 settings."""
    import os
    import subprocess
    from pathlib import Path

    log, stub = tmp_path / "casp.log", tmp_path / "casp-stub"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CASP_LOG"\n')
    stub.chmod(0o755)
    script = Path(__file__).resolve().parent.parent / "SVD" / "scripts" / "svd_onevision.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "CASP": str(stub), "CASP_LOG": str(log)})
    assert res.returncode == 0, res.stderr[-2000:]
    argv = log.read_text().split()
    flag = {f: argv[argv.index(f) + 1] for f in ("--model", "--output", "--compression",
                                                  "--rank-multiple", "--dataset", "--nsamples",
                                                  "--seqlen", "--seed")}
    assert argv[0] == "lowrank"
    assert flag == {"--model": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                    "--output": "checkpoints/llava-onevision-qwen2-7b-svd",
                    "--compression": "0.75", "--rank-multiple": "8", "--dataset": "redpajama",
                    "--nsamples": "256", "--seqlen": "2048", "--seed": "3"}
