"""``casp gptq | aqlm | quip``: stage 3, one code path driven by casp.quant.registry; and
``casp hessians``, QuIP#'s offline Hessians."""
from __future__ import annotations

from pathlib import Path

from casp.cli.args import (add_calibration_args, add_model_args, add_quantizer_args,
                           calibration_config, early_output_check, layer_list)
from casp.errors import CaspError


def quantizer_plan(args, quantizer: str):
    """The --plan file, refused unless it was made for ``quantizer``."""
    from casp.allocation.plan import BitPlan

    plan = BitPlan.load(args.plan) if args.plan else None
    made_for = plan.meta.get("quantizer", "gptq") if plan is not None else quantizer
    if made_for != quantizer:
        raise CaspError(f"{args.plan} is a plan for {made_for}, not {quantizer.upper()}; make "
                        f"one with casp allocate --quantizer {quantizer}")
    return plan


def cmd_quantize(args) -> int:
    """``casp gptq``, ``casp aqlm`` and ``casp quip``: the pass from the quantizer's flags and
    the plan; load, check the plan against the model, run the stage, report, and optionally
    export the standard format."""
    from casp.checkpoint import load_checkpoint
    from casp.devices import resolve_device
    from casp.loading import load_pretrained
    from casp.pipeline import run_stage
    from casp.quant.registry import quantizer

    spec = quantizer(args.command)
    plan = quantizer_plan(args, spec.name)
    layer_pass = spec.pass_from_flags(args, plan)
    device = resolve_device(args.device)
    if early_output_check(args, spec.name, [layer_pass]):
        return 0
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    if plan is not None:
        plan.check_matches(loaded.model, loaded.spec, args.model)
    result = run_stage(loaded, spec.name, [layer_pass], calibration_config(args), device,
                       output=args.output, overwrite=args.overwrite,
                       layers=layer_list(args.layers),
                       offload_activations=args.offload_activations)
    if result.skipped:
        print(f"{args.output} is already done (same model and settings)")
        return 0
    report_quantized(spec.name.upper(), loaded, result, args.output)
    export = getattr(args, spec.export_flag) if spec.export_flag else None
    if export:
        path = spec.export(load_checkpoint(args.output), export, args.overwrite)
        print(f"standard {spec.name.upper()} format written to {path}")
    return 0


def report_quantized(method: str, loaded, result, output) -> None:
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


def cmd_hessians(args) -> int:
    from casp.identity import model_identity
    from casp.loading import load_pretrained, resolve_device
    from casp.pipeline import run_stage
    from casp.quant.quip.hessians import HessianPass, check_hessian_dir

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CaspError(f"--output {out} is a file; give a directory for the Hessians")
    device = resolve_device(args.device)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    check_hessian_dir(out, model_identity(args.model), writing=True)
    result = run_stage(loaded, "hessians", [HessianPass(out)], calibration_config(args), device,
                       layers=layer_list(args.layers),
                       offload_activations=args.offload_activations)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"Hessians of {len(list(out.glob('layer_*.safetensors')))} layers written to {out} "
          f"({size / 2**20:.1f} MiB) in {result.seconds:.1f} s")
    return 0


def add_quantizer_parser(sub, spec) -> None:
    """Register ``casp <quantizer>`` from its registry entry: the model flags, --plan, the
    quantizer's own flags, then the flags every quantizer shares."""
    p = sub.add_parser(spec.name, help=spec.help, description=spec.description)
    add_model_args(p)
    p.add_argument("--plan", default=None, help=spec.plan_help)
    for flag, options in spec.flags:
        p.add_argument(flag, **options)
    add_quantizer_args(p)
    p.set_defaults(func=cmd_quantize)


def add_hessians_parser(sub) -> None:
    """Register ``casp hessians``."""
    p = sub.add_parser("hessians", help="QuIP#'s offline Hessians of every linear's input",
                       description="Run the calibration data through the model layer by layer "
                                   "(as given, nothing quantized) and write, per decoder layer, "
                                   "E[x x^T] of every distinct linear input (float32, upper "
                                   "triangle) to a directory, for casp quip --hessians. A rerun "
                                   "keeps the layers already written.")
    add_model_args(p)
    p.add_argument("--output", required=True, help="directory for the Hessians")
    p.add_argument("--layers", default=None,
                   help="only these decoder layers, e.g. 0-3 (default: all)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between layers")
    add_calibration_args(p, nsamples=128, seqlen=2048)
    p.set_defaults(func=cmd_hessians)


def add_parser(sub) -> None:
    """Register every quantizer of casp.quant.registry, then ``casp hessians``."""
    from casp.quant.registry import QUANTIZERS

    for spec in QUANTIZERS.values():
        add_quantizer_parser(sub, spec)
    add_hessians_parser(sub)
