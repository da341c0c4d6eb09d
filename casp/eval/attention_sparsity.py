"""Attention sparsity and the attention error of low-rank W_q, W_k: the CASP paper's figure.

The paper's argument for compressing only W_q and W_k is that the error this causes in the
attention map is bounded by the map's density: the sparser the attention (redundant visual
tokens), the smaller the error. This module measures both sides of that claim, per decoder
layer of the language model, on text-only and on image+text inputs.

What is measured, for each decoder layer and each input sample:

* ``S``: the attention probabilities of the ORIGINAL model, softmax(Q K^T / sqrt(d) + mask)
  per head, with Q and K after the rotary embedding, grouped-query K heads repeated, and
  the mask the model itself builds (causal; sliding windows and padding included when the
  model uses them). Q and K are taken from the layer's own ``q_proj`` / ``k_proj`` on the
  layer's real inputs, captured with a forward pre-hook on the attention module; the score
  matmul and the softmax run in float32. For a Llama-style layer this equals the
  ``output_attentions`` of an eager-attention forward (tested to 1e-5).
* ``S'``: the same attention with ``q_proj`` and ``k_proj`` replaced by those of a casp
  low-rank checkpoint (the output of ``casp lowrank``), fed the SAME inputs: the original
  model's hidden states entering the layer, so the error is this layer's own and not
  accumulated from the layers before it.
* valid entries: the entries the mask lets through (for a causal mask, the lower triangle
  with the diagonal). Masked entries are zero in both maps and are never counted.
* **sparsity** of S: the fraction of valid entries that are negligible, i.e. whose
  probability is below ``threshold / n_i``, where n_i is the number of valid entries in that
  row (the query's context length); the default threshold 0.1 counts an entry as zero when it
  gets less than a tenth of an even share of its row. ``threshold_mode="absolute"`` compares
  with ``threshold`` itself instead. Density = 1 - sparsity.
* **MSE**: the mean of (S - S')^2 over valid entries.

Per layer, both are pooled over heads and samples (counts and squared errors are summed,
then divided), so a longer sample weighs more; per-sample values are kept too. The "mean"
of an input kind is the plain mean over layers.

Why this definition of sparsity: softmax never gives exact zeros, so a threshold is needed.
The CASP paper (arXiv 2503.05936) states its bound in terms of the attention map's density
and plots MSE(S - S') against sparsity (e.g. LLaVA-1.5-7B: about 9.8e-5 at sparsity 0.24,
3.0e-5 at 0.42), but the threshold it used to call an attention value zero could not be
found (neither in the paper material available to this project nor in its released code).
An absolute threshold (say 0.01) would make a sample sparser just for being longer (in a row
of 1000 entries the even share is 0.001), which would confound text with image+text inputs
of other lengths; a threshold relative to the row's even share does not. Our numbers are
therefore comparable with each other, not digit for digit with the paper's figure.

Entry point: :func:`analyse`; command line: ``casp sparsity`` (see :func:`add_parser`).
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from casp.errors import CaspError
from casp.layerwise import LayerPass

log = logging.getLogger("casp")

DEFAULT_THRESHOLD = 0.1
THRESHOLD_MODES = ("relative", "absolute")
# the attention probabilities of one head chunk, original and low-rank, stay under this
ATTENTION_CHUNK_BYTES = 256 * 2**20

SPARSITY_DEFINITION = {
    "relative": "fraction of valid (unmasked, causal) attention entries whose probability is "
                "below threshold / n, n = number of valid entries in the entry's row",
    "absolute": "fraction of valid (unmasked, causal) attention entries whose probability is "
                "below threshold",
}
MSE_DEFINITION = ("mean of (S - S')^2 over valid attention entries, heads and samples; S the "
                  "original model's attention, S' the same with the low-rank W_q, W_k, on the "
                  "original model's inputs of each layer")


# --------------------------------------------------------------------------------------------
# attention of one layer from its Q and K

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (rotary embedding)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [batch, heads, tokens, head_dim] with the model's
    own ``cos``/``sin`` [batch, tokens, head_dim] (what the model passes its attention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def head_dim_of(attention: nn.Module) -> int:
    head_dim = getattr(attention, "head_dim", None)
    if head_dim is None:
        raise CaspError(f"{type(attention).__name__} has no head_dim; the sparsity analysis "
                        "supports Llama-style attention only")
    return int(head_dim)


def queries_and_keys(attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, q_proj: nn.Module | None = None,
                     k_proj: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [batch, heads, tokens, head_dim] and K [batch, kv_heads, tokens, head_dim] after the
    rotary embedding, as the Llama-style ``attention`` computes them from ``hidden`` (its
    input, after the layer norm); ``q_proj``/``k_proj`` replace the layer's own projections."""
    head_dim = head_dim_of(attention)
    q_proj = q_proj if q_proj is not None else attention.q_proj
    k_proj = k_proj if k_proj is not None else attention.k_proj
    shape = (*hidden.shape[:-1], -1, head_dim)
    query = q_proj(hidden).view(shape).transpose(1, 2)
    key = k_proj(hidden).view(shape).transpose(1, 2)
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


