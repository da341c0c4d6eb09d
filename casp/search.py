"""Stage 2, measured: each layer's options scored by what they do to the model's output.

The block-influence allocation models a layer's error at b bits as w_i n_i 2^(-2b) and
takes the low-rank stage as given. Here every option of every layer is built for real and
measured instead:

    options of layer i:  W_q/W_k dense or low-rank (each compression asked for)
                         x each allowed width (the quantizer of the plan, on the
                           calibration data, with the layer's real inputs; a low-rank
                           option reuses the other linears of the dense option at its
                           width, quantized after the dense W_q/W_k: one quantization per
                           width instead of two)
    score of an option:  KL(p_fp || p_option), the mean over the measured calibration
                         tokens of the divergence of the model's next-token distribution
                         when layer i alone takes the option (every other layer in full
                         precision; layers after i run on the changed outputs)

then the multiple-choice knapsack (:func:`casp.allocation.solve_choices`) picks one option
per layer minimising the summed divergence at the budget. A layer is low-rank only where
that pays: where W_q/W_k are cheap to cut, the bits saved go to the layers where a wider
code helps most, and where cutting them costs more than the bits buy, they stay dense. The
plan lists the chosen ranks; ``casp lowrank --plan`` applies them to the original model
before the quantizer runs with the same plan.

Cost: each layer is quantized once per width (the low-rank factors once more), and the
layers after it run once per option on the measured tokens.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .allocation import (BitPlan, SettingRules, dense_parameters, plan_meta, solve_choices)
from .errors import CaspError
from .layerwise import LayerContext, LayerPass, _to, fingerprint
from .lowrank import LowRankLinear, LowRankPass, saves_parameters
from .quant.common import layer_quantization_groups

log = logging.getLogger("casp")


@dataclass(frozen=True)
class Option:
    """One way to store a layer: W_q/W_k low-rank at ``compression`` (None: dense) and the
    layer's width."""
    compression: float | None
    bits: int

    @property
    def label(self) -> str:
        shape = "dense" if self.compression is None else f"lowrank{self.compression:g}"
        return f"{shape}@{self.bits}"


def layer_shapes(ctx: LayerContext, layer: nn.Module) -> dict[str, list[int]]:
    """(out, in) of each quantizable linear of a (variant of a) layer, by full name."""
    return {ctx.full_name(n): list(layer.get_submodule(n).weight.shape)
            for g in layer_quantization_groups(layer, ctx.spec) for n in g}


