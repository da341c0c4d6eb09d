"""The layer-wise engine: captured inputs, propagation, layer selection and resume."""
import pytest
import torch

from casp.errors import CaspError
from casp.layerwise import LayerPass, capture_layer_inputs, run_layerwise
from casp.lowrank import LowRankLinear, LowRankPass
from casp.models import spec_for_model
from tiny import build_model


class NoOp(LayerPass):
    name = "noop"

    def __init__(self):
        self.seen = []

    def process(self, ctx):
        self.seen.append(ctx.index)


def batches(seed=0, n=3, length=12, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(6, 150, (batch, length), generator=gen)} for _ in range(n)]


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_walk_reproduces_the_model_hidden_states(kind):
    model = build_model(kind, layers=4)
    spec = spec_for_model(model)
    data = batches()
    inputs = capture_layer_inputs(model, spec, data, torch.device("cpu"))
    lm = model.model if kind == "llama" else model.model.language_model
    with torch.no_grad():
        ref = [lm(input_ids=b["input_ids"], output_hidden_states=True).hidden_states for b in data]
    for h, r in zip(inputs.hidden, ref):
        assert torch.equal(h, r[0])          # embeddings
    noop = NoOp()
    run_layerwise(model, spec, inputs, [noop], torch.device("cpu"), layers=[0, 1, 2, 3],
                  progress=False)
    assert noop.seen == [0, 1, 2, 3]
    # after the walk the hidden states are the inputs of the last layer
    for h, r in zip(inputs.hidden, ref):
        assert torch.allclose(h, r[3], atol=1e-5)


def test_layer_selection_stops_after_last_selected():
    model = build_model("llama", layers=4)
    spec = spec_for_model(model)
    inputs = capture_layer_inputs(model, spec, batches(), torch.device("cpu"))
    lowrank = LowRankPass(compression=0.5, method="plain")
    result = run_layerwise(model, spec, inputs, [lowrank], torch.device("cpu"), layers=[1],
                           progress=False)
    assert set(result.changes) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    assert isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with pytest.raises(CaspError, match="outside the model"):
        run_layerwise(model, spec, inputs, [NoOp()], torch.device("cpu"), layers=[7],
                      progress=False)


def test_input_grams_are_shared_by_q_k_v_and_exact():
    model = build_model("llama", layers=1)
    spec = spec_for_model(model)
    data = batches(n=2)
    inputs = capture_layer_inputs(model, spec, data, torch.device("cpu"))
    captured = []

    class Grams(LayerPass):
        name = "grams"

        def process(self, ctx):
            grams = ctx.input_grams(["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"])
            captured.append(grams)
            xs = []
            ctx.forward({"self_attn.q_proj": lambda m, i, o: xs.append(i[0].reshape(-1, 64))})
            x = torch.cat(xs).double()
            # per-batch products in float32, summed in float64
            assert torch.allclose(grams["self_attn.q_proj"].gram, x.T @ x, rtol=1e-5, atol=1e-4)

    run_layerwise(model, spec, inputs, [Grams()], torch.device("cpu"), progress=False)
    g = captured[0]
    assert g["self_attn.q_proj"] is g["self_attn.k_proj"]
    assert g["mlp.down_proj"] is not g["self_attn.q_proj"]
    assert g["self_attn.q_proj"].tokens == 2 * 2 * 12
    assert g["mlp.down_proj"].gram.shape == (128, 128)


class Crash(LayerPass):
    name = "lowrank"

    def __init__(self, inner, crash_at):
        self.inner, self.crash_at, self.calls = inner, crash_at, []

    def settings(self):
        return self.inner.settings()

    def process(self, ctx):
        if ctx.index == self.crash_at:
            raise KeyboardInterrupt
        self.calls.append(ctx.index)
        self.inner.process(ctx)


def test_resume_after_interruption_gives_the_same_model(tmp_path):
    data = batches()
    ref_model = build_model("llama", layers=4)
    spec = spec_for_model(ref_model)
    run_layerwise(ref_model, spec, capture_layer_inputs(ref_model, spec, data, torch.device("cpu")),
                  [LowRankPass(compression=0.5)], torch.device("cpu"), progress=False)

    model = build_model("llama", layers=4)
    state = tmp_path / "progress"
    first = Crash(LowRankPass(compression=0.5), crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_layerwise(model, spec, capture_layer_inputs(model, spec, data, torch.device("cpu")),
                      [first], torch.device("cpu"), state_dir=state, progress=False)
    assert first.calls == [0, 1]
    model = build_model("llama", layers=4)        # a fresh process would reload the model
    second = Crash(LowRankPass(compression=0.5), crash_at=-1)
    result = run_layerwise(model, spec, capture_layer_inputs(model, spec, data, torch.device("cpu")),
                           [second], torch.device("cpu"), state_dir=state, progress=False)
    assert second.calls == [2, 3]                 # layers 0 and 1 were restored, not redone
    assert len(result.changes) == 8
    for a, b in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert a[0] == b[0] and torch.allclose(a[1], b[1], atol=1e-6), a[0]
    # progress of a different run is refused
    with pytest.raises(CaspError, match="different run"):
        run_layerwise(model, spec, capture_layer_inputs(model, spec, data, torch.device("cpu")),
                      [LowRankPass(compression=0.3)], torch.device("cpu"), state_dir=state,
                      progress=False)
