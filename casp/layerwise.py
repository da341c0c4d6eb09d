"""The layer-wise engine: every stage of casp is a pass over the decoder layers.

    calibration batches -> inputs of decoder layer 0 (captured once)
    for each layer i:   a pass collects statistics of the layer's inputs and transforms it
                        the layer runs to produce the inputs of layer i + 1
    the changed modules are recorded for the checkpoint

Memory stays bounded: only the current layer (and the activations) sit on the compute
device; the rest of the model stays on the CPU. A pass is a small object with a
``process(ctx)`` method; the :class:`LayerContext` gives it forward passes with hooks,
input statistics and module replacement. With ``state_dir`` the engine saves each finished
layer and resumes after an interruption by replaying the finished layers.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from casp.devices import to_device
from casp.errors import CaspError
from casp.identity import fingerprint
from casp.models import ModelSpec
from casp.modules import replace_modules
from casp.stats import InputGram

log = logging.getLogger("casp")


class _StopForward(Exception):
    pass


class StopLayer(Exception):
    """Raised by a forward hook to end a layer's forward pass early."""


def modules_outside_layers(model: nn.Module, layers_path: str) -> list[nn.Module]:
    """The modules that are not on the path to the decoder layers (embeddings, vision
    tower, rotary embedding, norm, lm_head, ...)."""
    outside, node = [], model
    for part in layers_path.split("."):
        outside += [child for name, child in node.named_children() if name != part]
        node = getattr(node, part)
    return outside


@dataclass
class LayerInputs:
    """What decoder layer i is called with, one entry per calibration batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, spec: ModelSpec, batches: Iterable[dict],
                         device: torch.device, store: torch.device | None = None) -> LayerInputs:
    """Run the model up to its first decoder layer on every batch and keep what the layer
    receives (hidden states and keyword arguments such as position embeddings)."""
    store = store or device
    layers = spec.decoder_layers(model)
    outside = modules_outside_layers(model, spec.layers)
    hidden, kwargs_list = [], []

    def catch(module, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.to(store))
        kw = {k: to_device(v, store) for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        kw["past_key_values"] = None
        kwargs_list.append(kw)
        raise _StopForward

    for m in outside:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**to_device(batch, device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m in outside:
            m.to("cpu")
    if not hidden:
        raise CaspError("no calibration batches were given")
    return LayerInputs(hidden, kwargs_list)


class LayerContext:
    """What a pass sees of one decoder layer."""

    def __init__(self, index: int, layer: nn.Module, spec: ModelSpec, inputs: LayerInputs,
                 device: torch.device):
        self.index = index
        self.layer = layer
        self.spec = spec
        self.inputs = inputs
        self.device = device
        self.prefix = spec.layer_prefix(index)
        self.changes: dict[str, dict] = {}   # full module name -> description
        self.outputs: list[torch.Tensor] | None = None
        # quantizer passes touch only these modules (relative names) when set
        self.only: tuple[str, ...] | None = None
        # input Gram matrices to reuse by linear name (the measured search shares the
        # full-precision layer's across widths); read-only, never filled by input_grams
        self.gram_cache: dict[str, InputGram] | None = None

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def run_batch(self, batch: int, layer: nn.Module | None = None) -> torch.Tensor:
        """The hidden states ``layer`` (the context's layer by default; a variant of it, say)
        outputs on calibration batch number ``batch``, on the compute device. Gradients
        follow the caller's mode; a hook's :class:`StopLayer` passes through."""
        layer = self.layer if layer is None else layer
        out = layer(self.inputs.hidden[batch].to(self.device),
                    **to_device(self.inputs.kwargs[batch], self.device))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, hooks: dict[str, Callable] | None = None, keep_outputs: bool = True
                ) -> list[torch.Tensor] | None:
        """Run the layer on every calibration batch. ``hooks`` maps a module name (relative
        to the layer) to ``fn(module, inputs, output)``, called for every batch; a hook may
        raise :class:`StopLayer` to end that batch's forward early (when it has what it
        needs), in which case no outputs are kept."""
        handles = [self.module(n).register_forward_hook(fn) for n, fn in (hooks or {}).items()]
        outputs = [] if keep_outputs else None
        try:
            for j, h in enumerate(self.inputs.hidden):
                try:
                    out = self.run_batch(j)
                except StopLayer:
                    continue
                if keep_outputs:
                    outputs.append(out.to(h.device))
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def input_grams(self, names: Iterable[str]) -> dict[str, InputGram]:
        """Gram matrices of the inputs of the named linears, from one forward pass that
        stops, batch by batch, as soon as every named linear has run. Linears fed the very
        same tensor (q, k, v) share one accumulator. Names in ``gram_cache`` are taken from
        it."""
        cached = {n: self.gram_cache[n] for n in names if n in (self.gram_cache or {})}
        names = [n for n in names if n not in cached]
        if not names:
            return cached
        grams: dict[str, InputGram] = {}
        last: list = [None, None]   # the latest input tensor seen and its accumulator
        seen: set[str] = set()

        def make_hook(name):
            def hook(module, inputs, output):
                x = inputs[0]
                same = last[0] is x
                if name not in grams:
                    grams[name] = last[1] if same else InputGram(x.shape[-1], self.device)
                if not same:
                    grams[name].add(x)
                    last[0], last[1] = x, grams[name]
                seen.add(name)
                if len(seen) == len(names):
                    seen.clear()
                    last[0] = None
                    raise StopLayer
            return hook

        self.forward({n: make_hook(n) for n in names}, keep_outputs=False)
        return {**grams, **cached}

    def replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` in place of the layer's submodule ``name`` and record it."""
        self.layer.set_submodule(name, module)
        self.changes[self.full_name(name)] = module.describe()


