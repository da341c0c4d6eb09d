"""Tiny random models of every supported architecture, built from configs in milliseconds,
with a word-level tokenizer and (for LLaVA) a real processor, saved as HF directories."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
import transformers
from torch import nn
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ("the a of and to in is was for on with as by at from that it this be are an "
         "cat dog red blue green shape circle square triangle big small image text model "
         "layer weight bit rank low high river city north south year war king music art").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(120)]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>",
                                                 "video_token": "<video>"})
    return fast


def text_config(layers: int = 3, context: int = 256) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=context,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)


def vision_config() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=28, patch_size=14,
                                         projection_dim=32)


_SHARED_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
ARCHITECTURES = ("llama", "mistral", "qwen2", "llava", "llava_next", "llava_next_video",
                 "llava_onevision")


def build_model(kind: str, seed: int = 0, layers: int = 3, context: int = 256):
    torch.manual_seed(seed)
    tc = text_config(layers, context)
    image_id, video_id = VOCAB.index("<image>"), VOCAB.index("<video>")
    common = dict(text_config=tc.to_dict(), vision_config=vision_config().to_dict(),
                  image_token_index=image_id, vision_feature_select_strategy="default",
                  vision_feature_layer=-2)
    pinpoints = PINPOINTS
    if kind == "llama":
        model = transformers.LlamaForCausalLM(tc)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **{k: v for k, v in tc.to_dict().items() if k in _SHARED_TEXT_KEYS}, head_dim=16))
    elif kind == "qwen2":   # q/k/v carry biases
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **{k: v for k, v in tc.to_dict().items() if k in _SHARED_TEXT_KEYS}))
    elif kind == "llava":
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
    elif kind == "llava_next":
        model = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
    elif kind == "llava_next_video":
        model = transformers.LlavaNextVideoForConditionalGeneration(
            transformers.LlavaNextVideoConfig(**common, image_grid_pinpoints=pinpoints,
                                              video_token_index=video_id))
    elif kind == "llava_onevision":   # a Qwen2 language model and a SigLIP vision tower
        qwen2 = transformers.Qwen2Config(
            **{k: v for k, v in tc.to_dict().items() if k in _SHARED_TEXT_KEYS})
        siglip = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 image_size=28, patch_size=14)
        model = transformers.LlavaOnevisionForConditionalGeneration(
            transformers.LlavaOnevisionConfig(
                text_config=qwen2.to_dict(), vision_config=siglip.to_dict(),
                image_token_index=image_id, video_token_index=video_id,
                vision_feature_select_strategy="full", vision_feature_layer=-1,
                image_grid_pinpoints=pinpoints))
    else:
        raise ValueError(kind)
    model.config.architectures = [type(model).__name__]
    return model.eval()


PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _pil(name: str):
    # without torchvision (no CPU build here) transformers uses the PIL image processors
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def llava_processor(tokenizer, kind: str = "llava"):
    common = dict(tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1)
    size = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if kind == "llava":
        return transformers.LlavaProcessor(image_processor=_pil("CLIPImageProcessor")(**size),
                                           **common)
    return transformers.LlavaNextProcessor(
        image_processor=_pil("LlavaNextImageProcessor")(**size, image_grid_pinpoints=PINPOINTS),
        **common)


VIDEO_PROCESSOR = {   # LLaVA-NeXT-Video-7B-hf's video settings at this model's 28 x 28
    "video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": 28},
    "crop_size": {"height": 28, "width": 28}, "default_to_square": False, "do_resize": True,
    "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "do_convert_rgb": True,
    "do_sample_frames": False}


def save_video_processor(tokenizer, directory: Path) -> None:
    """LLaVA-NeXT-Video's processor files as transformers 5 writes them (one
    processor_config.json). Written by hand: its video processor needs torchvision, which the
    CPU build here lacks, so transformers cannot build the processor to save it."""
    llava_processor(tokenizer, "llava_next").save_pretrained(directory)
    path = Path(directory) / "processor_config.json"
    config = json.loads(path.read_text())
    config.update(processor_class="LlavaNextVideoProcessor", video_token="<video>",
                  video_processor=VIDEO_PROCESSOR)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tiny(kind: str, directory: Path, seed: int = 0, layers: int = 3, context: int = 256
              ) -> Path:
    model = build_model(kind, seed, layers, context)
    model.save_pretrained(directory)
    tokenizer = tiny_tokenizer()
    if kind in ("llava", "llava_next"):
        llava_processor(tokenizer, kind).save_pretrained(directory)
    elif kind == "llava_next_video":
        save_video_processor(tokenizer, directory)
    else:
        tokenizer.save_pretrained(directory)
    return directory


def write_text(path: Path, words: int = 20000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(words // 100):
        paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(100)))
    path.write_text("\n\n".join(paragraphs))
    return path


def check_resume(run, pass_cls, argv: list, output_index: int, tmp_path, monkeypatch) -> None:
    """Kill a run of ``argv`` (``argv[output_index]`` its output) at layer 2: nothing is
    written; the rerun restores layers 0 and 1 and ends equal to an uninterrupted run."""
    from casp.checkpoint import load_checkpoint

    output = Path(argv[output_index])
    original = pass_cls.process
    seen = []

    def crash_on_layer_2(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt
        seen.append(ctx.index)
        return original(self, ctx)

    monkeypatch.setattr(pass_cls, "process", crash_on_layer_2)
    assert run(*argv) == 130
    assert seen == [0, 1] and not output.exists()
    monkeypatch.setattr(pass_cls, "process",
                        lambda self, ctx: (seen.append(ctx.index), original(self, ctx)))
    assert run(*argv) == 0
    assert seen == [0, 1, 2]           # layers 0 and 1 were restored, not processed again
    resumed = load_checkpoint(output)
    monkeypatch.setattr(pass_cls, "process", original)
    fresh_argv = list(argv)
    fresh_argv[output_index] = tmp_path / "uninterrupted"
    assert run(*fresh_argv) == 0
    fresh = load_checkpoint(tmp_path / "uninterrupted")
    a, b = resumed.model.state_dict(), fresh.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def dense_copy(model):
    """The model with every quantized linear replaced by an nn.Linear of its dequantized
    weight."""
    from casp.quant.stored import StoredLinear

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, StoredLinear):
            weight = module.dequantized_weight()
            linear = nn.Linear(weight.shape[1], weight.shape[0],
                               bias=getattr(module, "bias", None) is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if linear.bias is not None:
                    linear.bias.copy_(module.bias.float())
            dense.set_submodule(name, linear)
    return dense
