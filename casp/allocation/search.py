"""Stage 2, measured: each part of each layer scored by what it does to the model's output.

The block-influence allocation models a layer's error at b bits as w_i n_i 2^(-2b) and
takes the low-rank stage as given. Here the options are built for real and measured:

    parts of layer i:    W_q/W_k, the other attention linears (W_v/W_o), the MLP
    options of a part:   each allowed width (the plan's quantizer on the calibration data,
                         with the layer's real inputs); W_q/W_k also low-rank at each
                         compression asked for, its factors at the factor bits
    score of an option:  KL(p_fp || p_option), the mean over the measured calibration
                         tokens of the divergence of the model's next-token distribution
                         when that part alone takes the option (every other part and layer
                         in full precision), either measured by running the layers after
                         i on the changed outputs (score "kl", exact) or estimated to second
                         order from the diagonal Fisher of the next-token distributions
                         with respect to layer i's output (score "fisher",
                         casp.allocation.fisher: one backward pass of the model for all
                         layers, then one forward of the layer per option), by default
                         with each family of options (a part dense at every width, or
                         low-rank at one compression) scaled by one exact measurement
                         (score "calibrated": the diagonal misses correlations, most for
                         low-rank W_q/W_k)

then the multiple-choice knapsack (:func:`casp.allocation.solve_choices`) picks one option
per part minimising the summed divergence at the budget. W_q/W_k are low-rank only where
that pays: where they are cheap to cut, the bits saved go to the parts where a wider code
helps most (a layer's W_v/W_o cost a fraction of a whole layer's upgrade, so small savings
buy something), and where cutting them costs more than the bits buy, they stay dense. The
plan lists the chosen ranks; ``casp lowrank --plan`` applies them to the original model
before the quantizer runs with the same plan.

Approximations, for speed: each width's quantized linears come from one quantization of the
whole layer, every linear's Hessian from the full-precision layer's inputs (one forward per
layer shared by every width), and the parts' divergences are taken as additive. Cost: each
layer is quantized once per width (the low-rank factors once more); with the exact score the
layers after it run once per option on the measured samples, with the calibrated score once
per family (5 times a layer with two compressions), with the Fisher score never;
``calibrate_layers`` keeps the calibrated score's runs to a few layers spread over the depth
and scales the others' estimates by their ratios (:func:`spread_calibration`).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from casp.allocation.assemble import OptionStore, module_state_changes, options_dir
from casp.allocation.budget import SettingRules, dense_parameters
from casp.allocation.fisher import fisher_divergence, layer_output_fishers
from casp.allocation.plan import BitPlan, plan_meta
from casp.allocation.solver import solve_choices
from casp.devices import to_device
from casp.errors import CaspError
from casp.identity import fingerprint
from casp.layerwise import LayerContext, LayerPass
from casp.lowrank import LowRankLinear, LowRankPass, saves_parameters
from casp.quant.layer_groups import layer_linear_names

log = logging.getLogger("casp")


def option_label(compression: float | None, bits: int) -> str:
    """How an option is named: "dense@3", or "lowrank0.75@4" (W_q/W_k low-rank at that
    compression, the factors at 4 bits)."""
    shape = "dense" if compression is None else f"lowrank{compression:g}"
    return f"{shape}@{bits}"


def _width(label: str) -> int:
    return int(label.rsplit("@", 1)[1])


def _family(label: str) -> str:
    """An option's family: its shape without the width ("dense", "lowrank0.75")."""
    return label.rsplit("@", 1)[0]


SCORES = ("calibrated", "fisher", "kl")
QK = "qk"
UNIT_NAMES = {QK: "W_q/W_k (bits or low-rank)", "self_attn": "W_v/W_o bits", "mlp": "MLP bits"}


def unit_of(spec, name: str) -> str:
    """The part of a decoder layer a linear (relative name; a low-rank factor counts as its
    module) belongs to, each part taking its own option: the low-rank targets W_q/W_k
    ("qk"), the rest by the submodule they sit in ("self_attn": W_v/W_o, "mlp")."""
    base = name.rsplit(".", 1)[0] if name.endswith((".down", ".up")) else name
    return QK if base in spec.lowrank_targets else base.split(".")[0]


