"""The checkpoint: the contract between stages.

A checkpoint is a Hugging Face model directory (config.json, safetensors weights, tokenizer
or processor files) whose config.json has a ``casp`` section:

    "casp": {
      "format_version": 1,
      "casp_version": "0.1.0",
      "base_model": "<what stage 1 started from>",
      "architecture": "LlamaForCausalLM",
      "stages": [{"stage": "lowrank", "settings": {...}, "fingerprint": "...",
                  "seconds": 12.3, "date": "..."}],
      "modules": {"model.layers.0.self_attn.q_proj":
                    {"type": "lowrank", "in_features": 576, "out_features": 576,
                     "rank": 72, "bias": false}, ...}
    }

Every module named in ``modules`` replaces the dense linear of that name; its tensors are
stored under that name (``...q_proj.up.weight``, ``...q_proj.down.weight``), in the key
layout transformers writes for the architecture (LLaVA checkpoints use its legacy
``language_model.model.layers...`` keys). Everything else is stored exactly as transformers
stores it. A checkpoint is written into a temporary
directory beside the target and renamed when complete, so a directory that looks complete
is complete.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from casp.devices import resolve_device, resolve_dtype
from casp.errors import CaspError
from casp.hf_model import LoadedModel, load_preprocessors, read_casp_section
from casp.models import architecture_of, spec_for_architecture
from casp.modules import replace_modules
from casp.quant.registry import QUANTIZED_TENSOR_SUFFIXES, described_stored_bits
from casp.version import __version__

FORMAT_VERSION = 1
log = logging.getLogger("casp")


def check_output_dir(output: str | Path, fingerprint: str, overwrite: bool = False) -> bool:
    """Decide, before any work, what to do with ``output``.

    Returns True when ``output`` already holds this very result (same fingerprint): the
    stage has nothing to do. Raises when it holds something else, unless ``overwrite``.
    """
    out = Path(output)
    remove_stale_temporaries(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise CaspError(f"output {out} exists and is not a directory; choose another --output")
    if not any(out.iterdir()) or overwrite:
        return False
    section = read_casp_section(out)
    if section and section.get("stages") and section["stages"][-1].get("fingerprint") == fingerprint:
        return True
    raise CaspError(f"output directory {out} already holds a different checkpoint or other "
                    "files; choose another --output or pass --overwrite")


def remove_stale_temporaries(output: Path) -> None:
    """Temporary directories of an earlier save that was killed (its pid is gone)."""
    if not output.parent.is_dir():
        return
    for pattern in (f".{output.name}.tmp-*", f".{output.name}.old-*"):
        for stale in output.parent.glob(pattern):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(stale, ignore_errors=True)


def build_section(loaded: LoadedModel, stage: str, settings: dict, fingerprint: str,
                  changes: dict, seconds: float) -> dict:
    """The casp section of the model after ``stage``, extending what the input had."""
    previous = loaded.casp or {}
    modules = dict(previous.get("modules", {}))
    modules.update(changes)
    return {
        "format_version": FORMAT_VERSION,
        "casp_version": __version__,
        "base_model": previous.get("base_model", loaded.source),
        "architecture": type(loaded.model).__name__,
        "stages": list(previous.get("stages", [])) + [{
            "stage": stage, "settings": settings, "fingerprint": fingerprint,
            "seconds": round(seconds, 3),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }],
        "modules": modules,
    }


def save_checkpoint(loaded: LoadedModel, output: str | Path, section: dict,
                    overwrite: bool = False) -> Path:
    """Write the model, its preprocessor and the casp section; atomic by rename."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        loaded.model.save_pretrained(tmp)
        for pre in loaded.preprocessors():
            pre.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["casp"] = section
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise CaspError(f"output directory {out} appeared while writing; not replacing it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_weight_files(path: Path) -> None:
    """A clear error for a missing or unreadable weights file (single or sharded); what is
    inside is checked when transformers loads it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CaspError(f"{index} is corrupt ({exc}); write the checkpoint again")
        return
    single = path / "model.safetensors"
    if not single.is_file():
        raise CaspError(f"checkpoint {path} has no model.safetensors: it is partial or corrupt; "
                        "write it again")
    try:
        with safe_open(str(single), "pt") as f:
            f.keys()
    except Exception as exc:
        raise CaspError(f"{single} cannot be read ({str(exc).splitlines()[0]}): the checkpoint is "
                        "corrupt or partial; write it again")


def load_checkpoint(path: str | Path, dtype: str = "auto", device: str = "cpu",
                    with_preprocessors: bool = True) -> LoadedModel:
    """Rebuild a casp checkpoint: the transformers model with every changed module back in
    place, weights checked for completeness."""
    path = Path(path)
    if not path.is_dir():
        raise CaspError(f"checkpoint {path} does not exist; check the path")
    section = read_casp_section(path)
    if section is None:
        raise CaspError(f"{path} is not a casp checkpoint (no config.json with a casp section); "
                        "load plain models with transformers or pass them as --model")
    if section.get("format_version", 0) > FORMAT_VERSION:
        raise CaspError(f"{path} was written by a newer casp (format "
                        f"{section.get('format_version')}); upgrade casp")
    _check_weight_files(path)
    config = transformers.AutoConfig.from_pretrained(path)
    arch = architecture_of(config)
    spec = spec_for_architecture(arch)
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    modules = section.get("modules", {})

    # transformers builds the model, we put the replaced modules in place inside its
    # constructor, and transformers then loads every tensor (its key renamings, sharding and
    # tied weights included). Any tensor missing means the checkpoint is damaged.
    base_cls = getattr(transformers, arch)

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        replace_modules(self, modules, dtype=None)

    cls = type(base_cls.__name__, (base_cls,), {"__init__": __init__,
                                                 "__module__": base_cls.__module__})
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, dtype=torch_dtype, output_loading_info=True)
    except CaspError:
        raise
    except Exception as exc:
        raise CaspError(f"checkpoint {path} cannot be loaded ({str(exc).splitlines()[0]}): it is "
                        "corrupt or partial; write it again")
    finally:
        transformers.logging.set_verbosity(level)
    bad = list(info.get("missing_keys", [])) + [
        m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]
    if bad:
        raise CaspError(f"checkpoint {path} is corrupt or partial: {len(bad)} tensors missing or "
                        f"misshapen (first: {sorted(bad)[0]}); write it again")
    model.eval()
    tokenizer = processor = None
    if with_preprocessors:
        tokenizer, processor = load_preprocessors(str(path), {}, spec.multimodal)
    return LoadedModel(model=model, spec=spec, tokenizer=tokenizer, processor=processor,
                       source=str(path), casp=section)


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu") -> torch.nn.Module:
    """Load a casp checkpoint as a ready-to-run transformers model (on ``device``)."""
    loaded = load_checkpoint(path, dtype=dtype, device=device, with_preprocessors=False)
    return loaded.model.to(resolve_device(device))


def checkpoint_size(path: str | Path) -> dict:
    """Bytes on disk: the whole directory, the quantized modules' stored tensors, what their
    bits claim (from the casp section), and the rest of the weights."""
    import struct


    path = Path(path)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    quantized = weights = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
            weights += nbytes
            if key.endswith(QUANTIZED_TENSOR_SUFFIXES):
                quantized += nbytes
    claimed = 0
    for d in (read_casp_section(path) or {}).get("modules", {}).values():
        claimed += described_stored_bits(d) or 0
    return {"total_bytes": total, "weights_bytes": weights, "quantized_bytes": quantized,
            "claimed_quantized_bytes": claimed // 8, "other_weights_bytes": weights - quantized}
