"""The measured search's built options kept on disk, and the quantized model assembled from
them: the plan's choice of each part, exactly as the search built and measured it.

The search (casp.allocation.search.SensitivityPass) quantizes every part of every layer at
each width it measures (and the low-rank W_q/W_k factors at each compression and width) to
score them. Kept, those options are the quantized model of any plan solved on the same
measurements: installing the chosen option of every part replaces the second pass of the
usual recipe (``casp lowrank --plan``, then the quantizer with the plan), which costs about
one more uniform quantization. What differs from that recipe: every option was quantized
with the Hessians of the full-precision layer's inputs (the search's approximation), where
the quantizer with the plan takes them after the layers before were quantized.

Options the search did not build (widths it extrapolated with ``--measure-widths``) are
quantized while assembling, in order, with the inputs of the assembled layers before, as
the quantizer with the plan would; a low-rank option's full-precision factors are kept for
that.

On disk, beside the measurements record: per layer ``layer_NNN.safetensors`` (each option's
module tensors under "part/label/module.tensor") and ``layer_NNN.json`` (the record's key,
each option's module descriptions and names).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass
from casp.modules import replace_modules

log = logging.getLogger("casp")

FP_LOWRANK = "fp"             # the label of a compression's full-precision factors


def options_dir(record: str | Path) -> Path:
    """Where a measurements record's options live: beside it, ``<record>.options``."""
    record = Path(record)
    return record.with_name(record.name + ".options")