def layer_shapes(ctx: LayerContext, layer: nn.Module, members: list[str] | None = None
                 ) -> dict[str, list[int]]:
    """(out, in) of the quantizable linears of a (variant of a) layer, or of ``members``
    (relative names), by full name."""
    names = layer_linear_names(layer, ctx.spec) if members is None else members
    return {ctx.full_name(n): list(layer.get_submodule(n).weight.shape) for n in names}


def budget_error(budget: float, need: float) -> CaspError:
    return CaspError(f"budget {budget:.4f} bits cannot be met: the cheapest options already "
                     f"need {need:.4f} average bits; raise --budget, allow fewer bits or add "
                     "low-rank options")


class SensitivityPass(LayerPass):
    """Measures every option of every part of every layer; changes nothing (the next layer
    sees the original outputs). ``measured[i]`` after the walk:
    {part: {label: {"kl", "fisher", "shapes", "ranks"}}}, labels "dense@3",
    "lowrank0.75@4": "kl" the score the plan is solved on (see ``score``), "fisher" always
    the Fisher estimate (and "exact" where the calibrated score measured it).

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
        score: "calibrated" (the default: Fisher estimates, each family of options scaled
            by one exact measurement), "fisher" (the estimates alone) or "kl" (the layers
            after every option run: exact, slower).
        fisher_samples: next-token draws per position for the Fisher.
        measure_widths: the widths every layer is quantized and measured at (None: all of
            ``widths``); the others are measured only in ``anchors`` layers spread over
            the depth, and extrapolated elsewhere (:func:`extrapolate_widths`): each width
            left out saves one quantization of the layer.
        anchors: how many layers are measured at every width when ``measure_widths`` is
            given.
        calibrate_layers: with score "calibrated", measure the exact divergences (one run
            of the later layers per family) in this many layers spread over the depth only;
            the others' estimates are scaled when the plan is solved
            (:func:`spread_calibration`). None: every layer (each exact run costs the
            forwards of every later layer: most of the search's time with the default).
        keep_options: keep every built option on disk beside ``record``
            (casp.allocation.assemble): the quantized model of a plan is then assembled
            from them, without quantizing again.
    """

    name = "sensitivity"
    propagate = "original"

    def __init__(self, model: nn.Module, quantizer: Callable[[dict], LayerPass],
                 quantizer_settings: dict, rules: SettingRules, widths: list[int],
                 compressions: list[float], rank_multiple: int = 1, measure_batches: int = 1,
                 record: str | Path | None = None, identity: dict | None = None,
                 score: str = "calibrated", fisher_samples: int = 4,
                 measure_widths: list[int] | None = None, anchors: int = 3,
                 keep_options: bool = False, calibrate_layers: int | None = None):
        if measure_batches < 1:
            raise CaspError("--search-samples must be at least 1")
        if score not in SCORES:
            raise CaspError(f"--search-score {score!r}: use one of {', '.join(SCORES)}")
        if fisher_samples < 1:
            raise CaspError("--fisher-samples must be at least 1")
        self.score, self.fisher_samples = score, fisher_samples
        if calibrate_layers is not None and (score != "calibrated" or calibrate_layers < 1):
            raise CaspError("--calibrate-layers needs --search-score calibrated and at least "
                            "1 layer")
        self.calibrate_layers = calibrate_layers
        if measure_widths is not None:
            extra = sorted(set(measure_widths) - set(widths))
            if extra or not measure_widths:
                raise CaspError(f"--measure-widths {','.join(map(str, measure_widths))}: give "
                                f"some of the allowed widths --bits "
                                f"{','.join(map(str, sorted(widths)))}")
            if sorted(set(measure_widths)) == sorted(widths):
                measure_widths = None
        if measure_widths is not None and anchors < 1:
            raise CaspError("--anchor-layers must be at least 1 with --measure-widths")
        self.measure_widths = sorted(set(measure_widths)) if measure_widths else None
        self.anchors = anchors
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
        self.fishers: dict[int, list[torch.Tensor]] | None = None
        self._grams: dict = {}
        self._load_record()
        self.store = None
        if keep_options:
            if self.record is None:
                raise CaspError("keeping the search's options needs a measurements record")
            self.store = OptionStore(options_dir(self.record), self._key())

    def settings(self) -> dict:
        return {"parts": [QK, "rest by submodule"], "quantizer": self.quantizer_settings,
                "rules": self.rules.meta(),
                "widths": self.widths, "compressions": self.compressions,
                "rank_multiple": self.rank_multiple, "measure_batches": self.measure_batches,
                "score": self.score, "fisher_samples": self.fisher_samples,
                "hessians": "full-precision layer inputs",
                **({"measure_widths": self.measure_widths, "anchor_layers": self.anchors}
                   if self.measure_widths else {}),
                **({"calibrate_layers": self.calibrate_layers}
                   if self.calibrate_layers is not None else {})}

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
        h = ctx.run_batch(batch, layer)
        kwargs = to_device(ctx.inputs.kwargs[batch], device)     # the later layers take them too
        decoder = spec.decoder_layers(self.model)
        for k in range(ctx.index + 1, len(decoder)):
            out = decoder[k].to(device)(h, **kwargs)          # .to moves the module in place
            h = out[0] if isinstance(out, tuple) else out
            if device.type != "cpu":
                decoder[k].to("cpu")
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
        """At the first layer measured: the full-precision next-token distributions (the
        exact score's reference) and every later layer's output Fisher."""
        if self.fishers is None:
            self.fishers = layer_output_fishers(self.model, ctx.spec, ctx, self.measure_batches,
                                                self.fisher_samples)
        if self.reference is not None or self.score == "fisher":
            return
        self.reference = []
        for j in range(min(self.measure_batches, len(ctx.inputs.hidden))):
            self.reference.append(torch.cat([c.cpu() for c in
                                             self._tail_logprobs(ctx, ctx.layer, j)]))

    @torch.no_grad()
    def _layer_outputs(self, ctx: LayerContext, layer: nn.Module) -> list[torch.Tensor]:
        return [ctx.run_batch(j, layer)
                for j in range(min(self.measure_batches, len(ctx.inputs.hidden)))]

    def _quantized(self, ctx: LayerContext, layer: nn.Module, width: int,
                   only: tuple[str, ...] | None = None) -> tuple[nn.Module, dict]:
        """``layer`` (changed in place) with its linears (or those of ``only``) quantized
        at ``width`` by the plan's quantizer, on the layer's calibration inputs, and the
        descriptions of the modules it put in place."""
        sub = LayerContext(ctx.index, layer, ctx.spec, ctx.inputs, ctx.device)
        sub.only = only
        sub.gram_cache = self._grams
        plan = {name: self.rules.entry(name, width, shape)
                for name, shape in layer_shapes(sub, layer).items()}
        self.quantizer(plan).process(sub)
        return layer, sub.changes

    def process(self, ctx: LayerContext) -> None:
        if ctx.index in self.measured and (self.store is None
                                           or self.store.has_layer(ctx.index)):
            return
        start = time.perf_counter()
        self._ensure_reference(ctx)
        units: dict[str, list[str]] = {}
        for n in layer_linear_names(ctx.layer, ctx.spec):
            units.setdefault(unit_of(ctx.spec, n), []).append(n)
        # every width's (and the factors') quantization takes its Hessians from the
        # full-precision layer's inputs, collected once
        self._grams = ctx.input_grams(layer_linear_names(ctx.layer, ctx.spec))
        n_layers = len(ctx.spec.decoder_layers(self.model))
        widths = self.widths
        if self.measure_widths and ctx.index not in anchor_layers(n_layers, self.anchors):
            widths = self.measure_widths
        quantized, changes = {}, {}
        for b in widths:
            quantized[b], changes[b] = self._quantized(ctx, copy.deepcopy(ctx.layer), b)
        fisher = self.fishers.pop(ctx.index)
        reference = self._layer_outputs(ctx, ctx.layer)

        def variant(parts: dict[str, nn.Module]) -> nn.Module:
            """The full-precision layer but for ``parts`` (relative name -> module)."""
            layer = copy.deepcopy(ctx.layer)
            for n, module in parts.items():
                layer.set_submodule(n, copy.deepcopy(module))
            return layer

        def scored(parts: dict[str, nn.Module]) -> dict[str, float]:
            """The option's Fisher estimate, and its exact divergence with score "kl"."""
            layer = variant(parts)
            estimate = fisher_divergence(fisher, reference, self._layer_outputs(ctx, layer))
            if not math.isfinite(estimate):
                raise CaspError(f"layer {ctx.index}: an option made the layer's outputs "
                                "non-finite (an overflow at this dtype?); rerun with --dtype "
                                "float32")
            exact = self._divergence(ctx, layer) if self.score == "kl" else estimate
            return {"kl": exact, "fisher": estimate, "parts": parts}

        kept: dict[str, dict] = {u: {} for u in units}     # the options as built, to keep
        fp_lowrank: dict[str, dict] = {}

        def keep(unit: str, label: str, parts: dict[str, nn.Module], described: dict) -> None:
            if self.store is not None:
                kept[unit][label] = {"modules": parts, "changes": module_state_changes(
                    described, [ctx.full_name(n) for n in parts])}

        results: dict[str, dict] = {u: {} for u in units}
        for u, members in units.items():
            for b in widths:
                parts = {n: quantized[b].get_submodule(n) for n in members}
                results[u][option_label(None, b)] = {
                    **scored(parts), "shapes": layer_shapes(ctx, ctx.layer, members),
                    "ranks": {}}
                keep(u, option_label(None, b), parts, changes[b])
        targets = ctx.spec.lowrank_targets
        for c in self.compressions:
            lowrank = copy.deepcopy(ctx.layer)
            sub = LayerContext(ctx.index, lowrank, ctx.spec, ctx.inputs, ctx.device)
            sub.gram_cache = self._grams
            LowRankPass(compression=c, rank_multiple=self.rank_multiple,
                        targets=targets).process(sub)
            ranks = {ctx.full_name(t): lowrank.get_submodule(t).rank for t in targets
                     if isinstance(lowrank.get_submodule(t), LowRankLinear)}
            if not ranks:
                continue                       # nothing to save at this compression
            cut = tuple(full[len(ctx.prefix) + 1:] for full in ranks)
            lr_members = [n for n in layer_linear_names(lowrank, ctx.spec)
                          if unit_of(ctx.spec, n) == QK]
            # factors at fixed bits, all targets cut: one option; otherwise one per width
            fixed = self.rules.factor_bits is not None and len(cut) == len(targets)
            factor_widths = [self.rules.factor_bits] if fixed else widths
            factors = {w: self._quantized(ctx, copy.deepcopy(lowrank), w, only=cut)
                       for w in factor_widths}
            if self.store is not None:
                fp_lowrank[f"lowrank{c:g}"] = {
                    "modules": {t: lowrank.get_submodule(t) for t in cut},
                    "changes": module_state_changes(sub.changes,
                                                    [ctx.full_name(t) for t in cut])}
            for w in factor_widths:
                parts = {t: factors[w][0].get_submodule(t) for t in cut}
                parts.update({t: quantized[w].get_submodule(t) for t in targets if t not in cut})
                results[QK][option_label(c, w)] = {
                    **scored(parts), "shapes": layer_shapes(ctx, lowrank, lr_members),
                    "ranks": ranks}
                keep(QK, option_label(c, w), parts,
                     {**changes.get(w, {}), **sub.changes, **factors[w][1]})
        if self.score == "calibrated":
            if self.calibrate_layers is None or ctx.index in anchor_layers(
                    n_layers, self.calibrate_layers):
                calibrate(results, lambda o: self._divergence(ctx, variant(o["parts"])))
            else:                              # scaled by the calibrated layers' ratios
                for r in results.values():
                    for option in r.values():
                        option["uncalibrated"] = True
        for r in results.values():
            for option in r.values():
                del option["parts"]
        if self.store is not None:                # before the record names the layer measured
            self.store.save_layer(ctx.index, kept, fp_lowrank)
        self.measured[ctx.index] = results
        self._grams = {}
        self._save_record()
        summary = "; ".join(f"{u}: " + ", ".join(f"{k} {v['kl']:.4g}" for k, v in r.items())
                            for u, r in results.items())
        log.info("layer %d measured in %.1f s: KL %s", ctx.index, time.perf_counter() - start,
                 summary)


