"""Loading a model to compress: a local Hugging Face directory, a hub id, a GGUF file,
a casp checkpoint, or a built-in alias (``smollm2-135m``, ``mini-llava``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import transformers

from casp import assets
from casp.checkpoint import load_checkpoint
from casp.devices import resolve_device, resolve_dtype
from casp.errors import CaspError
from casp.gguf import forget_gguf_quantization, keep_converted
from casp.hf_model import LoadedModel, load_preprocessors
from casp.mini_llava.build import mini_llava_dir
from casp.models import ModelSpec, architecture_of, spec_for_architecture

log = logging.getLogger("casp")

def locate(source: str) -> tuple[str, dict]:
    """Turn a user's model argument into from_pretrained arguments."""
    if source.lower() == assets.MINI_LLAVA_ALIAS:     # built from wheels once, into the cache
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


def _read_config(source: str, location: str, kwargs: dict):
    try:
        return transformers.AutoConfig.from_pretrained(location, **kwargs)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CaspError(f"could not read the model config of {source}: {first}")


def read_spec(source: str) -> ModelSpec:
    """The architecture spec of ``source`` from its config alone, without loading weights:
    to refuse a request the model cannot serve (an image for a text model) before the load."""
    location, kwargs = locate(source)
    return spec_for_architecture(architecture_of(_read_config(source, location, kwargs)))


def load_pretrained(source: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load ``source`` on the CPU, ready for a layer-wise stage or for evaluation.

    The weights stay on the CPU: the layer-wise engine moves one layer at a time to the
    compute device, and evaluation moves the whole model when it fits.
    """
    location, kwargs = locate(source)
    if not kwargs and _is_casp_checkpoint(location):
        loaded = load_checkpoint(location, dtype=dtype, device=device)
        loaded.source = source
        return loaded
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    arch = architecture_of(_read_config(source, location, kwargs))
    spec = spec_for_architecture(arch)
    cls = getattr(transformers, arch)
    try:
        model = cls.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except Exception as exc:   # missing, truncated or mismatched weights, a corrupt GGUF
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CaspError(f"could not load the weights of {source} ({first}); check that the "
                        "model files are complete")
    if "gguf_file" in kwargs:
        forget_gguf_quantization(model)
    model.config.architectures = [arch]
    model.eval()
    tokenizer, processor = load_preprocessors(location, kwargs, spec.multimodal)
    if "gguf_file" in kwargs and source.lower() in assets.MODEL_ALIASES:
        keep_converted(source.lower(), model, tokenizer)
    return LoadedModel(model=model, spec=spec, tokenizer=tokenizer, processor=processor,
                       source=source)


