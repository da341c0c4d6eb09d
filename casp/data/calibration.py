"""Calibration batches for the layer-wise engine, from text or multimodal samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.data.multimodal import load_llava_instruct, sample_inputs
from casp.data.text import load_documents, random_windows, tokenize_documents
from casp.data.video import DEFAULT_NUM_FRAMES
from casp.errors import CaspError


@dataclass
class CalibrationConfig:
    dataset: str = "wiki"
    nsamples: int = 256
    seqlen: int = 2048
    seed: int = 3
    batch_size: int = 8
    split: str | None = None
    text_field: str = "text"
    mm_data: str | None = None       # LLaVA-Instruct JSON: calibrate with images
    image_root: str | None = None
    num_frames: int = DEFAULT_NUM_FRAMES   # frames kept per video sample (the paper's 8)

    def as_dict(self) -> dict:
        settings = dict(self.__dict__)
        if not self.mm_data:     # frames mean nothing to text: text stages keep their keys
            settings.pop("num_frames")
        return settings


def model_context_length(model) -> int | None:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(text_cfg, "max_position_embeddings", None)


def check_seqlen(model, seqlen: int) -> None:
    limit = model_context_length(model)
    if limit is not None and seqlen > limit:
        raise CaspError(f"--seqlen {seqlen} is longer than the model's context ({limit} tokens); "
                        f"use --seqlen {limit} or less")


def calibration_batches(loaded, cfg: CalibrationConfig) -> list[dict]:
    """Text windows grouped into batches, or one batch per multimodal sample."""
    if cfg.mm_data:
        if not loaded.spec.multimodal:
            raise CaspError(f"--mm-data needs a multimodal model; {loaded.spec.name} takes text only")
        samples = load_llava_instruct(cfg.mm_data, cfg.image_root, cfg.nsamples, cfg.seed,
                                      cfg.num_frames)
        return [sample_inputs(s, loaded.processor) for s in samples]
    check_seqlen(loaded.model, cfg.seqlen)
    ids = tokenize_documents(loaded.tokenizer,
                             load_documents(cfg.dataset, cfg.split, cfg.text_field))
    windows = random_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    size = max(1, cfg.batch_size)
    return [{"input_ids": windows[i: i + size]} for i in range(0, len(windows), size)]


def token_count(batches: list[dict]) -> int:
    return int(sum(torch.as_tensor(b["input_ids"]).numel() for b in batches))
