"""Benchmark: GPTQ vs CASP_GPTQ (and QuIP# / AQLM rows) on the mini LLaVA, a real small
multimodal model (DINOv2 ViT-S/14 + trained projector + SmolLM2-135M-Instruct).

For each uniform GPTQ setting (2-bit g128, 3-bit g128) the uniform model's average bits are
the budget of CASP_GPTQ: whitened low-rank W_q/W_k (75%, ranks multiple of 8) + block
influence allocation (widths {2,3,4,5}, factors 3-bit per channel) + GPTQ with the plan.
Every stage is calibrated with easy-vqa training samples (image + question + answer through
the vision tower and projector) unless the method ends in ``_text``: then every stage sees
text only (Wikipedia windows), the paper's setting for the low-rank stage. Optional rows
(--quip, --aqlm): uniform QuIP# E8P12 and CASP_QuIP# at its budget; uniform AQLM 2x8 and
CASP_AQLM. casp_gptq_m: the measured search (casp allocate --measured --lowrank-options
0.75), which keeps W_q/W_k dense where cutting them costs more than the bits it saves buy.

Measured on easy-vqa's test split (a fixed random draw): answer accuracy (greedy generation,
exact match after normalisation), answer perplexity given image and question, per question
type; quantization time of all stages, peak RSS, checkpoint size. Every stage runs as its own
casp process; finished checkpoints under --work are reused, so an interrupted run resumes.
Writes bench/results/mini_llava_quality.json and .md.

    .venv/bin/python bench/mini_llava_quality.py [--samples 500] [--quip] [--aqlm]
    .venv/bin/python bench/mini_llava_quality.py --measured-only   # casp_gptq_m, merged
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import (ROOT, add_measured_args, avg_bits_of, casp,  # noqa: E402
                          lowrank_note, machine, measured_settings, measured_stages,
                          merged_rows, peak_of, stage_seconds, write_results)

MODEL = "mini-llava"
MODEL_NAME = "mini LLaVA (DINOv2 ViT-S/14 + projector + SmolLM2-135M-Instruct)"
ALLOWED_BITS = "2,3,4,5"
MEASURED_BITS = "2,3,4"         # the measured search: each width costs a quantization per layer


def calib_flags(args, text: bool) -> list:
    if text:
        return ["--dataset", "wiki", "--split", "train", "--nsamples", args.text_nsamples,
                "--seqlen", args.text_seqlen, "--seed", 3]
    return ["--mm-data", "easy-vqa", "--nsamples", args.mm_nsamples, "--seed", 3]


def evaluate(model, work: Path, args) -> dict:
    out = work / f"vqa-{Path(str(model)).name}.json"
    if not out.is_file() or json.loads(out.read_text())["samples"] != args.samples:
        casp("vqa", "--model", model, "--samples", args.samples, "--seed", 0, "--output", out,
             log=work / "log.txt")
    return json.loads(out.read_text())


def row(method, avg_bits, res: dict, seconds, peak, checkpoint, args, **settings) -> dict:
    from casp.checkpoint import checkpoint_size

    size = checkpoint_size(checkpoint) if checkpoint else None
    return {"model": MODEL_NAME, "method": method,
            "avg_bits": None if avg_bits is None else round(avg_bits, 4),
            "task": "easy-vqa-test", "accuracy": round(res["accuracy"], 4),
            "answer_ppl": round(res["answer_ppl"], 4),
            "accuracy_by_type": {k: round(v, 4) for k, v in res["accuracy_by_type"].items()},
            "samples": res["samples"],
            "quant_seconds": None if seconds is None else round(seconds, 1),
            "peak_mem_gb": peak, "size_bytes": size["total_bytes"] if size else None,
            "settings": {"eval_samples": args.samples, "eval_seed": 0, **settings},
            "machine": machine(), "date": datetime.date.today().isoformat()}


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    rows = args.rows = [row("fp", None, evaluate(MODEL, work, args), None, None, None, args)]
    write(rows, args)

    lowranks = {}
    for text in (False, True):
        path = work / ("lowrank75-text" if text else "lowrank75-mm")
        casp("lowrank", "--model", MODEL, "--output", path, "--compression", 0.75,
             "--rank-multiple", 8, *calib_flags(args, text), log=log)
        lowranks[text] = (path, stage_seconds(path, "lowrank"))

    def calib_desc(text):
        return (f"wiki text {args.text_nsamples}x{args.text_seqlen}" if text else
                f"easy-vqa train {args.mm_nsamples} image+question+answer samples")

    for bits in args.bits:
        uniform = work / f"gptq-w{bits}g128"
        casp("gptq", "--model", MODEL, "--output", uniform, "--bits", bits, "--group-size", 128,
             *calib_flags(args, False), log=log)
        budget = avg_bits_of(uniform)
        rows.append(row("gptq", budget, evaluate(uniform, work, args),
                        stage_seconds(uniform, "gptq"), peak_of(uniform), uniform, args,
                        setting=f"w{bits}g128", calibration=calib_desc(False)))
        write(rows, args)
        for text in (False, True):
            method = "casp_gptq_text" if text else "casp_gptq"
            source, seconds = lowranks[text]
            plan = work / f"plan-{method}-w{bits}.json"
            if not plan.is_file():
                casp("allocate", "--model", source, "--output", plan, "--budget",
                     f"{bits}@128", "--bits", ALLOWED_BITS, "--factor-bits", 3,
                     *calib_flags(args, text), log=log)
            plan_data = json.loads(plan.read_text())
            seconds += plan_data["importance"]["seconds"]
            out = work / f"{method}-w{bits}g128"
            casp("gptq", "--model", source, "--output", out, "--plan", plan,
                 *calib_flags(args, text), log=log)
            seconds += stage_seconds(out, "gptq")
            rows.append(row(method, avg_bits_of(out), evaluate(out, work, args), seconds,
                            peak_of(out), out, args, setting=f"budget of w{bits}g128",
                            calibration=calib_desc(text),
                            layer_bits=[l["bits"] for l in plan_data["layers"]]))
            write(rows, args)

    if args.quip:
        rows += codebook_rows("quip", "e8p12", ["--codebook", "e8p12"], "2,3,4", lowranks[False],
                              work, args, calib_desc(False))
    if args.aqlm:
        flags = ["--codebooks", "2x8", "--steps-per-round", args.aqlm_steps, "--max-rounds",
                 args.aqlm_rounds]
        rows += codebook_rows("aqlm", "2x8", flags, "2,3,4", lowranks[False], work, args,
                              calib_desc(False))
    return rows


def measured_rows(args) -> list[dict]:
    """casp_gptq_m at each GPTQ budget, image-calibrated: the measured search (each layer's
    W_q/W_k dense or low-rank 75%, each part's width of MEASURED_BITS, scored by the KL of the
    model's next-token distribution each option causes on easy-vqa samples; one set of
    measurements for every budget) -> casp lowrank --plan -> GPTQ with the plan."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    measurements = work / "casp_gptq_m.measured.json"
    rows = []
    for bits in args.bits:
        plan = work / f"plan-casp_gptq_m-w{bits}.json"
        if not plan.is_file():
            casp("allocate", "--model", MODEL, "--output", plan, "--budget", f"{bits}@128",
                 "--bits", MEASURED_BITS, "--factor-bits", 3, "--measured", "--lowrank-options",
                 0.75, "--rank-multiple", 8, "--search-samples", args.search_samples,
                 "--measurements", measurements, *calib_flags(args, False), log=log)
        out = work / f"casp_gptq_m-w{bits}g128"
        plan_data, seconds = measured_stages(plan, MODEL, work / f"lowrank-casp_gptq_m-w{bits}",
                                             "gptq", out, [], calib_flags(args, False), log)
        rows.append(row("casp_gptq_m", avg_bits_of(out), evaluate(out, work, args), seconds,
                        peak_of(out), out, args, setting=f"budget of w{bits}g128",
                        calibration=f"easy-vqa train {args.mm_nsamples} image+question+answer "
                                    "samples",
                        allocation="measured", search_samples=args.search_samples,
                        allowed_bits=MEASURED_BITS, **measured_settings(plan_data)))
        print(f"casp_gptq_m at the w{bits}g128 budget: {avg_bits_of(out):.4f} bits, accuracy "
              f"{rows[-1]['accuracy']:.4f}", flush=True)
    return rows


