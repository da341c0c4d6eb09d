"""Benchmark: CASP's measured search against the uniform quantizer at every budget of a sweep,
with the ablation, the exact-score check of the cheap search and end-to-end fine-tuning, on
SmolLM2-135M (wiki and lee perplexity).

For each quantizer and each uniform setting of its sweep (GPTQ 2@128, 2@64, 3@128, 4@128;
QuIP# e8p12, e8p12rvq3b; AQLM 2x8 and 3x8 with --quantizers aqlm), the uniform model's
stored bits are the budget of:
    uniform     the quantizer at that setting on every linear
    casp_m      casp allocate --measured (calibrated score) with low-rank options: W_q/W_k of
                each layer dense or whitened low-rank at 50% or 75%, the factors at each
                allowed width; every part's width from the measured divergences; casp
                lowrank --plan; the quantizer with the plan
    casp_m_fast the same search measuring every layer at one width only (--measure-widths:
                3 for GPTQ, 2 for QuIP#), the other widths in 3 anchor layers, extrapolated
                elsewhere; its own measurements
    alloc_m     the ablation: the same measurements solved without the low-rank options
                (--without-lowrank), the quantizer with that plan on the original model
    paper       the paper's recipe: casp lowrank --compression 0.75 in every layer, the
                block-influence allocation (casp allocate, factors 3-bit), the quantizer
                with the plan
    casp_m_fisher, casp_m_kl
                (first QuIP# budget) the plan from the Fisher estimates alone
                (--search-score fisher), and from the exact divergences (--search-score kl,
                the layers after each option run), to check the cheaper scores' plans
    casp_m_ft   (budgets in --finetune) casp finetune on casp_m: the codes kept, the
                continuous parameters fitted end to end to the full-precision model
    uniform_ft  (the same budgets) casp finetune on the uniform model
    casp_m_asm  casp_m in one pass: casp allocate --measured --checkpoint keeps the options
                the search built and assembles the plan's model from them (no casp lowrank
                --plan, no second quantization); its own search
    casp_m_asm_fast
                the same with casp_m_fast's --measure-widths (the options it did not build
                are quantized while assembling)
    casp_m_cheap
                casp_m_asm with the exact runs of the calibrated score in 5 layers only
                (--calibrate-layers 5), the others' estimates scaled by their ratios
    casp_m_cheap_fast
                the same with --measure-widths too: the cheapest search
One search per quantizer and group size serves every budget (its measurements file is
reused); its time is counted in full in every casp_m and alloc_m row. Same calibration
(32 x 512 wiki-train tokens, seed 3) and evaluation (16 x 512 tokens of each test split)
for every row; every stage runs as its own casp process, finished checkpoints under --work
are reused. Writes bench/results/sweep.{json,md,png}: the rows of the budgets and methods run
replace the committed ones of the same quantizer, budget, method and corpus, the others are
kept.

    .venv/bin/python bench/sweep.py [--runs quip:e8p12 gptq:3@128 ...] [--finetune e8p12]
                                    [--methods uniform paper ...]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import (MODEL, ROOT, avg_bits_of, calib_flags,  # noqa: E402
                          calibration_note, casp, evaluate, lowrank_note, measured_settings,
                          merged_rows, peak_of, quality_parser, row, stage_seconds,
                          write_results)

SWEEPS = {
    "gptq": {"budgets": ["2@128", "2@64", "3@128", "4@128"], "widths": "2,3,4,5"},
    "quip": {"budgets": ["e8p12", "e8p12rvq3b"], "widths": "2,3,4",
             "codebooks": "2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b"},
    "aqlm": {"budgets": ["2x8", "3x8"], "widths": "2,3,4", "codebooks": "2=2x8,3=3x8,4=4x8"},
}
# AQLM's settings in every AQLM row (bench/aqlm_quality.py's): greedy code search, 10 Adam
# steps a round, at most 8 rounds; the search's options are built with the same
AQLM_FLAGS = ("--beam-size", 1, "--steps-per-round", 10, "--lr", 1e-4, "--tolerance", 0.01,
              "--max-rounds", 8)
COMPRESSIONS = "0.5,0.75"
SEARCH_SAMPLES = 2
PAPER_COMPRESSION = 0.75
PAPER_FACTOR_BITS = 3
METHODS = ("uniform", "paper", "casp_m", "casp_m_fast", "alloc_m", "casp_m_fisher",
           "casp_m_kl", "casp_m_ft", "uniform_ft", "casp_m_asm", "casp_m_asm_fast",
           "casp_m_cheap", "casp_m_cheap_fast")
CALIBRATE_LAYERS = 5
# casp_m_fast: every layer measured at this width only, the others in 3 anchor layers
FAST_WIDTHS = {"gptq": "3", "quip": "2", "aqlm": "2"}


def run_of(text: str) -> tuple[str, str]:
    quantizer, _, budget = text.partition(":")
    if quantizer not in SWEEPS or budget not in SWEEPS[quantizer]["budgets"]:
        raise SystemExit(f"--runs {text!r}: give QUANTIZER:BUDGET from "
                         + ", ".join(f"{q}:{b}" for q in SWEEPS for b in SWEEPS[q]["budgets"]))
    return quantizer, budget


def uniform_width(budget: str) -> int:
    """The allocation width a uniform setting stands for (2@128: 2, e8p12: 2, 3x8: 3)."""
    if "@" in budget:
        return int(budget.split("@")[0])
    if "x" in budget:
        return int(budget.split("x")[0])
    return {"e8p12": 2, "e8p12rvq3b": 3}[budget]


def uniform_flags(quantizer: str, budget: str) -> list:
    if quantizer == "gptq":
        bits, group = budget.split("@")
        return ["--bits", bits, "--group-size", group]
    if quantizer == "aqlm":
        return ["--codebooks", budget, *AQLM_FLAGS]
    return ["--codebook", budget]


def search_flags(quantizer: str, budget: str, samples: int = SEARCH_SAMPLES
                 ) -> tuple[str, list]:
    """The measurements file's tag (one per quantizer and group size) and the flags of casp
    allocate --measured for this budget, the divergences measured on ``samples``."""
    sweep = SWEEPS[quantizer]
    flags = ["--quantizer", quantizer, "--budget", budget, "--bits", sweep["widths"],
             "--factor-bits", 0, "--measured", "--lowrank-options", COMPRESSIONS,
             "--rank-multiple", 8, "--search-samples", samples]
    tag = quantizer
    if quantizer == "gptq":
        group = budget.split("@")[1]
        flags += ["--group-size", group, "--factor-group-size", -1]
        tag = f"gptq-g{group}"
    else:
        flags += ["--codebooks", sweep["codebooks"]]
    if quantizer == "aqlm":
        flags += ["--quantizer-flags", " ".join(map(str, AQLM_FLAGS))]
    return tag, flags


def search_calib(args) -> list:
    # batches of the measured size, so exactly those windows are scored
    return [*calib_flags(args), "--batch-size", SEARCH_SAMPLES]


def plan_for(work: Path, name: str, quantizer: str, budget: str, args, log: Path,
             extra: tuple = (), score: str = "calibrated") -> tuple[Path, dict, float]:
    """casp allocate --measured for one budget (the first call of a tag measures, the others
    reuse its file): the plan, its data and the search's seconds (of the measuring call)."""
    tag, flags = search_flags(quantizer, budget)
    if "--measure-widths" in extra:         # its own measurements
        tag += "-w" + str(extra[extra.index("--measure-widths") + 1])
    if "--calibrate-layers" in extra:
        tag += "-c" + str(extra[extra.index("--calibrate-layers") + 1])
    if "--checkpoint" in extra:             # a search that keeps its options: its own too
        tag += "-asm"
    record = work / f"{tag}-{score}.measured.json"
    seconds_file = work / f"{tag}-{score}.seconds"
    plan = work / f"plan-{name}-{budget}.json"
    if not plan.is_file():
        start = time.perf_counter()
        casp("allocate", "--model", MODEL, "--output", plan, *flags, "--search-score", score,
             "--measurements", record, *extra, *search_calib(args), log=log)
        if not seconds_file.is_file():
            data = json.loads(plan.read_text())
            seconds_file.write_text(f"{data['importance']['seconds']}\n")
            print(f"{tag} search ({score}): {data['importance']['seconds']:.0f} s "
                  f"({time.perf_counter() - start:.0f} s with the process)", flush=True)
    return plan, json.loads(plan.read_text()), float(seconds_file.read_text())


