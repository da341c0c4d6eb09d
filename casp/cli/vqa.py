"""``casp vqa``: easy-vqa answer accuracy and answer perplexity of a LLaVA model
(casp.eval.vqa)."""
from __future__ import annotations

import json
from pathlib import Path

from casp.cli.args import positive
from casp.errors import CaspError


def cmd_vqa(args) -> int:
    from casp.data.easy_vqa import load_split, subset
    from casp.devices import resolve_device
    from casp.eval.vqa import evaluate_vqa
    from casp.loading import load_pretrained

    device = resolve_device(args.device)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    if not loaded.spec.multimodal:
        raise CaspError(f"{args.model} takes text only; easy-vqa needs a LLaVA model "
                        "(e.g. --model mini-llava)")
    records = subset(load_split(args.split), args.samples, seed=args.seed)
    loaded.model.to(device)
    res = evaluate_vqa(loaded.model, loaded.processor, records, batch_size=args.batch_size)
    by_type = ", ".join(f"{k} {v:.3f}" for k, v in res["accuracy_by_type"].items())
    print(f"{args.model} on easy-vqa {args.split} ({res['samples']} questions): accuracy "
          f"{res['accuracy']:.4f} ({by_type}), answer perplexity {res['answer_ppl']:.4f}")
    if args.output:
        row = {"model": args.model, "task": f"easy-vqa-{args.split}", "seed": args.seed, **res}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps(row, indent=2) + "\n")
        tmp.replace(out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("vqa", help="easy-vqa accuracy and answer perplexity of a LLaVA model",
                       description="Greedy answers to easy-vqa questions (image + question), "
                                   "normalised and matched exactly against the reference "
                                   "(accuracy, overall and per question type), and the "
                                   "perplexity of the reference answers given image and "
                                   "question. Works on any LLaVA-family model or casp "
                                   "checkpoint; the data come from the easy-vqa wheel.")
    p.add_argument("--model", required=True,
                   help="a LLaVA model directory, a casp checkpoint, or 'mini-llava'")
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="easy-vqa split (default: test)")
    p.add_argument("--samples", type=positive, default=500,
                   help="questions drawn at random from the split (default: 500; the test "
                        "split has 9,673)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    p.add_argument("--batch-size", type=positive, default=16,
                   help="questions per forward pass (default: 16)")
    p.add_argument("--device", default="auto",
                   help="compute device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto",
                   help="weight dtype: auto (float16 on CUDA, float32 on CPU), float32, "
                        "float16, bfloat16")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.set_defaults(func=cmd_vqa)