def sweep_rows(args) -> list[dict]:
    """bench/sweep.py's rows on the mini LLaVA, image-calibrated, for each QUANTIZER:BUDGET of
    --sweep: the uniform quantizer (its row replaces the committed one of that setting),
    casp_<q>_m (the measured search with the sweep's settings: W_q/W_k of each layer dense or
    whitened low-rank at 50% or 75%, the factors at each width, every part's width from the
    calibrated score on --search-samples easy-vqa samples; casp lowrank --plan; the quantizer
    with the plan) and alloc_<q>_m (the ablation: the same measurements solved without the
    low-rank options). One search per quantizer and group size; its time counts in full in
    both rows."""
    from sweep import COMPRESSIONS, SWEEPS, search_flags, uniform_flags, uniform_width

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    calib = calib_flags(args, False)
    calibration = f"easy-vqa train {args.mm_nsamples} image+question+answer samples"
    rows = []
    for quantizer, budget in args.sweep:
        setting = f"w{budget.replace('@', 'g')}" if quantizer == "gptq" else budget
        flags = uniform_flags(quantizer, budget)
        uniform = work / f"sweep-{quantizer}-{setting}"
        casp(quantizer, "--model", MODEL, "--output", uniform, *flags, *calib, log=log)
        uniform_s = stage_seconds(uniform, quantizer)
        uniform_row = row(quantizer, avg_bits_of(uniform), evaluate(uniform, work, args),
                          uniform_s, peak_of(uniform), uniform, args, setting=setting,
                          calibration=calibration)
        rows.append(uniform_row)
        tag, search = search_flags(quantizer, budget, args.search_samples)
        record = work / f"sweep-{tag}.measured.json"
        seconds_file = work / f"sweep-{tag}.seconds"
        for method, extra in ((f"casp_{quantizer}_m", ()),
                              (f"alloc_{quantizer}_m", ("--without-lowrank",))):
            plan = work / f"sweep-plan-{method}-{setting}.json"
            if not plan.is_file():
                casp("allocate", "--model", MODEL, "--output", plan, *search,
                     "--measurements", record, *extra, *calib, log=log)
                if not seconds_file.is_file():
                    seconds_file.write_text(
                        f"{json.loads(plan.read_text())['importance']['seconds']}\n")
            plan_data = json.loads(plan.read_text())
            search_s = float(seconds_file.read_text())
            settings = dict(setting=f"budget of {setting}", calibration=calibration,
                            allocation="measured", search_samples=args.search_samples,
                            compressions=COMPRESSIONS if not extra else None,
                            allowed_bits=SWEEPS[quantizer]["widths"], search_seconds=search_s,
                            **measured_settings(plan_data))
            labels = {label for r in plan_data["layers"] for label in r["units"].values()}
            if extra and labels == {f"dense@{uniform_width(budget)}"}:
                # every part at the uniform width: the plan is the uniform model
                rows.append({**uniform_row, "method": method,
                             "quant_seconds": round(search_s + uniform_s, 1),
                             "settings": {**uniform_row["settings"], **settings,
                                          "identical_to": quantizer}})
                continue
            out = work / f"sweep-{method}-{setting}"
            plan_data, seconds = measured_stages(plan, MODEL, work / f"sweep-lowrank-{method}-"
                                                 f"{setting}", quantizer, out, flags, calib, log)
            seconds += search_s - plan_data["importance"]["seconds"]
            rows.append(row(method, avg_bits_of(out), evaluate(out, work, args), seconds,
                            peak_of(out), out, args, **settings))
            print(f"{method} at the {setting} budget: {avg_bits_of(out):.4f} bits, accuracy "
                  f"{rows[-1]['accuracy']:.4f} ({seconds:.0f} s)", flush=True)
            write(merged_rows("mini_llava_quality", rows), args)
    return rows


