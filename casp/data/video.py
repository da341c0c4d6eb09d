"""Video calibration samples for LLaVA-NeXT-Video: uniform frame sampling, and the model's
processor where transformers cannot build it.

transformers' video processors need torchvision. Without it ``AutoProcessor`` refuses
LLaVA-NeXT-Video's processor outright, and casp would have no processor at all: no
multimodal calibration, and checkpoints saved without the processor files. Then
:func:`frames_processor` stands in: text and images go through LLaVA-NeXT's processor (the
same tokenizer, image processor and any-resolution tiling), each video frame through a CLIP
image processor with the video processor's settings (resize the shortest edge, centre crop,
rescale, normalise), and each ``<video>`` placeholder becomes the tokens the model fills
with that video's features. Saving writes the original processor files back unchanged, so a
checkpoint loads with the full processor wherever torchvision is installed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from casp.errors import CaspError

log = logging.getLogger("casp")

DEFAULT_NUM_FRAMES = 8      # the paper samples 8 frames per video
VIDEO_PROCESSOR_CLASS = "LlavaNextVideoProcessor"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")
# the settings of a video processor that a CLIP image processor applies the same way
_FRAME_SETTINGS = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale",
                   "rescale_factor", "do_normalize", "image_mean", "image_std", "resample",
                   "do_convert_rgb")


def uniform_frames(frames: list, num_frames: int) -> list:
    """``num_frames`` frames spread evenly from the first to the last (LLaVA-NeXT-Video's
    sampling: ``linspace(0, n - 1, num_frames)``); every frame when there are no more."""
    if num_frames < 1 or len(frames) <= num_frames:
        return list(frames)
    return [frames[i] for i in np.linspace(0, len(frames) - 1, num_frames).round().astype(int)]


def _source_files(location: str) -> dict[str, str]:
    """The processor files of a local directory or hub repository, as text."""
    texts = {}
    for name in PROCESSOR_FILES:
        if Path(location).is_dir():
            path = Path(location) / name
            found = str(path) if path.is_file() else None
        else:
            from transformers.utils import cached_file

            try:
                found = cached_file(location, name, _raise_exceptions_for_missing_entries=False)
            except Exception:   # offline, gated: what cannot be read is not there
                found = None
        if found:
            texts[name] = Path(found).read_text(encoding="utf-8")
    return texts


class FramesVideoProcessor:
    """LLaVA-NeXT-Video's processor without a transformers video processor: called like the
    real one (``text``, ``images``, ``videos`` as arrays [frames, H, W, 3])."""

    def __init__(self, images, frames, video_token: str, files: dict[str, str]):
        self.images = images                       # a LlavaNextProcessor
        self.frames = frames                       # a CLIP image processor
        self.image_processor = images.image_processor
        self.tokenizer = images.tokenizer
        self.image_token = images.image_token
        self.video_token = video_token
        self.patch_size = images.patch_size
        self.files = files

    def __call__(self, text, images=None, videos=None, return_tensors="pt", **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        pixel = []
        for video in videos or []:
            frames = self.frames(list(video), return_tensors="pt")["pixel_values"]
            height, width = frames.shape[-2:]
            # the model pools each frame's patch grid 2 x 2; counted as transformers does:
            # the pooled tokens of one frame, times the frames
            count = (height // self.patch_size) * (width // self.patch_size) // 4 * len(frames)
            at = next((i for i, t in enumerate(texts) if self.video_token in t), None)
            if at is None:
                raise CaspError("a video was given but its text has no video placeholder")
            # expanded in place; the marker keeps a later video from expanding this one again
            texts[at] = texts[at].replace(self.video_token, "\0" * count, 1)
            pixel.append(frames)
        texts = [t.replace("\0", self.video_token) for t in texts]
        out = self.images(text=texts, images=images, return_tensors=return_tensors, **kwargs)
        if pixel:
            out["pixel_values_videos"] = torch.stack(pixel)
        return out

    def save_pretrained(self, directory, **kwargs):
        saved = self.images.save_pretrained(directory, **kwargs)
        for name, text in self.files.items():          # the original processor, unchanged
            (Path(directory) / name).write_text(text, encoding="utf-8")
        return saved


def _frame_settings(files: dict[str, str], image_processor) -> dict:
    """The video processor's settings: nested in processor_config.json (transformers 5),
    video_preprocessor_config.json, or else the image processor's own."""
    nested = json.loads(files.get("processor_config.json", "{}")).get("video_processor")
    found = nested or json.loads(files.get("video_preprocessor_config.json", "null"))
    if not found:
        found = {k: getattr(image_processor, k) for k in _FRAME_SETTINGS
                 if getattr(image_processor, k, None) is not None}
    return {k: v for k, v in found.items() if k in _FRAME_SETTINGS}


def frames_processor(location: str) -> FramesVideoProcessor | None:
    """The stand-in for LLaVA-NeXT-Video's processor at ``location``; None when its
    processor is another class, or its files cannot give one."""
    import transformers

    files = _source_files(location)
    config = json.loads(files.get("processor_config.json", "{}"))
    if config.get("processor_class") != VIDEO_PROCESSOR_CLASS:
        return None
    try:
        images = transformers.LlavaNextProcessor.from_pretrained(location)
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        frames = cls(**_frame_settings(files, images.image_processor))
    except Exception as exc:
        log.info("no LLaVA-NeXT processor for the frames of %s either (%s)", location, exc)
        return None
    video_token = (config.get("video_token") or getattr(images.tokenizer, "video_token", None)
                   or "<video>")
    log.info("%s: video frames preprocessed without transformers' video processor (it needs "
             "torchvision)", location)
    return FramesVideoProcessor(images, frames, video_token, files)
