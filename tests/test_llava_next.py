"""LLaVA-NeXT (any-resolution images) and LLaVA-NeXT-Video (video frames) through the whole
pipeline on tiny random models: low-rank -> allocate -> GPTQ with the plan, and QuIP# / AQLM
with a plan, every stage calibrated through the vision tower with LLaVA-Instruct samples;
the reloaded checkpoints compute what their dequantized weights compute. Frame sampling,
and the LLaVA-NeXT(-Video) stage scripts."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

import casp
import casp.pipeline
from casp.checkpoint import load_checkpoint, read_casp_section
from casp.cli import build_parser, main
from casp.cli.args import calibration_config
from casp.data.calibration import CalibrationConfig
from casp.data.multimodal import load_llava_instruct
from casp.data.video import FramesVideoProcessor, uniform_frames
from casp.errors import CaspError
from casp.quant.stored import StoredLinear
from tiny import PINPOINTS, VIDEO_PROCESSOR, dense_copy, save_tiny

ROOT = Path(__file__).resolve().parent.parent
CLIP_MEAN, CLIP_STD = VIDEO_PROCESSOR["image_mean"][0], VIDEO_PROCESSOR["image_std"][0]
IMAGE_SIZES = [(40, 64), (64, 40), (50, 50), (30, 100)]     # (h, w): every aspect ratio
LONG_CLIP = 20                                              # frames of clip0, sampled to 8
EXPECTED_FRAMES = [0, 3, 5, 8, 11, 14, 16, 19]              # linspace(0, 19, 8), rounded
GPTQ_PLAN = ["--budget", "2@32", "--bits", "2,3", "--group-size", "32"]
SECOND = {   # the other quantizer each model runs with a plan
    "llava_next": ("quip", ["--quantizer", "quip", "--budget", "e8p12", "--bits", "2,3"], []),
    "llava_next_video": ("aqlm", ["--quantizer", "aqlm", "--budget", "2x4g4", "--bits", "2,3",
                                  "--codebooks", "2=2x4g4,3=3x4g4", "--factor-bits", "0"],
                         ["--codebooks", "2x4", "--in-group-size", "4", "--max-rounds", "2",
                          "--steps-per-round", "5"]),
}


def run(*argv):
    return main(["-q", *map(str, argv)])


def _conversation(question, answer, placeholder=""):
    return [{"from": "human", "value": f"{placeholder}{question}"},
            {"from": "gpt", "value": answer}]


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """LLaVA-Instruct JSON: images of four aspect ratios; videos as a directory of 20 frames
    (unpadded names, frame i a flat grey of level 12 i) and as a list of 12 frames, plus an
    image sample for the video model."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        _save(root / "images" / f"{i}.png", rng.integers(0, 255, (h, w, 3)))
        images.append({"id": f"i{i}", "image": f"images/{i}.png",
                       "conversations": _conversation("what shape is this", "a red circle",
                                                      "<image>\n")})
    for i in range(LONG_CLIP):
        _save(root / "clip0" / f"frame_{i}.png", np.full((30, 40, 3), 12 * i))
    for i in range(12):
        _save(root / "clip1" / f"{i:03d}.png", rng.integers(0, 255, (48, 36, 3)))
    videos = [
        {"id": "v0", "video": "clip0",
         "conversations": _conversation("what happens", "a cat runs", "<video>\n")},
        {"id": "v1", "video": [f"clip1/{i:03d}.png" for i in range(12)],   # no placeholder
         "conversations": _conversation("describe the video", "a small blue square")},
        images[3],
    ]
    (root / "images.json").write_text(json.dumps(images))
    (root / "videos.json").write_text(json.dumps(videos))
    return root


def _calibration_args(kind, media):
    data = media / ("videos.json" if kind == "llava_next_video" else "images.json")
    return ["--mm-data", data, "--image-root", media, "--nsamples",
            3 if kind == "llava_next_video" else 4]