class LayerPass:
    """Base of every per-layer algorithm. Subclasses set ``name`` and implement ``process``.

    ``propagate`` says which outputs feed the next layer: "transformed" (the layer after
    this pass changed it; errors are seen and compensated downstream) or "original".
    """

    name = "pass"
    propagate = "transformed"

    def settings(self) -> dict:
        """JSON-able settings, recorded in the checkpoint and in resume fingerprints."""
        return {}

    def process(self, ctx: LayerContext) -> None:
        raise NotImplementedError


@dataclass
class LayerwiseResult:
    changes: dict[str, dict] = field(default_factory=dict)
    layer_seconds: list[float] = field(default_factory=list)
    layers_done: list[int] = field(default_factory=list)


class _ResumeState:
    """Finished layers saved one file each, plus a progress record."""

    def __init__(self, root: Path, key: str, replace_foreign: bool = False):
        self.root, self.key = root, key
        self.progress_file = root / "progress.json"
        record = self._read()
        if record is not None and record.get("fingerprint") != key:
            if not replace_foreign:
                raise CaspError(f"{root} holds progress of a different run; delete it, pass "
                                "--overwrite, or change the output directory")
            shutil.rmtree(root)
            record = None
        if record is None:
            root.mkdir(parents=True, exist_ok=True)
            record = {"fingerprint": key, "done": [], "changes": {}, "seconds": {}}
        self.record = record

    def _read(self) -> dict | None:
        """The progress record; {} if unreadable (treated as another run's), None if absent."""
        if not self.progress_file.is_file():
            return None
        try:
            return json.loads(self.progress_file.read_text())
        except json.JSONDecodeError:
            return {}

    def done(self, index: int) -> bool:
        return index in self.record["done"]

    def restore(self, index: int, layer: nn.Module, prefix: str, dtype: torch.dtype) -> dict:
        changes = {n: d for n, d in self.record["changes"].items() if n.startswith(prefix + ".")}
        replace_modules(layer, changes, dtype, prefix)
        layer.load_state_dict(load_file(self.root / f"layer_{index:03d}.safetensors"), strict=True)
        return changes

    def save(self, index: int, layer: nn.Module, changes: dict, seconds: float) -> None:
        tmp = self.root / f"layer_{index:03d}.safetensors.tmp"
        state = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
        save_file(state, str(tmp))
        tmp.replace(self.root / f"layer_{index:03d}.safetensors")
        self.record["done"].append(index)
        self.record["changes"].update(changes)
        self.record["seconds"][str(index)] = seconds
        tmp_record = self.progress_file.with_suffix(".tmp")
        tmp_record.write_text(json.dumps(self.record, indent=1))
        tmp_record.replace(self.progress_file)


def run_layerwise(model: nn.Module, spec: ModelSpec, inputs: LayerInputs,
                  passes: list[LayerPass], device: torch.device,
                  layers: Iterable[int] | None = None, state_dir: str | Path | None = None,
                  run_key: dict | None = None, progress: bool = True,
                  replace_foreign_progress: bool = False) -> LayerwiseResult:
    """Walk the decoder layers, applying ``passes`` to each selected layer.

    ``layers`` restricts which layers are transformed (all by default); the walk stops after
    the last selected one. ``inputs`` is consumed: its hidden states are replaced, layer by
    layer, by the outputs. With ``state_dir``, finished layers are saved there and a rerun
    with the same ``run_key`` resumes after the last finished layer; progress of a different
    run there is an error, or is discarded with ``replace_foreign_progress``.
    """
    decoder = spec.decoder_layers(model)
    selected = sorted(set(range(len(decoder)) if layers is None else layers))
    if not selected or selected[0] < 0 or selected[-1] >= len(decoder):
        raise CaspError(f"layer selection {selected} outside the model's {len(decoder)} layers")
    dtype = next(model.parameters()).dtype
    key = fingerprint({"passes": [(p.name, p.settings()) for p in passes], "layers": selected,
                       "run": run_key or {}})
    state = _ResumeState(Path(state_dir), key, replace_foreign_progress) if state_dir else None
    result = LayerwiseResult()
    bar = tqdm(range(selected[-1] + 1), desc=" + ".join(p.name for p in passes),
               unit="layer", disable=not progress)
    for i in bar:
        layer = decoder[i].to(device)
        ctx = LayerContext(i, layer, spec, inputs, device)
        start = time.perf_counter()
        if state is not None and state.done(i):
            if any(p.propagate == "original" for p in passes) and i < selected[-1]:
                ctx.outputs = ctx.forward()      # replay the original layer, as the first run did
            result.changes.update(state.restore(i, layer, ctx.prefix, dtype))
            layer.to(device)                     # restored modules are built on the CPU
            bar.set_postfix_str(f"layer {i} restored")
        elif i in selected:
            original_outputs = None
            for p in passes:
                if p.propagate == "original" and original_outputs is None:
                    original_outputs = ctx.forward()
                p.process(ctx)
            seconds = time.perf_counter() - start
            result.changes.update(ctx.changes)
            result.layer_seconds.append(seconds)
            result.layers_done.append(i)
            if state is not None:
                state.save(i, layer, ctx.changes, seconds)
            if original_outputs is not None:
                ctx.outputs = original_outputs
        if i < selected[-1]:
            inputs.hidden = ctx.outputs if ctx.outputs is not None else ctx.forward()
        decoder[i] = layer.to("cpu")
    return result