def quantize_plan(work: Path, name: str, quantizer: str, budget: str, plan: Path,
                  plan_data: dict, args, log: Path) -> tuple[Path, float]:
    """casp lowrank --plan (when the plan cut any W_q/W_k), then the quantizer with the
    plan; the checkpoint and the seconds of both."""
    source, seconds = MODEL, 0.0
    if any(l["lowrank"] is not None for l in plan_data["layers"]):
        source = work / f"lowrank-{name}-{budget}"
        casp("lowrank", "--model", MODEL, "--plan", plan, "--output", source,
             *calib_flags(args), log=log)
        seconds += stage_seconds(source, "lowrank")
    out = work / f"{name}-{budget}"
    casp(quantizer, "--model", source, "--output", out, "--plan", plan,
         *uniform_flags(quantizer, budget), *calib_flags(args), log=log)
    return out, seconds + stage_seconds(out, quantizer)


def finetuned(work: Path, checkpoint: Path, args, log: Path) -> tuple[Path, float]:
    out = work / f"{checkpoint.name}-ft"
    casp("finetune", "--model", checkpoint, "--teacher", MODEL, "--output", out, "--epochs",
         args.ft_epochs, "--lr", args.ft_lr, *calib_flags(args), "--batch-size", 2, log=log)
    return out, stage_seconds(out, "finetune")