@dataclass
class AttentionMask:
    """Which entries of a [tokens x tokens] attention map are valid, and what the model adds
    to the scores (None: nothing beyond masking)."""

    valid: torch.Tensor                 # bool [heads or 1, tokens, tokens]
    bias: torch.Tensor | None = None    # float, same shape, added to the scores


def sample_mask(attention_mask, sample: int, tokens: int, device) -> AttentionMask:
    """The mask of one sample from what the model passed its attention: None (plain causal,
    SDPA's shortcut), a boolean mask (True = attend) or an additive float mask (eager: 0 or
    the dtype's minimum), each [batch, 1 or heads, tokens, tokens]."""
    if attention_mask is None:
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
        return AttentionMask(causal[None])
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise CaspError(f"the model passes its attention a {type(attention_mask).__name__} mask; "
                        "the sparsity analysis needs eager or SDPA attention (load the model "
                        "with one of them)")
    mask = attention_mask[sample if attention_mask.shape[0] > 1 else 0].to(device)
    mask = mask[..., -tokens:, -tokens:]
    if mask.dtype == torch.bool:
        return AttentionMask(mask)
    valid = mask > torch.finfo(mask.dtype).min / 2
    return AttentionMask(valid, mask.float())


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, scaling: float,
                            mask: AttentionMask) -> torch.Tensor:
    """softmax(query key^T * scaling + mask) in float32, rows with no valid entry all zero.
    ``query`` [heads, tokens, d], ``key`` [heads, tokens, d] (KV heads already repeated)."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if mask.bias is not None:
        scores = scores + mask.bias
    scores = scores.masked_fill(~mask.valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def negligible(probs: torch.Tensor, valid: torch.Tensor, threshold: float,
               mode: str = "relative") -> torch.Tensor:
    """Boolean map of the valid entries that count as zero (see the module docstring)."""
    if mode == "relative":
        row_length = valid.sum(dim=-1, keepdim=True).clamp_min(1)
        limit = threshold / row_length
    elif mode == "absolute":
        limit = threshold
    else:
        raise CaspError(f"threshold mode {mode!r} is not one of {', '.join(THRESHOLD_MODES)}")
    return (probs < limit) & valid


def attention_sparsity(probs: torch.Tensor, valid: torch.Tensor | None = None,
                       threshold: float = DEFAULT_THRESHOLD, mode: str = "relative") -> float:
    """Sparsity of attention maps ``probs`` [..., tokens, tokens]: the fraction of valid
    entries (``valid``; default: the causal lower triangle) that are negligible."""
    if valid is None:
        n = probs.shape[-1]
        valid = torch.ones(n, n, dtype=torch.bool, device=probs.device).tril()
    valid = valid.expand_as(probs)
    return negligible(probs, valid, threshold, mode).sum().item() / max(1, valid.sum().item())


def head_chunks(heads: int, tokens: int, budget: int | None = None) -> list[range]:
    """Split the heads so that one chunk's float32 attention maps (original, low-rank and a
    few temporaries, about 4 of them) stay under ``budget`` bytes (default:
    ``ATTENTION_CHUNK_BYTES``)."""
    budget = ATTENTION_CHUNK_BYTES if budget is None else budget
    per_head = 4 * 4 * tokens * tokens
    size = max(1, min(heads, budget // max(1, per_head)))
    return [range(start, min(heads, start + size)) for start in range(0, heads, size)]


@dataclass
class SampleStats:
    """Sums over one sample's heads and valid entries, for one layer."""

    valid: int = 0
    negligible: int = 0
    squared_error: float = 0.0

    def add(self, other: "SampleStats") -> None:
        self.valid += other.valid
        self.negligible += other.negligible
        self.squared_error += other.squared_error

    @property
    def sparsity(self) -> float:
        return self.negligible / self.valid if self.valid else float("nan")

    @property
    def mse(self) -> float:
        return self.squared_error / self.valid if self.valid else float("nan")


