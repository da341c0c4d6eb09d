"""Every supported architecture on a tiny random model: load, low-rank pass, save,
load_model, identical outputs; frozen modules untouched."""
import pytest
import torch

import casp
from casp.data.calibration import CalibrationConfig
from casp.loading import load_pretrained
from casp.lowrank import LowRankLinear, LowRankPass
from casp.pipeline import run_stage
from tiny import ARCHITECTURES, save_tiny


def pixel_inputs(kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "llava":
        return {"pixel_values": torch.randn(1, 3, 28, 28, generator=gen)}
    if kind in ("llava_next", "llava_next_video"):
        # one image at 56 x 56: base view + a 2 x 2 grid of 28 x 28 crops
        return {"pixel_values": torch.randn(1, 5, 3, 28, 28, generator=gen),
                "image_sizes": torch.tensor([[56, 56]])}
    return {}


def model_inputs(model, kind):
    ids = torch.arange(6, 30).unsqueeze(0)
    extra = pixel_inputs(kind)
    if extra:
        image_id = model.config.image_token_index
        count = 4 if kind == "llava" else None
        if count is None:   # LLaVA-NeXT: ask the model how many tokens the image takes
            feats = model.model.get_image_features(extra["pixel_values"], extra["image_sizes"])
            feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
            count = sum(f.shape[0] for f in (feats if isinstance(feats, (list, tuple)) else [feats]))
        ids = torch.cat([torch.full((1, count), image_id), ids], dim=1)
    return {"input_ids": ids, **extra}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_lowrank_roundtrip(kind, tmp_path, calib_txt):
    src = save_tiny(kind, tmp_path / "src")
    loaded = load_pretrained(str(src))
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calib = CalibrationConfig(dataset=str(calib_txt), nsamples=8, seqlen=32, batch_size=4)
    out = tmp_path / "out"
    result = run_stage(loaded, "lowrank", [LowRankPass(compression=0.5)], calib,
                       torch.device("cpu"), output=out, progress=False)
    n_layers = 3
    assert len(result.changes) == 2 * n_layers
    for i in range(n_layers):
        attn = loaded.spec.decoder_layers(loaded.model)[i].self_attn
        assert isinstance(attn.q_proj, LowRankLinear) and isinstance(attn.k_proj, LowRankLinear)
        assert attn.q_proj.rank == 16 and attn.k_proj.rank == 10   # 64x64 and 32x64 at 50%
        if kind == "qwen2":   # biases move to the up factor
            assert attn.q_proj.up.bias is not None and attn.k_proj.up.bias is not None
    for frozen in loaded.spec.frozen:   # the declared frozen modules exist in the model
        if frozen not in ("model.image_newline",):
            assert loaded.model.get_submodule(frozen) is not None
    # frozen modules and the untouched linears are bit-identical to the source
    now = loaded.model.state_dict()
    for name, tensor in original.items():
        if ".q_proj." in name or ".k_proj." in name:
            continue
        assert torch.equal(now[name], tensor), name
    inputs = model_inputs(loaded.model, kind)
    with torch.no_grad():
        expected = loaded.model(**inputs).logits
        reloaded = casp.load_model(out)
        got = reloaded(**inputs).logits
    assert torch.equal(expected, got)
    assert isinstance(loaded.spec.decoder_layers(reloaded)[0].self_attn.q_proj, LowRankLinear)
    assert not list(tmp_path.glob(".*"))   # no temporary or progress folders left


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_whitened_stage_beats_plain_on_calibration_like_text(kind, tmp_path, calib_txt):
    """Through the whole pipeline, the data-aware factors change the model's outputs on text
    like the calibration text less than plain SVD at the same ranks."""
    src = save_tiny(kind, tmp_path / "src")
    ids = torch.tensor([[6 + (7 * i) % 60 for i in range(48)]])   # in-vocabulary words
    rel = {}
    for method in ("whitened", "plain"):
        loaded = load_pretrained(str(src))
        with torch.no_grad():
            before = loaded.model(input_ids=ids).logits
        calib = CalibrationConfig(dataset=str(calib_txt), nsamples=16, seqlen=32, batch_size=8)
        run_stage(loaded, "lowrank", [LowRankPass(compression=0.75, method=method)], calib,
                  torch.device("cpu"), progress=False)
        with torch.no_grad():
            after = loaded.model(input_ids=ids).logits
        rel[method] = ((after - before).norm() / before.norm()).item()
    assert 0 < rel["whitened"] < rel["plain"]