def paper_recipe(work: Path, quantizer: str, budget: str, args, log: Path
                 ) -> tuple[Path, dict, float]:
    """The paper's recipe at one budget: 75% low-rank W_q/W_k in every layer (one stage for
    every budget), the block-influence plan, the quantizer with it; the checkpoint, the
    plan's data and the seconds of every stage."""
    lowrank = work / f"lowrank{int(PAPER_COMPRESSION * 100)}-m8"
    casp("lowrank", "--model", MODEL, "--output", lowrank, "--compression", PAPER_COMPRESSION,
         "--rank-multiple", 8, *calib_flags(args), log=log)
    sweep = SWEEPS[quantizer]
    flags = ["--quantizer", quantizer, "--budget", budget, "--bits", sweep["widths"],
             "--factor-bits", PAPER_FACTOR_BITS]
    if quantizer == "gptq":
        flags += ["--group-size", budget.split("@")[1], "--factor-group-size", -1]
    else:
        flags += ["--codebooks", sweep["codebooks"]]
    plan = work / f"plan-paper-{quantizer}-{budget}.json"
    if not plan.is_file():
        casp("allocate", "--model", lowrank, "--output", plan, *flags, *calib_flags(args),
             log=log)
    data = json.loads(plan.read_text())
    out = work / f"paper-{quantizer}-{budget}"
    casp(quantizer, "--model", lowrank, "--output", out, "--plan", plan,
         *uniform_flags(quantizer, budget), *calib_flags(args), log=log)
    seconds = (stage_seconds(lowrank, "lowrank") + data["importance"]["seconds"]
               + stage_seconds(out, quantizer))
    return out, data, seconds