class OptionStore:
    """Built options of a measured search, one pair of files per layer, tied to the
    measurements record by its key."""

    def __init__(self, root: str | Path, key: str):
        self.root, self.key = Path(root), key

    def _paths(self, index: int) -> tuple[Path, Path]:
        return (self.root / f"layer_{index:03d}.json",
                self.root / f"layer_{index:03d}.safetensors")

    def _index(self, index: int) -> dict | None:
        meta, tensors = self._paths(index)
        if not (meta.is_file() and tensors.is_file()):
            return None
        try:
            data = json.loads(meta.read_text())
        except json.JSONDecodeError:
            return None
        return data if data.get("key") == self.key else None

    def has_layer(self, index: int) -> bool:
        return self._index(index) is not None

    def save_layer(self, index: int, options: dict[str, dict[str, dict]],
                   fp_lowrank: dict[str, dict]) -> None:
        """``options``: {part: {label: {"modules": {relative name: module}, "changes":
        {full name: description}}}}; ``fp_lowrank``: {compression label: the same for the
        full-precision low-rank W_q/W_k}. Written atomically (tensors first)."""
        tensors, meta = {}, {"key": self.key, "options": {}, "fp_lowrank": {}}

        def add(section: dict, part: str, label: str, option: dict) -> None:
            for name, module in option["modules"].items():
                for k, v in module.state_dict().items():
                    tensors[f"{part}/{label}/{name}.{k}"] = v.detach().cpu().contiguous().clone()
            section.setdefault(part, {})[label] = {"modules": list(option["modules"]),
                                                   "changes": option["changes"]}

        for part, labelled in options.items():
            for label, option in labelled.items():
                add(meta["options"], part, label, option)
        for label, option in fp_lowrank.items():
            add(meta["fp_lowrank"], FP_LOWRANK, label, option)
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path, tensor_path = self._paths(index)
        tmp = tensor_path.with_name(tensor_path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(tensor_path)
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(meta_path)

    def install_chosen(self, ctx: LayerContext, chosen: dict[str, str]) -> list[str]:
        """Put the stored option of each part of ``chosen`` ({part: label}) in place in
        ``ctx.layer`` and record its modules; a low-rank option not built gets its
        full-precision factors. Reads the layer's index once and only the tensors of the
        options installed. Returns the parts left to quantize, in order."""
        data = self._index(ctx.index)
        dtype = next(ctx.layer.parameters()).dtype
        missing = []
        with safe_open(str(self._paths(ctx.index)[1]), framework="pt") as tensors:
            keys = list(tensors.keys())

            def install(part: str, label: str, entry: dict) -> None:
                # parents (a low-rank module) before their children (its quantized factors)
                changes = dict(sorted(entry["changes"].items(), key=lambda kv: kv[0].count(".")))
                replace_modules(ctx.layer, changes, dtype, ctx.prefix)
                for name in entry["modules"]:
                    prefix = f"{part}/{label}/{name}."
                    module = ctx.layer.get_submodule(name)
                    module.load_state_dict({k[len(prefix):]: tensors.get_tensor(k)
                                            for k in keys if k.startswith(prefix)}, strict=True)
                    module.to(ctx.device)
                ctx.changes.update(changes)

            for part, label in chosen.items():
                entry = _entry(data, part, label)
                if entry is not None:
                    install(part, label, entry)
                    continue
                shape = label.rsplit("@", 1)[0]
                if shape.startswith("lowrank"):      # its full-precision factors, then quantize
                    fp = _entry(data, FP_LOWRANK, shape)
                    if fp is None:
                        raise CaspError(f"layer {ctx.index}: the search kept no full-precision "
                                        f"factors of {shape}; rerun it with --checkpoint")
                    install(FP_LOWRANK, shape, fp)
                missing.append(part)
        return missing

    def part_modules(self, index: int, part: str) -> list[str]:
        """The modules (relative names) a part of layer ``index`` replaces, from any option
        of it the search kept (every part keeps at least its measured widths)."""
        data = self._index(index) or {"options": {}}
        for entry in data["options"].get(part, {}).values():
            return list(entry["modules"])
        raise CaspError(f"layer {index}: the search kept no option of {part}; rerun it with "
                        "--checkpoint")


def _entry(data: dict | None, part: str, label: str) -> dict | None:
    if data is None:
        return None
    if part == FP_LOWRANK:
        return data["fp_lowrank"].get(FP_LOWRANK, {}).get(label)
    return data["options"].get(part, {}).get(label)


class AssemblePass(LayerPass):
    """Each layer as the plan chose it, from the search's options (see the module
    docstring); parts whose option the search did not build are quantized here.

    Args:
        plan: the measured plan (casp.allocation.plan.BitPlan).
        store: the search's options.
        quantizer: builds the quantizer pass for a plan ({full name: plan entry}), as the
            search did.
        quantizer_settings: recorded in the checkpoint.
    """

    name = "assemble"

    def __init__(self, plan, store: OptionStore, quantizer: Callable[[dict], LayerPass],
                 quantizer_settings: dict, plan_id: str):
        self.plan, self.store, self.quantizer = plan, store, quantizer
        self.quantizer_settings, self.plan_id = quantizer_settings, plan_id
        self.built: dict[int, list[str]] = {}

    def settings(self) -> dict:
        return {"plan": self.plan_id, "options": str(self.store.root),
                "quantizer": self.quantizer_settings,
                "hessians": "full-precision layer inputs (options the search built)"}

    def process(self, ctx: LayerContext) -> None:
        missing = self.store.install_chosen(ctx, self.plan.layers[ctx.index]["units"])
        self.built[ctx.index] = missing
        if not missing:
            return
        bases = tuple(n for part in missing for n in self.store.part_modules(ctx.index, part))
        entries = {name: e for name, e in self.plan.modules.items()
                   if name.startswith(ctx.prefix + ".")}
        log.info("layer %d: quantizing %s (not built by the search)", ctx.index,
                 ", ".join(missing))
        ctx.only = bases
        try:
            self.quantizer(entries).process(ctx)
        finally:
            ctx.only = None


def module_state_changes(changes: dict[str, dict], full_names: list[str]) -> dict[str, dict]:
    """The descriptions of ``full_names`` and of their submodules (a low-rank module's
    factors) among ``changes``."""
    return {n: d for n, d in changes.items()
            if any(n == f or n.startswith(f + ".") for f in full_names)}
