"""Benchmark: QuIP# vs CASP_QuIP# on SmolLM2-135M, with the ablations, beside the GPTQ and
AQLM rows of the other quality benchmarks.

For each uniform QuIP# codebook of the sweep (e8p12: 2 bits; e8p12rvq3b: 3 bits) the
uniform model's honest average bits (codes, one sign bit per input and output, the scale)
are the budget of:
    casp_quip          low-rank W_q/W_k (75%, whitened, ranks multiple of 8) + bit allocation
                       for QuIP# (widths {2,3,4} = e8p12 / e8p12rvq3b / e8p12rvq4b; the
                       low-rank factors at 3 bits as the paper's code) + QuIP# with the plan
    casp_quip_f2       the same with the factors at their layer's width (more bits left for
                       the layers)
    casp_quip_f4       the same with the factors at 4 bits (e8p12rvq4b)
    casp_quip_c50      50% compression instead of 75%, factors at their layer's width
    alloc_only_quip    bit allocation on the original model + QuIP# (no low-rank)
    lowrank_only_quip  low-rank + uniform QuIP# at the same codebook (its saved bits unspent)
    casp_quip_m        the measured search (casp allocate --measured --lowrank-options 0.75):
                       each layer's W_q/W_k dense or low-rank 75% (factors 4-bit), and the
                       codebook of each part (W_q/W_k, W_v/W_o, MLP; widths {2,3}) chosen from
                       the output KL each option causes on 2 calibration windows; casp
                       lowrank --plan; QuIP# with the plan (first budget only)
(the variants and ablations at the 2-bit budget only). QuIP#: random-sign Hadamard incoherence,
BlockLDLQ, Hessians collected true-sequentially in the pass, sigma_reg 0.01, no fine-tuning.

Perplexity on the bundled Wikipedia text and the Lee corpus (test splits), computed from the
packed form (codes decoded, transforms applied at every forward), time of every stage,
process peak RSS, checkpoint size against what the bits claim. Every stage runs as its own
casp process; finished checkpoints under --work are reused, so an interrupted benchmark
resumes. Writes bench/results/quip_quality.json, .md.

    .venv/bin/python bench/quip_quality.py [--nsamples 32] [--budgets e8p12 e8p12rvq3b]
    .venv/bin/python bench/quip_quality.py --measured-only     # casp_quip_m alone, merged
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import (MODEL, ROOT, add_measured_args, avg_bits_of,  # noqa: E402
                          calib_flags, calibration_note, casp, evaluate, lowrank_note, measured_settings,
                          measured_stages, merged_rows, peak_of, quality_parser, row,
                          stage_seconds, write_results)

CODEBOOK_MAP = "2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b"
ALLOWED_BITS = "2,3,4"
FACTOR_BITS = 3
MEASURED_FACTOR_BITS = 4        # casp_quip_f4 was the best block-influence variant
MEASURED_BITS = "2,3"           # the measured search: each width costs a quantization per layer
QUIP_BITS = {"e8p12": 2, "e8p12rvq3b": 3, "e8p12rvq4b": 4}


def settings(codebook: str, **extra) -> dict:
    return {"codebook": codebook, "sigma_reg": 0.01, "hessians": "true-sequential",
            "finetune_steps": 0, "act_order": None, "damp": None, **extra}


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    rows = row("fp", None, evaluate(MODEL, work, args), None, None, None, args)

    lowranks = {}
    for compression in (0.75, 0.5):
        path = work / f"lowrank{int(compression * 100)}-m8"
        casp("lowrank", "--model", MODEL, "--output", path, "--compression", compression,
             "--rank-multiple", 8, *calib_flags(args), log=log)
        lowranks[compression] = (path, stage_seconds(path, "lowrank"))

    for k, codebook in enumerate(args.budgets):
        uniform = work / f"quip-{codebook}"
        casp("quip", "--model", MODEL, "--output", uniform, "--codebook", codebook,
             *calib_flags(args), log=log)
        budget = avg_bits_of(uniform)
        rows += row("quip", budget, evaluate(uniform, work, args),
                    stage_seconds(uniform, "quip"), peak_of(uniform), uniform, args,
                    **settings(codebook))
        print(f"quip {codebook}: {budget:.4f} bits", flush=True)
        write(rows, args)
        # (method, compression or None, allocate, factor bits: 0 = the layer's width)
        methods = [("casp_quip", 0.75, True, FACTOR_BITS)]
        if k == 0:
            methods += [("casp_quip_f2", 0.75, True, 0), ("casp_quip_f4", 0.75, True, 4),
                        ("casp_quip_c50", 0.5, True, 0),
                        ("alloc_only_quip", None, True, 0), ("lowrank_only_quip", 0.75, False, 0)]
        for method, compression, allocate, factor_bits in methods:
            if method in args.skip:
                continue
            out = work / f"{method}-{codebook}"
            source, seconds = lowranks[compression] if compression else (MODEL, 0.0)
            extra = settings(codebook, compression=compression)
            plan_args: list = []
            if allocate:
                plan = work / f"plan-{method}-{codebook}.json"
                if not plan.is_file():
                    # the budget by name: exactly what uniform QuIP# at that codebook stores
                    casp("allocate", "--quantizer", "quip", "--model", source, "--output", plan,
                         "--budget", codebook, "--bits", ALLOWED_BITS, "--codebooks",
                         CODEBOOK_MAP, "--factor-bits", factor_bits, *calib_flags(args),
                         log=log)
                plan_data = json.loads(plan.read_text())
                seconds += plan_data["importance"]["seconds"]
                layer_bits = [l["bits"] for l in plan_data["layers"]]
                extra.update({"budget": budget, "allowed_bits": ALLOWED_BITS,
                              "codebook_map": CODEBOOK_MAP,
                              "factor_bits": factor_bits or "layer's", "layer_bits": layer_bits})
                if source == MODEL and set(layer_bits) == {int(QUIP_BITS[codebook])}:
                    # every layer at the uniform width: the plan is the uniform model
                    for r in [r for r in rows if r["method"] == "quip"
                              and r["settings"]["codebook"] == codebook]:
                        rows.append({**r, "method": method, "settings": {
                            **r["settings"], **extra, "identical_to": "quip"}})
                    print(f"{method}: the plan is uniform {codebook} (identical to quip)",
                          flush=True)
                    continue
                plan_args = ["--plan", plan]
            casp("quip", "--model", source, "--output", out, *plan_args, "--codebook", codebook,
                 *calib_flags(args), log=log)
            seconds += stage_seconds(out, "quip")
            rows += row(method, avg_bits_of(out), evaluate(out, work, args), seconds,
                        peak_of(out), out, args, **extra)
            print(f"{method} at the {codebook} budget: {avg_bits_of(out):.4f} bits", flush=True)
            write(rows, args)
    return rows


def measured_rows(args) -> list[dict]:
    """casp_quip_m at the first budget: the measured search (each layer's W_q/W_k dense or
    low-rank 75%, each width, scored by the output KL it causes) -> casp lowrank --plan ->
    QuIP# with the plan."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    codebook = args.budgets[0]
    plan = work / f"plan-casp_quip_m-{codebook}.json"
    if not plan.is_file():
        casp("allocate", "--quantizer", "quip", "--model", MODEL, "--output", plan, "--budget",
             codebook, "--bits", MEASURED_BITS, "--codebooks", CODEBOOK_MAP, "--factor-bits",
             MEASURED_FACTOR_BITS, "--measured", "--lowrank-options", 0.75, "--rank-multiple", 8,
             "--search-samples", args.search_samples, *calib_flags(args),
             # batches of the measured size, so exactly those windows are scored
             "--batch-size", args.search_samples, log=log)
    out = work / f"casp_quip_m-{codebook}"
    plan_data, seconds = measured_stages(plan, MODEL, work / f"lowrank-casp_quip_m-{codebook}",
                                         "quip", out, ["--codebook", codebook],
                                         calib_flags(args), log)
    extra = settings(codebook, compression=0.75, allocation="measured",
                     budget=plan_data["budget_bits"],
                     allowed_bits=MEASURED_BITS, codebook_map=CODEBOOK_MAP,
                     factor_bits=MEASURED_FACTOR_BITS, search_samples=args.search_samples,
                     **measured_settings(plan_data))
    rows = row("casp_quip_m", avg_bits_of(out), evaluate(out, work, args), seconds,
               peak_of(out), out, args, **extra)
    print(f"casp_quip_m at the {codebook} budget: {avg_bits_of(out):.4f} bits", flush=True)
    return rows


