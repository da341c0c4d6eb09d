"""Loading a model to compress: a local Hugging Face directory, a hub id, a GGUF file,
a casp checkpoint, or a built-in alias (``smollm2-135m``, ``mini-llava``)."""
from __future__ import annotations

import json
import os
import shutil
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from . import assets
from .errors import CaspError
from .models import ModelSpec, spec_for_architecture

log = logging.getLogger("casp")

# model_type -> class, for configs that do not name their architecture (GGUF files).
_CLASS_FOR_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model with everything a stage needs beside it."""

    model: torch.nn.Module
    spec: ModelSpec
    tokenizer: Any = None          # a tokenizer (always set when the source has one)
    processor: Any = None          # the multimodal processor, for LLaVA models
    source: str = ""
    casp: dict = field(default_factory=dict)   # the checkpoint's casp section, if any

    def preprocessors(self) -> list:
        """Objects to save beside the weights so the checkpoint is self-contained."""
        return [p for p in (self.processor, self.tokenizer) if p is not None][:1]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CaspError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CaspError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CaspError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", "")
    if model_type in _CLASS_FOR_MODEL_TYPE:
        return _CLASS_FOR_MODEL_TYPE[model_type]
    return model_type or "unknown"


def _locate(source: str) -> tuple[str, dict]:
    """Turn a user's model argument into from_pretrained arguments."""
    if source.lower() == assets.MINI_LLAVA_ALIAS:     # built from wheels once, into the cache
        from .mini_llava.build import mini_llava_dir

        return str(mini_llava_dir()), {}
    if source.lower() in assets.MODEL_ALIASES:
        converted = assets.converted_dir(source.lower())
        if (converted / "config.json").is_file():
            return str(converted), {}
        gguf = assets.wheel_member(*assets.MODEL_ALIASES[source.lower()])
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CaspError(f"GGUF file {source} does not exist; check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CaspError(f"{source} has no config.json; point --model at a Hugging Face "
                            "model directory, a .gguf file or a hub id")
        return str(path), {}
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CaspError(f"model path {source} does not exist; check the path, or give a hub id "
                        "such as llava-hf/llava-1.5-7b-hf")
    return source, {}


def _is_casp_checkpoint(location: str) -> bool:
    cfg = Path(location) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "casp" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _preprocessors(location: str, kwargs: dict, multimodal: bool):
    tokenizer = processor = None
    if multimodal:
        try:
            processor = transformers.AutoProcessor.from_pretrained(location, **kwargs)
            if not hasattr(processor, "image_processor"):   # a directory with a tokenizer only
                processor = None
            tokenizer = getattr(processor, "tokenizer", None)
        except Exception as exc:  # a bare config directory has no processor
            log.info("no processor loaded from %s (%s)", location, exc)
            # LLaVA-NeXT-Video's needs torchvision for its video processor: stand in for it
            from .data.video import frames_processor

            processor = frames_processor(location)
            tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        except Exception as exc:
            log.info("no tokenizer loaded from %s (%s)", location, exc)
    return tokenizer, processor


def load_pretrained(source: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load ``source`` on the CPU, ready for a layer-wise stage or for evaluation.

    The weights stay on the CPU: the layer-wise engine moves one layer at a time to the
    compute device, and evaluation moves the whole model when it fits.
    """
    location, kwargs = _locate(source)
    if not kwargs and _is_casp_checkpoint(location):
        from .checkpoint import load_checkpoint

        loaded = load_checkpoint(location, dtype=dtype, device=device)
        loaded.source = source
        return loaded
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    try:
        config = transformers.AutoConfig.from_pretrained(location, **kwargs)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CaspError(f"could not read the model config of {source}: {first}")
    arch = architecture_of(config)
    spec = spec_for_architecture(arch)
    cls = getattr(transformers, arch)
    try:
        model = cls.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except Exception as exc:   # missing, truncated or mismatched weights, a corrupt GGUF
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CaspError(f"could not load the weights of {source} ({first}); check that the "
                        "model files are complete")
    if "gguf_file" in kwargs:
        _forget_gguf_quantization(model)
    model.config.architectures = [arch]
    model.eval()
    tokenizer, processor = _preprocessors(location, kwargs, spec.multimodal)
    if "gguf_file" in kwargs and source.lower() in assets.MODEL_ALIASES:
        _keep_converted(source.lower(), model, tokenizer)
    return LoadedModel(model=model, spec=spec, tokenizer=tokenizer, processor=processor,
                       source=source)


def _keep_converted(alias: str, model, tokenizer) -> None:
    """Save a built-in model once as a float Hugging Face directory in the cache, so later
    loads skip the (slow) GGUF conversion. Written to a temporary name and renamed."""
    target = assets.converted_dir(alias)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError as exc:      # a read-only or full cache only costs speed
        log.info("could not keep the converted %s in the cache (%s)", alias, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _forget_gguf_quantization(model) -> None:
    """GGUF weights are dequantized on load; from then on the model is an ordinary float
    model (our full-precision reference), and must save as one."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
