"""Every method side by side: the rows of the three quality benchmarks (GPTQ, AQLM, QuIP#)
on SmolLM2-135M, grouped by bit budget, from their results files (nothing is rerun). All
three used the same calibration (32 x 512 wiki-train tokens, seed 3) and evaluation (16 x 512
tokens of each test split). Writes bench/results/all_methods.md (the README's table).

    .venv/bin/python bench/compare_methods.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("gptq_quality", "aqlm_quality", "quip_quality")
QUANTIZER = {"gptq": "GPTQ", "aqlm": "AQLM", "quip": "QuIP#"}


def setting_of(r: dict) -> str:
    s = r["settings"]
    if r["method"] == "fp":
        return "-"
    if "codebook" in s or "codebooks" in s:
        uniform = s.get("codebook") or s.get("codebooks")
        text = uniform if "budget" not in s else f"plan over {s['codebook_map']}"
    else:
        text = (f"{s['bits']}-bit g{s['group_size']}" if "budget" not in s
                else f"plan, widths {s['allowed_bits']}")
    if s.get("allocation") == "measured":
        text = text.replace("plan over", "measured plan over")
        text += f", W_q/W_k low-rank in {len(s['lowrank_layers'])} of {len(s['layer_bits'])} layers"
    if "budget" in s and s.get("factor_bits") is not None and "alloc_only" not in r["method"]:
        fb = s["factor_bits"]
        text += f", factors {fb}" + ("-bit" if isinstance(fb, int) else " width")
    if s.get("compression") and s["compression"] != 0.75:
        text += f", low-rank {int(s['compression'] * 100)}%"
    return text


def quantizer_of(method: str) -> str:
    return next((QUANTIZER[p] for p in method.split("_") if p in QUANTIZER), "-")


def baseline_key(r: dict) -> str:
    """Which uniform setting's budget a row belongs to."""
    s = r["settings"]
    if "codebook" in s:
        return f"QuIP# {s['codebook']}"
    if "codebooks" in s:
        return "AQLM 2x8"
    return f"GPTQ {s['bits']}-bit g{s['group_size']}"


def load() -> list[dict]:
    rows, seen_fp = [], False
    for name in SOURCES:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text()):
            if r["method"] == "fp":
                if seen_fp:
                    continue
            rows.append(r)
        seen_fp = True
    return rows


def table(rows: list[dict]) -> str:
    by: dict = {}
    for r in rows:
        key = (r["method"], None if r["method"] == "fp" else baseline_key(r))
        by.setdefault(key, {})[r["corpus"]] = r
    entries = []
    for (method, budget), d in by.items():
        w, lee = d["wiki"], d["lee"]
        entries.append((w["avg_bits"] or 99, method, budget, w, lee, quantizer_of(method)))
    entries.sort(key=lambda e: (e[0] if e[1] == "fp" else 0, e[2] or "", e[0]))
    lines = ["| budget of | method | quantizer | setting | avg bits | PPL wiki | PPL lee | "
             "time (s) | checkpoint (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for e in entries:
        groups.setdefault(e[2], []).append(e)
    def uniform_bits(k):
        return min((x[0] for x in groups[k] if "_" not in x[1]), default=0)

    order = sorted(groups, key=lambda k: (k is not None, uniform_bits(k)))
    rank = {"fp": 0, "gptq": 1, "aqlm": 1, "quip": 1, "casp": 2, "alloc": 3, "lowrank": 4}
    for key in order:
        for bits, method, budget, w, lee, quantizer in sorted(
                groups[key], key=lambda e: (rank.get(e[1].split("_")[0], 9), e[1])):
            size = f"{w['size_bytes'] / 2**20:.1f}" if w["size_bytes"] else "-"
            lines.append(f"| {budget or '-'} | {method} | {quantizer} | "
                         f"{setting_of(w)} | {w['avg_bits'] if w['avg_bits'] else '-'} | "
                         f"{w['ppl']:.2f} | {lee['ppl']:.2f} | {w['quant_seconds'] or '-'} | "
                         f"{size} |")
    lines += ["", "SmolLM2-135M on a 2-core CPU; every row from bench/results/{gptq,aqlm,"
              "quip}_quality.json (same calibration and evaluation; see each benchmark for its "
              "settings). Average bits count everything stored (scales, zeros, group indices, "
              "codebooks, signs); a CASP row and its ablations use the budget of the uniform "
              "row of its group."]
    return "\n".join(lines) + "\n"


def main() -> None:
    text = table(load())
    (RESULTS / "all_methods.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