def write(rows: list[dict], args) -> None:
    """Results so far (each finished method), so that a long run reports as it goes."""
    write_results("quip_quality", rows, table(rows, args))


NAMES = {"fp": "-", "quip": "{cb}, every linear",
         "casp_quip": "low-rank 75% + plan at the {cb} budget, factors 3-bit",
         "casp_quip_f2": "low-rank 75% + plan at the {cb} budget, factors at the layer's width",
         "casp_quip_f4": "low-rank 75% + plan at the {cb} budget, factors 4-bit",
         "casp_quip_c50": "low-rank 50% + plan at the {cb} budget, factors at the layer's width",
         "alloc_only_quip": "plan at the {cb} budget, no low-rank",
         "lowrank_only_quip": "low-rank 75% + {cb}",
         "casp_quip_m": "measured search at the {cb} budget (per layer: W_q/W_k dense or "
                        "low-rank 75% with 4-bit factors, each part's codebook of 2=e8p12,3=e8p12rvq3b)"}


def table(rows: list[dict], args) -> str:
    by: dict = {}
    for r in rows:
        key = (r["method"], r["settings"].get("codebook"))
        by.setdefault(key, {})[r["corpus"]] = r
    lines = ["| method | setting | avg bits | PPL wiki | PPL lee | time (s) | peak RSS (GB) | "
             "checkpoint (MiB) | quantized tensors / claimed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, codebook), d in by.items():
        w = d["wiki"]
        ratio = (f"{w['quantized_bytes'] / w['claimed_quantized_bytes']:.3f}"
                 if w.get("claimed_quantized_bytes") else "-")
        size = f"{w['size_bytes'] / 2**20:.1f}" if w["size_bytes"] else "-"
        bits = w["avg_bits"] if w["avg_bits"] is not None else "-"
        plan = w["settings"].get("layer_bits")
        note = " (same plan as quip)" if w["settings"].get("identical_to") else ""
        if plan and not note:
            wide = {b: [i for i, x in enumerate(plan) if x == b]
                    for b in sorted(set(plan)) if b > 2}
            note = " (" + "; ".join(f"{b} bits: layers {', '.join(map(str, v))}"
                                    for b, v in wide.items()) + ")" if wide else " (all 2 bits)"
            if w["settings"].get("parts") is not None:
                note = lowrank_note(w["settings"])
        lines.append(f"| {method} | {NAMES.get(method, method).format(cb=codebook)}{note} | "
                     f"{bits} | {w['ppl']:.2f} | {d['lee']['ppl']:.2f} | "
                     f"{w['quant_seconds'] or '-'} | {w['peak_mem_gb'] or '-'} | {size} | "
                     f"{ratio} |")
    r0 = rows[0]
    searched = ", ".join(sorted({str(r["settings"]["search_samples"]) for r in rows
                                 if "search_samples" in r["settings"]})) or "-"
    lines += ["", f"{calibration_note(args, r0)} from the packed form; QuIP#: random-sign Hadamard incoherence, "
              f"BlockLDLQ (blocks of 8), true-sequential Hessians, sigma_reg 0.01, no "
              f"fine-tuning; CASP: whitened low-rank W_q/W_k (ranks multiple of 8), "
              f"block-influence allocation over {CODEBOOK_MAP}; casp_quip_m: the measured "
              f"search (output KL on {searched} calibration windows); "
              f"average bits count codes, sign bits and scales; time includes every stage; "
              f"{r0['machine']}; {r0['date']} (newest row: {max(r['date'] for r in rows)})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = quality_parser(__doc__)
    p.add_argument("--budgets", nargs="+", default=["e8p12", "e8p12rvq3b"],
                   help="uniform codebooks whose bits are the budgets (default: e8p12 "
                        "e8p12rvq3b)")
    p.add_argument("--skip", nargs="*", default=[],
                   help="methods to leave out (casp_quip, casp_quip_f2, casp_quip_f4, "
                        "casp_quip_c50, alloc_only_quip, lowrank_only_quip, casp_quip_m)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "quip"),
                   help="where checkpoints and logs go (reused by a rerun)")
    add_measured_args(p, "casp_quip_m", 2, "calibration windows")
    args = p.parse_args()
    start = time.perf_counter()
    if args.measured_only:
        rows = merged_rows("quip_quality", measured_rows(args))
    else:
        rows = run(args)
        if "casp_quip_m" not in args.skip:
            rows += measured_rows(args)
    write(rows, args)
    print(table(rows, args))
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