def _pipeline(kind, root, media):
    """lowrank -> allocate -> gptq, and allocate -> quip/aqlm; the batches of each stage."""
    mm = _calibration_args(kind, media)
    src = save_tiny(kind, root / "src")
    second, plan_flags, flags = SECOND[kind]
    steps = [
        ("lowrank", ["--model", src, "--output", root / "lowrank", "--compression", "0.5",
                     "--rank-multiple", "8"]),
        ("allocate", ["--model", root / "lowrank", "--output", root / "gptq.plan.json",
                      *GPTQ_PLAN]),
        ("gptq", ["--model", root / "lowrank", "--plan", root / "gptq.plan.json", "--output",
                  root / "gptq", "--group-size", "32"]),
        ("allocate", ["--model", root / "lowrank", "--output", root / f"{second}.plan.json",
                      *plan_flags]),
        (second, ["--model", root / "lowrank", "--plan", root / f"{second}.plan.json",
                  "--output", root / second, *flags]),
    ]
    seen = []
    original = casp.pipeline.calibration_batches

    def recording(loaded, cfg):
        batches = original(loaded, cfg)
        seen[-1][1].extend(batches)
        return batches

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(casp.pipeline, "calibration_batches", recording)
        for command, argv in steps:
            seen.append((command, []))
            assert run(command, *argv, *mm) == 0, command
    return {"src": src, "lowrank": root / "lowrank", "quantized": [root / "gptq", root / second],
            "batches": seen}


@pytest.fixture(scope="module")
def next_run(tmp_path_factory, media):
    return _pipeline("llava_next", tmp_path_factory.mktemp("llava_next"), media)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, media):
    return _pipeline("llava_next_video", tmp_path_factory.mktemp("llava_next_video"), media)


