"""Benchmark: efficiency of every method on this CPU, the analogue of the CASP paper's
supplementary Tab. 1 (prefill time, decode speed, peak memory, model size).

Eight rows per model, all in float32 with eager attention (the paper's):
    Original       the model as loaded
    CASP_Original  low-rank W_q/W_k (75% of their parameters removed), the rest dense
    GPTQ           uniform 2-bit group 128, act-order      CASP_GPTQ   low-rank + GPTQ plan
    AQLM           uniform 2x8 (group 8)                    CASP_AQLM   low-rank + AQLM plan
    QuIP#          uniform e8p12                            CASP_QuIP#  low-rank + QuIP# plan
on SmolLM2-135M (a text prompt of --prompt-tokens tokens from the bundled Wikipedia test
split) and the mini LLaVA (one easy-vqa test image and its question through the chat
template; the vision tower and projector stay float32, as they do in every casp checkpoint).

How the quantized rows are built: stages 1 and 2 are real, stage 3 draws random codes.
    stage 1  casp lowrank --compression 0.75 --rank-multiple 8 (16 x 512 wiki tokens, seed 3)
    stage 2  casp allocate at the uniform row's budget, exactly as the quality benchmarks:
             GPTQ --budget 2@128 --bits 2,3,4,5 --group-size 128;
             AQLM --budget 2x8 --bits 2,3,4 --codebooks 2=2x8,3=3x8,4=4x8 --factor-bits 0;
             QuIP# --budget e8p12 --bits 2,3,4 --codebooks 2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b
             --factor-bits 3
    stage 3  casp.quant.random_codes.quantize_randomly: every quantizable linear replaced by
             the module a real checkpoint holds (same storage, same kernels) in the setting
             the plan (or the uniform row) names, with random codes.
Decode speed does not depend on the code values, and real AQLM / QuIP# quantization takes
6-26 minutes per model here; these rows therefore measure speed and memory, never quality.

Each row runs in its own process (its memory peaks are its own): torch.set_num_threads
(--threads), build the model, one warm-up generation (numba compiles or loads its kernels
on the first call), then casp.generation.generate_ids with ignore_eos (exactly --new-tokens
tokens) --repeats times; prefill time and decode tokens/s = (new tokens - 1) / decode time
are the medians. Memory is the process's RSS high-water mark (VmHWM), reset by writing 5 to
/proc/self/clear_refs after freed memory is handed back to the system (malloc_trim): once
before a prefill-only run (one new token; "prefill peak") and once before the timed runs
("peak", end to end). Size counts the bytes of every tensor a checkpoint stores, as they are
in memory (tied embedding and lm_head once); the fp32 embedding/lm_head's share of it and
the time share of lm_head in a decode step (50 calls on a [1, 1, hidden] input against the
per-token decode time) are recorded too.

Stages go through the casp command in their own processes and are kept under --work
(default runs/bench/efficiency/<model>); finished rows are kept in --work/rows.jsonl by
model, row and settings, so a rerun resumes (--fresh measures again). Writes
bench/results/efficiency.json and .md (the rows of other models already there are kept).

    .venv/bin/python bench/efficiency.py [--models smollm2-135m,mini-llava] [--rows all]
        [--threads N] [--repeats 3] [--prompt-tokens 512] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_quality import ROOT, RESULTS, casp, machine  # noqa: E402

NAME = "efficiency"
MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
          "mini-llava": "mini LLaVA (DINOv2 ViT-S/14 + projector + SmolLM2-135M-Instruct)"}
CALIB = ["--nsamples", 16, "--seqlen", 512, "--seed", 3]
CODES = "random (structure from real lowrank + allocate)"
WARMUP_TOKENS = 3
HEAD_CALLS = 50


@dataclass(frozen=True)
class Method:
    quantizer: str | None       # casp.quant.random_codes name; None: dense float32
    casp: bool                  # built from the low-rank checkpoint (with a plan if quantized)
    uniform: dict | None        # the uniform row's entry for every linear
    setting: str
    allocate: tuple = ()        # casp allocate flags of the CASP row's plan


GPTQ_PLAN = ("--budget", "2@128", "--bits", "2,3,4,5", "--group-size", 128)
AQLM_PLAN = ("--quantizer", "aqlm", "--budget", "2x8", "--bits", "2,3,4", "--codebooks",
             "2=2x8,3=3x8,4=4x8", "--factor-bits", 0)
QUIP_PLAN = ("--quantizer", "quip", "--budget", "e8p12", "--bits", "2,3,4", "--codebooks",
             "2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b", "--factor-bits", 3)
ROWS = {
    "Original": Method(None, False, None, "float32"),
    "CASP_Original": Method(None, True, None, "low-rank W_q/W_k 75%, float32"),
    "GPTQ": Method("gptq", False, {"bits": 2, "group_size": 128}, "2-bit g128 act-order"),
    "CASP_GPTQ": Method("gptq", True, None, "low-rank 75% + plan at the 2-bit g128 budget "
                        "(widths 2,3,4,5, factors 3-bit)", GPTQ_PLAN),
    "AQLM": Method("aqlm", False, {"codebooks": "2x8"}, "2x8 g8"),
    "CASP_AQLM": Method("aqlm", True, None, "low-rank 75% + plan at the 2x8 budget "
                        "(2=2x8,3=3x8,4=4x8, factors at their layer's width)", AQLM_PLAN),
    "QuIP#": Method("quip", False, {"quip_codebook": "e8p12"}, "e8p12"),
    "CASP_QuIP#": Method("quip", True, None, "low-rank 75% + plan at the e8p12 budget "
                         "(2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b, factors 3-bit)", QUIP_PLAN),
}


def row_name(text: str) -> str:
    """A --rows entry as its row name (case and a missing '#' forgiven)."""
    for name in ROWS:
        if text.strip().lower().rstrip("#") == name.lower().rstrip("#"):
            return name
    raise SystemExit(f"unknown row {text!r}; use any of {', '.join(ROWS)}")


def model_work(work: Path, model: str) -> Path:
    return work / model


def plan_path(work: Path, model: str, quantizer: str) -> Path:
    return model_work(work, model) / f"plan_{quantizer}.json"


def settings_of(model: str, args) -> dict:
    """What a measurement depends on (the key of a finished row with model and row)."""
    return {"threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens if model != "mini-llava" else None}


# ---------------------------------------------------------------- measuring one row

def malloc_trim() -> None:
    """Hand freed heap memory back to the system (glibc), so a reset high-water mark starts
    from what the process really holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def proc_status_mib(field: str) -> float | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS; False when the kernel refuses."""
    gc.collect()
    malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_mib(resettable: bool) -> float:
    from casp.generation import peak_rss_mib

    hwm = proc_status_mib("VmHWM") if resettable else None
    return hwm if hwm is not None else peak_rss_mib()


def stored_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def build(model: str, row: str, work: Path) -> tuple:
    """The row's model: loaded, made low-rank and given random codes as its method says."""
    from casp.loading import load_pretrained
    from casp.quant.layer_groups import quantizable_linears
    from casp.quant.random_codes import quantize_randomly

    method = ROWS[row]
    source = model_work(work, model) / "lowrank" if method.casp else model
    loaded = load_pretrained(str(source), dtype="float32", device="cpu")
    info = {"source": str(source), "quantized_modules": 0}
    if method.quantizer:
        linears = len(quantizable_linears(loaded.model, loaded.spec))
        if method.casp:
            plan = json.loads(plan_path(work, model, method.quantizer).read_text())
            count = quantize_randomly(loaded.model, loaded.spec, method.quantizer,
                                      modules=plan["modules"])
            info.update(plan=str(plan_path(work, model, method.quantizer)),
                        plan_budget_bits=plan.get("budget_bits"),
                        plan_achieved_bits=plan.get("achieved_bits"))
        else:
            count = quantize_randomly(loaded.model, loaded.spec, method.quantizer,
                                      uniform=method.uniform)
        info.update(quantized_modules=count, dense_linears_left=linears - count)
    return loaded, info


