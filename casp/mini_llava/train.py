"""Train the mini LLaVA's projector on easy-vqa (LLaVA's first stage: only the projector learns).

The vision tower and the language model are frozen, so the vision features of every training
image are computed once and kept. Each step takes a batch of images; each image becomes one
multi-turn ChatML conversation of ``turns`` of its questions (the image in the first user
turn, as LLaVA's instruction data does), and the loss is the cross-entropy of the answer
tokens (and the end-of-turn token after them) only. The logits are computed only where a
label is, which spares most of the 49k-word output layer.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from casp.data.easy_vqa import VQARecord, by_image, load_split, question_text
from casp.errors import CaspError

log = logging.getLogger("casp")


@dataclass
class TrainConfig:
    steps: int = 800
    batch_images: int = 8
    turns: int = 4
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.0
    seed: int = 0
    threads: int | None = None
    bf16: bool = True          # bfloat16 autocast of the forward pass (CPU and GPU)


def image_features(model, processor, paths: list[Path], batch: int = 64,
                   desc: str = "vision features") -> torch.Tensor:
    """The projector's inputs for every image: [n, 64, 384], fp32 (vision tower frozen)."""
    from PIL import Image

    feats = []
    cfg = model.config
    with torch.no_grad():
        for i in tqdm(range(0, len(paths), batch), desc=desc, leave=False):
            images = [Image.open(p).convert("RGB") for p in paths[i: i + batch]]
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(next(model.parameters()).device)
            out = model.model.vision_tower(pixels, output_hidden_states=True)
            hidden = out.hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                hidden = hidden[:, 1:]
            feats.append(hidden.float())
    return torch.cat(feats)


def conversation_ids(processor, records: list[VQARecord]) -> tuple[list[int], list[int]]:
    """Token ids of a multi-turn conversation about one image and its labels (-100 except on
    answers and the end-of-turn token that closes each answer)."""
    tok = processor.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for t, r in enumerate(records):
        content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text",
                                                               "text": question_text(r)}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(r.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        ids += p_ids + a_ids + nl
        labels += [-100] * len(p_ids) + a_ids + [-100] * len(nl)
    return ids, labels


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int,
                        n_tokens: int) -> tuple[list[int], list[int]]:
    """One image placeholder becomes ``n_tokens`` of them, as the processor does."""
    out_ids, out_labels = [], []
    for i, l in zip(ids, labels):
        reps = n_tokens if i == image_token_id else 1
        out_ids += [i] * reps
        out_labels += [l] * reps
    return out_ids, out_labels


def batch_loss(model, features: torch.Tensor, seqs: list[tuple[list[int], list[int]]]
               ) -> torch.Tensor:
    """Mean answer-token cross-entropy of a batch (right-padded); features [b, 64, 384]."""
    cfg = model.config
    lm = model.model.language_model
    pad = 0
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (s, l) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        labels[b, :len(l)] = torch.tensor(l)
        mask[b, :len(s)] = 1
    device = features.device
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    embeds = lm.embed_tokens(ids)
    image_pos = ids == cfg.image_token_id
    projected = model.model.multi_modal_projector(features)
    embeds = embeds.masked_scatter(image_pos.unsqueeze(-1), projected.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # position t predicts token t+1
    target = labels[:, 1:]
    where = target != -100
    logits = model.lm_head(hidden[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), target[where])


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_projector(model, processor, cfg: TrainConfig, records: list[VQARecord] | None = None,
                    features: dict[int, torch.Tensor] | None = None, log_every: int = 20,
                    every: int = 0, callback=None) -> dict:
    """Train ``model``'s projector in place; returns the training card (settings, losses).
    ``callback(step)`` runs every ``every`` steps (e.g. a quick accuracy check); what it
    returns is kept in the card's ``checks``."""
    if cfg.steps <= 0 or cfg.batch_images <= 0 or cfg.turns <= 0:
        raise CaspError("--steps, --batch-images and --turns must be positive")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records = records if records is not None else load_split("train")
    groups = by_image(records)
    ids_sorted = sorted(groups)
    if features is None:
        paths = [groups[i][0].image for i in ids_sorted]
        stacked = image_features(model, processor, paths)
        features = {i: stacked[k] for k, i in enumerate(ids_sorted)}
    n_tokens = next(iter(features.values())).shape[0]
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    checks: list[dict] = []
    start = time.time()
    model.train()
    bar = tqdm(range(cfg.steps), desc="projector")
    for step in bar:
        chosen = rng.sample(ids_sorted, min(cfg.batch_images, len(ids_sorted)))
        seqs = []
        for image_id in chosen:
            qs = rng.sample(groups[image_id], min(cfg.turns, len(groups[image_id])))
            ids, labels = conversation_ids(processor, qs)
            seqs.append(expand_image_tokens(ids, labels, model.config.image_token_id, n_tokens))
        feats = torch.stack([features[i] for i in chosen])
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        device_type = feats.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = batch_loss(model, feats, seqs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("step %d loss %.4f", step + 1, recent)
        if callback is not None and every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            model.eval()
            checks.append({"step": step + 1, **callback(step + 1)})
            log.info("step %d check %s", step + 1, checks[-1])
            model.train()
    model.eval()
    for p in projector.parameters():
        p.requires_grad_(False)
    tail = losses[-min(50, len(losses)):]
    return {"settings": asdict(cfg), "images": len(ids_sorted), "records": len(records),
            "final_loss": sum(tail) / len(tail), "loss_curve": losses[::max(1, len(losses) // 100)],
            "checks": checks, "seconds": round(time.time() - start, 1)}
