"""The ``casp`` command: ``casp <command> [flags]``; ``casp <command> --help`` explains each.

One file per group of commands, each with an ``add_parser(sub)`` that registers them:

    lowrank.py    casp lowrank                    stage 1
    allocate.py   casp allocate                   stage 2
    quantize.py   casp gptq | aqlm | quip         stage 3 (from casp.quant.registry), hessians
    finetune.py   casp finetune                   optional end-to-end fine-tuning
    prune.py      casp prune | prune-search       pruning, the seed paper's TPE search
    evaluate.py   casp ppl | info | fetch
    generate.py   casp generate                   a reply to a prompt (and an image), timed
    demo.py       casp demo
    sparsity.py, vqa.py, lmms.py, mini_llava.py   analysis, easy-vqa, lmms-eval, the mini LLaVA
    args.py       the flags several commands share
"""
from __future__ import annotations

import argparse
import logging
import sys

from casp.cli import (allocate, demo, evaluate, finetune, generate, lmms, lowrank, mini_llava,
                      prune, quantize, sparsity, vqa)
from casp.errors import CaspError
from casp.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casp",
        description="Compress LLaVA-family multimodal models and Llama-family LLMs (CASP, "
                    "CVPR 2025): data-aware low-rank W_q/W_k, then low-bit quantization. Each "
                    "stage reads a model and writes a checkpoint directory.")
    parser.add_argument("--version", action="version", version=f"casp {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    lowrank.add_parser(sub)
    allocate.add_parser(sub)
    quantize.add_parser(sub)
    finetune.add_parser(sub)
    prune.add_parser(sub)
    evaluate.add_ppl_parser(sub)
    generate.add_parser(sub)
    demo.add_parser(sub)
    evaluate.add_info_parsers(sub)
    sparsity.add_parser(sub)
    vqa.add_parser(sub)
    lmms.add_parser(sub)
    mini_llava.add_parser(sub)
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