def compare_sample(attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, mask: AttentionMask, q_proj: nn.Module,
                   k_proj: nn.Module, threshold: float, mode: str) -> SampleStats:
    """Sparsity counts of the original attention of ONE sample (``hidden`` [1, tokens, dim])
    and its squared error against the attention with ``q_proj``/``k_proj``."""
    query, key = queries_and_keys(attention, hidden, cos, sin)
    query_lr, key_lr = queries_and_keys(attention, hidden, cos, sin, q_proj, k_proj)
    heads, kv_heads, tokens = query.shape[1], key.shape[1], query.shape[2]
    if heads % kv_heads or query_lr.shape != query.shape or key_lr.shape != key.shape:
        raise CaspError(f"the low-rank W_q/W_k give Q {tuple(query_lr.shape)}, K "
                        f"{tuple(key_lr.shape)} where the model has {tuple(query.shape)}, "
                        f"{tuple(key.shape)}: the checkpoint is not of this model")
    group = heads // kv_heads
    stats = SampleStats()
    for chunk in head_chunks(heads, tokens):
        q_index = torch.tensor(list(chunk), device=query.device)
        kv_index = q_index // group          # repeat_kv: query head h reads KV head h // group
        chunk_mask = mask if mask.valid.shape[0] == 1 else AttentionMask(
            mask.valid[q_index], None if mask.bias is None else mask.bias[q_index])
        s = attention_probabilities(query[0, q_index], key[0, kv_index], attention.scaling,
                                    chunk_mask)
        s_lr = attention_probabilities(query_lr[0, q_index], key_lr[0, kv_index],
                                       attention.scaling, chunk_mask)
        valid = chunk_mask.valid.expand_as(s)
        stats.valid += int(valid.sum().item())
        stats.negligible += int(negligible(s, valid, threshold, mode).sum().item())
        diff = torch.where(valid, s - s_lr, torch.zeros((), device=s.device))
        stats.squared_error += float(diff.double().pow(2).sum().item())
        del s, s_lr, diff
    return stats


