"""Benchmark: SmolLM2-135M perplexity after low-rank W_q/W_k, whitened vs plain SVD.

Settings follow the probe in the foundation issue: calibration = 16 random 512-token windows
(seed 3) from the first 80% of the bundled Wikipedia text; evaluation = 16 consecutive
512-token windows from the last 20%. Each configuration runs in its own process so that
peak memory is its own. Writes bench/results/lowrank_quality.json and .md.

    .venv/bin/python bench/lowrank_quality.py [--nsamples 16] [--windows 16] [--seqlen 512]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# (method, compression, propagate): "transformed" feeds each layer the outputs of the already
# factorised layers (casp's default); "original" collects every layer's statistics on the
# original model's activations (what hooks on an unmodified model measure).
CONFIGS = [(None, None, None),
           ("whitened", 0.5, "transformed"), ("whitened", 0.75, "transformed"),
           ("whitened", 0.5, "original"), ("whitened", 0.75, "original"),
           ("plain", 0.5, "transformed"), ("plain", 0.75, "transformed")]


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"


def run_one(method: str | None, compression: float | None, propagate: str | None, args) -> list:
    from casp.eval.perplexity import corpus_perplexity
    from casp.data.calibration import CalibrationConfig
    from casp.loading import load_pretrained
    from casp.lowrank import LowRankPass
    from casp.pipeline import peak_rss_gb, run_stage

    device = torch.device("cpu")
    loaded = load_pretrained("smollm2-135m")
    seconds = None
    stage_peak = None
    if method is not None:
        calib = CalibrationConfig(dataset="wiki", split="train", nsamples=args.nsamples,
                                  seqlen=args.seqlen, seed=3, batch_size=8)
        lowrank = LowRankPass(compression=compression, method=method, propagate=propagate)
        res = run_stage(loaded, "lowrank", [lowrank], calib, device, progress=False)
        seconds, stage_peak = res.seconds, res.peak_rss_gb
    rows = []
    for corpus in ("wiki", "lee"):
        ppl = corpus_perplexity(loaded, corpus, "test", args.seqlen, args.windows, device)
        rows.append({
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
            "method": "fp" if method is None else f"lowrank_{method}",
            "compression": compression, "propagate": propagate, "avg_bits": None, "corpus": corpus, "split": "test",
            "ppl": round(ppl.ppl, 4), "eval_windows": ppl.windows, "eval_seqlen": ppl.seqlen,
            "eval_tokens": ppl.tokens, "quant_seconds": None,
            "lowrank_seconds": None if seconds is None else round(seconds, 2),
            "peak_mem_gb": round(stage_peak if stage_peak else peak_rss_gb(), 3),
            "size_bytes": None,
            "settings": {"calib_samples": args.nsamples, "calib_seqlen": args.seqlen,
                         "calib_corpus": "wiki (train split)", "seed": 3,
                         "windows": args.windows},
            "machine": machine(), "date": datetime.date.today().isoformat()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        method, comp, propagate = (None if a == "none" else a for a in args.one)
        print("ROWS " + json.dumps(run_one(method, comp and float(comp), propagate, args)))
        return
    rows = []
    for method, comp, propagate in CONFIGS:
        cmd = [sys.executable, __file__, "--one", method or "none", str(comp or "none"),
               propagate or "none",
               "--nsamples", str(args.nsamples), "--windows", str(args.windows),
               "--seqlen", str(args.seqlen)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        new = json.loads(next(l for l in out.splitlines() if l.startswith("ROWS "))[5:])
        for r in new:
            print(f"{r['method']:18s} c={r['compression']} {r['propagate']} {r['corpus']:5s} ppl={r['ppl']:.2f} "
                  f"time={r['lowrank_seconds']} peak={r['peak_mem_gb']} GB", flush=True)
        rows += new
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowrank_quality.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| method | W_q/W_k compression | statistics from | PPL wiki | PPL lee | "
             "low-rank time (s) | process peak RSS (GB) |", "|---|---|---|---|---|---|---|"]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["method"], r["compression"], r["propagate"]), {})[r["corpus"]] = r
    for (method, comp, propagate), d in by_key.items():
        w = d["wiki"]
        source = {"transformed": "compressed model", "original": "original model"}.get(
            propagate, "-") if method == "lowrank_whitened" else "-"
        lines.append(f"| {method} | {'-' if comp is None else f'{comp:.0%}'} | {source} | "
                     f"{w['ppl']:.2f} | {d['lee']['ppl']:.2f} | {w['lowrank_seconds'] or '-'} | "
                     f"{w['peak_mem_gb']} |")
    w = rows[0]
    lines.append("")
    lines.append(f"SmolLM2-135M; calibration {args.nsamples} x {args.seqlen} tokens (wiki train, "
                 f"seed 3); evaluation {w['eval_windows']} x {w['eval_seqlen']} tokens (test "
                 f"split of each corpus); {w['machine']}; {w['date']}.")
    (RESULTS / "lowrank_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