def uniform_copies(rows: list[dict], method: str, quantizer: str, budget: str,
                   settings: dict, quant_seconds: float | None = None) -> list[dict]:
    """The uniform rows of this quantizer and budget (one per corpus) as ``method``'s: a
    plan that is the uniform one. ``quant_seconds`` replaces the uniform row's time (the
    search's counted too); ``settings`` are added to its settings."""
    return [{**r, "method": method,
             **({"quant_seconds": quant_seconds} if quant_seconds is not None else {}),
             "settings": {**r["settings"], **settings, "identical_to": "uniform"}}
            for r in rows if r["method"] == "uniform"
            and r["settings"].get("setting") == budget
            and r["settings"].get("quantizer") == quantizer]


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    rows = row("fp", None, evaluate(MODEL, work, args), None, None, None, args)
    for quantizer, budget in args.runs:
        k = SWEEPS[quantizer]["budgets"].index(budget)
        common = {"quantizer": quantizer, "setting": budget}
        uniform, uniform_s = work / f"uniform-{quantizer}-{budget}", 0.0
        if {"uniform", "uniform_ft", "alloc_m"} & set(args.methods):
            casp(quantizer, "--model", MODEL, "--output", uniform,
                 *uniform_flags(quantizer, budget), *calib_flags(args), log=log)
            uniform_s = stage_seconds(uniform, quantizer)
            rows += row("uniform", avg_bits_of(uniform), evaluate(uniform, work, args),
                        uniform_s, peak_of(uniform), uniform, args, **common)
            write(rows, args)
        if budget in args.finetune and "uniform_ft" in args.methods:
            ft, ft_s = finetuned(work, uniform, args, log)
            rows += row("uniform_ft", avg_bits_of(ft), evaluate(ft, work, args),
                        uniform_s + ft_s, peak_of(ft), ft, args, **common,
                        finetune_epochs=args.ft_epochs, finetune_lr=args.ft_lr,
                        finetune_seconds=ft_s)
            write(rows, args)
        if "paper" in args.methods:
            out, data, seconds = paper_recipe(work, quantizer, budget, args, log)
            rows += row("paper", avg_bits_of(out), evaluate(out, work, args), seconds,
                        peak_of(out), out, args, **common, compression=PAPER_COMPRESSION,
                        factor_bits=PAPER_FACTOR_BITS, allowed_bits=SWEEPS[quantizer]["widths"],
                        importance=data["importance"]["method"],
                        layer_bits=[l["bits"] for l in data["layers"]])
            print(f"paper {quantizer} {budget}: {avg_bits_of(out):.4f} bits ({seconds:.0f} s)",
                  flush=True)
            write(rows, args)
        # (method, extra flags, score, file stem)
        fast = ("--measure-widths", FAST_WIDTHS[quantizer], "--anchor-layers", ANCHORS)
        methods = [("casp_m", (), "calibrated", "casp_cal"),
                   ("casp_m_fast", fast, "calibrated", "casp_fast"),
                   ("alloc_m", ("--without-lowrank",), "calibrated", "alloc_cal")]
        if quantizer == "quip" and k == 0:
            methods += [("casp_m_fisher", (), "fisher", "casp_m"),
                        ("casp_m_kl", (), "kl", "casp_m_kl")]
        methods += [("casp_m_asm", ("--checkpoint", work / f"asm-{quantizer}-{budget}"),
                     "calibrated", "casp_asm"),
                    ("casp_m_asm_fast", (*fast, "--checkpoint",
                                         work / f"asm-fast-{quantizer}-{budget}"),
                     "calibrated", "casp_asm_fast"),
                    ("casp_m_cheap", ("--calibrate-layers", CALIBRATE_LAYERS, "--checkpoint",
                                      work / f"asm-cheap-{quantizer}-{budget}"),
                     "calibrated", "casp_cheap"),
                    ("casp_m_cheap_fast", (*fast, "--calibrate-layers", CALIBRATE_LAYERS,
                                           "--checkpoint",
                                           work / f"asm-cheap-fast-{quantizer}-{budget}"),
                     "calibrated", "casp_cheap_fast")]
        methods = [m for m in methods if m[0] in args.methods]
        lowest = uniform_width(budget) == min(int(w) for w in SWEEPS[quantizer]["widths"]
                                              .split(","))
        for method, extra, score, stem in methods:
            name = f"{stem}-{quantizer}"
            if method == "alloc_m" and lowest:
                # every part already at the smallest width: without low-rank nothing can be
                # lowered to pay for a raise, so the plan is the uniform one (no search)
                rows += uniform_copies(rows, method, quantizer, budget,
                                       {"by_construction": True})
                write(rows, args)
                continue
            plan, data, search_s = plan_for(work, name, quantizer, budget, args, log,
                                            extra, score)
            settings = {**common, "score": score, "compressions": COMPRESSIONS,
                        "allowed_bits": SWEEPS[quantizer]["widths"],
                        "search_samples": SEARCH_SAMPLES, "search_seconds": search_s,
                        **measured_settings(data)}
            if "--measure-widths" in extra:
                settings.update(measure_widths=FAST_WIDTHS[quantizer], anchor_layers=ANCHORS)
            if "--calibrate-layers" in extra:
                settings["calibrate_layers"] = CALIBRATE_LAYERS
            labels = {label for r in data["layers"] for label in r["units"].values()}
            if method == "alloc_m" and labels == {f"dense@{uniform_width(budget)}"}:
                # every part at the uniform width: the plan is the uniform model
                rows += uniform_copies(rows, method, quantizer, budget, settings,
                                       round(search_s + uniform_s, 1))
                continue
            if "--checkpoint" in extra:        # assembled by the search's own call
                out = Path(extra[extra.index("--checkpoint") + 1])
                seconds = stage_seconds(out, "assemble")
                settings["assembled"] = True
            else:
                out, seconds = quantize_plan(work, name, quantizer, budget, plan, data, args,
                                             log)
            rows += row(method, avg_bits_of(out), evaluate(out, work, args),
                        search_s + seconds, peak_of(out), out, args, **settings)
            print(f"{method} {quantizer} {budget}: {avg_bits_of(out):.4f} bits "
                  f"({search_s + seconds:.0f} s)", flush=True)
            write(rows, args)
            if method == "casp_m" and budget in args.finetune and "casp_m_ft" in args.methods:
                for base, base_s, label in ((out, search_s + seconds, "casp_m_ft"),):
                    ft, ft_s = finetuned(work, base, args, log)
                    rows += row(label, avg_bits_of(ft), evaluate(ft, work, args),
                                base_s + ft_s, peak_of(ft), ft, args, **common,
                                finetune_epochs=args.ft_epochs, finetune_lr=args.ft_lr,
                                finetune_seconds=ft_s)
                    write(rows, args)
    return rows


