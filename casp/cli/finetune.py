"""``casp finetune``: optional end-to-end fine-tuning of a quantized checkpoint
(casp.quant.e2e)."""
from __future__ import annotations

import shutil
from pathlib import Path

from casp.cli.args import add_calibration_args, add_model_args, calibration_config, positive
from casp.errors import CaspError


def cmd_finetune(args) -> int:
    from casp.checkpoint import build_section, check_output_dir, save_checkpoint
    from casp.data.calibration import calibration_batches
    from casp.devices import resolve_device
    from casp.hf_model import read_casp_section
    from casp.identity import fingerprint, model_identity
    from casp.loading import load_pretrained
    from casp.pipeline import peak_rss_gb, progress_dir
    from casp.quant.e2e import finetune_end_to_end, quantized_modules

    if args.lr <= 0:
        raise CaspError(f"--lr {args.lr} must be positive (e.g. 1e-4)")
    section = read_casp_section(args.model) if Path(args.model).is_dir() else None
    if not section or not any(d.get("type") in ("gptq", "aqlm", "quip")
                              for d in section.get("modules", {}).values()):
        raise CaspError(f"{args.model} is not a quantized casp checkpoint; quantize it first "
                        "(casp gptq | aqlm | quip)")
    teacher_name = args.teacher or section.get("base_model")
    if not teacher_name:
        raise CaspError("the checkpoint does not say which model it was made from; give "
                        "--teacher (the full-precision model)")
    calibration = calibration_config(args)
    settings = {"teacher": model_identity(teacher_name), "epochs": args.epochs, "lr": args.lr,
                "calibration": calibration.as_dict(), "trains": "continuous parameters of "
                "the quantized modules and the norm weights"}
    key = fingerprint({"model": model_identity(args.model), **settings})
    if check_output_dir(args.output, key, args.overwrite):
        print(f"{args.output} is already done (same model and settings)")
        return 0
    device = resolve_device(args.device)
    student = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    teacher = load_pretrained(teacher_name, dtype=args.dtype, device=args.device)
    shapes = [(m.config.get_text_config().vocab_size, m.config.get_text_config().hidden_size)
              for m in (teacher.model, student.model)]
    if shapes[0] != shapes[1]:
        raise CaspError(f"--teacher {teacher_name} has (vocabulary, hidden size) {shapes[0]}, "
                        f"the checkpoint {shapes[1]}: give the model it was quantized from")
    batches = calibration_batches(student, calibration)
    state = progress_dir(args.output)
    state.mkdir(parents=True, exist_ok=True)
    result = finetune_end_to_end(student.model, teacher.model, student.spec, batches,
                                 args.epochs, args.lr, device, state / "e2e.pt")
    del teacher
    changes = {n: m.describe() for n, m in quantized_modules(student.model).items()}
    out_section = build_section(student, "finetune", {**settings, "result": result}, key,
                                changes, result["seconds"])
    save_checkpoint(student, args.output, out_section, overwrite=args.overwrite)
    shutil.rmtree(state, ignore_errors=True)
    print(f"mean KL to {teacher_name} on the calibration tokens: {result['kl_before']:.4f} -> "
          f"{result['kl_after']:.4f}" + ("" if result["kept"] else " (no gain: unchanged)"))
    print(f"fine-tuning {result['seconds']:.1f} s, peak RSS {peak_rss_gb():.2f} GB")
    print(f"checkpoint written to {args.output}")
    return 0


def add_parser(sub) -> None:
    """Register ``casp finetune``."""
    p = sub.add_parser(
        "finetune", help="optional: end-to-end fine-tuning of a quantized checkpoint",
        description="Fit the continuous parameters of a quantized checkpoint (GPTQ scales, "
                    "AQLM codebooks and scales, QuIP# sign vectors made real-valued, and the "
                    "norm weights; the codes stay) to the full-precision model's next-token "
                    "distributions on calibration text: Adam on the mean KL divergence. Kept "
                    "only if the KL falls; each finished epoch is saved, so an interrupted run "
                    "resumes. Off in the paper's recipe; QuIP#'s and AQLM's last step.")
    add_model_args(p)
    p.add_argument("--teacher", default=None,
                   help="the full-precision model (default: the base model the checkpoint "
                        "records)")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--epochs", type=positive, default=2,
                   help="passes over the calibration batches (default: 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory that holds something else")
    add_calibration_args(p, nsamples=128, seqlen=2048)
    p.set_defaults(func=cmd_finetune)
