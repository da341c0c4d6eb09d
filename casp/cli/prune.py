"""``casp prune`` (one pruning of the language model's linears: magnitude, Wanda, the seed
paper's score or SparseGPT, at a ratio, N:M, or a searched profile) and ``casp
prune-search`` (the seed paper's TPE search over per-block ratios, casp.prune.search)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from casp.cli.args import (add_calibration_args, add_model_args, calibration_config,
                           early_output_check, layer_list, positive)
from casp.errors import CaspError

log = logging.getLogger("casp")


def _sparsity_ratio(text: str) -> float:
    from casp.prune.masks import check_ratio

    try:
        value = float(text)
    except ValueError:
        raise CaspError(f"ratio {text!r} is not a number; give a value in [0, 1), e.g. 0.5")
    return check_ratio(value)


def _nm(text: str) -> tuple[int, int]:
    from casp.prune.masks import parse_nm

    return parse_nm(text)


def cmd_prune(args) -> int:
    from casp.identity import fingerprint
    from casp.loading import load_pretrained, resolve_device
    from casp.prune.layer_pass import PrunePass
    from casp.prune.profile import mean_sparsity, profile_ratios, prunable_shapes, read_profile
    from casp.prune.sparse_linear import stored_bytes
    from casp.pipeline import run_stage

    device = resolve_device(args.device)
    profile = read_profile(args.profile) if args.profile else None
    if profile and args.nm:
        raise CaspError("give --profile or --nm, not both")
    method = args.method or (profile.get("score") if profile else None) or "wanda"
    ratios = {n: float(r) for n, r in profile["ratios"].items()} if profile else None
    prune = PrunePass(method, ratio=args.ratio, nm=args.nm, ratios=ratios,
                      profile_id=fingerprint(ratios)[:12] if ratios else None,
                      damp=args.damp, block_size=args.block_size)
    calibration = calibration_config(args)
    if early_output_check(args, "prune", [prune]):
        return 0
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    shapes = prunable_shapes(loaded.model, loaded.spec)
    if profile:
        profile_ratios(profile, shapes, type(loaded.model).__name__, f"profile {args.profile}")
    if args.nm:
        bad = [n for n, (_, i) in shapes.items() if i % args.nm[1]]
        if bad:
            raise CaspError(f"{args.nm[0]}:{args.nm[1]} needs input sizes that are multiples of "
                            f"{args.nm[1]}; {bad[0]} has {shapes[bad[0]][1]}")
    result = run_stage(loaded, "prune", [prune], calibration, device, output=args.output,
                       overwrite=args.overwrite, layers=layer_list(args.layers),
                       offload_activations=args.offload_activations)
    if result.skipped:
        print(f"{args.output} is already done (same model and settings)")
        return 0
    changes = result.changes
    dense = sum(d["in_features"] * d["out_features"] for d in changes.values())
    kept = sum(d["kept"] for d in changes.values())
    value_bytes = next(loaded.model.parameters()).element_size()
    stored = sum(stored_bytes(d["out_features"], d["in_features"], d["kept"], value_bytes)
                 for d in changes.values())
    errors = [d["relative_error"] for d in changes.values()]
    how = (f"{args.nm[0]}:{args.nm[1]}" if args.nm else
           f"profile {args.profile} (mean {mean_sparsity(ratios, shapes):.4f})" if ratios
           else f"ratio {args.ratio}")
    print(f"pruned ({method}, {how}): {len(changes)} linears, sparsity "
          f"{1 - kept / max(dense, 1):.4f}, relative output error mean "
          f"{sum(errors) / max(len(errors), 1):.4f}, {result.seconds:.1f} s, peak RSS "
          f"{result.peak_rss_gb:.2f} GB")
    print(f"stored: {stored / max(dense, 1):.4f} bytes per weight (mask + kept values) against "
          f"{value_bytes} dense")
    print(f"checkpoint written to {result.output}")
    return 0


def _text_objective(loaded, args):
    """Validation perplexity on windows of the calibration corpus that share no token with
    the calibration windows."""
    from casp.data import load_documents, tokenize_documents
    from casp.data.text import random_window_starts, windows_apart
    from casp.eval.perplexity import perplexity

    seqlen = args.val_seqlen or args.seqlen
    ids = tokenize_documents(loaded.tokenizer,
                             load_documents(args.dataset, args.split, args.text_field))
    avoid = [] if args.mm_data else random_window_starts(ids.numel(), args.nsamples,
                                                         args.seqlen, args.seed)
    windows = windows_apart(ids, seqlen, args.val_windows, avoid, args.seqlen)
    flat = windows.reshape(-1)
    identity = {"val": "text", "dataset": args.dataset, "split": args.split,
                "windows": args.val_windows, "seqlen": seqlen}

    def evaluate(model) -> float:
        return perplexity(model, flat, seqlen, progress=False).ppl

    return evaluate, identity


def _vqa_objective(loaded, args):
    """Answer perplexity on easy-vqa training questions that calibration did not use."""
    from casp.data.easy_vqa import load_split, subset
    from casp.eval.vqa import evaluate_vqa

    if loaded.processor is None:
        raise CaspError("--objective vqa needs a LLaVA model (image + question validation); use "
                        "--objective text for text-only models")
    train = load_split("train")
    used = set()
    if args.mm_data in ("easy-vqa", "easy-vqa:train"):
        used = {(r.question, r.image_id) for r in subset(train, args.nsamples, args.seed)}
    free = [r for r in train if (r.question, r.image_id) not in used]
    records = subset(free, args.val_samples, args.seed + 1)
    identity = {"val": "easy-vqa", "samples": args.val_samples}

    def evaluate(model) -> float:
        return evaluate_vqa(model, loaded.processor, records, max_new_tokens=1)["answer_ppl"]

    return evaluate, identity


def cmd_prune_search(args) -> int:
    from casp.layerwise import capture_layer_inputs
    from casp.loading import load_pretrained, resolve_device
    from casp.data.calibration import calibration_batches
    from casp.prune.profile import write_profile
    from casp.pipeline import peak_rss_gb
    from casp.prune.search import PruneSearch, SearchSettings, uniform_sparsity

    output = Path(args.output)
    if output.is_dir():
        raise CaspError(f"--output {output} is a directory; give the profile's JSON file path")
    settings = SearchSettings(target=args.target, blocks=args.blocks, spread=args.spread,
                              step=args.step, per_type=args.per_type, score=args.score,
                              mode=args.mode, tolerance=args.tolerance, seed=args.search_seed,
                              objective=args.objective)
    settings.check()
    study = Path(args.study) if args.study else output.with_suffix(".study.db")
    device = resolve_device(args.device)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    calibration = calibration_config(args)
    evaluate, val_identity = (_vqa_objective if args.objective == "vqa"
                              else _text_objective)(loaded, args)
    identity = {"model": args.model, "calibration": calibration.as_dict(), **val_identity}
    start = time.perf_counter()
    batches = calibration_batches(loaded, calibration)
    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, device)
    del batches
    search = PruneSearch(loaded, inputs, evaluate, settings, study, identity, device)
    summary = search.run(args.trials, enqueue_uniform=True)
    seconds = time.perf_counter() - start
    write_profile(output, summary["ratios"], search.shapes, type(loaded.model).__name__,
                  search.n_layers, score=settings.score, target=settings.target,
                  blocks=search.blocks, block_ratios=summary["block_ratios"],
                  search={**{k: v for k, v in summary.items() if k not in ("ratios",)},
                          "settings": vars(settings), "objective_data": val_identity,
                          "seconds_this_run": round(seconds, 1),
                          "peak_rss_gb": round(peak_rss_gb(), 2), "study": str(study)})
    uniform = summary["uniform_value"]
    times = summary["trial_seconds"]
    print(f"best of {summary['trials_completed']} trials ({summary['trials_infeasible']} "
          f"infeasible draws skipped): objective {summary['best_value']:.4f} at mean sparsity "
          f"{summary['mean_sparsity']:.4f}" + (f"; uniform {settings.target} (mean "
          f"{uniform_sparsity(settings.target, search.shapes):.4f}): {uniform:.4f}"
          if uniform is not None else ""))
    print("block ratios: " + ", ".join(
        "/".join(f"{v:g}" for v in entry.values()) for entry in summary["block_ratios"]))
    if times:
        print(f"{seconds:.1f} s this run, {sum(times) / len(times):.1f} s per trial, peak RSS "
              f"{peak_rss_gb():.2f} GB")
    print(f"profile written to {output} (apply it: casp prune --model {args.model} --profile "
          f"{output} --output DIR); study in {study}")
    return 0


def add_parser(sub) -> None:
    """Register ``casp prune`` and ``casp prune-search``."""
    from casp.prune.layer_pass import METHODS
    from casp.prune.masks import SCORES

    p = sub.add_parser("prune", help="prune the language model's linears (magnitude, Wanda, "
                                     "the seed paper's score, SparseGPT)",
                       description="Prune every linear of the decoder layers, layer by layer "
                                   "(each layer's statistics from inputs through the pruned "
                                   "layers before it), and write a checkpoint whose pruned "
                                   "linears are stored as a bitmask plus the kept values.")
    add_model_args(p)
    p.add_argument("--output", required=True,
                   help="checkpoint directory to write (atomically; an interrupted run resumes "
                        "from its last finished layer)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="magnitude: |W|; wanda: |W| * ||X_j||; ria: the seed paper's "
                        "relative-importance score; sparsegpt: OBS updates of the kept "
                        "weights (default: the profile's score, else wanda)")
    p.add_argument("--ratio", type=_sparsity_ratio, default=0.5,
                   help="unstructured: the fraction of each row's weights removed, in [0, 1) "
                        "(default: 0.5)")
    p.add_argument("--nm", type=_nm, default=None,
                   help="N:M instead: N of every M consecutive weights of a row removed, e.g. "
                        "2:4 or 4:8")
    p.add_argument("--profile", default=None,
                   help="a profile JSON from casp prune-search: each linear at its ratio "
                        "(replaces --ratio)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="SparseGPT's dampening, a fraction of the mean Hessian diagonal "
                        "(default: 0.01)")
    p.add_argument("--block-size", type=positive, default=128,
                   help="SparseGPT's columns per block (default: 128)")
    p.add_argument("--layers", default=None,
                   help="only these decoder layers, e.g. 0-3 (default: all)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between layers")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory that holds something else")
    add_calibration_args(p, nsamples=128, seqlen=2048)
    p.set_defaults(func=cmd_prune)

    s = sub.add_parser("prune-search", help="the seed paper's TPE search over per-block "
                                            "pruning ratios",
                       description="Search per-block pruning ratios (optuna's TPE) at a target "
                                   "mean sparsity, each trial pruned without weight updates "
                                   "and scored on held-out validation data; writes the best "
                                   "profile for casp prune --profile. The study is kept in "
                                   "SQLite: rerun the same command to resume a killed search.")
    add_model_args(s)
    s.add_argument("--output", required=True, help="the profile JSON to write")
    s.add_argument("--study", default=None,
                   help="the study's SQLite file (default: OUTPUT with .study.db); a study of "
                        "other settings is refused")
    s.add_argument("--target", type=_sparsity_ratio, default=0.5,
                   help="mean sparsity (parameter-weighted) every trial must reach "
                        "(default: 0.5)")
    s.add_argument("--blocks", type=positive, default=8,
                   help="blocks of consecutive decoder layers, one ratio each (default: 8, the "
                        "authors')")
    s.add_argument("--spread", type=float, default=0.05,
                   help="each block's ratio ranges over target +- spread (default: 0.05)")
    s.add_argument("--step", type=float, default=0.025,
                   help="step between a block's ratios (default: 0.025)")
    s.add_argument("--per-type", action="store_true",
                   help="one ratio per linear type (q, k, v, o, gate, up, down) per block")
    s.add_argument("--score", choices=SCORES, default="ria",
                   help="the pruning rule of every trial (no weight update; default: ria, the "
                        "authors' score)")
    s.add_argument("--mode", choices=["exact", "fast"], default="exact",
                   help="exact: each trial prunes layer by layer from the dense model (the "
                        "authors'); fast: statistics collected once, a trial only thresholds "
                        "them (default: exact)")
    s.add_argument("--tolerance", type=float, default=0.0,
                   help="a trial is feasible at mean sparsity >= what uniform pruning at the "
                        "target realizes (the target, or just under it where rounding each "
                        "row's cut down leaves less) - tolerance (default: 0; the authors' code "
                        "used 0.005)")
    s.add_argument("--trials", type=positive, default=50,
                   help="feasible trials to complete, a resumed study's included (default: 50)")
    s.add_argument("--search-seed", type=int, default=0,
                   help="the TPE sampler's seed (default: 0)")
    s.add_argument("--objective", choices=["text", "vqa"], default="text",
                   help="text: perplexity on validation windows of the calibration corpus that "
                        "share no token with calibration; vqa: answer perplexity on easy-vqa "
                        "training questions calibration did not use (LLaVA models)")
    s.add_argument("--val-windows", type=positive, default=64,
                   help="validation windows for --objective text (default: 64, the authors')")
    s.add_argument("--val-seqlen", type=positive, default=None,
                   help="tokens per validation window (default: --seqlen)")
    s.add_argument("--val-samples", type=positive, default=64,
                   help="easy-vqa questions for --objective vqa (default: 64)")
    add_calibration_args(s, nsamples=128, seqlen=2048)
    s.set_defaults(func=cmd_prune_search)