def _attention_call(args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:
        raise CaspError("the attention module receives no position embeddings; the sparsity "
                        "analysis supports Llama-style (rotary) attention only")
    return hidden, position_embeddings, kwargs.get("attention_mask")


def attention_module_name(spec) -> str:
    """The attention module of a decoder layer (the parent of W_q), e.g. ``self_attn``."""
    return spec.lowrank_targets[0].rsplit(".", 1)[0]


@torch.no_grad()
def attention_maps(model: nn.Module, spec, inputs: dict) -> list[torch.Tensor]:
    """The original attention probabilities [batch, heads, tokens, tokens] of every decoder
    layer on ``inputs``, from Q and K as :func:`compare_sample` computes them (for checks
    against ``output_attentions``)."""
    maps: list[torch.Tensor] = []
    handles = []

    def hook(attention, args, kwargs):
        hidden, (cos, sin), attention_mask = _attention_call(args, kwargs)
        query, key = queries_and_keys(attention, hidden, cos, sin)
        group = query.shape[1] // key.shape[1]
        per_sample = []
        for b in range(hidden.shape[0]):
            mask = sample_mask(attention_mask, b, hidden.shape[1], hidden.device)
            per_sample.append(attention_probabilities(
                query[b], key[b].repeat_interleave(group, dim=0), attention.scaling, mask))
        maps.append(torch.stack(per_sample))

    name = attention_module_name(spec)
    for layer in spec.decoder_layers(model):
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return maps


# --------------------------------------------------------------------------------------------
# the low-rank checkpoint

@dataclass
class LowRankQK:
    """The W_q, W_k modules of every decoder layer of a low-rank checkpoint."""

    source: str
    architecture: str
    q_proj: list[nn.Module]
    k_proj: list[nn.Module]
    ranks: list[dict]                   # per layer {"q": rank or None, "k": ...}; None = dense
    embedding_rows: torch.Tensor        # a sample of the embedding rows, to check the base
    stages: list[str] = field(default_factory=list)


def _embedding_rows(model: nn.Module, count: int = 64) -> torch.Tensor:
    weight = model.get_input_embeddings().weight.detach()
    index = torch.linspace(0, weight.shape[0] - 1, min(count, weight.shape[0])).long()
    return weight[index].float().cpu().clone()


def load_lowrank_qk(path: str, dtype: str = "auto", device: str = "auto") -> LowRankQK:
    """Load a casp checkpoint whose W_q/W_k are low-rank and keep only those modules (on the
    CPU) and what is needed to check it against the original model."""
    from casp.checkpoint import load_checkpoint, read_casp_section
    from casp.lowrank import LowRankLinear

    if not Path(path).is_dir():
        raise CaspError(f"--lowrank {path} does not exist; give the checkpoint directory that "
                        "casp lowrank wrote")
    section = read_casp_section(path)
    if section is None:
        raise CaspError(f"--lowrank {path} is not a casp checkpoint (no config.json with a casp "
                        "section); give the output of casp lowrank")
    if not any(d.get("type") == "lowrank" for d in section.get("modules", {}).values()):
        raise CaspError(f"--lowrank {path} has no low-rank modules (its stages: "
                        f"{', '.join(s['stage'] for s in section.get('stages', [])) or 'none'}); "
                        "give the output of casp lowrank")
    loaded = load_checkpoint(path, dtype=dtype, device=device, with_preprocessors=False)
    spec, model = loaded.spec, loaded.model
    q_name, k_name = spec.lowrank_targets
    q_mods, k_mods, ranks = [], [], []
    for layer in spec.decoder_layers(model):
        q, k = layer.get_submodule(q_name), layer.get_submodule(k_name)
        q_mods.append(q)
        k_mods.append(k)
        ranks.append({"q": q.rank if isinstance(q, LowRankLinear) else None,
                      "k": k.rank if isinstance(k, LowRankLinear) else None})
    if not any(r["q"] or r["k"] for r in ranks):
        raise CaspError(f"--lowrank {path} has no low-rank W_q or W_k; give the output of casp "
                        "lowrank")
    stages = [s["stage"] for s in section.get("stages", [])]
    if stages != ["lowrank"]:
        log.warning("%s went through %s: S' includes what the later stages did to the "
                    "factors, not only the low rank", path, " + ".join(stages))
    return LowRankQK(source=path, architecture=type(model).__name__, q_proj=q_mods,
                     k_proj=k_mods, ranks=ranks, embedding_rows=_embedding_rows(model),
                     stages=stages)


def check_same_base(lowrank: LowRankQK, loaded) -> None:
    """Refuse an original model the low-rank checkpoint was not made from: another
    architecture, layer count or projection shape, or other embeddings (no stage ever
    changes the embeddings); and an "original" whose W_q/W_k are not dense linears."""
    model, spec = loaded.model, loaded.spec
    arch = type(model).__name__
    if arch != lowrank.architecture:
        raise CaspError(f"--model is a {arch} but --lowrank {lowrank.source} is a "
                        f"{lowrank.architecture}; give the model the checkpoint was made from")
    layers = spec.decoder_layers(model)
    if len(layers) != len(lowrank.q_proj):
        raise CaspError(f"--model has {len(layers)} decoder layers but --lowrank "
                        f"{lowrank.source} has {len(lowrank.q_proj)}; give the model the "
                        "checkpoint was made from")
    q_name, k_name = spec.lowrank_targets
    for i, layer in enumerate(layers):
        for name, replacement in ((q_name, lowrank.q_proj[i]), (k_name, lowrank.k_proj[i])):
            dense = layer.get_submodule(name)
            if not isinstance(dense, nn.Linear):
                raise CaspError(f"--model's {spec.layer_prefix(i)}.{name} is a "
                                f"{type(dense).__name__}, not a dense linear; give the original "
                                "model (before casp lowrank)")
            shape = (replacement.out_features, replacement.in_features)
            if tuple(dense.weight.shape) != shape:
                raise CaspError(f"{spec.layer_prefix(i)}.{name} is {tuple(dense.weight.shape)} in "
                                f"--model but {shape} in --lowrank {lowrank.source}; give the "
                                "model the checkpoint was made from")
    rows = _embedding_rows(model)
    reference = lowrank.embedding_rows
    scale = reference.abs().max().clamp_min(1e-12)
    if rows.shape != reference.shape or (rows - reference).abs().max() > 1e-2 * scale:
        raise CaspError(f"--model's embeddings differ from those of --lowrank {lowrank.source}: "
                        "the checkpoint was made from another model; give the model it was "
                        "made from")


# --------------------------------------------------------------------------------------------
# the analysis

class AttentionErrorPass(LayerPass):
    """Leaves the layer unchanged; on its inputs, collects the sparsity of the original
    attention and its error against the attention with the low-rank W_q, W_k."""

    name = "attention"

    def __init__(self, lowrank: LowRankQK, threshold: float, mode: str, label: str):
        self.lowrank, self.threshold, self.mode = lowrank, threshold, mode
        self.name = f"attention ({label})"
        self.per_layer: list[list[SampleStats]] = []   # [layer][sample]

    def settings(self) -> dict:
        return {"threshold": self.threshold, "mode": self.mode}

    def process(self, ctx) -> None:
        q_proj = self.lowrank.q_proj[ctx.index].to(ctx.device)
        k_proj = self.lowrank.k_proj[ctx.index].to(ctx.device)
        samples: list[SampleStats] = []

        def hook(attention, args, kwargs):
            hidden, (cos, sin), attention_mask = _attention_call(args, kwargs)
            for b in range(hidden.shape[0]):
                mask = sample_mask(attention_mask, b, hidden.shape[1], hidden.device)
                samples.append(compare_sample(
                    attention, hidden[b: b + 1], cos[b: b + 1] if cos.shape[0] > 1 else cos,
                    sin[b: b + 1] if sin.shape[0] > 1 else sin, mask, q_proj, k_proj,
                    self.threshold, self.mode))

        attention = ctx.module(attention_module_name(ctx.spec))
        handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            ctx.outputs = ctx.forward()     # the original layer's outputs feed the next
        finally:
            handle.remove()
            self.lowrank.q_proj[ctx.index].to("cpu")
            self.lowrank.k_proj[ctx.index].to("cpu")
        self.per_layer.append(samples)


def _visual_token_fraction(model: nn.Module, batches: list[dict]) -> float | None:
    ids = [getattr(model.config, name, None) for name in
           ("image_token_id", "image_token_index", "video_token_id", "video_token_index")]
    ids = {i for i in ids if isinstance(i, int)}
    if not ids:
        return None
    visual = total = 0
    for batch in batches:
        input_ids = torch.as_tensor(batch["input_ids"])
        total += input_ids.numel()
        visual += sum(int((input_ids == i).sum()) for i in ids)
    return visual / max(1, total)


def summarise(per_layer: list[list[SampleStats]]) -> dict:
    """Per-layer pooled sparsity and MSE, their means over layers, per-sample values."""
    pooled = []
    for samples in per_layer:
        total = SampleStats()
        for s in samples:
            total.add(s)
        pooled.append(total)
    sparsity = [p.sparsity for p in pooled]
    mse = [p.mse for p in pooled]
    return {
        "per_layer": {"sparsity": sparsity, "mse": mse},
        "mean": {"sparsity": sum(sparsity) / len(sparsity), "mse": sum(mse) / len(mse)},
        "per_sample": {"sparsity": [[s.sparsity for s in samples] for samples in per_layer],
                       "mse": [[s.mse for s in samples] for samples in per_layer]},
        "valid_entries_per_layer": pooled[0].valid if pooled else 0,
    }


@torch.no_grad()
def analyse_batches(loaded, lowrank: LowRankQK, batches: list[dict], device: torch.device,
                    threshold: float, mode: str, label: str, progress: bool = True) -> dict:
    """Sparsity and MSE per layer of ``loaded`` (the original model) on ``batches``, layer
    by layer through the layer-wise engine (one layer on the device at a time)."""
    from casp.data.calibration import token_count
    from casp.layerwise import capture_layer_inputs, run_layerwise

    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, device)
    layer_pass = AttentionErrorPass(lowrank, threshold, mode, label)
    run_layerwise(loaded.model, loaded.spec, inputs, [layer_pass], device, progress=progress)
    result = summarise(layer_pass.per_layer)
    lengths = [int(torch.as_tensor(b["input_ids"]).shape[-1]) for b in batches]
    result = {"samples": sum(int(torch.as_tensor(b["input_ids"]).shape[0]) for b in batches),
              "tokens": token_count(batches), "tokens_per_sample": {"min": min(lengths),
                                                                    "max": max(lengths)},
              **result}
    fraction = _visual_token_fraction(loaded.model, batches)
    if fraction is not None:
        result["visual_token_fraction"] = fraction
    return result


