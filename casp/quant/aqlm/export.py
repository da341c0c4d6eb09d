"""Export to the HF AQLM checkpoint format (stock transformers with the aqlm package load
it), for models with no low-rank modules and one global setting."""
from __future__ import annotations

from pathlib import Path

import torch

from casp.errors import CaspError
from casp.hf_model import LoadedModel
from casp.quant.aqlm.linear import AQLMLinear
from casp.quant.export import refuse_lowrank, write_standard


def export_aqlm(loaded: LoadedModel, output: str | Path, overwrite: bool = False) -> Path:
    """The HF AQLM format: the casp tensors already have the aqlm layout (codes, codebooks,
    scales per quantized linear); config.json gets ``quantization_config`` {quant_method:
    "aqlm", in_group_size, out_group_size, num_codebooks, nbits_per_codebook,
    linear_weights_not_to_quantize (every other linear, by module name and by weight name,
    the forms transformers 5 and 4 match)}."""
    refuse_lowrank(loaded, "AQLM")
    quantized = {n: m for n, m in loaded.model.named_modules() if isinstance(m, AQLMLinear)}
    if not quantized:
        raise CaspError("the model has no AQLM-quantized modules to export")
    settings = {(m.num_codebooks, m.nbits_per_codebook, m.in_group_size)
                for m in quantized.values()}
    if len(settings) != 1:
        raise CaspError("the HF AQLM format holds one global setting; this model mixes "
                        f"{sorted(settings)}: keep the casp checkpoint")
    m, b, g = settings.pop()
    keep = [n for n, mod in loaded.model.named_modules() if isinstance(mod, torch.nn.Linear)]
    config = {"quant_method": "aqlm", "in_group_size": g, "out_group_size": 1,
              "num_codebooks": m, "nbits_per_codebook": b,
              "linear_weights_not_to_quantize": [x for n in keep for x in (n, f"{n}.weight")]}
    return write_standard(loaded, output, overwrite, lambda state: None, config)