def calibrate(results: dict, exact_of: Callable[[dict], float]) -> None:
    """Score "calibrated", in place on one layer's results {part: {label: option}}: in each
    family of a part's options (dense at every width; low-rank at one compression, its
    factors at every width) the option at the lowest width is measured exactly
    (``exact_of(option)``), and the family's Fisher estimates are scaled by its exact /
    estimate ratio. The diagonal Fisher misses the correlations of a change (a low-rank
    W_q/W_k's most), by a factor about the same across a family."""
    for r in results.values():
        families: dict[str, list[str]] = {}
        for label in r:
            families.setdefault(_family(label), []).append(label)
        for labels in families.values():
            anchor = r[min(labels, key=_width)]
            exact = exact_of(anchor)
            ratio = exact / anchor["fisher"] if anchor["fisher"] > 0 else 1.0
            for label in labels:
                r[label]["kl"] = r[label]["fisher"] * ratio
            anchor["kl"] = anchor["exact"] = exact


def spread_calibration(measured: dict[int, dict]) -> dict[int, dict]:
    """The measurements with the options marked "uncalibrated" (a search with
    ``calibrate_layers``: the Fisher estimate alone) scaled like the calibrated layers': by
    the geometric mean, over the layers measured exactly, of the exact / estimate ratio of
    the same part and family (dense, or low-rank at one compression). The ratio drifts
    with depth and varies from layer to layer by a factor of about 2 on SmolLM2; a mean
    over a few layers spread from the first to the last stands for it within a few percent
    of the summed divergence of the plan (docs/results.md)."""
    logs: dict[tuple, list[float]] = {}
    for results in measured.values():
        for part, r in results.items():
            for label, o in r.items():
                if "exact" in o and o["exact"] > 0 and o["fisher"] > 0:
                    logs.setdefault((part, _family(label)), []).append(
                        math.log(o["exact"] / o["fisher"]))
    out: dict[int, dict] = {}
    for i, results in measured.items():
        out[i] = {}
        for part, r in results.items():
            out[i][part] = {}
            for label, o in r.items():
                if o.get("uncalibrated"):
                    ratios = logs.get((part, _family(label)))
                    if not ratios:
                        raise CaspError(f"layer {i} {part}: no layer measured {_family(label)} "
                                        "exactly to scale its estimate by; raise "
                                        "--calibrate-layers")
                    o = {**o, "kl": o["fisher"] * math.exp(sum(ratios) / len(ratios))}
                    del o["uncalibrated"]
                out[i][part][label] = o
    return out