def codebook_rows(quantizer: str, setting: str, flags: list, widths: str, lowrank: tuple,
                  work: Path, args, calibration: str) -> list[dict]:
    """Uniform ``quantizer`` at ``setting`` and CASP_<quantizer> at its budget (the budget by
    name: exactly what the uniform setting stores), image-calibrated."""
    log = work / "log.txt"
    uniform = work / f"{quantizer}-{setting}"
    casp(quantizer, "--model", MODEL, "--output", uniform, *flags, *calib_flags(args, False),
         log=log)
    rows = [row(quantizer, avg_bits_of(uniform), evaluate(uniform, work, args),
                stage_seconds(uniform, quantizer), peak_of(uniform), uniform, args,
                setting=setting, calibration=calibration)]
    write(args.rows + rows, args)
    source, seconds = lowrank
    plan = work / f"plan-casp_{quantizer}.json"
    if not plan.is_file():
        casp("allocate", "--quantizer", quantizer, "--model", source, "--output", plan,
             "--budget", setting, "--bits", widths, "--factor-bits", 3,
             *calib_flags(args, False), log=log)
    plan_data = json.loads(plan.read_text())
    out = work / f"casp_{quantizer}-{setting}"
    casp(quantizer, "--model", source, "--output", out, "--plan", plan, *flags,
         *calib_flags(args, False), log=log)
    seconds += plan_data["importance"]["seconds"] + stage_seconds(out, quantizer)
    rows.append(row(f"casp_{quantizer}", avg_bits_of(out), evaluate(out, work, args), seconds,
                    peak_of(out), out, args, setting=f"budget of {setting}",
                    calibration=calibration,
                    layer_bits=[l["bits"] for l in plan_data["layers"]]))
    write(args.rows + rows, args)
    return rows


