"""Benchmark: GPTQ vs CASP_GPTQ on SmolLM2-135M across bit budgets, with the ablations.

For each uniform GPTQ setting of the sweep (2-bit g128, 2-bit g64,
3-bit g128, 4-bit g128) the uniform model's honest average bits become the budget of:
    casp_gptq          low-rank W_q/W_k (75%, whitened) + bit allocation + GPTQ with the plan
    alloc_only_gptq    bit allocation on the original model + GPTQ (no low-rank)
    lowrank_only_gptq  low-rank + uniform GPTQ at the same setting (its saved bits unspent)
(the ablations run at the budgets named by --ablations: w2g128 by default, or all).
Perplexity on the bundled Wikipedia text and the Lee news corpus (test splits), time of
every stage, process peak RSS, checkpoint size against what the bits claim.

Every stage goes through the casp command in its own process and writes its checkpoint
under --work (default runs/bench/gptq); a rerun reuses finished checkpoints (the command
says "already done"), so an interrupted benchmark resumes. Writes
bench/results/gptq_quality.json, .md and .png.

    .venv/bin/python bench/gptq_quality.py [--nsamples 32] [--seqlen 512] [--windows 16]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
SWEEP = [(2, 128), (2, 64), (3, 128), (4, 128)]
ALLOWED_BITS = "2,3,4,5"


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"


def casp(*argv, log: Path) -> None:
    """Run one casp command in its own process (peak memory is its own). A stage's peak RSS
    is kept in peaks.json beside the log, by output directory, so that a rerun that finds
    the stage already done still reports it."""
    import re

    cmd = [sys.executable, "-m", "casp", *[str(a) for a in argv]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n" + done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    found = re.findall(r"peak RSS ([0-9.]+) GB", done.stdout)
    if found and "--output" in argv:
        peaks_file = log.parent / "peaks.json"
        peaks = json.loads(peaks_file.read_text()) if peaks_file.is_file() else {}
        peaks[Path(str(argv[argv.index("--output") + 1])).name] = float(found[-1])
        peaks_file.write_text(json.dumps(peaks, indent=1) + "\n")


def peak_of(checkpoint: Path) -> float | None:
    """The peak RSS of the stage that wrote ``checkpoint``."""
    peaks_file = checkpoint.parent / "peaks.json"
    peaks = json.loads(peaks_file.read_text()) if peaks_file.is_file() else {}
    return peaks.get(checkpoint.name)


def stage_seconds(checkpoint: Path, stage: str) -> float:
    cfg = json.loads((checkpoint / "config.json").read_text())
    return sum(s["seconds"] for s in cfg["casp"]["stages"] if s["stage"] == stage)


def evaluate(model: Path | str, work: Path, args) -> dict:
    out = work / f"ppl-{Path(str(model)).name}.json"
    if not out.is_file():
        casp("ppl", "--model", model, "--dataset", "wiki", "lee", "--split", "test", "--seqlen",
             args.seqlen, "--max-windows", args.windows, "--output", out, log=work / "log.txt")
    return {r["corpus"]: r for r in json.loads(out.read_text())}


def calib_flags(args) -> list:
    return ["--dataset", "wiki", "--split", "train", "--nsamples", args.nsamples, "--seqlen",
            args.seqlen, "--seed", 3]


def row(method: str, avg_bits, ppl: dict, quant_seconds, peak, checkpoint: Path | None,
        args, **extra) -> list[dict]:
    from casp.checkpoint import checkpoint_size

    size = checkpoint_size(checkpoint) if checkpoint else None
    rows = []
    for corpus, r in ppl.items():
        rows.append({
            "model": MODEL_NAME, "method": method,
            "avg_bits": None if avg_bits is None else round(avg_bits, 4), "corpus": corpus,
            "split": "test", "ppl": round(r["ppl"], 4), "eval_windows": r["windows"],
            "eval_seqlen": r["seqlen"],
            "quant_seconds": None if quant_seconds is None else round(quant_seconds, 1),
            "peak_mem_gb": peak, "size_bytes": size["total_bytes"] if size else None,
            "quantized_bytes": size["quantized_bytes"] if size else None,
            "claimed_quantized_bytes": size["claimed_quantized_bytes"] if size else None,
            "settings": {"calib_samples": args.nsamples, "calib_seqlen": args.seqlen,
                         "calib_corpus": "wiki (train split)", "seed": 3,
                         "windows": args.windows, "act_order": True, "damp": 0.01, **extra},
            "machine": machine(), "date": datetime.date.today().isoformat()})
    return rows


def quality_parser(doc: str) -> argparse.ArgumentParser:
    """The flags the SmolLM2 quality benchmarks share (the same calibration and evaluation
    for every quantizer)."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    return p


