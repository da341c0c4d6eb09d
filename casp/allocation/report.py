"""Stage 2's report: a plan as a table and as a plot (bits per layer beside the
importance, or the measured divergence of each layer's choice)."""
from __future__ import annotations

from pathlib import Path

from casp.allocation.budget import QUANTIZER_LABELS
from casp.allocation.plan import BitPlan
from casp.allocation.search import UNIT_NAMES


def format_plan_table(plan: BitPlan) -> str:
    lines = ["| layer | importance | continuous bits | bits |", "|---|---|---|---|"]
    for row in plan.layers:
        lines.append(f"| {row['layer']} | {row['importance']:.4f} | {row['continuous_bits']:.2f} "
                     f"| {row['bits']} |")
    m = plan.meta
    books = m.get("codebooks")
    if books:
        label = QUANTIZER_LABELS[m.get("quantizer", "aqlm")]
        factors = ("same as the layer" if m["factor_bits"] is None else
                   f"{m['factor_bits']} bits = {label} {books[str(m['factor_bits'])]}")
        setting = f"{label} " + ", ".join(f"{b} bits = {s}" for b, s in books.items())
    else:
        factors = ("same as the layer" if m["factor_bits"] is None else
                   f"{m['factor_bits']} bits, group {m['factor_group_size']}")
        setting = f"group {m['group_size']}"
    lines.append("")
    lines.append(f"budget {m['budget_bits']} bits; achieved {m['achieved_bits']:.4f} average bits "
                 f"over {m['dense_parameters']:,} original dense weights ({setting}, overheads "
                 f"included); low-rank factors: {factors}")
    return "\n".join(lines)


def format_measured_table(plan: BitPlan) -> str:
    units = list(dict.fromkeys(u for r in plan.layers for u in r["units"]))
    lines = ["| layer | " + " | ".join(UNIT_NAMES.get(u, u) for u in units) +
             " | KL of the choice | KL all at the lowest width |",
             "|---" * (len(units) + 3) + "|"]
    lowest = f"dense@{min(plan.meta['allowed_bits'])}"
    for row in plan.layers:
        cells = [row["units"].get(u, "-").replace("dense@", "").replace("lowrank", "low-rank ")
                 .replace("@", ", factors ") for u in units]
        base = sum(r.get(lowest, 0.0) for r in row["measured"].values())
        lines.append(f"| {row['layer']} | " + " | ".join(cells) +
                     f" | {row['kl']:.4g} | {base:.4g} |")
    m = plan.meta
    n_lr = sum(r["lowrank"] is not None for r in plan.layers)
    lines += ["", f"budget {m['budget_bits']} bits; achieved {m['achieved_bits']:.4f} average "
              f"bits over {m['dense_parameters']:,} original dense weights; {n_lr} of "
              f"{len(plan.layers)} layers take low-rank W_q/W_k; summed KL "
              f"{sum(r['kl'] for r in plan.layers):.4g} (measured one part at a time)"]
    return "\n".join(lines)


def plot_plan(plan: BitPlan, path: str | Path) -> Path:
    """Bar chart of bits per layer with the importance score (or, for a measured plan, the
    measured divergence of each layer's choice) on a second axis; low-rank layers hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = plan.meta.get("allocation") == "measured"
    idx = [r["layer"] for r in plan.layers]
    fig, ax = plt.subplots(figsize=(max(6, len(idx) * 0.25), 3.5))
    bars = ax.bar(idx, [r["bits"] for r in plan.layers], color="#4a7ab5", label="bits (integer)")
    if measured:
        for bar, r in zip(bars, plan.layers):
            if r.get("lowrank") is not None:
                bar.set_hatch("//")
                bar.set_facecolor("#8fb0d9")
        ax.bar([], [], color="#8fb0d9", hatch="//", label="low-rank W_q/W_k")
    else:
        ax.plot(idx, [r["continuous_bits"] for r in plan.layers], "k.--", lw=0.8,
                label="continuous optimum")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(plan.meta["allowed_bits"]) + 1)
    ax2 = ax.twinx()
    values = [max(r["kl"], 1e-12) if measured else r["importance"] for r in plan.layers]
    what = "KL of the choice" if measured else "importance"
    ax2.plot(idx, values, color="#c0504d", lw=1.2, label=what)
    ax2.set_yscale("log")
    ax2.set_ylabel(what)
    ax.set_title(f"{'measured ' if measured else ''}bit plan: "
                 f"{plan.meta['achieved_bits']:.3f} average bits (budget {plan.meta['budget_bits']})")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