def fisher_check(work: Path) -> dict | None:
    """The cheap search's plans against the exact one's on the same measurements (the exact
    record holds both scores of every option): summed exact divergence of each plan."""
    record = work / "quip-kl.measured.json"
    if not record.is_file():
        return None
    from casp.allocation.budget import SettingRules, parse_codebook_map
    from casp.allocation.search import calibrate, measured_plan
    from casp.loading import load_pretrained

    data = json.loads(record.read_text())
    measured = {int(i): m for i, m in data["layers"].items()}
    for results in measured.values():      # the calibrated score from the same options
        for r in results.values():
            for option in r.values():
                option["exact_kl"] = option["kl"]
        calibrate(results, lambda o: o["exact_kl"])
        for r in results.values():
            for option in r.values():
                option["calibrated"], option["kl"] = option["kl"], option["exact_kl"]
    loaded = load_pretrained(MODEL, dtype="float32", device="cpu")
    sweep = SWEEPS["quip"]
    rules = SettingRules(codebooks=parse_codebook_map(sweep["codebooks"], "quip"),
                         factor_bits=None)
    widths = [int(w) for w in sweep["widths"].split(",")]
    from casp.allocation.budget import uniform_setting_bits
    from casp.quant.quip.setting import QuIPSetting

    out = {}
    for budget in sweep["budgets"]:
        bits = uniform_setting_bits(loaded.model, loaded.spec, QuIPSetting.parse(budget),
                                    dense=True)
        sums = {}
        for score in ("kl", "fisher", "calibrated"):
            plan = measured_plan(loaded.model, loaded.spec, measured, rules, widths, bits,
                                 [0.5, 0.75], 8, score=score)
            sums[score] = sum(measured[r["layer"]][u][label]["kl"]
                              for r in plan.layers for u, label in r["units"].items())
        out[budget] = {"exact_plan_kl": round(sums["kl"], 6),
                       "fisher_plan_kl": round(sums["fisher"], 6),
                       "calibrated_plan_kl": round(sums["calibrated"], 6),
                       "fisher_ratio": round(sums["fisher"] / sums["kl"], 4),
                       "calibrated_ratio": round(sums["calibrated"] / sums["kl"], 4)}
    return out