def calibration_note(args, first_row: dict) -> str:
    """The start of every SmolLM2 quality table's footer: the model, its calibration and
    its evaluation."""
    return (f"SmolLM2-135M; calibration {args.nsamples} x {args.seqlen} tokens (wiki train, "
            f"seed 3); evaluation {first_row['eval_windows']} x {first_row['eval_seqlen']} "
            "tokens (test split of each corpus)")


def write_results(name: str, rows: list[dict], markdown: str) -> None:
    """bench/results/<name>.json (the rows) and .md (the table)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)


def add_measured_args(p, method: str, samples: int, what: str) -> None:
    """The measured-search flags of a quality benchmark."""
    p.add_argument("--measured-only", action="store_true",
                   help=f"run only {method} (the measured search) and merge its rows into the "
                        "committed results")
    p.add_argument("--search-samples", type=int, default=samples,
                   help=f"{what} whose output KL the measured search scores (default {samples})")


def measured_stages(plan: Path, model: str, lowrank: Path, quantizer: str, out: Path,
                    flags: list, calib: list, log: Path) -> tuple[dict, float]:
    """After a measured plan: casp lowrank --plan (when it cut any W_q/W_k) and the
    quantizer with the plan. Returns the plan and the seconds of the search and stages."""
    plan_data = json.loads(plan.read_text())
    seconds = plan_data["importance"]["seconds"]
    source = model
    if any(l["lowrank"] is not None for l in plan_data["layers"]):
        source = lowrank
        casp("lowrank", "--model", model, "--plan", plan, "--output", source, *calib, log=log)
        seconds += stage_seconds(source, "lowrank")
    casp(quantizer, "--model", source, "--output", out, "--plan", plan, *flags, *calib, log=log)
    return plan_data, seconds + stage_seconds(out, quantizer)


def measured_settings(plan_data: dict) -> dict:
    """What a measured plan chose, for a result row's settings."""
    layers = plan_data["layers"]
    return {"layer_bits": [l["bits"] for l in layers],
            "lowrank_layers": [l["layer"] for l in layers if l["lowrank"] is not None],
            "parts": [l["units"] for l in layers]}


PART_LABELS = {"qk": "W_q/W_k", "self_attn": "W_v/W_o", "mlp": "MLP"}


def lowrank_note(settings: dict) -> str:
    """What a measured plan chose: the low-rank layers, and the parts whose width differs
    from the most common one."""
    parts = settings.get("parts")
    if parts is None:
        return ""
    widths = [int(label.rsplit("@", 1)[1]) for chosen in parts for label in chosen.values()
              if label.startswith("dense")]
    common = max(set(widths), key=widths.count)
    layers = settings.get("lowrank_layers") or []
    other: dict = {}
    for i, chosen in enumerate(parts):
        for part, label in chosen.items():
            width = int(label.rsplit("@", 1)[1])
            if label.startswith("dense") and width != common:
                other.setdefault((width, part), []).append(i)
    rest = f"the rest {common} bits"
    if other:
        rest += " except " + " / ".join(f"{PART_LABELS.get(part, part)} {width} bits in "
                                        f"layers {', '.join(map(str, idx))}"
                                        for (width, part), idx in sorted(other.items()))
    cut = (f"low-rank W_q/W_k in layers {', '.join(map(str, layers))}" if layers
           else "no layer low-rank")
    return f" ({cut}; {rest})"


def row_key(r: dict) -> tuple:
    s = r["settings"]
    return (r["method"], s.get("codebook") or s.get("setting"), r.get("corpus") or r.get("task"))


