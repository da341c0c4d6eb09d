"""Stock transformers loads casp's standard GPTQ export (through its GPTQ integration, whose
loader needs optimum and gptqmodel) and computes the same logits as casp's own checkpoint.

The loader lives in the reference environment (bench/reference_env.sh, pinned versions:
gptqmodel 7.6.0, optimum 2.3.0, the CPU torch 2.13.0), kept apart from the project's venv
because gptqmodel pins its own stack; this test creates it on first use (about 2 minutes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from casp.checkpoint import load_checkpoint
from casp.cli import main
from tiny import VOCAB, save_tiny

ROOT = Path(__file__).resolve().parent.parent
REF_PY = ROOT / "bench" / ".refenv" / "bin" / "python"

LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, GPTQConfig
path, bits, ids_file, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(
    path, device_map="cpu", dtype=torch.float32,
    quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"))
kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_file)).logits.float()
torch.save({"logits": logits, "kinds": kinds}, out_file)
"""


@pytest.fixture(scope="module")
def reference_python():
    if not REF_PY.is_file():
        done = subprocess.run(["bash", str(ROOT / "bench" / "reference_env.sh")],
                              capture_output=True, text=True)
        if done.returncode:       # e.g. no PyPI or no C compiler for gptqmodel's deps
            pytest.skip("the reference environment cannot be created here: "
                        + (done.stderr.strip().splitlines() or ["?"])[-1])
    return REF_PY


@pytest.mark.parametrize("bits", [4, 2])
def test_transformers_loads_the_standard_export(reference_python, tmp_path, calib_txt, bits):
    src = save_tiny("llama", tmp_path / "src", layers=2)
    ours, std = tmp_path / "q", tmp_path / "std"
    assert main(["gptq", "--model", str(src), "--output", str(ours), "--bits", str(bits),
                 "--group-size", "32", "--dataset", str(calib_txt), "--nsamples", "8",
                 "--seqlen", "32", "--export-gptq", str(std)]) == 0
    cfg = json.loads((std / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq" and cfg["desc_act"] is True
    ids = torch.tensor([[VOCAB.index(w) for w in "the red cat and the blue dog".split()]])
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    done = subprocess.run([str(reference_python), "-c", LOAD, str(std), str(bits),
                           str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["kinds"], "transformers did not install quantized modules"
    expected = load_checkpoint(ours).model(input_ids=ids).logits
    assert torch.allclose(result["logits"], expected, atol=1e-3, rtol=1e-3), \
        (result["logits"] - expected).abs().max()