def _patches(h, w, tile=28):
    best_h, best_w = select_best_resolution((h, w), PINPOINTS)
    return 1 + (best_h // tile) * (best_w // tile)      # the base view and the grid's tiles


def test_any_resolution_images_reach_the_vision_tower_in_every_stage(next_run):
    image_id = casp.load_model(next_run["lowrank"]).config.image_token_index
    assert [c for c, _ in next_run["batches"]] == ["lowrank", "allocate", "gptq", "allocate",
                                                   "quip"]
    for command, batches in next_run["batches"]:
        assert len(batches) == 4, command
        sizes = sorted(tuple(b["image_sizes"][0].tolist()) for b in batches)
        assert sizes == sorted(IMAGE_SIZES)
        for b in batches:
            h, w = b["image_sizes"][0].tolist()
            assert tuple(b["pixel_values"].shape) == (1, _patches(h, w), 3, 28, 28)
            assert (b["input_ids"] == image_id).sum() > 0
    # the tiling differs with the aspect ratio: a wide image gets a 1 x 2 grid, others 2 x 2
    counts = {tuple(b["image_sizes"][0].tolist()): b["pixel_values"].shape[1]
              for b in next_run["batches"][0][1]}
    assert counts[(30, 100)] == 3 and counts[(50, 50)] == 5
    tokens = {tuple(b["image_sizes"][0].tolist()): int((b["input_ids"] == image_id).sum())
              for b in next_run["batches"][0][1]}
    assert len(set(tokens.values())) > 1          # unpadded features follow the aspect ratio


def test_video_samples_reach_the_vision_tower_as_8_frames(video_run):
    config = casp.load_model(video_run["lowrank"]).config
    for command, batches in video_run["batches"]:
        assert len(batches) == 3, command
        videos = [b for b in batches if "pixel_values_videos" in b]
        assert len(videos) == 2, command
        for b in videos:
            assert tuple(b["pixel_values_videos"].shape) == (1, 8, 3, 28, 28)
            assert "pixel_values" not in b
            # (28 / 14)^2 patches pooled 2 x 2: one token per frame
            assert int((b["input_ids"] == config.video_token_index).sum()) == 8
        images = [b for b in batches if "pixel_values" in b]
        assert len(images) == 1 and tuple(images[0]["image_sizes"][0].tolist()) == (30, 100)
        assert tuple(images[0]["pixel_values"].shape) == (1, 3, 3, 28, 28)
    # the flat-grey clip: the frames kept are 8 evenly spread of 20, in natural name order
    flat = [b["pixel_values_videos"][0] for b in video_run["batches"][0][1]
            if "pixel_values_videos" in b and b["pixel_values_videos"][0].std(dim=(2, 3)).max() < 1e-4]
    assert len(flat) == 1
    levels = ((flat[0][:, 0, 0, 0] * CLIP_STD + CLIP_MEAN) * 255 / 12).round().int().tolist()
    assert levels == EXPECTED_FRAMES


@pytest.mark.parametrize("which", ["next_run", "video_run"])
def test_quantized_checkpoints_reload_and_match_their_dense_weights(which, request):
    result = request.getfixturevalue(which)
    batches = result["batches"][0][1][:3]     # video model: both videos and the image
    reference = casp.load_model(result["lowrank"])
    for path in result["quantized"]:
        section = read_casp_section(path)
        assert [s["stage"] for s in section["stages"]] == ["lowrank", path.name]
        assert section["stages"][1]["settings"]["calibration"]["mm_data"].endswith(".json")
        quantized = {n for n, d in section["modules"].items() if d["type"] == path.name}
        assert any(n.endswith("q_proj.down") for n in quantized)     # factors quantized too
        assert all(".language_model." in n for n in quantized)       # never the vision side
        model = casp.load_model(path)
        assert sum(isinstance(m, StoredLinear) for m in model.modules()) == len(quantized)
        dense = dense_copy(model)
        assert not any(isinstance(m, StoredLinear) for m in dense.modules())
        for batch in batches:
            with torch.no_grad():
                packed = model(**batch).logits
                expected = dense(**batch).logits
                before = reference(**batch).logits
            assert torch.isfinite(packed).all()
            assert torch.allclose(packed, expected, atol=1e-4), path.name
            rel = ((packed - before).norm() / before.norm()).item()
            assert 0 < rel < 0.5, (path.name, rel)


def test_video_checkpoints_keep_the_video_processor(video_run):
    source = json.loads((video_run["src"] / "processor_config.json").read_text())
    for path in [video_run["lowrank"], *video_run["quantized"]]:
        saved = json.loads((path / "processor_config.json").read_text())
        assert saved["processor_class"] == "LlavaNextVideoProcessor"
        assert saved["video_processor"] == source["video_processor"]
        processor = load_checkpoint(path).processor
        if importlib.util.find_spec("torchvision") is None:   # transformers cannot build it
            assert isinstance(processor, FramesVideoProcessor)
        else:
            assert type(processor).__name__ == "LlavaNextVideoProcessor"


def test_uniform_frames():
    frames = list(range(LONG_CLIP))
    assert uniform_frames(frames, 8) == EXPECTED_FRAMES
    assert uniform_frames(frames, 2) == [0, 19]
    assert uniform_frames(frames, 20) == frames and uniform_frames(frames[:5], 8) == frames[:5]
    assert uniform_frames(frames, 1) == [0]


def test_num_frames_flag_and_frame_order(media):
    args = build_parser().parse_args(["lowrank", "--model", "m", "--output", "o", "--mm-data",
                                      str(media / "videos.json"), "--num-frames", "4"])
    cfg = calibration_config(args)
    assert cfg.num_frames == 4 and cfg.as_dict()["num_frames"] == 4
    default = calibration_config(build_parser().parse_args(["lowrank", "--model", "m", "--output",
                                                      "o"]))
    assert default.num_frames == 8
    assert "num_frames" not in default.as_dict()     # text stages' fingerprints unchanged
    samples = {s.id: s for s in load_llava_instruct(media / "videos.json", media, num_frames=4)}
    assert [p.name for p in samples["v0"].video] == [f"frame_{i}.png" for i in (0, 6, 13, 19)]
    assert [p.name for p in samples["v1"].video] == ["000.png", "004.png", "007.png", "011.png"]
    every = load_llava_instruct(media / "videos.json", media, num_frames=100)
    assert [p.name for p in every[0].video] == [f"frame_{i}.png" for i in range(LONG_CLIP)]


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_num_frames_reaches_the_calibration_batches(layout, media, tmp_path):
    src = save_tiny("llava_next_video", tmp_path / "src")
    if layout == "hub":   # the hub repository's files: one per processor
        config = json.loads((src / "processor_config.json").read_text())
        image, video = config.pop("image_processor"), config.pop("video_processor")
        (src / "preprocessor_config.json").write_text(json.dumps(image))
        (src / "video_preprocessor_config.json").write_text(json.dumps(video))
        (src / "processor_config.json").write_text(json.dumps(config))
    loaded = casp.loading.load_pretrained(str(src))
    cfg = CalibrationConfig(mm_data=str(media / "videos.json"), image_root=str(media),
                            nsamples=3, num_frames=5)
    batches = casp.data.calibration.calibration_batches(loaded, cfg)
    shapes = sorted(tuple(b["pixel_values_videos"].shape) for b in batches
                    if "pixel_values_videos" in b)
    assert shapes == [(1, 5, 3, 28, 28)] * 2
    with torch.no_grad():
        for b in batches:
            assert torch.isfinite(loaded.model(**b).logits).all()
    if not isinstance(loaded.processor, FramesVideoProcessor):
        return                           # torchvision is installed: transformers' own processor
    # saving writes the original processor files back
    loaded.processor.save_pretrained(tmp_path / "saved")
    for f in src.glob("*process*config.json"):
        assert (tmp_path / "saved" / f.name).read_text() == f.read_text()


def test_video_files_are_refused_with_the_fix(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)
    (tmp_path / "v.json").write_text(json.dumps([{"video": "clip.mp4", "conversations":
                                                  _conversation("what", "it")}]))
    with pytest.raises(CaspError, match="does not decode video files"):
        load_llava_instruct(tmp_path / "v.json")


# --- the stage scripts ---------------------------------------------------------------------

FAMILIES = {"llava_next": ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-next-7b"),
            "llava_next_video": ("llava-hf/LLaVA-NeXT-Video-7B-hf", "llava-next-video-7b")}


def _run_script(script, env, cwd=None):
    env = {**os.environ, "CASP": str(Path(sys.executable).parent / "casp"), **env}
    return subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture
def stub_casp(tmp_path):
    """A stand-in casp that records each command line."""
    log = tmp_path / "casp.log"
    stub = tmp_path / "casp-stub"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CASP_LOG"\n')
    stub.chmod(0o755)

    def commands(script, **env):
        log.write_text("")
        res = _run_script(script, {"CASP": str(stub), "CASP_LOG": str(log), **env},
                          cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        return [line.split() for line in log.read_text().splitlines()]
    return commands


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_scripts_have_the_paper_defaults(family, stub_casp):
    hub, name = FAMILIES[family]
    frames = "8" if family.endswith("video") else None
    svd, = stub_casp(f"SVD/scripts/svd_{family}.sh")
    assert svd[0] == "lowrank" and _flag(svd, "--model") == hub
    assert _flag(svd, "--output") == f"checkpoints/{name}-svd"
    assert [_flag(svd, f) for f in ("--compression", "--rank-multiple", "--dataset",
                                    "--nsamples", "--seqlen", "--seed")] == \
        ["0.75", "8", "redpajama", "256", "2048", "3"]
    assert _flag(svd, "--num-frames") == frames and "--mm-data" not in svd
    for script, command, budget in (
            (f"GPTQ/scripts/quantize_{family}.sh", "gptq", "2@128"),
            (f"AQLM/scripts/quantize_{family}.sh", "aqlm", "2x8g8"),
            (f"quip-sharp/scripts/quantize_finetune_{family}.sh", "quip", "e8p12")):
        commands = stub_casp(script)
        allocate, quantize = commands[-2:]
        assert allocate[0] == "allocate" and _flag(allocate, "--budget") == budget
        assert _flag(allocate, "--bits") == "2,3" and _flag(allocate, "--factor-bits") == "3"
        assert quantize[0] == command
        assert _flag(quantize, "--model") == f"checkpoints/{name}-svd"
        assert _flag(quantize, "--output") == f"checkpoints/{name}-casp-{command}"
        assert _flag(quantize, "--nsamples") == "128"
        assert all(_flag(c, "--num-frames") == frames for c in commands)
        if command == "quip":
            assert commands[0][0] == "hessians"
            assert _flag(quantize, "--hessians") == f"checkpoints/{name}-svd-hessians"
    for script, command, output in (
            (f"GPTQ/scripts/quantize_{family}_baseline.sh", "gptq", "gptq-2bit"),
            (f"AQLM/scripts/quantize_{family}_baseline.sh", "aqlm", "aqlm-2x8"),
            (f"quip-sharp/scripts/quantize_finetune_{family}_baseline.sh", "quip", "quip-e8p12")):
        quantize = stub_casp(script)[-1]
        assert quantize[0] == command and _flag(quantize, "--model") == hub
        assert _flag(quantize, "--output") == f"checkpoints/{name}-{output}"
        assert "--plan" not in quantize and _flag(quantize, "--num-frames") == frames
    hessians, = stub_casp(f"quip-sharp/scripts/hfize_{family}.sh")
    assert hessians[0] == "hessians" and _flag(hessians, "--model") == f"checkpoints/{name}-svd"
    # multimodal calibration reaches every step
    for c in stub_casp(f"GPTQ/scripts/quantize_{family}.sh", MM_DATA="mm.json",
                       IMAGE_ROOT="media"):
        assert _flag(c, "--mm-data") == "mm.json" and _flag(c, "--image-root") == "media"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quantizer", ["gptq", "aqlm", "quip"])
def test_end_to_end_scripts_wrap_casp_e2e(family, quantizer, stub_casp, tmp_path):
    hub, _ = FAMILIES[family]
    base = hub.split("/")[1]
    commands = stub_casp(f"scripts/casp_{quantizer}_{family}.sh", WORK=str(tmp_path / "w"),
                         SVD_NSAMPLES="16", NUM_FRAMES="4")
    assert commands[0][0] == "lowrank" and _flag(commands[0], "--model") == hub
    assert _flag(commands[0], "--nsamples") == "16"
    assert [c[0] for c in commands[-3:]] == ["ppl"] * 3
    outputs = [_flag(c, "--output") for c in commands]
    assert str(tmp_path / "w" / f"{base}-casp-{quantizer}") in outputs
    assert all(_flag(c, "--num-frames") == "4" for c in commands if c[0] != "ppl")


def test_video_quantize_script_calibrates_with_frames_on_a_tiny_model(video_run, media,
                                                                      tmp_path):
    """GPTQ/scripts/quantize_llava_next_video.sh for real (stage 2 and 3, two casp processes)
    on the tiny low-rank checkpoint, with MM_DATA: both steps see the video samples' 8
    frames."""
    mm = {"MM_DATA": str(media / "videos.json"), "IMAGE_ROOT": str(media), "NSAMPLES": "3"}
    res = _run_script("GPTQ/scripts/quantize_llava_next_video.sh",
                      {"MODEL": str(video_run["lowrank"]), "OUTPUT": str(tmp_path / "q"),
                       "GROUP_SIZE": "32", **mm})
    assert res.returncode == 0, res.stderr[-2000:]
    section = read_casp_section(tmp_path / "q")
    assert [s["stage"] for s in section["stages"]] == ["lowrank", "gptq"]
    gptq = section["stages"][1]["settings"]
    assert gptq["passes"]["gptq"]["plan"] and gptq["calibration"]["nsamples"] == 3
    plan = json.loads((tmp_path / "q.plan.json").read_text())
    assert plan["allowed_bits"] == [2, 3] and plan["factor_bits"] == 3
    for calib in (gptq["calibration"], plan["importance"]["calibration"]):
        assert calib["mm_data"] == mm["MM_DATA"] and calib["num_frames"] == 8