def write(rows: list[dict], args) -> None:
    write_results("mini_llava_quality", rows, table(rows, args))


def table(rows: list[dict], args) -> str:
    lines = ["| method | setting | calibration | avg bits | easy-vqa accuracy | yes/no | shape | "
             "color | answer PPL | time (s) | peak RSS (GB) | checkpoint (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        t = r["accuracy_by_type"]
        plan = s.get("layer_bits")
        note = ""
        if plan:
            wide = {b: [i for i, x in enumerate(plan) if x == b]
                    for b in sorted(set(plan)) if b != min(plan)}
            note = " (" + "; ".join(f"{b} bits: layers {', '.join(map(str, v))}"
                                    for b, v in wide.items()) + ")" if wide else ""
            if s.get("parts") is not None:
                note = lowrank_note(s)
        size = f"{r['size_bytes'] / 2**20:.1f}" if r["size_bytes"] else "-"
        calib = "images" if "easy-vqa" in s.get("calibration", "") else (
            "text" if s.get("calibration") else "-")
        lines.append(f"| {r['method']} | {s.get('setting', '-')}{note} | {calib} | "
                     f"{r['avg_bits'] if r['avg_bits'] is not None else '-'} | "
                     f"{r['accuracy']:.4f} | {t.get('yes/no', 0):.3f} | {t.get('shape', 0):.3f} | "
                     f"{t.get('color', 0):.3f} | {r['answer_ppl']:.3f} | "
                     f"{r['quant_seconds'] or '-'} | {r['peak_mem_gb'] or '-'} | {size} |")
    r0 = rows[0]
    older = [r for r in rows if r["method"].endswith("_m") and "compressions" not in r["settings"]]
    old_search = "".join(
        f"; {r['method']} at {r['settings']['setting']} ({r['date']}): the earlier search "
        f"(W_q/W_k dense or low-rank 75% with 3-bit factors, widths {MEASURED_BITS})"
        for r in older)
    searched = ", ".join(sorted({str(r["settings"]["search_samples"]) for r in rows
                                 if "search_samples" in r["settings"]})) or "-"
    lines += ["", f"{MODEL_NAME}; easy-vqa test, {r0['samples']} questions drawn with seed 0 "
              f"(greedy answers, exact match after normalisation; answer perplexity of the "
              f"reference answers given image and question); calibration: "
              f"{args.mm_nsamples} easy-vqa train samples (image + question + answer), or "
              f"{args.text_nsamples} x {args.text_seqlen} tokens of wiki text for *_text rows; "
              f"GPTQ act-order, damp 0.01, true-sequential; CASP: whitened low-rank W_q/W_k 75% "
              f"(ranks multiple of 8), block-influence allocation over widths {ALLOWED_BITS}, "
              f"factors 3-bit; *_m rows: the measured search, bench/sweep.py's settings "
              f"(W_q/W_k of each layer dense or whitened low-rank at 50% or 75%, the factors at "
              f"each width; widths 2,3,4,5 for GPTQ, 2,3,4 for QuIP#; calibrated score on "
              f"{searched} easy-vqa samples), alloc_*_m the same measurements solved without "
              f"the low-rank options{old_search}; time includes every stage; "
              f"{r0['machine']}; {r0['date']} (rows run since: "
              f"{', '.join(sorted({r['date'] for r in rows} - {r0['date']}))})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=500, help="test questions (default 500)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3],
                   help="uniform GPTQ widths whose bits are the budgets (default: 2 3)")
    p.add_argument("--mm-nsamples", type=int, default=128,
                   help="image+text calibration samples (default 128)")
    p.add_argument("--text-nsamples", type=int, default=32,
                   help="text calibration windows for *_text rows (default 32)")
    p.add_argument("--text-seqlen", type=int, default=512, help="their length (default 512)")
    p.add_argument("--quip", action="store_true", help="add QuIP# E8P12 and CASP_QuIP# rows")
    p.add_argument("--aqlm", action="store_true", help="add AQLM 2x8 and CASP_AQLM rows")
    p.add_argument("--aqlm-steps", type=int, default=10,
                   help="AQLM Adam steps per round (default 10, for CPU time)")
    p.add_argument("--aqlm-rounds", type=int, default=8,
                   help="AQLM rounds per module at most (default 8, for CPU time)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "mini_llava"),
                   help="where checkpoints and logs go (reused by a rerun)")
    add_measured_args(p, "casp_gptq_m", 8, "easy-vqa samples")
    p.add_argument("--sweep", nargs="+", metavar="QUANTIZER:BUDGET", default=None,
                   help="run only bench/sweep.py's rows at these budgets (e.g. quip:e8p12 "
                        "gptq:3@128): uniform, casp_<q>_m (the measured search, low-rank "
                        "options 0.5,0.75) and alloc_<q>_m (without low-rank), merged into "
                        "the committed results")
    args = p.parse_args()
    start = time.perf_counter()
    if args.sweep:
        from sweep import run_of
        args.sweep = [run_of(text) for text in args.sweep]
        rows = merged_rows("mini_llava_quality", sweep_rows(args))
    elif args.measured_only:
        rows = merged_rows("mini_llava_quality", measured_rows(args))
    else:
        rows = run(args) + measured_rows(args)
    write(rows, args)
    print(table(rows, args))
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
