"""A transformers model with what a stage needs beside it (:class:`LoadedModel`), and what a
model directory holds besides weights: its tokenizer or processor, and the casp section of
its config.json (casp.checkpoint documents that section)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from casp.errors import CaspError
from casp.models import ModelSpec

log = logging.getLogger("casp")


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


def load_preprocessors(location: str, kwargs: dict, multimodal: bool):
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
            from casp.data.video import frames_processor

            processor = frames_processor(location)
            tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        except Exception as exc:
            log.info("no tokenizer loaded from %s (%s)", location, exc)
    return tokenizer, processor


def read_casp_section(path: str | Path) -> dict | None:
    """The casp section of a checkpoint directory, None if it has no config or section."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("casp")
    except (OSError, json.JSONDecodeError) as exc:
        raise CaspError(f"{cfg} is not valid JSON ({exc}); the checkpoint is corrupt: "
                        "write it again")
