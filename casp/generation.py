"""Text generation with a KV cache, written out: the loop ``casp generate`` runs and a
throughput benchmark times.

The prompt (the model's chat template unless told otherwise; for a LLaVA model an image
entry and the processor's pixel values) is run once through the model with an empty
transformers ``DynamicCache`` (the *prefill*); then each step feeds only the last chosen
token and the cache (the *decode*). The next token is the argmax of the last logits
(greedy, temperature 0) or is drawn, with a ``torch.Generator`` seeded by ``seed``, from

    p_i  proportional to  exp(z_i / T),   restricted to the top-p nucleus: the fewest
                          most likely tokens whose probabilities sum to at least ``top_p``

(Holtzman et al., 2020). Generation stops at an end token (the tokenizer's and the
generation config's EOS, ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) or after
``max_new_tokens``; ``ignore_eos`` keeps going to exactly ``max_new_tokens`` (an end token
may then appear among them, as in vLLM's ``ignore_eos``). Attention is eager by default,
the implementation the paper's speed measurements use.

Timing: ``prefill_s`` runs from the prompt's forward pass to the first new token;
``decode_tokens_per_s`` counts the tokens after the first over the time they took.
"""
from __future__ import annotations

import inspect
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

from casp.errors import CaspError
from casp.hf_model import LoadedModel

log = logging.getLogger("casp")

END_TOKENS = ("<|im_end|>", "<|eot_id|>")     # ChatML and Llama 3 turn ends


@dataclass
class GenerationResult:
    """What one generation produced and what it cost."""

    text: str                       # the new tokens decoded, special tokens dropped
    token_ids: list[int]            # the new tokens (an end token included when it stopped)
    prompt_tokens: int
    prefill_s: float                # prompt forward pass up to the first new token
    decode_s: float                 # the tokens after the first
    decode_tokens_per_s: float | None   # (new tokens - 1) / decode_s; None with one token
    stopped_at_end: bool            # an end token stopped it (else max_new_tokens did)
    peak_rss_mib: float             # the process's peak resident memory so far
    peak_cuda_mib: float | None = None   # torch.cuda.max_memory_allocated during this run

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def summary(self) -> str:
        rate = (f"{self.decode_tokens_per_s:.1f} tokens/s" if self.decode_tokens_per_s
                is not None else "n/a (one token)")
        memory = f"peak RSS {self.peak_rss_mib:.0f} MiB"
        if self.peak_cuda_mib is not None:
            memory += f", peak CUDA {self.peak_cuda_mib:.0f} MiB"
        return (f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_s:.3f} s; "
                f"{self.new_tokens} new tokens, decode {rate}; {memory}")


def peak_rss_mib() -> float:
    """The process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def read_image(path: str | Path):
    """The RGB image at ``path``, or a CaspError saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise CaspError(f"image file {path} does not exist; check --image")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CaspError(f"could not read image {path} ({exc}); give a PNG, JPEG or other "
                        "image file PIL can open")


def chat_prompt(processor, tokenizer, text: str, images: int = 0, videos: int = 0) -> str:
    """One user turn (``images`` image placeholders, ``videos`` video placeholders, then
    ``text``) and the opening of the assistant's turn, in the model's chat template. For one
    image this is exactly ``casp.eval.vqa.user_prompt``'s prompt."""
    owner = next((p for p in (processor, getattr(processor, "images", None))
                  if p is not None and getattr(p, "chat_template", None)), None)
    if owner is not None:
        content = ([{"type": "video"}] * videos + [{"type": "image"}] * images
                   + [{"type": "text", "text": text}])
        return owner.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    if processor is not None:       # a multimodal model without a template: LLaVA-1.5's form
        image_token = getattr(processor, "image_token", "<image>")
        video_token = getattr(processor, "video_token", "<video>")
        marks = "".join([f"{video_token}\n"] * videos + [f"{image_token}\n"] * images)
        return f"USER: {marks}{text} ASSISTANT:"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return text                     # a base LLM: the text as it is


