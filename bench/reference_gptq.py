"""Reference GPTQ run with the GPTQModel library (PyPI ``gptqmodel``), for comparison with casp.

Run it with the reference environment's interpreter (``bench/reference_env.sh`` creates it):

    bench/.refenv/bin/python bench/reference_gptq.py --model-dir /tmp/smol_fp \
        --calib calib.pt --bits 4 --group-size 128 --output-json ref.json --save-dequantized /tmp/ref4

Settings are pinned to plain GPTQ: asymmetric min-max grid, the given damping, no MSE grid
search, no group-aware reordering (GPTQModel's ``act_group_aware``, on by default, is turned
off), ``desc_act`` only with ``--act-order``, true-sequential, the given calibration token ids
only (no sorting, concatenation or trimming), every decoder-layer linear and nothing else
(no lm_head, no embedding). The model is loaded and quantized in float32 (GPTQModel would
otherwise down-cast to bfloat16 on CPU).

``--save-dequantized DIR`` writes a plain float32 Hugging Face model whose decoder linears hold
the reference's quantized weights, dequantized from the packed GPTQ tensors (qweight, qzeros,
scales, g_idx) that the library produced, so any perplexity code can evaluate it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="plain Hugging Face Llama directory (float32)")
    p.add_argument("--calib", required=True, help=".pt file holding a LongTensor [N, L] of token ids")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="columns per group; -1 = per channel")
    p.add_argument("--act-order", action="store_true", help="desc_act: quantize columns by "
                   "descending Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean(diag(H))")
    p.add_argument("--batch-size", type=int, default=1, help="calibration forward batch size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output-json", required=True)
    p.add_argument("--save-dequantized", default=None, metavar="DIR")
    p.add_argument("--dequant-from", choices=["packed", "gptq"], default="packed",
                   help="weights written by --save-dequantized: 'packed' = decoded from the "
                   "library's packed tensors (float16 scales, as in its checkpoints); 'gptq' = the "
                   "float32 weights its GPTQ loop returned before packing (float32 scales)")
    p.add_argument("--save-quantized", default=None, metavar="DIR",
                   help="also write the library's own GPTQ checkpoint (format gptq v1) here")
    return p.parse_args(argv)


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2)


def load_calibration(path: str):
    import torch
    ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise SystemExit(f"{path}: expected a LongTensor [N, L], got "
                         f"{type(ids).__name__} {getattr(ids, 'dtype', '')} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    return ids


def build_config(args):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD

    cfg = QuantizeConfig(
        method=METHOD.GPTQ,
        format=FORMAT.GPTQ,
        bits=args.bits,
        group_size=args.group_size,
        sym=False,
        desc_act=bool(args.act_order),
        act_group_aware=False,      # GPTQModel's GAR reordering: not plain GPTQ
        static_groups=False,
        true_sequential=True,
        damp_percent=args.damp,
        mse=0.0,                    # plain min-max grid, no shrink search
        lm_head=False,
        device="cpu",
        offload_to_disk=False,
        fallback=None,              # never silently fall back to RTN
    )
    # damp_auto_increment (0.01) is used only if a Cholesky fails; the damping actually used
    # per module is recorded in the JSON (damp_used_max).
    return cfg


def find_quant_linears(model):
    """Map 'model.layers.{i}.{name}' -> packed quant-linear module, for every decoder linear."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            found[name] = module
    return found


def dequantize_packed(module):
    """Float32 [out, in] weight from a packed GPTQ module (qweight/qzeros/scales/g_idx).

    Unpacks the int32 words directly: codes are stored lowest bits first, 32 // bits per
    word; qweight packs along in_features, qzeros along out_features. After quantize() the
    library leaves the modules in checkpoint ("gptq" v1) layout, where every zero point was
    stored minus one by subtracting 0x..1111 from each whole int32 word (a zero of 0 borrows
    from its neighbour); the library undoes that with the same whole-word addition, and so
    does this. The product is formed in float32: exact for the stored float16 scales.
    """
    import torch
    bits = module.bits
    if bits not in (2, 4, 8):
        raise SystemExit(f"dequantization of {bits}-bit packing is not implemented here")
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    qweight = module.qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask      # [in/pf, pf, out]
    codes = codes.reshape(-1, qweight.shape[1])[: module.in_features]   # [in, out]
    qzeros = module.qzeros.to(torch.int64) & 0xFFFFFFFF
    if module.qzero_format() == 1:
        ones = sum(1 << int(s) for s in shifts.tolist())
        qzeros = (qzeros + ones) & 0xFFFFFFFF
    zeros = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask       # [groups, out/pf, pf]
    zeros = zeros.reshape(qzeros.shape[0], -1)[:, : module.out_features]
    scales = module.scales.to(torch.float32)                            # [groups, out]
    g = module.g_idx.long()
    w = scales[g] * (codes.to(torch.float32) - zeros[g].to(torch.float32))
    return w.t().contiguous()