def merged_rows(name: str, rows: list[dict], key=row_key) -> list[dict]:
    """The committed rows of bench/results/<name>.json with ``rows`` in place of those of
    the same ``key`` (method, setting and corpus by default; new ones appended): a run of
    some methods only keeps the others' measurements."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    new = {key(r): r for r in rows}
    result = [new.pop(key(r), r) for r in old]
    return result + [r for r in rows if key(r) in new]


def avg_bits_of(checkpoint: Path) -> float:
    from casp.allocation.budget import average_bits
    from casp.checkpoint import read_casp_section

    return average_bits(read_casp_section(checkpoint))


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    rows = row("fp", None, evaluate(MODEL, work, args), None, None, None, args)

    lowrank = work / "lowrank75"
    casp("lowrank", "--model", MODEL, "--output", lowrank, "--compression", 0.75,
         *calib_flags(args), log=log)
    lowrank_s = stage_seconds(lowrank, "lowrank")

    for i, (bits, group) in enumerate(SWEEP):
        tag = f"w{bits}g{group if group > 0 else 'c'}"
        uniform = work / f"gptq-{tag}"
        casp("gptq", "--model", MODEL, "--output", uniform, "--bits", bits, "--group-size", group,
             *calib_flags(args), log=log)
        budget = avg_bits_of(uniform)
        peak = peak_of(uniform)
        rows += row("gptq", budget, evaluate(uniform, work, args),
                    stage_seconds(uniform, "gptq"), peak, uniform, args, bits=bits,
                    group_size=group)
        print(f"gptq {tag}: {budget:.4f} bits", flush=True)

        variants = [("casp_gptq", lowrank, True)]
        if "all" in args.ablations or tag in args.ablations:
            variants += [("alloc_only_gptq", MODEL, True), ("lowrank_only_gptq", lowrank, False)]
        for method, source, allocate in variants:
            out = work / f"{method}-{tag}"
            seconds = lowrank_s if source == lowrank else 0.0
            extra = {"bits": bits, "group_size": group}
            if allocate:
                plan = work / f"plan-{method}-{tag}.json"
                if not plan.is_file():
                    start = time.perf_counter()
                    casp("allocate", "--model", source, "--output", plan, "--budget",
                         f"{budget:.6f}", "--bits", ALLOWED_BITS, "--group-size", 128,
                         *calib_flags(args), log=log)
                    (work / f"{plan.name}.seconds").write_text(str(time.perf_counter() - start))
                plan_data = json.loads(plan.read_text())
                seconds += plan_data["importance"]["seconds"]
                extra.update({"budget": budget, "allowed_bits": ALLOWED_BITS,
                              "layer_bits": [l["bits"] for l in plan_data["layers"]]})
                casp("gptq", "--model", source, "--plan", plan, "--output", out,
                     *calib_flags(args), log=log)
            else:
                casp("gptq", "--model", source, "--output", out, "--bits", bits, "--group-size",
                     group, *calib_flags(args), log=log)
            seconds += stage_seconds(out, "gptq")
            rows += row(method, avg_bits_of(out), evaluate(out, work, args), seconds,
                        peak_of(out), out, args, **extra)
            print(f"{method} {tag}: {avg_bits_of(out):.4f} bits", flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    by: dict = {}
    for r in rows:
        by.setdefault((r["method"], r["avg_bits"], r["settings"].get("bits"),
                       r["settings"].get("group_size")), {})[r["corpus"]] = r
    lines = ["| method | setting | avg bits | PPL wiki | PPL lee | time (s) | peak RSS (GB) | "
             "checkpoint (MiB) | quantized tensors / claimed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, bits, b, g), d in by.items():
        w = d["wiki"]
        if method == "fp":
            setting = "-"
        else:
            base = f"{b}-bit {'per channel' if g == -1 else f'g{g}'}"
            setting = {"gptq": base, "lowrank_only_gptq": f"low-rank 75% + {base}"}.get(
                method, f"plan at the {base} budget")
        ratio = (f"{w['quantized_bytes'] / w['claimed_quantized_bytes']:.3f}"
                 if w.get("claimed_quantized_bytes") else "-")
        size = f"{w['size_bytes'] / 2**20:.1f}" if w["size_bytes"] else "-"
        lines.append(f"| {method} | {setting} | {bits if bits is not None else '-'} | "
                     f"{w['ppl']:.2f} | {d['lee']['ppl']:.2f} | {w['quant_seconds'] or '-'} | "
                     f"{w['peak_mem_gb'] or '-'} | {size} | {ratio} |")
    r0 = rows[0]
    lines += ["", f"{calibration_note(args, r0)}; GPTQ act-order, damp 0.01, true-sequential; CASP: whitened "
              f"low-rank W_q/W_k 75% (factors 3-bit per channel), block-influence allocation over "
              f"widths {{{ALLOWED_BITS}}} at group 128; time includes every stage (low-rank, "
              f"importance, GPTQ); {r0['machine']}; {r0['date']}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"gptq": "o-", "casp_gptq": "s-", "alloc_only_gptq": "^--",
              "lowrank_only_gptq": "v:"}
    fp = {r["corpus"]: r["ppl"] for r in rows if r["method"] == "fp"}
    for ax, corpus in zip(axes, ("wiki", "lee")):
        for method, style in styles.items():
            pts = sorted((r["avg_bits"], r["ppl"]) for r in rows
                         if r["method"] == method and r["corpus"] == corpus)
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        ax.axhline(fp[corpus], color="gray", lw=0.8, ls="--", label="fp")
        ax.set_yscale("log")
        ax.set_xlabel("average bits (everything stored counted)")
        ax.set_ylabel(f"perplexity ({corpus}, test)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: GPTQ vs CASP_GPTQ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = quality_parser(__doc__)
    p.add_argument("--ablations", nargs="+", default=["w2g128"],
                   help="budgets (tags such as w2g128, w3g128, w4g128) at which to run the "
                        "ablations, or 'all' (default: w2g128)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "gptq"),
                   help="where checkpoints and logs go (reused by a rerun)")
    args = p.parse_args()
    rows = run(args)
    write_results("gptq_quality", rows, table(rows, args))
    plot(rows, RESULTS / "gptq_quality.png")
    print(table(rows, args))


if __name__ == "__main__":
    main()
