"""What the standard-format exports share (casp.quant.gptq.export, casp.quant.aqlm.export):
formats that cannot hold low-rank modules are refused, and the model is written with
transformers' key layout, its quantized tensors rewritten and ``quantization_config`` in
place of the casp section, atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from casp.errors import CaspError
from casp.hf_model import LoadedModel


def refuse_lowrank(loaded: LoadedModel, fmt: str) -> None:
    modules = loaded.casp.get("modules", {}) if loaded.casp else {}
    if any(d["type"] == "lowrank" for d in modules.values()):
        raise CaspError(f"the standard {fmt} format cannot hold low-rank modules; keep the casp "
                        "checkpoint (casp.load_model reads it)")


def write_standard(loaded: LoadedModel, output: str | Path, overwrite: bool, convert,
                    quantization_config: dict) -> Path:
    """save_pretrained, then ``convert(state)`` rewrites the quantized tensors in place, and
    config.json gets ``quantization_config`` instead of the casp section; atomic."""
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CaspError(f"{out} is not empty; choose another directory or pass --overwrite")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        loaded.model.save_pretrained(tmp)        # config, tokenizer side files, key layout
        state = {}
        for file in tmp.glob("*.safetensors"):
            state.update(load_file(file))
            file.unlink()
        for index in tmp.glob("*.safetensors.index.json"):
            index.unlink()
        convert(state)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("casp", None)
        cfg["quantization_config"] = quantization_config
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for pre in loaded.preprocessors():
            pre.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def stored_key(state: dict, module_name: str, tensor: str) -> str:
    """The key prefix transformers used for ``module_name`` (LLaVA saves legacy keys)."""
    if f"{module_name}.{tensor}" in state:
        return module_name
    tail = module_name.split(".layers.", 1)[-1]
    for key in state:
        if key.endswith(f".layers.{tail}.{tensor}"):
            return key[: -len(f".{tensor}")]
    raise CaspError(f"cannot find the stored tensors of {module_name}")