@dataclass
class SparsityConfig:
    """What ``casp sparsity`` analyses and how."""

    model: str
    lowrank: str
    dataset: str = "wiki"
    split: str | None = None
    text_field: str = "text"
    nsamples: int = 16
    seqlen: int = 1024
    seed: int = 3
    mm_data: str | None = None
    image_root: str | None = None
    mm_samples: int = 16
    threshold: float = DEFAULT_THRESHOLD
    threshold_mode: str = "relative"
    out: str = "assets"
    name: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def check(self) -> None:
        if self.threshold_mode not in THRESHOLD_MODES:
            raise CaspError(f"--threshold-mode {self.threshold_mode!r} is not one of "
                            f"{', '.join(THRESHOLD_MODES)}")
        if not self.threshold > 0 or (self.threshold_mode == "absolute" and self.threshold >= 1):
            raise CaspError(f"--threshold {self.threshold} is out of range; give a positive "
                            "multiple of the row's even share (relative, e.g. 0.1) or a "
                            "probability in (0, 1) (absolute, e.g. 0.01)")
        from casp.assets import is_builtin_model

        hub_id = self.model.count("/") == 1 and not self.model.startswith((".", "/", "~"))
        if not (Path(self.model).exists() or hub_id or is_builtin_model(self.model)):
            raise CaspError(f"--model {self.model} does not exist; check the path")
        from casp.data.easy_vqa import is_builtin

        if self.mm_data and not (Path(self.mm_data).is_file() or is_builtin(self.mm_data)):
            raise CaspError(f"--mm-data {self.mm_data} does not exist; give a LLaVA-Instruct "
                            "JSON file")
        if self.image_root and not Path(self.image_root).is_dir():
            raise CaspError(f"--image-root {self.image_root} is not a directory")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise CaspError(f"--out {out} is a file; give a directory")
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", self.output_name()):
            raise CaspError(f"--name {self.output_name()!r} may only use letters, digits and "
                            "._+-")

    def output_name(self) -> str:
        return self.name or Path(self.lowrank).resolve().name

    def paths(self) -> tuple[Path, Path]:
        stem = Path(self.out) / f"attention_sparsity_{self.output_name()}"
        return stem.with_suffix(".json"), stem.with_suffix(".png")


