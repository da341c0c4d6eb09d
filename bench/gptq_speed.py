"""Benchmark: GPTQ speed at the shapes of a 7B model's decoder layer, random weights.

Times the two parts of quantizing one Llama-2-7B layer: accumulating the input Hessians
(InputGram, as the engine does) and the GPTQ column loop (gptq_quantize) for each of the
layer's seven linears (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096; down: 4096 x 11008),
at 2 bits, group 128, act-order. Random weights and random correlated inputs: the time does
not depend on the values. Writes bench/results/gptq_speed.json and .md.

    .venv/bin/python bench/gptq_speed.py [--device cpu|cuda] [--tokens 8192] [--repeat 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from casp.quant.gptq.quantize import gptq_quantize
from casp.stats import InputGram

RESULTS = Path(__file__).parent / "results"
LAYER_7B = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
            ("o_proj", 4096, 4096), ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096),
            ("down_proj", 4096, 11008)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=8192,
                   help="calibration tokens for the Hessian timing (paper: 128 x 2048 = 262144)")
    p.add_argument("--batch", type=int, default=2048, help="tokens per accumulation step")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    gram_seconds = {}
    for dim in (4096, 11008):
        gram = InputGram(dim, device)
        mix = torch.randn(dim, dim, device=device) / dim**0.5
        batches = [torch.randn(args.batch, dim, device=device) @ mix
                   for _ in range(args.tokens // args.batch)]
        sync(device)
        start = time.perf_counter()        # only the accumulation is timed
        for x in batches:
            gram.add(x)
        sync(device)
        gram_seconds[dim] = time.perf_counter() - start
        hessian = 2 * gram.mean().float()
        for name, out_f, in_f in LAYER_7B:
            if in_f != dim:
                continue
            w = torch.randn(out_f, in_f, device=device) * 0.02
            sync(device)
            start = time.perf_counter()
            gptq_quantize(w, hessian, 2, 128, act_order=True)
            sync(device)
            rows.append({"module": name, "shape": [out_f, in_f],
                         "gptq_seconds": round(time.perf_counter() - start, 2)})
            print(rows[-1], flush=True)
        del gram, mix, batches
    layer = sum(r["gptq_seconds"] for r in rows)
    # per layer the engine accumulates 4 Hessians: q/k/v share one (4096), o (4096),
    # gate/up share one (4096), down (11008)
    hess = 3 * gram_seconds[4096] + gram_seconds[11008]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.machine()}, {torch.get_num_threads()} threads, CPU")
    summary = {"model_shapes": "Llama-2-7B decoder layer", "device": machine,
               "torch": torch.__version__, "bits": 2, "group_size": 128, "act_order": True,
               "hessian_tokens": args.tokens,
               "hessian_seconds_per_layer": round(hess, 2),
               "gptq_seconds_per_layer": round(layer, 2), "modules": rows,
               "date": datetime.date.today().isoformat()}
    RESULTS.mkdir(exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    (RESULTS / f"gptq_speed_{tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["| module | shape | GPTQ column loop (s) |", "|---|---|---|"]
    lines += [f"| {r['module']} | {r['shape'][0]} x {r['shape'][1]} | {r['gptq_seconds']} |"
              for r in rows]
    lines += ["", f"One Llama-2-7B layer on {machine}: GPTQ {layer:.1f} s; Hessians from "
              f"{args.tokens} tokens {hess:.1f} s (time grows linearly with the tokens); "
              f"x 32 layers for the model; {summary['date']}."]
    (RESULTS / f"gptq_speed_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
