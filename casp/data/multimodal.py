"""Multimodal calibration samples in LLaVA-Instruct JSON form.

A file is a JSON list of records such as

    {"id": "1", "image": "shapes/17.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat shape is this?"},
                       {"from": "gpt", "value": "circle"}]}

``image`` may also be a list of paths (several images), and ``video`` a list of frame
paths or a directory of frames (LLaVA-NeXT-Video), of which ``num_frames`` (8, the
paper's) evenly spread frames are kept. Paths are relative to ``image_root``.
Each sample becomes one calibration batch: the processor expands the image placeholder into
the image's tokens, and the vision tower and projector run inside the model's own forward.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from casp.data.easy_vqa import builtin_records, is_builtin
from casp.data.video import DEFAULT_NUM_FRAMES, uniform_frames
from casp.errors import CaspError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class MultimodalSample:
    conversations: list[dict]
    images: list[Path] = field(default_factory=list)
    video: list[Path] = field(default_factory=list)   # frames, in order
    id: str = ""


def _paths(value, root: Path) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        p = root / item
        if p.is_dir():   # frames in natural order: frame_2 before frame_10
            out += sorted((q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES),
                          key=lambda q: [int(t) if t.isdigit() else t
                                         for t in re.split(r"(\d+)", q.name)])
        elif p.is_file():
            out.append(p)
        else:
            raise CaspError(f"image {p} named in the calibration JSON does not exist; check "
                            "--image-root")
    return out


def _frames(value, root: Path, num_frames: int) -> list[Path]:
    frames = _paths(value, root)
    files = [p for p in frames if p.suffix.lower() not in IMAGE_SUFFIXES]
    if files:
        raise CaspError(f"video {files[0]} is not an image: casp does not decode video files; "
                        "give the video as a directory or a list of frame images")
    if not frames:
        raise CaspError(f"video {value} has no frame images ({', '.join(IMAGE_SUFFIXES)}); "
                        "check the calibration JSON")
    return uniform_frames(frames, num_frames)


def load_llava_instruct(path: str | Path, image_root: str | Path | None = None,
                        nsamples: int | None = None, seed: int = 0,
                        num_frames: int = DEFAULT_NUM_FRAMES) -> list[MultimodalSample]:
    """Read LLaVA-Instruct JSON (a list, or JSON lines); pick ``nsamples`` at random; keep
    ``num_frames`` of each video's frames, evenly spread. ``easy-vqa`` (or
    ``easy-vqa:test``) names the built-in easy-vqa training (test) questions instead of a file."""
    if is_builtin(path):
        return [MultimodalSample(conversations=rec["conversations"], images=[Path(rec["image"])],
                                 id=rec["id"])
                for rec in builtin_records(str(path), nsamples, seed)]
    path = Path(path)
    if not path.is_file():
        raise CaspError(f"multimodal calibration file {path} does not exist; check the path")
    root = Path(image_root) if image_root else path.parent
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise CaspError(f"{path} is not LLaVA-Instruct JSON ({exc}); fix the file")
    if nsamples is not None:
        if len(records) < nsamples:
            raise CaspError(f"{path} has {len(records)} samples, fewer than the {nsamples} asked "
                            "for; lower --nsamples")
        records = random.Random(seed).sample(records, nsamples)
    samples = []
    for i, rec in enumerate(records):
        if "conversations" not in rec:
            raise CaspError(f"record {i} of {path} has no 'conversations'; not LLaVA-Instruct form")
        samples.append(MultimodalSample(
            conversations=rec["conversations"], id=str(rec.get("id", i)),
            images=_paths(rec["image"], root) if rec.get("image") else [],
            video=_frames(rec["video"], root, num_frames) if rec.get("video") else []))
    return samples


def conversation_prompt(sample: MultimodalSample, image_token: str, video_token: str) -> str:
    """LLaVA-1.5 style text: ``USER: <image>\\n... ASSISTANT: ...``; a placeholder is added
    to the first turn when the record has media but its text has none."""
    turns = []
    for turn in sample.conversations:
        role = "USER" if turn.get("from") in ("human", "user") else "ASSISTANT"
        value = turn.get("value", "").replace("<image>", image_token).replace("<video>", video_token)
        turns.append(f"{role}: {value}")
    text = " ".join(turns)
    if sample.images and image_token not in text:
        text = f"{image_token}\n{text}"
    if sample.video and video_token not in text:
        text = f"{video_token}\n{text}"
    return text


def templated_prompt(sample: MultimodalSample, processor) -> str | None:
    """The conversation in the model's own chat template (what it was trained on), with
    each ``<image>`` / ``<video>`` placeholder as a media part; None when the template
    cannot render it (the LLaVA-1.5 style text is used then)."""
    messages = []
    for t, turn in enumerate(sample.conversations):
        role = "user" if turn.get("from") in ("human", "user") else "assistant"
        value = turn.get("value", "")
        parts = [{"type": "image"}] * value.count("<image>")
        parts += [{"type": "video"}] * value.count("<video>")
        if t == 0:   # media the text does not place go first, as conversation_prompt does
            if sample.images and not value.count("<image>"):
                parts.insert(0, {"type": "image"})
            if sample.video and not value.count("<video>"):
                parts.insert(0, {"type": "video"})
        text = value.replace("<image>", "").replace("<video>", "").strip()
        messages.append({"role": role, "content": parts + [{"type": "text", "text": text}]})
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=False)
    except Exception:   # a template that does not take this conversation's shape
        return None


def sample_inputs(sample: MultimodalSample, processor) -> dict:
    """Model inputs (tensors, batch of one) for one sample."""
    from PIL import Image

    if processor is None:
        raise CaspError("multimodal calibration needs the model's processor; give a model "
                        "directory that includes preprocessor files")
    image_token = getattr(processor, "image_token", "<image>")
    video_token = getattr(processor, "video_token", "<video>")
    text = None
    if getattr(processor, "chat_template", None):
        text = templated_prompt(sample, processor)
    if text is None:
        text = conversation_prompt(sample, image_token, video_token)
    kwargs = {"text": [text], "return_tensors": "pt"}
    if sample.images:
        kwargs["images"] = [Image.open(p).convert("RGB") for p in sample.images]
    if sample.video:
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in sample.video]
        kwargs["videos"] = [np.stack(frames)]
    return dict(processor(**kwargs))
