"""Benchmark: the seed paper's adaptive sparsity on the mini LLaVA (DINOv2 ViT-S/14 + trained
projector + SmolLM2-135M-Instruct), a real small multimodal model: uniform magnitude, Wanda,
the paper's score (RIA) and SparseGPT against the per-block TPE search, with the search's
objective on text (the paper's: perplexity of wiki windows) and on images (answer perplexity
of easy-vqa training questions that calibration did not use).

Rows, at each unstructured sparsity of --ratios and at 2:4 (the language model's decoder
linears only; vision tower and projector untouched):
    fp                       the model unpruned
    magnitude, wanda, ria, sparsegpt   uniform
    optspa_text / optspa_vqa at each --search target: casp prune-search (TPE over 8 blocks,
                             ratios target +- 0.05 by 0.025, the ria score, --mode fast),
                             objective text or vqa, then casp prune --profile with ria
    optspa_<objective>_wanda, optspa_<objective>_sparsegpt
                             the same profile applied with Wanda, with SparseGPT
Every row: calibration 128 easy-vqa train samples (image + question + answer, seed 3);
evaluation easy-vqa test, 500 questions drawn with seed 0 (greedy answers, exact match;
answer perplexity given image and question). Every stage runs as its own casp process;
finished checkpoints, profiles and evaluations under --work are reused, so a rerun resumes.
Writes bench/results/prune_mini_llava.{json,md,png}.

    .venv/bin/python bench/prune_mini_llava.py [--ratios 0.5 0.6] [--search 0.5] [--trials 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import ROOT, casp, machine, peak_of, stage_seconds, write_results  # noqa: E402
from mini_llava_quality import MODEL, MODEL_NAME, evaluate  # noqa: E402
from prune_quality import search_lines, search_settings  # noqa: E402

UNIFORM = ("magnitude", "wanda", "ria", "sparsegpt")
OBJECTIVES = ("text", "vqa")
TEXT_VAL = ["--val-windows", 8, "--val-seqlen", 512]
VQA_VAL = ["--val-samples", 64]


def calib_flags(args) -> list:
    return ["--mm-data", "easy-vqa", "--nsamples", args.mm_nsamples, "--seed", 3]


def row(method: str, setting: str, res: dict, checkpoint: Path | None, seconds, args,
        **extra) -> dict:
    from casp.checkpoint import checkpoint_size, read_casp_section

    sparsity, size = None, None
    if checkpoint is not None:
        size = checkpoint_size(checkpoint)["weights_bytes"]
        modules = read_casp_section(checkpoint)["modules"]
        dense = sum(d["in_features"] * d["out_features"] for d in modules.values())
        sparsity = round(1 - sum(d["kept"] for d in modules.values()) / dense, 4)
    return {"model": MODEL_NAME, "method": method, "setting": setting, "sparsity": sparsity,
            "task": "easy-vqa-test", "accuracy": round(res["accuracy"], 4),
            "answer_ppl": round(res["answer_ppl"], 4),
            "accuracy_by_type": {k: round(v, 4) for k, v in res["accuracy_by_type"].items()},
            "samples": res["samples"],
            "seconds": None if seconds is None else round(seconds, 1),
            "peak_mem_gb": None if checkpoint is None else peak_of(checkpoint),
            "weights_bytes": size,
            "settings": {"calibration": f"easy-vqa train {args.mm_nsamples} samples, seed 3",
                         "eval_samples": args.samples, "eval_seed": 0, **extra},
            "machine": machine(), "date": datetime.date.today().isoformat()}


def prune(work: Path, name: str, flags: list, args) -> Path:
    out = work / name
    casp("prune", "--model", MODEL, "--output", out, *flags, *calib_flags(args),
         log=work / "log.txt")
    return out


def search(work: Path, target: float, objective: str, args) -> tuple[Path, dict]:
    profile = work / f"profile-{objective}-{target:g}.json"
    if not profile.is_file():
        casp("prune-search", "--model", MODEL, "--output", profile, "--target", target,
             "--score", "ria", "--mode", "fast", "--trials", args.trials, "--objective",
             objective, *(TEXT_VAL if objective == "text" else VQA_VAL), *calib_flags(args),
             log=work / "log.txt")
    return profile, json.loads(profile.read_text())


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [row("fp", "dense", evaluate(MODEL, work, args), None, None, args)]
    settings = [(f"{r:g}", ["--ratio", r]) for r in args.ratios] + [("2:4", ["--nm", "2:4"])]
    for setting, flags in settings:
        for method in UNIFORM:
            out = prune(work, f"{method}-{setting.replace(':', 'of')}",
                        ["--method", method, *flags], args)
            rows.append(row(method, setting, evaluate(out, work, args), out,
                            stage_seconds(out, "prune"), args))
            write(rows, args)
    for target in args.search:
        for objective in OBJECTIVES:
            profile, data = search(work, target, objective, args)
            found = data["search"]
            extra = {"objective": objective, **search_settings(data)}
            for score in ("ria", "wanda", "sparsegpt"):
                method = f"optspa_{objective}" + ("" if score == "ria" else f"_{score}")
                out = prune(work, f"{method}-{target:g}", ["--method", score, "--profile",
                                                           profile], args)
                seconds = stage_seconds(out, "prune") + found["seconds_this_run"]
                rows.append(row(method, f"{target:g}", evaluate(out, work, args), out, seconds,
                                args, **extra))
                write(rows, args)
    return rows


def methods_of(rows) -> list[str]:
    order = [*UNIFORM, *(f"optspa_{o}{s}" for o in OBJECTIVES
                         for s in ("", "_wanda", "_sparsegpt"))]
    return [m for m in order if any(r["method"] == m for r in rows)]


def table(rows: list[dict], args) -> str:
    def cell(method, setting):
        r = next((r for r in rows if r["method"] == method and r["setting"] == setting), None)
        return "—" if r is None else f"{r['accuracy']:.3f} / {r['answer_ppl']:.2f}"

    fp = rows[0]
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] != "fp"))
    lines = [f"fp: accuracy {fp['accuracy']:.3f}, answer perplexity {fp['answer_ppl']:.3f}", "",
             "| method | " + " | ".join(f"{s} acc / answer ppl" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for m in methods_of(rows):
        lines.append(f"| {m} | " + " | ".join(cell(m, s) for s in settings) + " |")
    lines += ["", "| method | setting | sparsity | yes/no | shape | color | weights MiB | "
                  "seconds | peak GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        t = r["accuracy_by_type"]
        lines.append(f"| {r['method']} | {r['setting']} | {r['sparsity']:.4f} | "
                     f"{t.get('yes/no', 0):.3f} | {t.get('shape', 0):.3f} | "
                     f"{t.get('color', 0):.3f} | {r['weights_bytes'] / 2**20:.1f} | "
                     f"{r['seconds']} | {r['peak_mem_gb']} |")
    lines += search_lines([r for r in rows if r["method"] in ("optspa_text", "optspa_vqa")],
                          "validation objective")
    lines += ["", f"{MODEL_NAME}; calibration {args.mm_nsamples} easy-vqa train samples "
              f"(image + question + answer, seed 3); evaluation easy-vqa test, {args.samples} "
              "questions drawn with seed 0 (greedy answers, exact match after normalisation; "
              "answer perplexity of the reference answers given image and question); search "
              "objectives: text = perplexity of 8 x 512 wiki-train windows, vqa = answer "
              "perplexity of 64 easy-vqa train questions calibration did not use; weights "
              "counted as stored (language-model linears pruned: bitmask + kept fp32 values; "
              f"the rest dense); {fp['machine']}; {fp['date']}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = dict(zip(methods_of(rows), ("v:", "o-", "^-", "s-", "*-", "X--", "P--",
                                              "x-", "d--", "D--")))
    for ax, key, label in ((axes[0], "accuracy", "easy-vqa accuracy (test)"),
                           (axes[1], "answer_ppl", "answer perplexity (test)")):
        for method, style in styles.items():
            pts = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == method
                         and r["setting"] != "2:4")
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        ax.axhline(rows[0][key], color="gray", lw=0.8, ls="--", label="fp")
        if key == "answer_ppl":
            ax.set_yscale("log")
        ax.set_xlabel("sparsity of the language model's decoder linears")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center left",
               bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("mini LLaVA: unstructured pruning, uniform and searched per-block ratios")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(rows: list[dict], args) -> None:
    write_results("prune_mini_llava", rows, table(rows, args))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=500, help="test questions (default 500)")
    p.add_argument("--mm-nsamples", type=int, default=128,
                   help="easy-vqa calibration samples (default 128)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6],
                   help="unstructured sparsities of the uniform rows (default: 0.5 0.6)")
    p.add_argument("--search", type=float, nargs="*", default=[0.5],
                   help="targets of the searched rows (default: 0.5)")
    p.add_argument("--trials", type=int, default=32,
                   help="feasible trials of each search (default: 32; the paper's 50)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "prune_mini_llava"),
                   help="where checkpoints, profiles, evaluations and logs go (reused)")
    args = p.parse_args()
    rows = run(args)
    write(rows, args)
    from gptq_quality import RESULTS

    plot(rows, RESULTS / "prune_mini_llava.png")
    print(table(rows, args))


if __name__ == "__main__":
    main()
