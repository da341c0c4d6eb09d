"""casp's lmms-eval model, registered as ``casp``: any casp checkpoint (low-rank and quantized
modules included), a plain Hugging Face LLaVA / LLaVA-NeXT / LLaVA-NeXT-Video / Llama
directory, or a built-in alias, evaluated by lmms-eval's own evaluator.

    python -m lmms_eval --model casp --model_args pretrained=runs/llava-casp-gptq \\
        --tasks gqa --batch_size 1

Prompts go through the model's own chat template (the processor's, as ``casp vqa`` does):
one user turn holding the images (or the video) and the task's text, then the assistant's
turn. Generation is greedy. ``loglikelihood`` scores a continuation appended to that prompt
(the assistant's answer), for perplexity and multiple-choice tasks.

This module imports lmms-eval; ``casp.eval.lmms`` (the ``casp lmms-eval`` command and the
registration) does not, so casp works without it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from tqdm import tqdm

from casp.errors import CaspError
from casp.generation import chat_prompt
from casp.loading import load_pretrained, resolve_device

log = logging.getLogger("casp")

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def read_video(source, num_frames: int) -> np.ndarray:
    """``num_frames`` evenly spread frames [T, H, W, 3] of a video: an array, a directory of
    frame images, or a video file (decoded with PyAV, which casp does not install)."""
    from PIL import Image

    from casp.data.video import uniform_frames

    if isinstance(source, np.ndarray):
        return np.stack(uniform_frames(list(source), num_frames))
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise CaspError(f"video directory {path} holds no frame images")
        return np.stack([np.asarray(Image.open(p).convert("RGB"))
                         for p in uniform_frames(files, num_frames)])
    try:
        import av
    except ImportError:
        raise CaspError(f"video {path}: decoding video files needs PyAV (pip install 'av<16'), "
                        "which casp does not install; or give the frames as a directory")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise CaspError(f"video {path} has no frames")
    return np.stack(uniform_frames(frames, num_frames))


def _is_video(visual) -> bool:
    if isinstance(visual, np.ndarray):
        return visual.ndim == 4
    if isinstance(visual, (str, Path)):
        path = Path(visual)
        return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES
    return False


@register_model("casp")
class CaspLMMS(lmms):
    """lmms-eval's ``model_args``: ``pretrained`` (what ``--model`` takes in casp: a casp
    checkpoint, a Hugging Face directory, a hub id or an alias such as ``mini-llava``),
    ``device`` (auto, cpu, cuda, cuda:N), ``dtype`` (auto, float32, float16, bfloat16),
    ``batch_size``, ``max_new_tokens`` (when a task sets none) and ``num_frames`` (frames
    per video, 8 as in the paper)."""

    is_simple = True

    def __init__(self, pretrained: str = "", device: str | None = "auto", dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int = 256, num_frames: int = 8,
                 **kwargs) -> None:
        super().__init__()
        if not pretrained:
            raise CaspError("the casp lmms-eval model needs pretrained=<checkpoint or model "
                            "directory> in --model_args")
        ignored = {k: v for k, v in kwargs.items() if v is not None}
        if ignored:
            log.warning("casp model: ignoring model_args %s", ", ".join(sorted(ignored)))
        self._device = resolve_device(device or "auto")
        loaded = load_pretrained(str(pretrained), dtype=dtype, device=str(self._device))
        self.model = loaded.model.to(self._device).eval()
        self.processor = loaded.processor
        self.tokenizer = loaded.tokenizer or getattr(loaded.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise CaspError(f"{pretrained} has no tokenizer or processor files; lmms-eval needs "
                            "them to build prompts")
        self.multimodal = loaded.spec.multimodal
        self.pretrained = str(pretrained)
        try:
            self.batch_size_per_gpu = max(1, int(batch_size))
        except (TypeError, ValueError):
            log.warning("casp model: batch_size=%s is not a number; using 1", batch_size)
            self.batch_size_per_gpu = 1
        self.max_new_tokens = int(max_new_tokens)
        self.num_frames = int(num_frames)
        vocab = self.tokenizer.get_vocab()
        ends = [self.tokenizer.eos_token_id] + [vocab[t] for t in ("<|im_end|>", "<|eot_id|>")
                                                if t in vocab]
        self.end_ids = list(dict.fromkeys(i for i in ends if isinstance(i, int) and i >= 0))
        self._sampling_warned = False

    # lmms-eval reads these
    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ inputs
    def _visuals(self, doc_to_visual, task, split, doc_id) -> tuple[list, list]:
        """(images, videos) of one document."""
        if doc_to_visual is None:
            return [], []
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        images, videos = [], []
        for v in visuals:
            if v is None:
                continue
            if _is_video(v):
                videos.append(read_video(v, self.num_frames))
            elif isinstance(v, (str, Path)):
                from PIL import Image

                images.append(Image.open(v).convert("RGB"))
            elif hasattr(v, "convert"):
                images.append(v.convert("RGB"))
            else:
                raise CaspError(f"{task}: a visual of type {type(v).__name__} (audio?) is not "
                                "supported by the casp model; it takes images and videos")
        if (images or videos) and not self.multimodal:
            raise CaspError(f"{task} gives images or video but {self.pretrained} takes text "
                            "only; evaluate a LLaVA-family model")
        if videos and not hasattr(self.model.config, "video_token_index") \
                and not hasattr(self.model.config, "video_token_id"):
            raise CaspError(f"{task} is a video task but {type(self.model).__name__} takes no "
                            "video; use a LLaVA-NeXT-Video model")
        return images, videos

    def _encode(self, prompts: list[str], images: list, videos: list) -> dict:
        if self.processor is None:
            enc = dict(self.tokenizer(prompts, return_tensors="pt", padding=True))
        else:
            kwargs = {"text": prompts, "return_tensors": "pt", "padding": True}
            if images:
                kwargs["images"] = images
            if videos:
                kwargs["videos"] = videos
            enc = dict(self.processor(**kwargs))
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self._device, dtype) if v.is_floating_point() else v.to(self._device))
                for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def _prompt(self, context: str, images: list, videos: list) -> str:
        return chat_prompt(self.processor, self.tokenizer, context, len(images), len(videos))

    # ------------------------------------------------------------------ generation
    def _greedy(self, gen_kwargs: dict) -> dict:
        if not self._sampling_warned and (gen_kwargs.get("do_sample")
                                          or (gen_kwargs.get("temperature") or 0) > 0):
            log.warning("casp model: the task asks for sampling; decoding greedily")
            self._sampling_warned = True
        pad = self.tokenizer.pad_token_id
        return {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                "do_sample": False, "num_beams": 1, "eos_token_id": self.end_ids or None,
                "pad_token_id": pad if pad is not None else (self.end_ids or [0])[0]}

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        replies: list[str | None] = [None] * len(requests)
        order = list(range(len(requests)))
        # batches of requests with the same generation settings, in the given order
        batches, current = [], []
        for i in order:
            if current and (len(current) == self.batch_size_per_gpu
                            or requests[i].args[1] != requests[current[0]].args[1]):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        tok = self.tokenizer
        saved_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for batch in tqdm(batches, desc="casp: generating", disable=self.rank != 0):
                prompts, images, videos = [], [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    im, vi = self._visuals(doc_to_visual, task, split, doc_id)
                    prompts.append(self._prompt(context, im, vi))
                    images += im
                    videos += vi
                gen_kwargs = dict(requests[batch[0]].args[1] or {})
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                inputs = self._encode(prompts, images, videos)
                out = self.model.generate(**inputs, **self._greedy(gen_kwargs))
                texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    replies[i] = text.strip()
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2],
                                                replies[i])
        finally:
            tok.padding_side = saved_side
        return replies

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the casp lmms-eval model does not run multi-round tasks; "
                                  "use single-round generation or loglikelihood tasks")

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of the log-probabilities of each continuation's tokens given the prompt (chat
        template, then the continuation as the assistant's reply), and whether greedy decoding
        would have produced them."""
        results = []
        for req in tqdm(requests, desc="casp: scoring", disable=self.rank != 0):
            args = req.args
            context, target = args[0], args[1]
            images, videos = [], []
            if len(args) >= 6:
                doc_to_visual, doc_id, task, split = args[2:6]
                images, videos = self._visuals(doc_to_visual, task, split, doc_id)
                if callable(target):
                    target = target(self.task_dict[task][split][doc_id])
            if isinstance(target, (list, tuple)):
                target = target[0]
            inputs = self._encode([self._prompt(context, images, videos)], images, videos)
            cont = self.tokenizer(str(target), add_special_tokens=False,
                                  return_tensors="pt")["input_ids"].to(self._device)
            n_ctx = inputs["input_ids"].shape[1]
            for key, value in list(inputs.items()):   # per-token inputs grow with the answer
                if key != "input_ids" and value.shape == inputs["input_ids"].shape:
                    inputs[key] = torch.cat([value, torch.full_like(cont, int(
                        key == "attention_mask"))], dim=1)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
            logits = self.model(**inputs).logits[0, n_ctx - 1: -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target_ids = cont[0]
            ll = logp.gather(1, target_ids[:, None]).sum().item()
            greedy = bool((logits.argmax(dim=-1) == target_ids).all())
            results.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, target), (ll, greedy))
        return results
