"""Benchmark: how much casp prune-search's fast mode changes a search's result against the
authors' exact mode.

Fast mode scores every weight once, along one uniform pruning at the target, and a trial only
thresholds those ranks; exact mode prunes each trial layer by layer from the dense model, each
layer's statistics from inputs through its own already-pruned layers (the authors' code). This
takes the profiles a finished fast search evaluated (its study file, written by
bench/prune_quality.py), re-evaluates a spread of them in exact mode on the same calibration
and validation windows, and reports per profile both objectives, their rank correlation, and
whether the fast search's best profile is also the best of them in exact mode.

    .venv/bin/python bench/prune_fast_vs_exact.py [--target 0.5] [--profiles 8]
Writes bench/results/prune_fast_vs_exact.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import MODEL, ROOT, machine, write_results  # noqa: E402


def search_args(target: float, study: Path, mode: str) -> argparse.Namespace:
    """The flags bench/prune_quality.py gave casp prune-search, through casp's own parser."""
    from casp.cli import build_parser

    return build_parser().parse_args([
        "prune-search", "--model", MODEL, "--output", str(study.with_suffix(".json")),
        "--study", str(study), "--target", str(target), "--score", "ria", "--mode", mode,
        "--val-windows", "8", "--dataset", "wiki", "--split", "train", "--nsamples", "32",
        "--seqlen", "512", "--seed", "3"])


def spread_of(trials: list, n: int) -> list:
    """``n`` of the completed trials, evenly spaced in the fast objective's order (the best
    and the worst included), the uniform one always."""
    ordered = sorted(trials, key=lambda t: t.value)
    picks = {round(i * (len(ordered) - 1) / max(n - 1, 1)) for i in range(n)}
    chosen = [ordered[i] for i in sorted(picks)]
    uniform = [t for t in trials if t.number == 0]
    return chosen + [t for t in uniform if t not in chosen]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.5, help="the search's target (default 0.5)")
    p.add_argument("--profiles", type=int, default=8,
                   help="profiles re-evaluated in exact mode (default 8, plus the uniform one)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "prune"),
                   help="bench/prune_quality.py's work folder (its study files)")
    args = p.parse_args()
    import optuna

    from casp.cli.args import calibration_config
    from casp.cli.prune import _text_objective
    from casp.data.calibration import calibration_batches
    from casp.layerwise import capture_layer_inputs
    from casp.loading import load_pretrained
    from casp.prune.profile import mean_sparsity
    from casp.prune.search import PruneSearch, SearchSettings

    torch.manual_seed(0)
    study_path = Path(args.work) / f"profile-{args.target:g}.study.db"
    if not study_path.is_file():
        sys.exit(f"no study at {study_path}: run bench/prune_quality.py first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fast = optuna.load_study(study_name="casp-prune-search", storage=f"sqlite:///{study_path}")
    trials = [t for t in fast.trials if t.state.name == "COMPLETE"]
    chosen = spread_of(trials, args.profiles)

    exact_args = search_args(args.target, Path(args.work) / "exact-scratch.study.db", "exact")
    loaded = load_pretrained(MODEL)
    evaluate, _ = _text_objective(loaded, exact_args)
    batches = calibration_batches(loaded, calibration_config(exact_args))
    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, torch.device("cpu"))
    del batches
    scratch = Path(args.work) / "exact-scratch.study.db"
    scratch.unlink(missing_ok=True)
    search = PruneSearch(loaded, inputs, evaluate,
                         SearchSettings(target=args.target, score="ria", mode="exact"),
                         scratch, {"bench": "fast-vs-exact"}, torch.device("cpu"))
    rows = []
    for t in chosen:
        ratios = search.ratios(t.params)
        start = time.perf_counter()
        exact = search.run_trial(ratios)
        seconds = time.perf_counter() - start
        rows.append({"trial": t.number, "uniform": t.number == 0,
                     "mean_sparsity": round(mean_sparsity(ratios, search.shapes), 6),
                     "params": t.params, "fast": round(t.value, 4), "exact": round(exact, 4),
                     "fast_seconds": round(t.user_attrs.get("seconds", 0.0), 2),
                     "exact_seconds": round(seconds, 2)})
        print(f"trial {t.number}: fast {t.value:.4f}, exact {exact:.4f} ({seconds:.1f} s)",
              flush=True)
    scratch.unlink(missing_ok=True)
    fast_best = min(rows, key=lambda r: r["fast"])
    exact_best = min(rows, key=lambda r: r["exact"])
    summary = {"target": args.target, "profiles": len(rows),
               "spearman": round(spearman([r["fast"] for r in rows],
                                          [r["exact"] for r in rows]), 4),
               "fast_best_trial": fast_best["trial"], "exact_best_trial": exact_best["trial"],
               "fast_best_exact_value": fast_best["exact"],
               "exact_best_value": exact_best["exact"],
               "machine": machine(), "date": datetime.date.today().isoformat()}
    lines = ["| trial | uniform | mean sparsity | fast objective | exact objective | "
             "fast s | exact s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["fast"]):
        lines.append(f"| {r['trial']} | {'yes' if r['uniform'] else ''} | "
                     f"{r['mean_sparsity']:.4f} | {r['fast']:.3f} | {r['exact']:.3f} | "
                     f"{r['fast_seconds']} | {r['exact_seconds']} |")
    lines += ["", f"Spearman rank correlation fast vs exact over {len(rows)} profiles: "
              f"{summary['spearman']}; the fast search's best (trial {fast_best['trial']}) "
              f"scores {fast_best['exact']:.3f} in exact mode, the exact best of these (trial "
              f"{exact_best['trial']}) {exact_best['exact']:.3f}.", "",
              f"SmolLM2-135M, target {args.target:g}, ria score, validation perplexity on 8 x "
              "512 wiki-train windows apart from the 32 x 512 calibration windows (seed 3); "
              f"profiles from bench/prune_quality.py's fast study; {summary['machine']}; "
              f"{summary['date']}."]
    write_results("prune_fast_vs_exact", [{"summary": summary}, *rows], "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
