"""``casp lowrank``: stage 1, data-aware low-rank W_q and W_k."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from casp.cli.args import (add_calibration_args, add_model_args, calibration_config,
                           early_output_check, layer_list, positive, ratio)
from casp.errors import CaspError

log = logging.getLogger("casp")


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
    layers = layer_list(args.layers)
    lowrank = LowRankPass(compression=args.compression, method=args.method, ranks=ranks,
                          propagate=args.propagate, rank_multiple=args.rank_multiple,
                          only_ranked=only_ranked)
    calibration = calibration_config(args)
    if early_output_check(args, "lowrank", [lowrank]):
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


def add_parser(sub) -> None:
    """Register ``casp lowrank``."""
    p = sub.add_parser("lowrank", help="stage 1: data-aware low-rank W_q and W_k",
                       description="Replace each decoder layer's W_q and W_k with a rank-r "
                                   "factorisation that minimises the error on calibration "
                                   "activations (whitened SVD), and write a checkpoint.")
    add_model_args(p)
    p.add_argument("--output", required=True,
                   help="checkpoint directory to write (written atomically; an unfinished run "
                        "resumes from its last finished layer)")
    p.add_argument("--compression", type=ratio, default=0.75,
                   help="fraction of W_q/W_k parameters removed, in (0, 1); rank r = "
                        "floor((1 - c) * out * in / (out + in)) (default: 0.75, the paper's)")
    p.add_argument("--method", choices=["whitened", "plain"], default="whitened",
                   help="whitened: data-aware SVD (CASP); plain: truncated SVD of the weights "
                        "alone, for comparison (default: whitened)")
    p.add_argument("--ranks", default=None,
                   help="JSON file {module name: rank} overriding the rank of given modules; a "
                        "rank that saves nothing keeps the module dense")
    p.add_argument("--rank-multiple", type=positive, default=1,
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
    add_calibration_args(p, nsamples=256, seqlen=2048)
    p.set_defaults(func=cmd_lowrank)
