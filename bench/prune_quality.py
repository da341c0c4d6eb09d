"""Benchmark: the seed paper's adaptive sparsity (per-block TPE search over pruning ratios,
casp prune-search) against uniform magnitude, Wanda, the paper's score (RIA) and SparseGPT,
on SmolLM2-135M (wiki and lee perplexity), with each checkpoint's size on disk.

Rows, at each unstructured sparsity of --ratios and at 2:4:
    dense             the model unpruned
    magnitude         |W|, each row's smallest removed
    wanda             |W| * ||X_j||_2 (Sun et al. 2023)
    ria               the seed paper's relative-importance score with activations, no update
    sparsegpt         OBS pruning with updates of the kept weights (Frantar & Alistarh 2023)
    optspa            at each --search target: casp prune-search (TPE over 8 blocks, ratios
                      target +- 0.05 by 0.025, the ria score, --mode fast, validation
                      perplexity on wiki-train windows that share no token with calibration),
                      then casp prune --profile with ria (the paper's method)
    optspa_wanda      the same profile applied with Wanda
    optspa_sparsegpt  the same profile applied with SparseGPT
Every row: the same calibration (32 x 512 wiki-train tokens, seed 3) and evaluation (16 x 512
tokens of each test split); every stage runs as its own casp process; finished checkpoints
and profiles under --work are reused. A search row's time is the search plus its prune.
Writes bench/results/prune_quality.{json,md,png}.

    .venv/bin/python bench/prune_quality.py [--ratios 0.5 0.6 0.7] [--search 0.5 0.6 0.7]
                                            [--trials 50] [--searched-only]
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import (MODEL, MODEL_NAME, RESULTS, ROOT, calib_flags,  # noqa: E402
                          calibration_note, casp, evaluate, machine, merged_rows, peak_of,
                          quality_parser, stage_seconds, write_results)

UNIFORM = ("magnitude", "wanda", "ria", "sparsegpt")
SEARCHED = {"optspa": "ria", "optspa_wanda": "wanda", "optspa_sparsegpt": "sparsegpt"}
VAL_WINDOWS = 8


def prune_row(method: str, setting: str, ppl: dict, checkpoint: Path | None, seconds, peak,
              args, **extra) -> list[dict]:
    from casp.checkpoint import checkpoint_size, read_casp_section

    sparsity = None
    if checkpoint is None:
        weights = dense_weight_bytes()
        size = {"weights_bytes": weights, "total_bytes": None}
    else:
        size = checkpoint_size(checkpoint)
        modules = read_casp_section(checkpoint)["modules"]
        dense = sum(d["in_features"] * d["out_features"] for d in modules.values())
        sparsity = round(1 - sum(d["kept"] for d in modules.values()) / dense, 4)
    return [{"model": MODEL_NAME, "method": method, "setting": setting, "sparsity": sparsity,
             "corpus": corpus, "split": "test", "ppl": round(r["ppl"], 4),
             "eval_windows": r["windows"], "eval_seqlen": r["seqlen"],
             "seconds": None if seconds is None else round(seconds, 1), "peak_mem_gb": peak,
             "weights_bytes": size["weights_bytes"], "size_bytes": size["total_bytes"],
             "settings": {"calib_samples": args.nsamples, "calib_seqlen": args.seqlen,
                          "calib_corpus": "wiki (train split)", "seed": 3,
                          "windows": args.windows, **extra},
             "machine": machine(), "date": datetime.date.today().isoformat()}
            for corpus, r in ppl.items()]


def dense_weight_bytes() -> int:
    """The unpruned model's parameters in memory, each stored tensor once (tied embeddings
    once), at the dtype the pruned checkpoints store."""
    from casp.loading import load_pretrained

    model = load_pretrained(MODEL).model
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def prune(work: Path, name: str, flags: list, args) -> Path:
    out = work / name
    casp("prune", "--model", MODEL, "--output", out, *flags, *calib_flags(args),
         log=work / "log.txt")
    return out


def search(work: Path, target: float, args) -> tuple[Path, dict]:
    profile = work / f"profile-{target:g}.json"
    if not profile.is_file():
        casp("prune-search", "--model", MODEL, "--output", profile, "--target", target,
             "--score", "ria", "--mode", "fast", "--trials", args.trials, "--val-windows",
             VAL_WINDOWS, *calib_flags(args), log=work / "log.txt")
    return profile, json.loads(profile.read_text())


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [] if args.searched_only else prune_row("dense", "dense", evaluate(MODEL, work, args),
                                                   None, None, None, args)
    settings = [(f"{r:g}", ["--ratio", r]) for r in args.ratios] + [("2:4", ["--nm", "2:4"])]
    for setting, flags in settings if not args.searched_only else []:
        for method in UNIFORM:
            out = prune(work, f"{method}-{setting.replace(':', 'of')}",
                        ["--method", method, *flags], args)
            rows += prune_row(method, setting, evaluate(out, work, args), out,
                              stage_seconds(out, "prune"), peak_of(out), args)
            print(f"{method} {setting}: done", flush=True)
    for target in args.search:
        profile, data = search(work, target, args)
        found = data["search"]
        extra = search_settings(data)
        for method, score in SEARCHED.items():
            out = prune(work, f"{method}-{target:g}", ["--method", score, "--profile", profile],
                        args)
            seconds = stage_seconds(out, "prune") + found["seconds_this_run"]
            rows += prune_row(method, f"{target:g}", evaluate(out, work, args), out, seconds,
                              peak_of(out), args, **extra)
            print(f"{method} {target:g}: done", flush=True)
    return rows


def search_settings(profile: dict) -> dict:
    """What a searched row records of its search (from the profile casp prune-search wrote):
    trials, skipped draws, time (the trials' sum; the first includes fast mode's statistics
    pass), peak memory, the objective of the uniform and the best profile, block ratios."""
    found = profile["search"]
    return {"trials": found["trials_completed"], "infeasible": found["trials_infeasible"],
            "search_seconds": round(sum(found["trial_seconds"]), 1),
            "trial_seconds_mean": round(sum(found["trial_seconds"])
                                        / len(found["trial_seconds"]), 2),
            "search_peak_mem_gb": found.get("peak_rss_gb"),
            "val_windows": found["objective_data"].get("windows"),
            "objective_best": round(found["best_value"], 4),
            "objective_uniform": found["uniform_value"] and round(found["uniform_value"], 4),
            "block_ratios": ["/".join(f"{v:g}" for v in b.values())
                             for b in profile["block_ratios"]]}


def search_lines(searched: list[dict], objective: str) -> list[str]:
    """The table of the searches behind ``searched`` (one row each)."""
    if not searched:
        return []
    lines = ["", "| search | target | trials (infeasible skipped) | s per trial | search s | "
                 f"search peak GB | {objective} uniform -> best | block ratios |",
             "|---|---|---|---|---|---|---|---|"]
    for r in searched:
        s = r["settings"]
        lines.append(f"| {s.get('objective', 'text')} | {r['setting']} | {s['trials']} "
                     f"({s['infeasible']}) | {s['trial_seconds_mean']} | {s['search_seconds']} | "
                     f"{s['search_peak_mem_gb']} | {s['objective_uniform']} -> "
                     f"{s['objective_best']} | {', '.join(s['block_ratios'])} |")
    return lines


def table(rows: list[dict], args) -> str:
    def cell(method, setting, corpus):
        r = next((r for r in rows if r["method"] == method and r["setting"] == setting
                  and r["corpus"] == corpus), None)
        return "—" if r is None else f"{r['ppl']:.2f}"

    dense = {r["corpus"]: r for r in rows if r["method"] == "dense"}
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] != "dense"))
    methods = [m for m in (*UNIFORM, *SEARCHED) if any(r["method"] == m for r in rows)]
    lines = [f"dense: wiki {dense['wiki']['ppl']:.2f}, lee {dense['lee']['ppl']:.2f}; "
             f"{dense['wiki']['weights_bytes'] / 2**20:.1f} MiB of weights", "",
             "| method | " + " | ".join(f"{s} wiki / lee" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{cell(m, s, 'wiki')} / {cell(m, s, 'lee')}" for s in settings) + " |")
    lines += ["", "| method | setting | sparsity | weights MiB | seconds | peak GB |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["corpus"] == "wiki" and r["method"] != "dense":
            lines.append(f"| {r['method']} | {r['setting']} | {r['sparsity']:.4f} | "
                         f"{r['weights_bytes'] / 2**20:.1f} | {r['seconds']} | "
                         f"{r['peak_mem_gb']} |")
    lines += search_lines([r for r in rows if r["method"] == "optspa" and r["corpus"] == "wiki"],
                          "validation ppl")
    r0 = rows[0]
    lines += ["", calibration_note(args, r0) + "; weights counted as stored (pruned linears: "
              "a bitmask plus the kept fp32 values); search validation "
              f"{VAL_WINDOWS} x {args.seqlen} wiki-train tokens apart from calibration; "
              f"{r0['machine']}; {r0['date']}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"magnitude": "v:", "wanda": "o-", "ria": "^-", "sparsegpt": "s-",
              "optspa": "*-", "optspa_wanda": "X--", "optspa_sparsegpt": "P--"}
    for ax, corpus in zip(axes, ("wiki", "lee")):
        for method, style in styles.items():
            pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == method
                         and r["corpus"] == corpus and r["setting"] != "2:4")
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        dense = next(r["ppl"] for r in rows if r["method"] == "dense" and r["corpus"] == corpus)
        ax.axhline(dense, color="gray", lw=0.8, ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the decoder linears")
        ax.set_ylabel(f"perplexity ({corpus}, test)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: unstructured pruning, uniform and searched per-block ratios")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = quality_parser(__doc__)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6, 0.7],
                   help="unstructured sparsities of the uniform rows (default: 0.5 0.6 0.7)")
    p.add_argument("--search", type=float, nargs="*", default=[0.5, 0.6, 0.7],
                   help="targets of the searched rows (default: 0.5 0.6 0.7)")
    p.add_argument("--trials", type=int, default=50,
                   help="feasible trials of each search (default: 50, the paper's)")
    p.add_argument("--searched-only", action="store_true",
                   help="run the searched rows only and merge them into the committed results "
                        "(the dense and uniform rows kept as measured)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "prune"),
                   help="where checkpoints, profiles and logs go (reused by a rerun)")
    p.add_argument("--replot", action="store_true",
                   help="rebuild the table and plot from the committed results, running nothing")
    args = p.parse_args()
    if args.replot:
        rows = json.loads((RESULTS / "prune_quality.json").read_text())
    else:
        rows = run(args)
    if args.searched_only and not args.replot:
        rows = merged_rows("prune_quality", rows,
                           key=lambda r: (r["method"], r["setting"], r["corpus"]))
    write_results("prune_quality", rows, table(rows, args))
    plot(rows, RESULTS / "prune_quality.png")
    print(table(rows, args))


if __name__ == "__main__":
    main()
