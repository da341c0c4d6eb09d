"""GGUF files as float transformers models: their weights are dequantized on load, and the
built-in ones (``smollm2-135m``) are kept converted in the cache so later loads skip the
slow conversion."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import transformers

from casp import assets

log = logging.getLogger("casp")


def converted_builtin_dir(alias: str) -> Path:
    """A built-in GGUF model (an alias of ``assets.MODEL_ALIASES``) as a float Hugging Face
    directory in the cache, converted once."""
    target = assets.converted_dir(alias)
    if not (target / "config.json").is_file():
        gguf = assets.wheel_member(*assets.MODEL_ALIASES[alias])
        kwargs = {"gguf_file": gguf.name}
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32,
                                                                  **kwargs)
        forget_gguf_quantization(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        keep_converted(alias, model, tokenizer)
    return target


def forget_gguf_quantization(model) -> None:
    """GGUF weights are dequantized on load; from then on the model is an ordinary float
    model (our full-precision reference), and must save as one."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def keep_converted(alias: str, model, tokenizer) -> None:
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