def prompt_of(loaded, model: str, prompt_tokens: int) -> tuple[dict, str]:
    """The row's inputs and a description: a text prompt of exactly ``prompt_tokens`` tokens
    (SmolLM2) or the first easy-vqa test image and its question (the mini LLaVA)."""
    if loaded.spec.multimodal:
        from casp.data.easy_vqa import load_split, question_text
        from casp.generation import prompt_inputs, read_image

        record = load_split("test")[0]
        inputs = prompt_inputs(loaded, question_text(record), read_image(record.image))
        return inputs, (f"easy-vqa test image {record.image_id} + {question_text(record)!r} "
                        "(chat template)")
    from casp.data.text import load_documents, tokenize_documents

    docs, chosen = load_documents("wiki", "test"), []
    for doc in docs:             # enough text for the prompt, not the whole split
        chosen.append(doc)
        if sum(map(len, chosen)) > 8 * prompt_tokens:
            break
    ids = tokenize_documents(loaded.tokenizer, chosen)[:prompt_tokens]
    if ids.numel() < prompt_tokens:
        raise SystemExit(f"the wiki test split has {ids.numel()} tokens, fewer than "
                         f"--prompt-tokens {prompt_tokens}")
    return ({"input_ids": ids[None], "attention_mask": torch.ones(1, prompt_tokens,
                                                                  dtype=torch.long)},
            f"{prompt_tokens} tokens of the bundled Wikipedia test split (no chat template)")