def prompt_inputs(loaded: LoadedModel, prompt: str, image=None,
                  chat_template: bool = True) -> dict[str, torch.Tensor]:
    """The model inputs of ``prompt`` (and ``image``, a PIL image, for a LLaVA model) on the
    CPU: input_ids, attention_mask and, with an image, pixel_values (and image_sizes)."""
    processor, tokenizer = loaded.processor, loaded.tokenizer
    if image is not None:
        if not loaded.spec.multimodal:
            raise CaspError(f"{loaded.source or 'the model'} takes text only; --image needs a "
                            "LLaVA-family model (e.g. --model mini-llava)")
        if processor is None:
            raise CaspError(f"{loaded.source or 'the model'} has no image processor files; "
                            "save the model with its processor to give it an image")
    if processor is None and tokenizer is None:
        raise CaspError(f"{loaded.source or 'the model'} has no tokenizer files; generation "
                        "needs them to read the prompt and write the reply")
    images = 1 if image is not None else 0
    if chat_template:
        text = chat_prompt(processor, tokenizer, prompt, images=images)
    else:
        text = prompt
        image_token = getattr(processor, "image_token", "<image>")
        if image is not None and image_token not in text:
            text = f"{image_token}\n{text}"
    if processor is not None and image is not None:
        enc = processor(text=[text], images=[image], return_tensors="pt")
    elif processor is not None:
        enc = processor(text=[text], return_tensors="pt")
    else:
        # a template already holds the start-of-text token; plain text gets the tokenizer's
        templated = chat_template and getattr(tokenizer, "chat_template", None)
        enc = tokenizer([text], return_tensors="pt", add_special_tokens=not templated)
    inputs = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
    if inputs["input_ids"].shape[1] == 0:
        raise CaspError("the prompt is empty after tokenization; give some text with --prompt")
    return inputs


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's and generation config's EOS, and the
    turn ends of ChatML and Llama 3 when the vocabulary has them."""
    ids = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    if tokenizer is not None:
        ids.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in END_TOKENS if t in vocab]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))


def context_length(model) -> int | None:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(text_cfg, "max_position_embeddings", None)


def check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = (f"use --max-new-tokens {room} or less, or a shorter prompt" if room > 0
               else f"shorten the prompt to under {limit} tokens")
        raise CaspError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens "
                        f"{max_new_tokens} is {prompt_tokens + max_new_tokens} tokens, longer "
                        f"than the model's context ({limit} tokens); {fix}")


def use_attention(model, implementation: str = "eager") -> None:
    """Switch ``model`` (and its sub-models) to ``implementation`` when transformers allows."""
    if getattr(model.config, "_attn_implementation", None) == implementation:
        return
    try:
        model.set_attn_implementation(implementation)
    except (AttributeError, ValueError, ImportError) as exc:
        log.warning("keeping %s attention (%s)", model.config._attn_implementation, exc)


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> int:
    """The next token from the last position's logits [vocab]: greedy or nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs    # mass of the more likely tokens
        sorted_probs[before >= top_p] = 0.0                # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_ids(model, inputs: dict[str, torch.Tensor], max_new_tokens: int,
                 end_ids: list[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, ignore_eos: bool = False,
                 on_token: Callable[[list[int]], None] | None = None) -> dict:
    """The decoding loop on prepared ``inputs`` (already on the model's device): new token
    ids and timings. ``on_token(ids)`` is called with all new ids after each step."""
    if max_new_tokens < 1:
        raise CaspError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    device = inputs["input_ids"].device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache = transformers.DynamicCache(config=model.config)
    mask = inputs.get("attention_mask")
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    # earlier transformers 5 releases call the cache argument past_key_values
    cache_arg = "cache" if "cache" in params else "past_key_values"
    ends = set(end_ids)
    _sync(device)
    start = time.perf_counter()
    out = model(**inputs, **{cache_arg: cache}, use_cache=True, **keep)
    ids = [next_token(out.logits[0, -1], temperature, top_p, generator)]
    _sync(device)
    prefill_s = time.perf_counter() - start
    if on_token is not None:
        on_token(ids)
    start = time.perf_counter()
    while len(ids) < max_new_tokens and (ignore_eos or ids[-1] not in ends):
        step = torch.tensor([[ids[-1]]], device=device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        out = model(input_ids=step, attention_mask=mask, **{cache_arg: cache}, use_cache=True)
        ids.append(next_token(out.logits[0, -1], temperature, top_p, generator))
        if on_token is not None:
            on_token(ids)
    _sync(device)
    decode_s = time.perf_counter() - start
    return {"token_ids": ids, "prefill_s": prefill_s, "decode_s": decode_s,
            "stopped_at_end": not ignore_eos and ids[-1] in ends}


class TextStream:
    """Writes the reply as it grows: decodes all new ids each step and writes the new suffix,
    holding back a partial multi-byte character (decoded as U+FFFD) until it is complete."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write, self.shown = tokenizer, write, ""

    def __call__(self, ids: list[int], final: bool = False) -> None:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.shown):
            return
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def generate(loaded: LoadedModel, prompt: str, image=None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             chat_template: bool = True, ignore_eos: bool = False, device: str = "auto",
             attention: str | None = "eager",
             write: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate a reply to ``prompt`` (and ``image``: a PIL image or a path, LLaVA models
    only) with ``loaded``, moved to ``device``. ``write`` receives the text as it grows;
    ``attention`` None keeps the model's attention implementation."""
    from casp.devices import resolve_device

    if image is not None and not hasattr(image, "convert"):
        image = read_image(image)
    inputs = prompt_inputs(loaded, prompt, image, chat_template)
    prompt_tokens = inputs["input_ids"].shape[1]
    check_context(loaded.model, prompt_tokens, max_new_tokens)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    if attention:
        use_attention(model, attention)
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev))
              for k, v in inputs.items()}
    tokenizer = loaded.tokenizer or getattr(loaded.processor, "tokenizer", None)
    stream = TextStream(tokenizer, write) if write is not None else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    run = generate_ids(model, inputs, max_new_tokens, end_token_ids(model, tokenizer),
                       temperature, top_p, seed, ignore_eos, on_token=stream)
    if stream is not None:
        stream(run["token_ids"], final=True)
    ids = run["token_ids"]
    return GenerationResult(
        text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
        prompt_tokens=prompt_tokens, prefill_s=run["prefill_s"], decode_s=run["decode_s"],
        decode_tokens_per_s=(len(ids) - 1) / run["decode_s"] if len(ids) > 1 and
        run["decode_s"] > 0 else None,
        stopped_at_end=run["stopped_at_end"], peak_rss_mib=peak_rss_mib(),
        peak_cuda_mib=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
        else None)