def anchor_layers(n_layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly from the first to the last (every layer when count is
    at least the layer count): the ones measured at every width when a search measures the
    others at some widths only."""
    if count >= n_layers:
        return list(range(n_layers))
    if count <= 1:
        return [0]
    return sorted({round(k * (n_layers - 1) / (count - 1)) for k in range(count)})


def extrapolate_widths(measured: dict[int, dict], widths: list[int]) -> dict[int, dict]:
    """The measurements with every allowed width filled in where a layer was measured at
    some widths only: in each part, a family of options (dense, or low-rank at one
    compression) scored at width w0 is scored at width w by its score at w0 times the ratio
    score(w) / score(w0) of the same part and family in the layers measured at both (the
    geometric mean over them). Filled options are marked "extrapolated"; measured ones are
    kept as they are. The scores shrink with width about the same way in every layer (a
    quantizer's error falls by a factor per bit that is a property of its code, not of the
    weights), which is what lets a few layers measured at every width stand for the rest."""
    logs: dict[tuple, list[float]] = {}       # (part, family, w0, w) -> log ratios
    seen: dict[tuple, set[int]] = {}          # (part, family) -> widths measured anywhere
    for results in measured.values():
        for part, r in results.items():
            for label in r:
                seen.setdefault((part, _family(label)), set()).add(_width(label))
            for a, oa in r.items():
                for b, ob in r.items():
                    if a != b and _family(a) == _family(b) and oa["kl"] > 0 and ob["kl"] > 0:
                        logs.setdefault((part, _family(a), _width(a), _width(b)), []).append(
                            math.log(ob["kl"] / oa["kl"]))
    out: dict[int, dict] = {}
    for i, results in measured.items():
        out[i] = {}
        for part, r in results.items():
            filled = dict(r)
            for fam in {_family(label) for label in r}:
                have = {_width(label): label for label in r if _family(label) == fam}
                for w in sorted(seen[(part, fam)] & set(widths)):
                    if w in have:
                        continue
                    known = [w0 for w0 in have if (part, fam, w0, w) in logs]
                    if not known:
                        raise CaspError(f"layer {i} {part}: no layer was measured at both "
                                        f"{sorted(have)} and {w} bits to extrapolate from; "
                                        "measure more anchor layers")
                    w0 = min(known, key=lambda x: (abs(x - w), x))
                    ratios = logs[(part, fam, w0, w)]
                    scale = math.exp(sum(ratios) / len(ratios))
                    base = r[have[w0]]
                    filled[f"{fam}@{w}"] = {
                        **base, "kl": base["kl"] * scale,
                        "fisher": base.get("fisher", base["kl"]) * scale,
                        "extrapolated": True}
                    filled[f"{fam}@{w}"].pop("exact", None)
            out[i][part] = filled
    return out


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
            for name in layer_linear_names(layer, spec):
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
        raise budget_error(budget, need)


def measured_plan(model: nn.Module, spec, measured: dict[int, dict], rules: SettingRules,
                  widths: list[int], budget: float, compressions: list[float],
                  rank_multiple: int, lowrank: bool = True, score: str = "kl") -> BitPlan:
    """Solve the knapsack over every (layer, part) on the measurements and write the plan:
    every module of the model as it will be after the chosen low-rank factorisations, each
    part's width, and the ranks. ``lowrank=False`` leaves the low-rank options out (the
    ablation: what the allocation alone buys); ``score`` is the measurement solved on
    ("kl": the search's score; "fisher": its Fisher estimate). Estimates of layers not
    calibrated are scaled first (:func:`spread_calibration`), then widths a layer was not
    measured at extrapolated (:func:`extrapolate_widths`)."""
    measured = extrapolate_widths(spread_calibration(measured), widths)
    if not lowrank:
        measured = {i: {u: {k: v for k, v in r.items() if k.startswith("dense")}
                        for u, r in m.items()} for i, m in measured.items()}
        compressions = []
    if score != "kl":
        measured = {i: {u: {k: {**v, "kl": v[score]} for k, v in r.items()}
                        for u, r in m.items()} for i, m in measured.items()}
    dense = dense_parameters(model, spec)
    n_layers = len(spec.decoder_layers(model))
    missing = [i for i in range(n_layers) if i not in measured]
    if missing:
        raise CaspError(f"no measurements for layer {missing[0]}")
    items, options = [], []
    for i in range(n_layers):
        for unit, labelled in measured[i].items():
            opts = {}
            for label, m in labelled.items():
                shapes = {n: tuple(x) for n, x in m["shapes"].items()}
                opts[label] = (rules.layer_cost(shapes, _width(label)), m["kl"])
            items.append((i, unit))
            options.append(opts)
    budget_total = int(math.floor(budget * dense))
    try:
        chosen = solve_choices(options, budget_total)
    except CaspError:
        raise budget_error(budget, sum(min(c for c, _ in o.values()) for o in options) / dense)
    modules, ranks, total = {}, {}, 0
    rows = {i: {"layer": i, "units": {}, "lowrank": None, "kl": 0.0, "stored_bits": 0,
                "measured": {u: {k: round(v["kl"], 8) for k, v in r.items()}
                             for u, r in measured[i].items()}} for i in range(n_layers)}
    for (i, unit), label, opts in zip(items, chosen, options):
        m = measured[i][unit][label]
        for name, shape in m["shapes"].items():
            modules[name] = rules.entry(name, _width(label), shape)
        ranks.update(m["ranks"])
        row = rows[i]
        row["units"][unit] = label
        row["kl"] += m["kl"]
        row["stored_bits"] += opts[label][0]
        if label.startswith("lowrank"):
            row["lowrank"] = float(label.split("@")[0][len("lowrank"):])
        total += opts[label][0]
    layers_out = []
    for i in range(n_layers):
        row = rows[i]
        # the widest dense part's width stands for the layer in tables and plots
        dense_widths = [_width(l) for l in row["units"].values() if l.startswith("dense")]
        row["bits"] = max(dense_widths, default=min(widths))
        row["kl"] = round(row["kl"], 8)
        layers_out.append(row)
    meta = plan_meta(budget, total, dense, sorted(widths), rules, model)
    meta["allocation"] = "measured"
    meta["lowrank"] = {"compressions": sorted(compressions), "rank_multiple": rank_multiple,
                       "method": "whitened", "ranks": ranks}
    return BitPlan(modules=modules, layers=layers_out, meta=meta)


def plan_ranks(plan: BitPlan) -> dict[str, int] | None:
    """The low-rank ranks a measured plan chose ({} or None: it chose no low-rank step)."""
    lowrank = plan.meta.get("lowrank")
    return dict(lowrank["ranks"]) if lowrank else None
