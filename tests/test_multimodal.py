"""Multimodal calibration: LLaVA-Instruct JSON with local images on tiny LLaVA models."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import casp
from casp.cli import main
from casp.data.calibration import CalibrationConfig, calibration_batches
from casp.data.multimodal import conversation_prompt, load_llava_instruct
from casp.errors import CaspError
from casp.layerwise import capture_layer_inputs
from casp.loading import load_pretrained
from tiny import save_tiny

QUESTIONS = [("what shape is this", "circle"), ("what color is the shape", "red"),
             ("is the shape big", "small"), ("what is in the image", "a blue square")]


@pytest.fixture
def instruct_json(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    records = []
    for i, (q, a) in enumerate(QUESTIONS):
        size = (40 + 8 * i, 64 - 6 * i)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                          {"from": "gpt", "value": a}]})
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    return path


def test_reading_llava_instruct(instruct_json):
    samples = load_llava_instruct(instruct_json, instruct_json.parent / "images")
    assert len(samples) == 4 and samples[2].images[0].name == "2.png"
    assert conversation_prompt(samples[0], "<image>", "<video>") == \
        "USER: <image>\nwhat shape is this ASSISTANT: circle"
    picked = load_llava_instruct(instruct_json, instruct_json.parent / "images", nsamples=2, seed=1)
    assert len(picked) == 2
    with pytest.raises(CaspError, match="fewer than the 9"):
        load_llava_instruct(instruct_json, instruct_json.parent / "images", nsamples=9)
    with pytest.raises(CaspError, match="does not exist; check --image-root"):
        load_llava_instruct(instruct_json, instruct_json.parent)


@pytest.mark.parametrize("kind,image_tokens", [("llava", 4), ("llava_next", None)])
def test_image_calibration_reaches_the_language_model(kind, image_tokens, tmp_path, instruct_json):
    src = save_tiny(kind, tmp_path / kind)
    loaded = load_pretrained(str(src))
    cfg = CalibrationConfig(mm_data=str(instruct_json), image_root=str(instruct_json.parent / "images"),
                            nsamples=4)
    batches = calibration_batches(loaded, cfg)
    assert len(batches) == 4 and "pixel_values" in batches[0]
    image_id = loaded.model.config.image_token_index
    n_image = [(b["input_ids"] == image_id).sum().item() for b in batches]
    assert all(n > 0 for n in n_image)
    if image_tokens:
        assert n_image == [image_tokens] * 4
    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, torch.device("cpu"))
    # layer 0 sees the image features in place of the placeholder tokens
    embed = loaded.model.get_input_embeddings()
    for b, h in zip(batches, inputs.hidden):
        ids = b["input_ids"]
        assert h.shape[1] == ids.shape[1]
        text_pos = ids != image_id
        assert torch.allclose(h[text_pos], embed(ids)[text_pos])
        assert not torch.allclose(h[~text_pos], embed(ids)[~text_pos])


def test_lowrank_cli_with_images(tmp_path, instruct_json):
    src = save_tiny("llava", tmp_path / "llava")
    out = tmp_path / "out"
    code = main(["-q", "lowrank", "--model", str(src), "--output", str(out), "--mm-data",
                 str(instruct_json), "--image-root", str(instruct_json.parent / "images"),
                 "--nsamples", "4", "--compression", "0.5"])
    assert code == 0
    section = json.loads((out / "config.json").read_text())["casp"]
    assert section["stages"][0]["settings"]["calibration"]["mm_data"] == str(instruct_json)
    assert len(section["modules"]) == 6
    model = casp.load_model(out)
    assert type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"


def test_images_need_a_multimodal_model(tmp_path, instruct_json, capsys):
    src = save_tiny("llama", tmp_path / "llama")
    code = main(["lowrank", "--model", str(src), "--output", str(tmp_path / "o"), "--mm-data",
                 str(instruct_json), "--nsamples", "2"])
    assert code == 2 and "needs a multimodal model" in capsys.readouterr().err
