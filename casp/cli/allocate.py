"""``casp allocate``: stage 2, the bit plan (block influence, or the measured search)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from types import SimpleNamespace

from casp.cli.args import (add_calibration_args, add_model_args, bits_list, budget_text,
                           calibration_config, group, positive, ratio)
from casp.errors import CaspError


def cmd_allocate(args) -> int:
    from casp.allocation.assemble import AssemblePass
    from casp.allocation.budget import (SettingRules, parse_budget, parse_codebook_map,
                                        uniform_average_bits, uniform_setting_bits)
    from casp.allocation.importance import ImportancePass
    from casp.allocation.plan import allocate
    from casp.allocation.report import format_measured_table, format_plan_table, plot_plan
    from casp.allocation.search import SensitivityPass, check_feasible, measured_plan, plan_ranks
    from casp.devices import resolve_device
    from casp.identity import model_identity
    from casp.loading import load_pretrained
    from casp.lowrank import LowRankLinear
    from casp.pipeline import run_stage
    from casp.quant.gptq.quantize import check_bits
    from casp.quant.registry import QUANTIZER_LABELS, quantizer

    spec = quantizer(args.quantizer)
    if args.quantizer_flags is not None and not args.measured:
        raise CaspError("--quantizer-flags needs --measured (the search quantizes its options "
                        "with them)")
    quantizer_flags(spec, args.quantizer_flags, args.model)     # refuse bad flags before work
    codebooks = None
    if spec.coded:
        if args.codebooks is None:
            args.codebooks = spec.default_codebooks
        # refuse a malformed map before any work
        codebooks = parse_codebook_map(args.codebooks, args.quantizer)
    out = Path(args.output)
    if out.suffix != ".json":
        raise CaspError(f"--output {out} should be a .json file (the plot is written beside it "
                        "as .png)")
    if out.exists() and not args.overwrite:
        raise CaspError(f"{out} exists; choose another --output or pass --overwrite")
    bits = bits_list(args.bits)
    device = resolve_device(args.device)
    calibration = calibration_config(args)
    compressions = _compressions(args.lowrank_options) if args.lowrank_options else []
    if compressions and not args.measured:
        raise CaspError("--lowrank-options needs --measured (the low-rank choice is measured)")
    if args.without_lowrank and not compressions:
        raise CaspError("--without-lowrank needs --lowrank-options (it solves the same "
                        "measurements with the low-rank options left out)")
    measure_widths = bits_list(args.measure_widths, "--measure-widths") if args.measure_widths else None
    if measure_widths and not args.measured:
        raise CaspError("--measure-widths needs --measured")
    if args.calibrate_layers is not None and (not args.measured
                                              or args.search_score != "calibrated"):
        raise CaspError("--calibrate-layers needs --measured with --search-score calibrated "
                        "(it chooses where the calibrated score's exact runs are made)")
    if args.checkpoint and not args.measured:
        raise CaspError("--checkpoint needs --measured (it is assembled from the search's "
                        "options)")
    if args.checkpoint and Path(args.checkpoint).is_dir() and any(
            Path(args.checkpoint).iterdir()) and not args.overwrite:
        raise CaspError(f"--checkpoint {args.checkpoint} exists and is not empty; choose another "
                        "directory or pass --overwrite")
    if measure_widths and not set(measure_widths) <= set(bits):
        raise CaspError(f"--measure-widths {args.measure_widths}: give some of the allowed "
                        f"widths --bits {args.bits}")
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
        search = SensitivityPass(loaded.model, _measuring_quantizer(args, spec),
                                 {"quantizer": args.quantizer, "act_order": args.act_order,
                                  "static_groups": args.static_groups,
                                  **({"flags": args.quantizer_flags}
                                     if args.quantizer_flags is not None else {})},
                                 rules, bits, compressions, args.rank_multiple,
                                 _search_batches(args),
                                 record=args.measurements or out.with_suffix(".measured.json"),
                                 identity={"model": model_identity(args.model),
                                           "calibration": calibration.as_dict(),
                                           "dtype": str(next(loaded.model.parameters()).dtype)},
                                 score=args.search_score, fisher_samples=args.fisher_samples,
                                 measure_widths=measure_widths, anchors=args.anchor_layers,
                                 keep_options=bool(args.checkpoint),
                                 calibrate_layers=args.calibrate_layers)
        result = run_stage(loaded, "sensitivity", [search], calibration, device)
        plan = measured_plan(loaded.model, loaded.spec, search.measured, rules, bits, budget,
                             compressions, args.rank_multiple, lowrank=not args.without_lowrank)
        how = {"method": "measured", "search_samples": args.search_samples,
               "score": args.search_score, "without_lowrank": args.without_lowrank}
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
    if args.checkpoint:
        assemble = AssemblePass(plan, search.store, _measuring_quantizer(args, spec),
                                search.quantizer_settings, plan.fingerprint())
        built = run_stage(loaded, "assemble", [assemble], calibration, device,
                          output=args.checkpoint, overwrite=args.overwrite)
        quantized_here = sum(len(v) for v in assemble.built.values())
        print(f"quantized model written to {args.checkpoint} in {built.seconds:.1f} s "
              f"({quantized_here} parts quantized while assembling, the rest as the search "
              "built them)")
    return 0


def _compressions(text: str) -> list[float]:
    values = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        values.append(ratio(item))
    if not values:
        raise CaspError(f"--lowrank-options {text!r} names no compression; give e.g. 0.75")
    return sorted(set(values))


def _search_batches(args) -> int:
    """Calibration batches holding --search-samples samples (one per batch with images)."""
    per_batch = 1 if args.mm_data else args.batch_size
    return max(1, -(-args.search_samples // per_batch))


class _FlagParser(argparse.ArgumentParser):
    def error(self, message):
        raise CaspError(f"--quantizer-flags: {message}; give flags of casp {self.prog} "
                        f"(see casp {self.prog} --help)")


def quantizer_flags(spec, text: str | None, model: str) -> argparse.Namespace | None:
    """``--quantizer-flags`` parsed by the quantizer's own flags (``casp <quantizer>``'s
    names, defaults and checks), or None when not given."""
    if text is None:
        return None
    p = _FlagParser(prog=spec.name, add_help=False)
    for flag, options in spec.flags:
        p.add_argument(flag, **options)
    flags = p.parse_args(shlex.split(text))
    flags.true_sequential, flags.model = True, model
    return flags


def _measuring_quantizer(args, spec):
    """The quantizer pass the measured search builds each option with, for a plan: the
    quantizer's defaults, or its --quantizer-flags, but for the flags it shares with casp
    allocate (which win)."""
    options = {name: getattr(args, name) for name in spec.search_options}
    flags = quantizer_flags(spec, args.quantizer_flags, args.model)
    if flags is None:
        return lambda plan: spec.pass_type(plan=plan, **options)
    vars(flags).update(options)
    return lambda plan: spec.pass_from_flags(
        flags, SimpleNamespace(modules=plan, meta={}, fingerprint=lambda: None))


def add_parser(sub) -> None:
    """Register ``casp allocate``."""
    from casp.allocation.importance import IMPORTANCE_SCORES
    from casp.quant.registry import QUANTIZERS

    p = sub.add_parser("allocate", help="stage 2: the optimal per-layer bit allocation (a plan)",
                       description="Score each decoder layer's importance on calibration data, "
                                   "then choose each layer's bit width so that the average bits "
                                   "over the original dense weights of the quantized linears "
                                   "(scales, zeros, group indices and low-rank factors counted) "
                                   "meet --budget, minimising sum importance x weights x "
                                   "2^(-2 bits). Writes the plan (JSON) and a plot (PNG) beside "
                                   "it, and prints the plan as a table.")
    add_model_args(p)
    p.add_argument("--output", required=True, help="plan file to write (.json; the plot goes "
                                                   "beside it as .png)")
    p.add_argument("--budget", type=budget_text, required=True,
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
    p.add_argument("--group-size", type=group, default=128,
                   help="group size of the layers' dense linears; -1 = per channel (default: 128)")
    p.add_argument("--factor-bits", type=int, default=3,
                   help="bits of the low-rank factors (they have more outliers); 0 = the "
                        "layer's width (default: 3, as the paper's code)")
    p.add_argument("--factor-group-size", type=group, default=-1,
                   help="group size of the low-rank factors (default: -1, per channel)")
    p.add_argument("--importance", choices=list(IMPORTANCE_SCORES),
                   default="block_influence",
                   help="layer importance: block_influence = 1 - mean cos(input, output) of "
                        "the layer (default); relative_change = mean |output - input| / |input|")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="the GPTQ run will use act-order (counts its group indices unless "
                        "--static-groups; default: on)")
    p.add_argument("--static-groups", action="store_true",
                   help="the GPTQ run will use static groups (no group indices to store)")
    p.add_argument("--quantizer", choices=list(QUANTIZERS), default="gptq",
                   help="the stage-3 quantizer the plan is for; it decides what each width "
                        "stores and costs (default: gptq)")
    p.add_argument("--codebooks", default=None,
                   help="with --quantizer aqlm: the AQLM setting of each width, WIDTH=MxB[gG] "
                        "comma-separated; costs count int8/int16 codes, fp16 codebooks and "
                        f"scales (default: {QUANTIZERS['aqlm'].default_codebooks}, 2x8 and 2x12 as the "
                        "paper's code). With --quantizer quip: the QuIP# codebook of each width "
                        f"(default: {QUANTIZERS['quip'].default_codebooks}); costs count the codes, one "
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
    p.add_argument("--rank-multiple", type=positive, default=1,
                   help="with --lowrank-options: round ranks down to a multiple of this (8 for "
                        "AQLM's groups; default: 1)")
    p.add_argument("--search-samples", type=positive, default=8,
                   help="with --measured: calibration samples (text windows or image samples) "
                        "whose output divergence is measured, rounded up to whole batches of "
                        "--batch-size; the quantizers use every sample (default: 8)")
    p.add_argument("--search-score", choices=["calibrated", "fisher", "kl"],
                   default="calibrated",
                   help="with --measured: how an option's output divergence is scored: fisher "
                        "= the second-order estimate from the diagonal Fisher of the "
                        "next-token distributions with respect to the layer's output (one "
                        "backward pass of the model, then one forward of the layer per "
                        "option); calibrated = those estimates, each family of options (a part "
                        "dense at every width, or low-rank at one compression) scaled by one "
                        "exact measurement (default); kl = measured by running every later "
                        "layer per option (exact, slower)")
    p.add_argument("--fisher-samples", type=positive, default=4,
                   help="with --search-score fisher: next-token draws per position for the "
                        "Fisher (default: 4)")
    p.add_argument("--measure-widths", default=None, metavar="BITS",
                   help="with --measured: quantize and measure every layer at these of the "
                        "allowed --bits only (e.g. 3); the other widths are measured in "
                        "--anchor-layers layers and extrapolated elsewhere by the ratio of "
                        "scores between widths there (each width left out saves one "
                        "quantization of every layer; default: measure every width)")
    p.add_argument("--anchor-layers", type=positive, default=3,
                   help="with --measure-widths: layers, spread from the first to the last, "
                        "measured at every width (default: 3)")
    p.add_argument("--quantizer-flags", default=None, metavar="FLAGS",
                   help="with --measured: flags of casp QUANTIZER for the options the search "
                        "builds (and --checkpoint assembles), one quoted string, e.g. "
                        "\"--steps-per-round 10 --max-rounds 8\" for AQLM; pass the same to "
                        "casp QUANTIZER --plan; a single flag as --quantizer-flags=--FLAG "
                        "(default: the quantizer's defaults)")
    p.add_argument("--calibrate-layers", type=positive, default=None, metavar="N",
                   help="with --search-score calibrated: run the exact measurements (every "
                        "later layer, once per family of options) in N layers spread from "
                        "the first to the last only, and scale the other layers' Fisher "
                        "estimates by those layers' exact / estimate ratios (geometric mean "
                        "per part and family); the exact runs are most of the search's time, "
                        "and 5 layers cut them about six-fold on a 30-layer model (default: "
                        "every layer)")
    p.add_argument("--without-lowrank", action="store_true",
                   help="with --lowrank-options: solve the plan with the low-rank options "
                        "left out (the ablation: what the allocation alone buys; reuses the "
                        "same --measurements)")
    p.add_argument("--measurements", default=None,
                   help="with --measured: the file keeping each layer's measurements (default: "
                        "PLAN.measured.json beside the plan); an interrupted search resumes from "
                        "it, and a plan at another --budget with the same model, calibration and "
                        "options reuses it without measuring again")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="with --measured: also write the quantized model of the plan to DIR, "
                        "assembled from the options the search built and kept (beside "
                        "--measurements, as MEASUREMENTS.options/): each part exactly as "
                        "measured, its Hessians from the full-precision layer's inputs. This "
                        "replaces casp lowrank --plan and the quantizer with the plan (about "
                        "one more uniform quantization); options the search extrapolated "
                        "(--measure-widths) are quantized while assembling. Reload DIR with "
                        "casp.load_model, evaluate it with casp ppl")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing plan file (and --checkpoint directory)")
    add_calibration_args(p, nsamples=128, seqlen=2048)
    p.set_defaults(func=cmd_allocate)