EXTRAPOLATION_TRIALS = {"gptq": [[3], [2, 4], [3, 4]], "quip": [[2], [3], [2, 3]]}
ANCHORS = 3


def extrapolation_check(work: Path) -> dict:
    """What measuring fewer widths would cost the plans, on the full measurements of each
    search run here: every layer but ``ANCHORS`` spread ones keeps only the options at the
    widths of a trial, the rest are extrapolated (casp.allocation.search.extrapolate_widths),
    and the plan solved on that is scored on the measured divergences of the options it
    chose, against the plan solved on every measurement."""
    from casp.allocation.budget import SettingRules, parse_codebook_map, uniform_setting_bits
    from casp.allocation.budget import uniform_average_bits
    from casp.allocation.search import anchor_layers, measured_plan
    from casp.loading import load_pretrained
    from casp.quant.quip.setting import QuIPSetting

    loaded = load_pretrained(MODEL, dtype="float32", device="cpu")
    out = {}
    for record in sorted(work.glob("*-calibrated.measured.json")):
        tag = record.name.split("-calibrated")[0]
        quantizer = tag.split("-")[0]
        if quantizer not in EXTRAPOLATION_TRIALS or "-w" in tag or tag.endswith("-asm"):
            # a search at fewer widths, or a repeat of one that kept its options
            continue
        sweep = SWEEPS[quantizer]
        widths = [int(w) for w in sweep["widths"].split(",")]
        measured = {int(i): m for i, m in json.loads(record.read_text())["layers"].items()}
        if quantizer == "gptq":
            group = int(tag.split("-g")[1])
            rules = SettingRules(group, None, -1, True, None)
            budgets = {b: uniform_average_bits(loaded.model, loaded.spec, int(b.split("@")[0]),
                                               group, g_idx=True, dense=True)
                       for b in sweep["budgets"] if b.endswith(f"@{group}")}
        else:
            rules = SettingRules(codebooks=parse_codebook_map(sweep["codebooks"], quantizer),
                                 factor_bits=None)
            budgets = {b: uniform_setting_bits(loaded.model, loaded.spec, QuIPSetting.parse(b),
                                               dense=True) for b in sweep["budgets"]}
        anchors = set(anchor_layers(len(measured), ANCHORS))

        def plan_kl(m):
            plan = measured_plan(loaded.model, loaded.spec, m, rules, widths, bits,
                                 [0.5, 0.75], 8)
            return sum(measured[r["layer"]][u][label]["kl"]
                       for r in plan.layers for u, label in r["units"].items())

        for budget, bits in budgets.items():
            full = plan_kl(measured)
            row = {"full_plan_kl": round(full, 6)}
            for trial in EXTRAPOLATION_TRIALS[quantizer]:
                kept = {i: m if i in anchors else
                        {u: {k: v for k, v in r.items() if int(k.rsplit("@", 1)[1]) in trial}
                         for u, r in m.items()} for i, m in measured.items()}
                row[",".join(map(str, trial))] = round(plan_kl(kept) / full, 4)
            out[f"{tag} {budget}"] = row
    return out