def analyse(cfg: SparsityConfig, progress: bool = True) -> dict:
    """Run the whole analysis of ``cfg`` and return the report (what the JSON holds)."""
    from casp.data.calibration import CalibrationConfig, calibration_batches
    from casp.loading import load_pretrained, resolve_device
    from casp.version import __version__

    cfg.check()
    device = resolve_device(cfg.device)
    lowrank = load_lowrank_qk(cfg.lowrank, dtype=cfg.dtype, device=cfg.device)
    if cfg.mm_data:
        from casp.models import spec_for_architecture

        if not spec_for_architecture(lowrank.architecture).multimodal:
            raise CaspError(f"--mm-data needs a multimodal model; {lowrank.architecture} takes "
                            "text only")
    loaded = load_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
    check_same_base(lowrank, loaded)
    text_cfg = CalibrationConfig(dataset=cfg.dataset, split=cfg.split, text_field=cfg.text_field,
                                 nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
                                 batch_size=1)
    kinds = {"text": calibration_batches(loaded, text_cfg)}
    if cfg.mm_data:
        mm_cfg = CalibrationConfig(mm_data=cfg.mm_data, image_root=cfg.image_root,
                                   nsamples=cfg.mm_samples, seed=cfg.seed, batch_size=1)
        try:
            kinds["image_text"] = calibration_batches(loaded, mm_cfg)
        except CaspError as exc:   # its messages name the calibration flag
            raise CaspError(str(exc).replace("--nsamples", "--mm-samples"))
    report = {
        "settings": {
            "model": cfg.model, "lowrank": cfg.lowrank, "lowrank_stages": lowrank.stages,
            "architecture": lowrank.architecture,
            "threshold": cfg.threshold, "threshold_mode": cfg.threshold_mode,
            "sparsity_definition": SPARSITY_DEFINITION[cfg.threshold_mode],
            "mse_definition": MSE_DEFINITION,
            "text": {"dataset": cfg.dataset, "split": cfg.split, "nsamples": cfg.nsamples,
                     "seqlen": cfg.seqlen, "seed": cfg.seed},
            "image_text": ({"mm_data": cfg.mm_data, "image_root": cfg.image_root,
                            "nsamples": cfg.mm_samples, "seed": cfg.seed}
                           if cfg.mm_data else None),
            "device": str(device), "dtype": str(next(loaded.model.parameters()).dtype),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "casp_version": __version__,
        },
        "layers": len(lowrank.q_proj),
        "ranks": lowrank.ranks,
    }
    labels = {"text": "text", "image_text": "image+text"}
    for kind, batches in kinds.items():
        report[kind] = analyse_batches(loaded, lowrank, batches, device, cfg.threshold,
                                       cfg.threshold_mode, labels[kind], progress=progress)
    return report


# --------------------------------------------------------------------------------------------
# output