class SensitivityPass(LayerPass):
    """Measures every option of every layer; changes nothing (the next layer sees the
    original outputs). ``measured[i]`` after the walk: {label: {"kl", "shapes", "ranks"}}.

    Args:
        model: the whole model (the layers after the current one, the final norm and the
            output projection turn a layer's outputs into next-token distributions).
        quantizer: builds the quantizer pass for a plan ({full name: plan entry}).
        rules: how each module at a width is stored (groups, factor bits, codebooks).
        widths: the allowed layer widths.
        compressions: low-rank compressions to try for W_q/W_k (empty: dense only).
        rank_multiple: low-rank ranks rounded down to a multiple of this.
        measure_batches: calibration batches whose output divergence is measured (the
            quantizers use every batch).
        record: a JSON file keeping each finished layer's measurements: an interrupted
            search resumes, and a plan at another budget reuses them.
        identity: what the measurements are of (model, calibration): a record of anything
            else is not reused.
    """

    name = "sensitivity"
    propagate = "original"

    def __init__(self, model: nn.Module, quantizer: Callable[[dict], LayerPass],
                 quantizer_settings: dict, rules: SettingRules, widths: list[int],
                 compressions: list[float], rank_multiple: int = 1, measure_batches: int = 1,
                 record: str | Path | None = None, identity: dict | None = None):
        if measure_batches < 1:
            raise CaspError("--search-samples must be at least 1")
        self.model, self.quantizer, self.rules = model, quantizer, rules
        self.quantizer_settings = quantizer_settings
        self.widths, self.compressions = sorted(widths), sorted(compressions)
        self.rank_multiple, self.measure_batches = rank_multiple, measure_batches
        self.record = Path(record) if record else None
        if self.record is not None and self.record.is_dir():
            raise CaspError(f"--measurements {self.record} is a directory; give a file path "
                            "(e.g. plan.measured.json)")
        self.identity = identity or {}
        self.measured: dict[int, dict] = {}
        self.reference: list[torch.Tensor] | None = None
        self._load_record()

    def settings(self) -> dict:
        return {"quantizer": self.quantizer_settings, "rules": self.rules.meta(),
                "widths": self.widths, "compressions": self.compressions,
                "rank_multiple": self.rank_multiple, "measure_batches": self.measure_batches}

    def options(self) -> list[Option]:
        return [Option(c, b) for c in [None, *self.compressions] for b in self.widths]

    # -- resume -------------------------------------------------------------------------

    def _key(self) -> str:
        return fingerprint({**self.settings(), "identity": self.identity})

    def _load_record(self) -> None:
        if self.record is None or not self.record.is_file():
            return
        try:
            data = json.loads(self.record.read_text())
        except json.JSONDecodeError:
            return
        if data.get("key") == self._key():
            self.measured = {int(i): m for i, m in data.get("layers", {}).items()}
            if self.measured:
                log.info("measurements of layers %s restored from %s", sorted(self.measured),
                         self.record)

    def _save_record(self) -> None:
        if self.record is None:
            return
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps({"key": self._key(), "settings": self.settings(),
                                   "layers": self.measured}, indent=1))
        tmp.replace(self.record)

    # -- measuring ----------------------------------------------------------------------

    def _tail_logprobs(self, ctx: LayerContext, layer: nn.Module, batch: int):
        """Next-token log-probabilities of the model with ``layer`` in place of layer
        ``ctx.index`` on one calibration batch, in chunks of positions."""
        spec, device = ctx.spec, ctx.device
        kwargs = _to(ctx.inputs.kwargs[batch], device)
        h = layer(ctx.inputs.hidden[batch].to(device), **kwargs)
        h = h[0] if isinstance(h, tuple) else h
        decoder = spec.decoder_layers(self.model)
        for k in range(ctx.index + 1, len(decoder)):
            moved = decoder[k].to(device)
            out = moved(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            if device.type != "cpu":
                decoder[k] = moved.to("cpu")
        norm = self.model.get_submodule(spec.norm).to(device)
        head = self.model.get_submodule(spec.head).to(device)
        flat = norm(h).reshape(-1, h.shape[-1])
        try:
            for start in range(0, flat.shape[0], 1024):
                logits = head(flat[start:start + 1024]).float()
                yield torch.log_softmax(logits, dim=-1)
        finally:
            if device.type != "cpu":              # only the current layer stays on the device
                norm.to("cpu")
                head.to("cpu")

    @torch.no_grad()
    def _divergence(self, ctx: LayerContext, layer: nn.Module) -> float:
        """Mean KL(p_fp || p) over the measured tokens, ``layer`` in place of layer i."""
        total, count = 0.0, 0
        for j in range(min(self.measure_batches, len(ctx.inputs.hidden))):
            chunks = self._tail_logprobs(ctx, layer, j)
            offset = 0
            for logp in chunks:
                ref = self.reference[j][offset:offset + logp.shape[0]].to(logp.device)
                offset += logp.shape[0]
                total += float((ref.exp() * (ref - logp)).sum())
                count += logp.shape[0]
        value = total / max(count, 1)
        if not math.isfinite(value):
            raise CaspError(f"layer {ctx.index}: an option made the model's outputs non-finite "
                            "(an overflow at this dtype?); rerun with --dtype float32")
        return max(value, 0.0)

    @torch.no_grad()
    def _ensure_reference(self, ctx: LayerContext) -> None:
        if self.reference is not None:
            return
        self.reference = []
        for j in range(min(self.measure_batches, len(ctx.inputs.hidden))):
            self.reference.append(torch.cat([c.cpu() for c in
                                             self._tail_logprobs(ctx, ctx.layer, j)]))

    def _quantized(self, ctx: LayerContext, layer: nn.Module, width: int,
                   only: tuple[str, ...] | None = None) -> nn.Module:
        """``layer`` (changed in place) with its linears (or those of ``only``) quantized
        at ``width`` by the plan's quantizer, on the layer's calibration inputs."""
        sub = LayerContext(ctx.index, layer, ctx.spec, ctx.inputs, ctx.device)
        sub.only = only
        plan = {name: self.rules.entry(name, width, shape)
                for name, shape in layer_shapes(sub, layer).items()}
        self.quantizer(plan).process(sub)
        return layer

    def process(self, ctx: LayerContext) -> None:
        if ctx.index in self.measured:
            return
        start = time.perf_counter()
        self._ensure_reference(ctx)
        results: dict[str, dict] = {}
        shapes = layer_shapes(ctx, ctx.layer)
        quantized = {}
        for b in self.widths:
            quantized[b] = self._quantized(ctx, copy.deepcopy(ctx.layer), b)
            results[Option(None, b).label] = {"kl": self._divergence(ctx, quantized[b]),
                                              "shapes": shapes, "ranks": {}}
        targets = ctx.spec.lowrank_targets
        for c in self.compressions:
            lowrank = copy.deepcopy(ctx.layer)
            sub = LayerContext(ctx.index, lowrank, ctx.spec, ctx.inputs, ctx.device)
            LowRankPass(compression=c, rank_multiple=self.rank_multiple,
                        targets=targets).process(sub)
            ranks = {ctx.full_name(t): lowrank.get_submodule(t).rank for t in targets
                     if isinstance(lowrank.get_submodule(t), LowRankLinear)}
            if not ranks:
                continue                       # nothing to save at this compression
            lr_shapes = layer_shapes(ctx, lowrank)
            # the factors' quantization depends on the layer width only when they take it
            factor_widths = ([None] if self.rules.factor_bits is not None else self.widths)
            cut = tuple(full[len(ctx.prefix) + 1:] for full in ranks)
            factors = {w: self._quantized(ctx, copy.deepcopy(lowrank), w or self.widths[0],
                                          only=cut) for w in factor_widths}
            for b in self.widths:
                # an approximation that saves a quantization per width: the layer's other
                # linears are those of the dense option at b (quantized after the dense
                # q/k, not after the factors, as the real run does)
                variant = copy.deepcopy(quantized[b])
                source = factors[None if self.rules.factor_bits is not None else b]
                for full in ranks:                # the factorised ones; the rest as at b
                    t = full[len(ctx.prefix) + 1:]
                    variant.set_submodule(t, copy.deepcopy(source.get_submodule(t)))
                results[Option(c, b).label] = {"kl": self._divergence(ctx, variant),
                                               "shapes": lr_shapes, "ranks": ranks}
        self.measured[ctx.index] = results
        self._save_record()
        summary = ", ".join(f"{k} {v['kl']:.4g}" for k, v in results.items())
        log.info("layer %d measured in %.1f s: KL %s", ctx.index, time.perf_counter() - start,
                 summary)


def check_feasible(model: nn.Module, spec, rules: SettingRules, widths: list[int],
                   compressions: list[float], rank_multiple: int, budget: float) -> None:
    """Before any measuring: every module's shape must suit every setting it may get (the
    low-rank factors' too), and the budget must cover every layer's cheapest option."""
    total = 0
    for index, layer in enumerate(spec.decoder_layers(model)):
        prefix = spec.layer_prefix(index)
        variants = []
        for cut in [None, *compressions]:
            helper = LowRankPass(compression=cut or 0.5, rank_multiple=rank_multiple)
            shapes = {}
            for group in layer_quantization_groups(layer, spec):
                for name in group:
                    out_f, in_f = layer.get_submodule(name).weight.shape
                    full = f"{prefix}.{name}"
                    rank = helper.rank_for(full, out_f, in_f) if cut else 0
                    if name in spec.lowrank_targets and saves_parameters(out_f, in_f, rank):
                        shapes[f"{full}.down"], shapes[f"{full}.up"] = (rank, in_f), (out_f, rank)
                    else:
                        shapes[full] = (out_f, in_f)
            for name, shape in shapes.items():
                for b in widths:
                    rules.setting(name, b).check(*shape, name=name)
            variants.append(shapes)
        total += min(rules.layer_cost(shapes, b) for shapes in variants for b in widths)
    need = total / dense_parameters(model, spec)
    if need > budget:
        raise CaspError(f"budget {budget:.4f} bits cannot be met: the cheapest options already "
                        f"need {need:.4f} average bits; raise --budget, allow fewer bits or "
                        "add low-rank options")


def measured_plan(model: nn.Module, spec, measured: dict[int, dict], rules: SettingRules,
                  widths: list[int], budget: float, compressions: list[float],
                  rank_multiple: int) -> BitPlan:
    """Solve the knapsack on the measurements and write the plan: every module of the
    model as it will be after the chosen low-rank factorisations, and the ranks."""
    dense = dense_parameters(model, spec)
    n_layers = len(spec.decoder_layers(model))
    missing = [i for i in range(n_layers) if i not in measured]
    if missing:
        raise CaspError(f"no measurements for layer {missing[0]}")
    options = []
    for i in range(n_layers):
        opts = {}
        for label, m in measured[i].items():
            bits = int(label.rsplit("@", 1)[1])
            shapes = {n: tuple(s) for n, s in m["shapes"].items()}
            opts[label] = (rules.layer_cost(shapes, bits), m["kl"])
        options.append(opts)
    budget_total = int(math.floor(budget * dense))
    try:
        chosen = solve_choices(options, budget_total)
    except CaspError:
        lowest = sum(min(c for c, _ in o.values()) for o in options) / dense
        raise CaspError(f"budget {budget} bits cannot be met: the cheapest options already "
                        f"need {lowest:.4f} average bits; raise --budget, allow fewer bits or "
                        "add low-rank options")
    modules, layers_out, ranks, total = {}, [], {}, 0
    for i, label in enumerate(chosen):
        m = measured[i][label]
        bits = int(label.rsplit("@", 1)[1])
        for name, shape in m["shapes"].items():
            modules[name] = rules.entry(name, bits, shape)
        ranks.update(m["ranks"])
        cost = options[i][label][0]
        total += cost
        lowrank = label.split("@")[0]
        layers_out.append({"layer": i, "bits": bits,
                           "lowrank": None if lowrank == "dense" else float(lowrank[7:]),
                           "kl": round(m["kl"], 8), "stored_bits": cost,
                           "measured": {k: round(v["kl"], 8) for k, v in measured[i].items()}})
    meta = plan_meta(budget, total, dense, sorted(widths), rules, model)
    meta["allocation"] = "measured"
    meta["lowrank"] = {"compressions": sorted(compressions), "rank_multiple": rank_multiple,
                       "method": "whitened", "ranks": ranks}
    return BitPlan(modules=modules, layers=layers_out, meta=meta)


def plan_ranks(plan: BitPlan) -> dict[str, int] | None:
    """The low-rank ranks a measured plan chose ({} or None: it chose no low-rank step)."""
    lowrank = plan.meta.get("lowrank")
    return dict(lowrank["ranks"]) if lowrank else None


def format_measured_table(plan: BitPlan) -> str:
    lines = ["| layer | W_q/W_k | bits | KL of the choice | KL dense at the lowest width |",
             "|---|---|---|---|---|"]
    lowest = min(plan.meta["allowed_bits"])
    for row in plan.layers:
        shape = "dense" if row["lowrank"] is None else f"low-rank {row['lowrank']:g}"
        base = row["measured"].get(f"dense@{lowest}")
        lines.append(f"| {row['layer']} | {shape} | {row['bits']} | {row['kl']:.4g} | "
                     f"{'-' if base is None else f'{base:.4g}'} |")
    m = plan.meta
    n_lr = sum(r["lowrank"] is not None for r in plan.layers)
    lines += ["", f"budget {m['budget_bits']} bits; achieved {m['achieved_bits']:.4f} average "
              f"bits over {m['dense_parameters']:,} original dense weights; {n_lr} of "
              f"{len(plan.layers)} layers take low-rank W_q/W_k; summed KL "
              f"{sum(r['kl'] for r in plan.layers):.4g} (measured one layer at a time)"]
    return "\n".join(lines)