def sweep_key(r: dict) -> tuple:
    s = r["settings"]
    return (s.get("quantizer"), s.get("setting"), r["method"], r["corpus"])


def write(rows: list[dict], args, check: dict | None = None) -> list[dict]:
    """The committed rows with these in place of the same quantizer, budget, method and
    corpus (new ones appended); returns what was written."""
    merged = merged_rows("sweep", rows, key=sweep_key)
    write_results("sweep", merged, table(merged, args, check))
    return merged


NAMES = {"fp": "full precision", "uniform": "uniform",
         "paper": "the paper's recipe (75% low-rank everywhere, block influence)",
         "casp_m": "CASP, measured search (calibrated score)",
         "casp_m_fast": "CASP, measured search at fewer widths (--measure-widths)",
         "casp_m_asm": "CASP, measured search, model assembled from its options (--checkpoint)",
         "casp_m_asm_fast": "CASP, fewer widths + assembled (--measure-widths --checkpoint)",
         "casp_m_cheap": "CASP, exact runs in 5 layers, assembled (--calibrate-layers 5)",
         "casp_m_cheap_fast": "CASP, fewer widths + exact runs in 5 layers, assembled",
         "alloc_m": "allocation only (ablation)",
         "casp_m_fisher": "CASP, measured search (Fisher score alone)",
         "casp_m_kl": "CASP, measured search (exact score)",
         "uniform_ft": "uniform + end-to-end fine-tuning",
         "casp_m_ft": "CASP measured + end-to-end fine-tuning"}