def per_call_s(fn, x, calls: int = HEAD_CALLS) -> float:
    for _ in range(5):
        fn(x)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls


def measure_row(model: str, row: str, args) -> dict:
    from casp.generation import check_context, generate_ids, use_attention

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded, info = build(model, row, Path(args.work))
    net = loaded.model.eval()
    use_attention(net, "eager")
    gc.collect()
    build_s = time.perf_counter() - start
    inputs, prompt = prompt_of(loaded, model, args.prompt_tokens)
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    check_context(net, prompt_len, args.new_tokens)

    def generation(tokens: int) -> dict:
        run = generate_ids(net, inputs, tokens, ignore_eos=True)
        if len(run["token_ids"]) != tokens:
            raise SystemExit(f"asked for {tokens} tokens, got {len(run['token_ids'])}")
        return run

    with torch.no_grad():
        start = time.perf_counter()
        generation(WARMUP_TOKENS)                  # kernels compiled or loaded here
        warmup_s = time.perf_counter() - start
        resettable = reset_peak()
        rss_before = proc_status_mib("VmRSS")
        generation(1)
        prefill_peak = peak_mib(resettable)
        reset_peak()
        runs = [generation(args.new_tokens) for _ in range(args.repeats)]
        peak = peak_mib(resettable)
        head, embed = net.get_output_embeddings(), net.get_input_embeddings()
        hidden = embed.weight.shape[1]
        head_s = per_call_s(head, torch.randn(1, 1, hidden))
        embed_s = per_call_s(embed, torch.tensor([[1]]))

    prefill = [r["prefill_s"] for r in runs]
    decode = [r["decode_s"] for r in runs]
    rates = [(args.new_tokens - 1) / d for d in decode] if args.new_tokens > 1 else []
    step_s = statistics.median(decode) / (args.new_tokens - 1) if rates else None
    size = stored_bytes(net.state_dict(keep_vars=True).values())
    fp_io = stored_bytes([embed.weight, head.weight, getattr(head, "bias", None)])
    method = ROWS[row]
    return {
        "model": MODELS[model], "model_alias": model, "method": row,
        "quantizer": method.quantizer, "setting": method.setting, "codes": CODES
        if method.quantizer else None,
        "threads": torch.get_num_threads(), "dtype": str(next(net.parameters()).dtype)
        .removeprefix("torch."), "attention": "eager",
        "prompt": prompt, "prompt_tokens": prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prefill_s": round(statistics.median(prefill), 4),
        "decode_tokens_per_s": round(statistics.median(rates), 3) if rates else None,
        "prefill_s_runs": [round(x, 4) for x in prefill],
        "decode_s_runs": [round(x, 4) for x in decode],
        "decode_tokens_per_s_runs": [round(x, 3) for x in rates],
        "prefill_peak_mib": round(prefill_peak, 1), "peak_mib": round(peak, 1),
        "rss_before_mib": None if rss_before is None else round(rss_before, 1),
        "memory": ("VmHWM after writing 5 to /proc/self/clear_refs (after malloc_trim)"
                   if resettable else "ru_maxrss: /proc/self/clear_refs not writable, so both "
                   "peaks include loading and building the model"),
        "size_mib": round(size / 2**20, 2), "embed_lm_head_mib": round(fp_io / 2**20, 2),
        "embed_lm_head_share": round(fp_io / size, 4),
        "lm_head_ms": round(head_s * 1e3, 3), "embed_ms": round(embed_s * 1e3, 4),
        "lm_head_decode_share": round(head_s / step_s, 4) if step_s else None,
        "build_s": round(build_s, 1), "warmup_s": round(warmup_s, 1), **info,
        "machine": machine(), "cpu": cpu_name(), "date": datetime.date.today().isoformat()}