def capture_gptq_outputs(keep_weights: bool):
    """Record what each GPTQ task returns: the damping it used and (optionally) its weight.

    A thin wrapper around GPTQModel's ``GPTQ.quantize``; it changes nothing. Weights are the
    float32 result before the library packs them, keyed by the module's full name, used to
    cross-check the packed result and for ``--dequant-from gptq``.
    """
    import torch
    from gptqmodel.quantization import gptq as gptq_mod
    weights, damps = {}, {}
    original = gptq_mod.GPTQ.quantize

    def quantize(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        named = getattr(self, "_named_module", None)
        key = getattr(named, "full_name", None) or self.name
        damps[key] = float(result[6])
        if keep_weights:
            weights[key] = result[0].detach().to("cpu", torch.float32).clone()
        return result

    gptq_mod.GPTQ.quantize = quantize
    return weights, damps


def main(argv=None):
    args = parse_args(argv)
    if args.save_dequantized and args.dequant_from == "packed" and args.bits not in (2, 4, 8):
        raise SystemExit(f"--save-dequantized decodes 2/4/8-bit packing only; for {args.bits} bits "
                         f"use --dequant-from gptq")
    # GPTQModel 7.6 sizes its CPU pool as ceil(cores/2) but always asks for a 2-worker loader
    # sub-pool, so on a machine with <= 2 cores it fails ("Virtual pool 'model_loader:cpu'
    # requests 2 workers but parent 'cpu' only has 1") unless this is set before the import.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

    calib = load_calibration(args.calib)
    nsamples, seqlen = calib.shape

    import gptqmodel
    from gptqmodel import GPTQModel

    qcfg = build_config(args)
    captured, damps = capture_gptq_outputs(keep_weights=bool(args.save_dequantized))
    model = GPTQModel.load(args.model_dir, qcfg, dtype=torch.float32)
    n_layers = model.model.config.num_hidden_layers
    dataset = [{"input_ids": row.unsqueeze(0).clone(),
                "attention_mask": torch.ones(1, seqlen, dtype=torch.long)} for row in calib]

    t0 = time.perf_counter()
    model.quantize(dataset, batch_size=args.batch_size, calibration_sort=None,
                   calibration_concat_size=None, calibration_data_min_length=0)
    quant_seconds = time.perf_counter() - t0

    qlinears = find_quant_linears(model.model)
    expected = {f"model.layers.{i}.{n}" for i in range(n_layers) for n in LINEAR_NAMES}
    missing = expected - set(qlinears)
    extra = set(qlinears) - expected
    if missing or extra:
        raise SystemExit(f"quantized modules differ from the decoder linears: missing "
                         f"{sorted(missing)[:5]} ({len(missing)}), extra {sorted(extra)[:5]}")

    first = qlinears[f"model.layers.0.{LINEAR_NAMES[0]}"]
    info = {
        "library": "gptqmodel",
        "version": gptqmodel.__version__,
        "torch": torch.__version__,
        "bits": args.bits,
        "group_size": args.group_size,
        "act_order": bool(args.act_order),
        "damp": args.damp,
        "nsamples": int(nsamples),
        "seqlen": int(seqlen),
        "quant_seconds": round(quant_seconds, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "threads": torch.get_num_threads(),
        "damp_used_max": max(damps.values()) if damps else None,
        "gptq_tasks": len(damps),
        "quantized_modules": len(qlinears),
        "packed_module_class": type(first).__name__,
        "scales_dtype": str(first.scales.dtype),
        "settings": {
            "sym": qcfg.sym, "desc_act": qcfg.desc_act,
            "act_group_aware": getattr(qcfg, "act_group_aware", None),
            "static_groups": getattr(qcfg, "static_groups", None),
            "true_sequential": qcfg.true_sequential, "mse": getattr(qcfg, "mse", None),
            "damp_percent": qcfg.damp_percent,
            "damp_auto_increment": getattr(qcfg, "damp_auto_increment", None),
            "format": str(getattr(qcfg.format, "value", qcfg.format)),
            "lm_head": qcfg.lm_head,
        },
    }

    if args.save_dequantized:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        out = Path(args.save_dequantized)
        out.mkdir(parents=True, exist_ok=True)
        dense = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        modules = dict(dense.named_modules())
        vs_gptq = 0.0
        off_grid = 0
        with torch.no_grad():
            for name in sorted(expected):
                packed = dequantize_packed(qlinears[name])
                loop = captured.get(name)
                if loop is None:
                    raise SystemExit(f"{name}: no GPTQ output was captured")
                diff = (packed - loop).abs()
                vs_gptq = max(vs_gptq, diff.max().item())
                # packed = fp16(s) * (q - z) and loop = s * (q - z): they differ only by the
                # float16 rounding of s (relative 2^-11, absolute 2^-24 per level if subnormal)
                off_grid += int((diff > loop.abs() * 2.0 ** -10 + 2.0 ** -24 * 256).sum().item())
                w = packed if args.dequant_from == "packed" else loop
                target = modules[name].weight
                if w.shape != target.shape:
                    raise SystemExit(f"{name}: dequantized shape {tuple(w.shape)} != "
                                     f"{tuple(target.shape)}")
                target.copy_(w)
        if off_grid:
            raise SystemExit(f"{off_grid} packed weights disagree with the GPTQ loop's output "
                             f"beyond float16 scale rounding (max abs diff {vs_gptq:g})")
        dense.save_pretrained(out)
        try:
            AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(out)
        except Exception as exc:  # a model dir without tokenizer is still usable
            print(f"note: tokenizer not copied: {exc}", file=sys.stderr)
        info["dequantized_dir"] = str(out)
        info["dequant_from"] = args.dequant_from
        info["packed_vs_gptq_loop_max_abs_diff"] = vs_gptq

    if args.save_quantized:
        model.save(args.save_quantized)
        info["quantized_dir"] = str(args.save_quantized)

    info["peak_rss_gb_total"] = round(peak_rss_gb(), 3)
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
