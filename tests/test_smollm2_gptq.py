"""CASP_GPTQ on the real SmolLM2-135M: a small run (8 x 256 calibration tokens) in which
CASP_GPTQ must beat uniform 2-bit GPTQ at the same average bits on both corpora."""
import contextlib

import pytest
import torch

from casp.allocation import ImportancePass, allocate, average_bits, uniform_average_bits
from casp.checkpoint import checkpoint_size, load_checkpoint
from casp.eval.perplexity import corpus_perplexity
from casp.data.calibration import CalibrationConfig
from casp.loading import load_pretrained
from casp.lowrank import LowRankPass
from casp.pipeline import run_stage
from casp.quant.gptq.layer_pass import GPTQPass

pytestmark = pytest.mark.real
CPU = torch.device("cpu")
CALIB = CalibrationConfig(dataset="wiki", split="train", nsamples=8, seqlen=256, seed=3)


def ppl(checkpoint):
    loaded = load_checkpoint(checkpoint)
    return {c: corpus_perplexity(loaded, c, "test", 256, 4, CPU).ppl for c in ("wiki", "lee")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol_gptq")
    base = load_pretrained("smollm2-135m")
    budget = uniform_average_bits(base.model, base.spec, 2, 128, g_idx=True)
    run_stage(base, "gptq", [GPTQPass(bits=2, group_size=128)], CALIB, CPU,
              output=root / "gptq", progress=False)

    loaded = load_pretrained("smollm2-135m")
    run_stage(loaded, "lowrank", [LowRankPass(0.75)], CALIB, CPU, output=root / "lowrank",
              progress=False)
    importance = ImportancePass()
    run_stage(loaded, "importance", [importance], CALIB, CPU, progress=False)
    plan = allocate(loaded.model, loaded.spec, importance.scores, budget, [2, 3, 4, 5],
                    group_size=128, g_idx=True)
    run_stage(loaded, "gptq", [GPTQPass(plan=plan.modules, plan_id=plan.fingerprint())], CALIB,
              CPU, output=root / "casp", progress=False)
    return root, budget, plan, importance.scores


def test_budget_is_the_uniform_models_average_bits(runs):
    root, budget, plan, _ = runs
    assert average_bits(load_checkpoint(root / "gptq").casp) == pytest.approx(budget)
    # 2 bits + fp16 scale and zero per 128 weights (576 inputs: 5 groups) + int16 g_idx
    assert 2.28 < budget < 2.30
    assert average_bits(load_checkpoint(root / "casp").casp) <= budget


def test_block_influence_ranks_the_first_layer_highest(runs):
    _, _, plan, scores = runs
    assert max(scores, key=scores.get) == 0 and scores[0] > 0.9
    assert plan.layers[0]["bits"] == max(r["bits"] for r in plan.layers)


def test_casp_gptq_beats_uniform_gptq_on_both_corpora(runs):
    root = runs[0]
    uniform, casp = ppl(root / "gptq"), ppl(root / "casp")
    for corpus in ("wiki", "lee"):
        assert casp[corpus] < uniform[corpus], (corpus, casp, uniform)


def test_checkpoint_size_is_what_the_bits_claim(runs):
    root = runs[0]
    for name in ("gptq", "casp"):
        size = checkpoint_size(root / name)
        assert size["quantized_bytes"] == pytest.approx(size["claimed_quantized_bytes"], rel=0.01)
        # the whole directory: quantized linears plus the untouched fp32 embeddings and norms
        expected = size["claimed_quantized_bytes"] + size["other_weights_bytes"]
        assert size["total_bytes"] == pytest.approx(expected, rel=0.10)


def test_kernels_give_the_dequantized_models_logits(runs):
    """The real CASP_GPTQ checkpoint (low-rank factors, widths 2-5, act-order groups):
    logits through the CPU kernels (a 64-token prefill through tiles, then one decode step
    through the fused kernel) equal the dequantized weights' within 1e-3 of the largest
    logit (measured here: 2e-4, float32 sums in another order through 30 layers; a wrong
    code or scale moves logits by whole units); the first generated token is the same."""
    from casp.data import load_documents, tokenize_documents
    from casp.kernels.packed_matmul import reference_path

    loaded = load_checkpoint(runs[0] / "casp")
    ids = tokenize_documents(loaded.tokenizer, load_documents("wiki", "test"))[None, :64]
    results = {}
    for name in ("kernels", "reference"):
        context = reference_path() if name == "reference" else contextlib.nullcontext()
        with context, torch.no_grad():
            prefill = loaded.model(input_ids=ids, use_cache=True)
            token = prefill.logits[:, -1:].argmax(-1)
            step = loaded.model(input_ids=token, cache=prefill.cache)
        results[name] = (prefill.logits, step.logits, token)
    for got, expected in zip(results["kernels"][:2], results["reference"][:2]):
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert torch.equal(results["kernels"][2], results["reference"][2])
