"""End-to-end fine-tuning of a quantized model (optional, off by default as in the paper):
the last step of QuIP# (Tseng et al. 2024, sec. 5: "fine-tuning during quantization", the
end-to-end part) and AQLM's global fine-tuning (Egiazarian et al. 2024, sec. 3.4), for every
quantizer here.

The codes stay. What can move continuously is fitted by Adam to the full-precision model's
next-token distributions on the calibration tokens:

    min  mean_t KL(p_teacher(. | x_<t) || p_student(. | x_<t))

over the quantized modules' continuous parameters (``begin_training()``: GPTQ's scales,
AQLM's codebooks and scales, QuIP#'s sign vectors made real-valued) and the decoder's norm
weights. Everything trained is rounded to what will be stored (fp16) before the final
measurement; the result is kept only if the mean KL on the calibration tokens fell. Each
finished epoch is saved beside the output, so an interrupted run resumes there.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from casp.devices import to_device
from casp.quant.stored import StoredLinear

log = logging.getLogger("casp")


def quantized_modules(model: torch.nn.Module) -> dict[str, StoredLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, StoredLinear)}


def norm_weights(model: torch.nn.Module, spec) -> list[torch.nn.Parameter]:
    """The decoder's norm weights (every layer's and the final one)."""
    params = []
    for layer in spec.decoder_layers(model):
        for name, module in layer.named_modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                params.append(module.weight)
    final = model.get_submodule(spec.norm)
    if getattr(final, "weight", None) is not None:
        params.append(final.weight)
    return params


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(p_teacher || p_student)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum()


def _mean_kl(student, teacher_logits: list[torch.Tensor], batches: list[dict], device) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch, target in zip(batches, teacher_logits):
            logits = student(**to_device(batch, device), use_cache=False).logits
            total += float(_kl(target.to(device), logits))
            tokens += logits.shape[0] * logits.shape[1]
    return total / max(tokens, 1)


def finetune_end_to_end(student: torch.nn.Module, teacher: torch.nn.Module, spec,
                        batches: list[dict], epochs: int, lr: float, device: torch.device,
                        state_file: Path | None = None, progress: bool = True) -> dict:
    """Fit ``student``'s continuous parameters to ``teacher`` (see the module docstring);
    returns {"kl_before", "kl_after", "kept", "epochs", "seconds", "trained_parameters"}.
    ``state_file``: where each finished epoch is kept (a rerun with the same file resumes)."""
    start = time.perf_counter()
    student.to(device)
    teacher.to(device).eval()
    with torch.no_grad():
        targets = [teacher(**to_device(b, device), use_cache=False).logits.to(torch.bfloat16)
                   .cpu() for b in batches]
    teacher.to("cpu")
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    modules = quantized_modules(student)
    norms = norm_weights(student, spec)
    originals = [p.detach().clone() for p in norms]
    before = _mean_kl(student, targets, batches, device)
    params = [p for m in modules.values() for p in m.begin_training()]
    for p in norms:
        p.requires_grad_(True)
    params += norms
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
    first = 0
    if state_file is not None and state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        if len(state["params"]) == len(params) and state["epochs"] == epochs:
            with torch.no_grad():
                for p, saved in zip(params, state["params"]):
                    p.copy_(saved)
            opt.load_state_dict(state["optimizer"])
            first = state["epoch"]
            log.info("end-to-end fine-tuning resumes after epoch %d (%s)", first, state_file)
    kept = True
    try:
        for epoch in range(first, epochs):
            bar = tqdm(list(zip(batches, targets)), desc=f"fine-tune epoch {epoch + 1}/{epochs}",
                       unit="batch", disable=not progress)
            for batch, target in bar:
                with torch.enable_grad():
                    logits = student(**to_device(batch, device), use_cache=False).logits
                    loss = _kl(target.to(device), logits) / (logits.shape[0] * logits.shape[1])
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                bar.set_postfix_str(f"KL {loss.item():.4f}")
            if state_file is not None:
                tmp = state_file.with_name(state_file.name + ".tmp")
                torch.save({"epoch": epoch + 1, "epochs": epochs,
                            "params": [p.detach().cpu() for p in params],
                            "optimizer": opt.state_dict()}, tmp)
                tmp.replace(state_file)
        for m in modules.values():
            m.trained_as_stored()
        with torch.no_grad():
            for p in norms:
                p.copy_(p.to(torch.float16).to(p.dtype))
        after = _mean_kl(student, targets, batches, device)
        kept = after < before
    finally:
        for m in modules.values():
            m.end_training(keep=kept)
        with torch.no_grad():
            for p, original in zip(norms, originals):
                p.requires_grad_(False)
                if not kept:
                    p.copy_(original)
        for p in frozen:
            p.requires_grad_(True)
    if not kept:
        after = before
    seconds = time.perf_counter() - start
    log.info("end-to-end fine-tuning: mean KL to the full-precision model %.4f -> %.4f%s "
             "(%.0f s)", before, after, "" if kept else " (no gain: kept the model as it was)",
             seconds)
    return {"kl_before": round(before, 6), "kl_after": round(after, 6), "kept": kept,
            "epochs": epochs, "seconds": round(seconds, 1),
            "trained_parameters": int(sum(p.numel() for p in params))}
