"""Benchmark: casp's GPTQ against a reference GPTQ from PyPI (GPTQModel) at identical
settings on SmolLM2-135M, side by side in one run.

Both quantize the same float32 model with the very same calibration token ids (32 random
512-token windows of the bundled Wikipedia train split, seed 3, written once to a .pt
file): asymmetric min-max grid, group 128, damp 0.01, true-sequential, no act-order (the
reference's default group-aware reordering is off), every decoder linear. The reference
runs in its own environment (bench/reference_env.sh creates bench/.refenv) and writes its
dequantized weights as a plain float32 model; casp's perplexity code then evaluates both on
the Wikipedia and Lee test splits. Writes bench/results/gptq_reference.json and .md.

    .venv/bin/python bench/gptq_reference.py [--bits 4 2] [--nsamples 32] [--seqlen 512]
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REF_PY = ROOT / "bench" / ".refenv" / "bin" / "python"


def sh(cmd: list, log: Path) -> None:
    """Run ``cmd`` in the log's folder (GPTQModel writes a logs/ folder where it runs)."""
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        if subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT,
                          cwd=log.parent).returncode:
            raise SystemExit(f"failed: {' '.join(map(str, cmd))}; see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "gptq_reference"))
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"

    from casp import assets
    from casp.data.calibration import CalibrationConfig, calibration_batches
    from casp.loading import load_pretrained

    if not REF_PY.is_file():
        sh(["bash", ROOT / "bench" / "reference_env.sh"], log)
    loaded = load_pretrained("smollm2-135m")          # also keeps the float HF directory
    model_dir = assets.converted_dir("smollm2-135m")
    calib = CalibrationConfig(dataset="wiki", split="train", nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=3)
    ids = torch.cat([b["input_ids"] for b in calibration_batches(loaded, calib)])
    calib_file = work / "calib.pt"
    torch.save(ids, calib_file)
    del loaded

    flags = ["--dataset", "wiki", "--split", "train", "--nsamples", args.nsamples, "--seqlen",
             args.seqlen, "--seed", 3]
    casp_cmd = [sys.executable, "-m", "casp"]
    rows = []
    for bits in args.bits:
        ours, ref_dir = work / f"casp-w{bits}", work / f"ref-w{bits}"
        ref_json = work / f"ref-w{bits}.json"
        sh(casp_cmd + ["gptq", "--model", "smollm2-135m", "--output", ours, "--bits", bits,
                       "--group-size", 128, "--no-act-order", *flags], log)
        if not ref_json.is_file():
            sh([REF_PY, ROOT / "bench" / "reference_gptq.py", "--model-dir", model_dir,
                "--calib", calib_file, "--bits", bits, "--group-size", 128, "--damp", 0.01,
                "--output-json", ref_json, "--save-dequantized", ref_dir], log)
        ref = json.loads(ref_json.read_text())
        our_cfg = json.loads((ours / "config.json").read_text())["casp"]
        our_seconds = sum(s["seconds"] for s in our_cfg["stages"])
        for method, model, seconds, extra in (
                ("gptq", ours, our_seconds, {}),
                (f"ref_gptq_{ref['library']}", ref_dir, ref["quant_seconds"],
                 {"library_version": ref.get("version")})):
            out = work / f"ppl-{Path(model).name}.json"
            if not out.is_file():
                sh(casp_cmd + ["ppl", "--model", model, "--dataset", "wiki", "lee", "--split",
                               "test", "--seqlen", args.seqlen, "--max-windows", args.windows,
                               "--output", out], log)
            for r in json.loads(out.read_text()):
                rows.append({"model": "SmolLM2-135M-Instruct", "method": method,
                             "avg_bits": None, "bits": bits, "corpus": r["corpus"],
                             "ppl": round(r["ppl"], 4), "quant_seconds": round(seconds, 1),
                             "peak_mem_gb": None, "size_bytes": None,
                             "settings": {"calib_samples": args.nsamples,
                                          "calib_seqlen": args.seqlen, "seed": 3,
                                          "group_size": 128, "act_order": False, "damp": 0.01,
                                          "windows": args.windows, **extra},
                             "machine": f"{platform.machine()}, {torch.get_num_threads()} "
                                        "threads, CPU",
                             "date": datetime.date.today().isoformat()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq_reference.json").write_text(json.dumps(rows, indent=1) + "\n")
    by = {}
    for r in rows:
        by.setdefault((r["bits"], r["method"]), {})[r["corpus"]] = r
    lines = ["| bits | implementation | PPL wiki | PPL lee | quantization time (s) |",
             "|---|---|---|---|---|"]
    for (bits, method), d in by.items():
        lines.append(f"| {bits} | {method} | {d['wiki']['ppl']:.2f} | {d['lee']['ppl']:.2f} | "
                     f"{d['wiki']['quant_seconds']} |")
    lines += ["", f"SmolLM2-135M, identical calibration ids ({args.nsamples} x {args.seqlen}, wiki "
              f"train, seed 3), group 128, damp 0.01, no act-order, true-sequential; evaluation "
              f"{args.windows} x {args.seqlen} tokens of each test split with casp's perplexity "
              f"code; casp's time is its whole stage (calibration forward passes included), the "
              f"reference's its quantization call; {rows[0]['machine']}; {rows[0]['date']}."]
    (RESULTS / "gptq_reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
