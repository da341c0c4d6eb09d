"""The attention-sparsity report (casp.eval.attention_sparsity's results): the per-layer plot,
the JSON and PNG outputs, and the summary lines ``casp sparsity`` prints."""
from __future__ import annotations

import json
import os
from pathlib import Path

KIND_STYLE = {"text": ("text", "tab:blue", "o"), "image_text": ("image+text", "tab:orange", "s")}


def plot_report(report: dict, path: Path, title: str) -> None:
    """Three panels: sparsity per layer, MSE per layer, MSE against sparsity (one point per
    layer and input kind, like the paper's figure; small points: single samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_m, ax_x) = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, (label, color, marker) in KIND_STYLE.items():
        if kind not in report:
            continue
        data = report[kind]
        layers = range(len(data["per_layer"]["sparsity"]))
        ax_s.plot(layers, data["per_layer"]["sparsity"], marker=marker, color=color, label=label)
        ax_m.plot(layers, data["per_layer"]["mse"], marker=marker, color=color, label=label)
        for s_row, m_row in zip(data["per_sample"]["sparsity"], data["per_sample"]["mse"]):
            ax_x.scatter(s_row, m_row, s=6, color=color, alpha=0.2, linewidths=0)
        ax_x.scatter(data["per_layer"]["sparsity"], data["per_layer"]["mse"], color=color,
                     marker=marker, label=f"{label} (per layer)", edgecolors="black",
                     linewidths=0.5)
    mode = report["settings"]["threshold_mode"]
    threshold = report["settings"]["threshold"]
    rule = f"p < {threshold:g}/n" if mode == "relative" else f"p < {threshold:g}"
    ax_s.set(xlabel="decoder layer", ylabel=f"sparsity ({rule})", title="attention sparsity")
    ax_m.set(xlabel="decoder layer", ylabel="MSE(S - S')", title="low-rank W_q/W_k error")
    ax_x.set(xlabel=f"sparsity ({rule})", ylabel="MSE(S - S')", title="error vs sparsity")
    all_mse = [v for kind in KIND_STYLE if kind in report
               for row in report[kind]["per_sample"]["mse"] for v in row]
    if all_mse and min(all_mse) > 0:
        ax_m.set_yscale("log")
        ax_x.set_yscale("log")
    for ax in (ax_s, ax_m, ax_x):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: Path, png_path: Path) -> None:
    """JSON and PNG, each written to a temporary file and renamed into place only when both
    are complete."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    tmp_png = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}")
    try:
        tmp_json.write_text(json.dumps(report, indent=1) + "\n")
        title = (f"{Path(report['settings']['lowrank']).name} vs "
                 f"{report['settings']['model']}: attention of each layer on the original "
                 "model's inputs")
        plot_report(report, tmp_png, title)
        tmp_json.replace(json_path)
        tmp_png.replace(png_path)
    finally:
        tmp_json.unlink(missing_ok=True)
        tmp_png.unlink(missing_ok=True)


def describe(report: dict) -> list[str]:
    lines = []
    for kind, (label, _, _) in KIND_STYLE.items():
        if kind not in report:
            continue
        data = report[kind]
        sp, mse = data["per_layer"]["sparsity"], data["per_layer"]["mse"]
        visual = (f", {data['visual_token_fraction']:.0%} visual tokens"
                  if data.get("visual_token_fraction") else "")
        lines.append(f"{label}: {data['samples']} samples, {data['tokens']} tokens{visual}; "
                     f"sparsity mean {data['mean']['sparsity']:.3f} (layers "
                     f"{min(sp):.3f}-{max(sp):.3f}), MSE mean {data['mean']['mse']:.3e} "
                     f"(layers {min(mse):.3e}-{max(mse):.3e})")
    return lines


# --------------------------------------------------------------------------------------------
# command line