def cpu_name() -> str:
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else "unknown"


# ---------------------------------------------------------------- the parent process

def prepare(model: str, rows: list[str], work: Path) -> None:
    """Stages 1 and 2 the rows need (each skipped when its output is already there)."""
    mdir = model_work(work, model)
    mdir.mkdir(parents=True, exist_ok=True)
    log = mdir / "log.txt"
    needs = [ROWS[r] for r in rows if ROWS[r].casp]
    if not needs:
        return
    lowrank = mdir / "lowrank"
    start = time.perf_counter()
    casp("lowrank", "--model", model, "--output", lowrank, "--compression", 0.75,
         "--rank-multiple", 8, *CALIB, log=log)
    print(f"{model}: stage 1 (lowrank) ready in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    for method in needs:
        plan = plan_path(work, model, method.quantizer)
        if method.quantizer and not plan.is_file():
            start = time.perf_counter()
            casp("allocate", "--model", lowrank, "--output", plan, *method.allocate, *CALIB,
                 log=log)
            print(f"{model}: stage 2 ({plan.name}) in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)


def row_key(model: str, row: str, settings: dict) -> str:
    return json.dumps([model, row, settings], sort_keys=True)


def finished_rows(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["key"]] = entry["row"]
    return done


def run_row(model: str, row: str, args, log: Path) -> dict:
    out = Path(args.work) / model / f"row-{re.sub(r'[^A-Za-z0-9]+', '_', row)}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", f"{model}:{row}",
           "--json-out", str(out), "--work", str(args.work), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n" + done.stdout + done.stderr)
    if done.returncode or not out.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"exit {done.returncode}; last lines:\n{tail}")
    return json.loads(out.read_text())


def with_ratios(rows: list[dict]) -> list[dict]:
    """Speed against the Original row of the same model and run."""
    fp = {r["model_alias"]: r for r in rows if r["method"] == "Original"}
    for r in rows:
        base = fp.get(r["model_alias"])
        ok = base is not None and base["decode_tokens_per_s"] and r["decode_tokens_per_s"]
        r["decode_vs_fp"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3) \
            if ok else None
        r["prefill_vs_fp"] = round(base["prefill_s"] / r["prefill_s"], 3) if base else None
    return rows


def share_note(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["method"] in ("Original", "GPTQ", "QuIP#"):
            decode = (f", lm_head {r['lm_head_decode_share']:.0%} of a decode step "
                      f"({r['lm_head_ms']:.2f} ms a call)" if r["lm_head_decode_share"] else "")
            parts.append(f"{r['method']} {r['embed_lm_head_share']:.0%} of the size{decode}")
    return "; fp32 embedding/lm_head: " + "; ".join(parts) if parts else ""


def table(rows: list[dict]) -> str:
    lines = []
    for alias in dict.fromkeys(r["model_alias"] for r in rows):
        mine = [r for r in rows if r["model_alias"] == alias]
        r0 = mine[0]
        lines += [f"**{r0['model']}**", "",
                  "| method | prefill (s) | decode (tok/s) | vs fp | prefill peak (MiB) | "
                  "peak (MiB) | size (MiB) |", "|---|---|---|---|---|---|---|"]
        for r in mine:
            rate = f"{r['decode_tokens_per_s']:.2f}" if r["decode_tokens_per_s"] else "-"
            ratio = f"{r['decode_vs_fp']:.2f}x" if r.get("decode_vs_fp") else "-"
            lines.append(f"| {r['method']} | {r['prefill_s']:.3f} | {rate} | {ratio} | "
                         f"{r['prefill_peak_mib']:.0f} | {r['peak_mib']:.0f} | "
                         f"{r['size_mib']:.1f} |")
        lines += ["", f"{r0['threads']} threads, {r0['dtype']}, {r0['attention']} attention; "
                  f"prompt {r0['prompt']} = {r0['prompt_tokens']} tokens; {r0['new_tokens']} "
                  f"new tokens (end token ignored); median of {r0['repeats']} runs; peaks are "
                  f"the process's RSS high-water mark; quantized rows: codes "
                  f"{CODES}{share_note(mine)}; {r0['cpu']}, {r0['machine']}; {r0['date']}.", ""]
    return "\n".join(lines)


def run(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "rows.jsonl"
    done = {} if args.fresh else finished_rows(cache)
    rows, failed = [], []
    total = len(args.models) * len(args.rows)
    for model in args.models:
        prepare(model, args.rows, work)
        for row in args.rows:
            n = len(rows) + len(failed) + 1
            key = row_key(model, row, settings_of(model, args))
            start = time.perf_counter()
            if key in done:
                result, note = done[key], "kept from rows.jsonl"
            else:
                try:
                    result = run_row(model, row, args, model_work(work, model) / "log.txt")
                except RuntimeError as exc:
                    failed.append(f"{model} {row}")
                    print(f"[{n}/{total}] {model} {row}: FAILED ({exc})", file=sys.stderr,
                          flush=True)
                    continue
                with open(cache, "a") as fh:
                    fh.write(json.dumps({"key": key, "row": result}) + "\n")
                note = f"{time.perf_counter() - start:.0f} s"
            rows.append(result)
            rate = result["decode_tokens_per_s"]
            print(f"[{n}/{total}] {model} {row}: prefill {result['prefill_s']:.3f} s, decode "
                  f"{rate if rate is None else round(rate, 2)} tok/s, prefill peak "
                  f"{result['prefill_peak_mib']:.0f} MiB, peak {result['peak_mib']:.0f} MiB, "
                  f"size {result['size_mib']:.1f} MiB ({note})", file=sys.stderr, flush=True)
    rows = with_ratios(rows)
    path = RESULTS / f"{NAME}.json"
    kept = [r for r in json.loads(path.read_text()) if r["model_alias"] not in args.models] \
        if path.is_file() else []
    order = list(MODELS)
    merged = sorted(kept + rows, key=lambda r: order.index(r["model_alias"])
                    if r["model_alias"] in order else len(order))
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    (RESULTS / f"{NAME}.md").write_text(table(merged))
    print(table(merged))
    if failed:
        print(f"failed rows: {', '.join(failed)} (their logs: {work}/<model>/log.txt)",
              file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models to measure (default: {','.join(MODELS)})")
    p.add_argument("--rows", default="all",
                   help=f"comma-separated rows to measure, or all (default): {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help=f"torch (and numba) threads of each row (default: all cores, "
                        f"{os.cpu_count()} here)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed generations per row; prefill and decode speed are their "
                        "medians (default 3)")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help="tokens of the text prompt (SmolLM2; the mini LLaVA's prompt is an "
                        "image and a question) (default 512)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens generated per run, end token ignored (default 128)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "efficiency"),
                   help="where the low-rank checkpoints, plans, logs and finished rows go, "
                        "under <work>/<model> (reused by a rerun; default "
                        "runs/bench/efficiency)")
    p.add_argument("--fresh", action="store_true",
                   help="measure every row again instead of keeping those in "
                        "<work>/rows.jsonl (stages 1 and 2 are still reused)")
    p.add_argument("--row", metavar="MODEL:ROW",
                   help="internal: measure one row in this process and write it to --json-out")
    p.add_argument("--json-out", metavar="FILE", help="internal: where --row writes its row")
    args = p.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.new_tokens < 1 or args.prompt_tokens < 1:
        p.error("--threads, --repeats, --new-tokens and --prompt-tokens must be at least 1")
    if args.row:
        model, row = args.row.split(":", 1)
        result = measure_row(model, row_name(row), args)
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
        return
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; use any of {', '.join(MODELS)}")
    args.rows = list(ROWS) if args.rows == "all" else [row_name(r) for r in args.rows.split(",")]
    sys.exit(run(args))


if __name__ == "__main__":
    main()