def table(rows: list[dict], args, check: dict | None) -> str:
    by: dict = {}
    for r in rows:
        s = r["settings"]
        by.setdefault((s.get("quantizer"), s.get("setting"), r["method"]), {})[r["corpus"]] = r
    lines = ["| quantizer | budget | method | avg bits | PPL wiki | PPL lee | time (s) | run | "
             "what the plan chose |", "|---|---|---|---|---|---|---|---|---|"]
    def order(key):
        quantizer, budget, method = key
        if quantizer is None:
            return (-1, 0, 0)
        return (list(SWEEPS).index(quantizer), SWEEPS[quantizer]["budgets"].index(budget),
                list(NAMES).index(method) if method in NAMES else len(NAMES))

    for (quantizer, budget, method), d in sorted(by.items(), key=lambda kv: order(kv[0])):
        w = d["wiki"]
        s = w["settings"]
        note = ("same plan as uniform" + (" (no width below the budget's to trade; no search)"
                                          if s.get("by_construction") else "")
                if s.get("identical_to") else lowrank_note(s).strip(" ()"))
        lines.append(f"| {quantizer or '-'} | {budget or '-'} | {NAMES.get(method, method)} | "
                     f"{w['avg_bits'] if w['avg_bits'] is not None else '-'} | {w['ppl']:.2f} | "
                     f"{d['lee']['ppl']:.2f} | {w['quant_seconds'] or '-'} | "
                     f"{w['date'][:10]} | {note or '-'} |")
    r0 = rows[0]
    lines += ["", f"{calibration_note(args, r0)} from the packed form; search: low-rank options "
              f"{COMPRESSIONS} with factors at each width, divergences on {SEARCH_SAMPLES} "
              f"calibration windows; time: every stage of the row (the search counted in "
              f"full); run: the day the row was measured; {r0['machine']}."]
    check = dict(check or {})
    extrapolation = check.pop("extrapolation", None)
    if extrapolation:
        trials = sorted({k for r in extrapolation.values() for k in r} - {"full_plan_kl"})
        lines += ["", f"Measuring fewer widths (--measure-widths W, {ANCHORS} anchor layers "
                  "measured at every width, the rest extrapolated): summed measured divergence "
                  "of the plan solved on that, over the plan solved on every measurement "
                  "(a search's full record, each budget):", "",
                  "| search, budget | full plan | " + " | ".join(f"W = {t}" for t in trials)
                  + " |", "|---|---|" + "---|" * len(trials)]
        lines += [f"| {k} | {r['full_plan_kl']} | "
                  + " | ".join(f"x{r[t]}" if t in r else "-" for t in trials) + " |"
                  for k, r in extrapolation.items()]
    if check:
        lines += ["", "The Fisher score's plans against the exact score's, on the exact "
                  "divergences of the same measured options (QuIP#):", "",
                  "| budget | exact score's plan | Fisher score's plan | calibrated score's plan |",
                  "|---|---|---|---|"]
        lines += [f"| {b} | {c['exact_plan_kl']} | {c['fisher_plan_kl']} (x{c['fisher_ratio']}) "
                  f"| {c['calibrated_plan_kl']} (x{c['calibrated_ratio']}) |"
                  for b, c in check.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantizers = sorted({r["settings"].get("quantizer") for r in rows} - {None})
    fig, axes = plt.subplots(1, len(quantizers), figsize=(5 * len(quantizers), 4),
                             squeeze=False)
    fp = next(r["ppl"] for r in rows if r["method"] == "fp" and r["corpus"] == "wiki")
    for ax, q in zip(axes[0], quantizers):
        for method in NAMES:
            pts = sorted((r["avg_bits"], r["ppl"]) for r in rows if r["method"] == method
                         and r["corpus"] == "wiki" and r["settings"].get("quantizer") == q)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=NAMES[method])
        ax.axhline(fp, color="gray", linestyle=":", label="full precision")
        ax.set_yscale("log")
        ax.set_xlabel("average stored bits per weight")
        ax.set_ylabel("wiki perplexity")
        ax.set_title(f"SmolLM2-135M, {q}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "sweep.png", dpi=120)


def main() -> None:
    p = quality_parser(__doc__)
    p.add_argument("--runs", nargs="+", type=run_of, default=[
                       (q, b) for q in ("quip", "gptq") for b in SWEEPS[q]["budgets"]],
                   help="QUANTIZER:BUDGET pairs to run, in order (default: every budget of "
                        "QuIP# then GPTQ; AQLM's, e.g. aqlm:2x8, on request)")
    p.add_argument("--finetune", nargs="*", default=["e8p12"],
                   help="budgets whose casp_m row also runs end-to-end fine-tuned (default: "
                        "e8p12)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to run at each budget (default: all; uniform runs too where "
                        "uniform_ft or alloc_m needs it); rows of the others stay as committed")
    p.add_argument("--ft-epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    p.add_argument("--ft-lr", type=float, default=1e-4,
                   help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "sweep"),
                   help="where checkpoints and logs go (reused by a rerun)")
    args = p.parse_args()
    start = time.perf_counter()
    rows = run(args)
    check = fisher_check(Path(args.work))
    if check is None:                         # keep the committed check
        old = (ROOT / "bench" / "results" / "sweep.check.json")
        check = json.loads(old.read_text()) if old.is_file() else None
    else:
        (ROOT / "bench" / "results" / "sweep.check.json").write_text(
            json.dumps(check, indent=1) + "\n")
    extrapolation = extrapolation_check(Path(args.work))
    saved = ROOT / "bench" / "results" / "sweep.extrapolation.json"
    if saved.is_file():                       # keep the searches not run this time
        extrapolation = {**json.loads(saved.read_text()), **extrapolation}
    if extrapolation:
        saved.write_text(json.dumps(extrapolation, indent=1) + "\n")
        check = {**(check or {}), "extrapolation": extrapolation}
    rows = write(rows, args, check)
    plot(rows)
    print(table(rows, args, check))
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
