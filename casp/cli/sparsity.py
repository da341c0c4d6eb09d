"""``casp sparsity``: the attention-sparsity premise measured on a model and its low-rank
W_q/W_k (casp.eval.attention_sparsity), with its report (casp.eval.sparsity_report)."""
from __future__ import annotations

from casp.cli.args import add_text_source_args, positive
from casp.errors import CaspError
from casp.eval.attention_sparsity import DEFAULT_THRESHOLD, THRESHOLD_MODES, SparsityConfig, analyse
from casp.eval.sparsity_report import describe, write_outputs


def cmd_sparsity(args) -> int:
    cfg = SparsityConfig(model=args.model, lowrank=args.lowrank, dataset=args.dataset,
                         split=args.split, text_field=args.text_field, nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=args.seed, mm_data=args.mm_data,
                         image_root=args.image_root, mm_samples=args.mm_samples,
                         threshold=args.threshold, threshold_mode=args.threshold_mode,
                         out=args.out, name=args.name, device=args.device, dtype=args.dtype)
    report = analyse(cfg)
    json_path, png_path = cfg.paths()
    write_outputs(report, json_path, png_path)
    for line in describe(report):
        print(line)
    print(f"per-layer results written to {json_path}, plot to {png_path}")
    return 0


def _threshold(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CaspError(f"--threshold {text!r} is not a number; give e.g. 0.1")


def add_parser(subparsers) -> None:
    """Register ``casp sparsity`` on the ``casp`` command's subparsers."""
    p = subparsers.add_parser(
        "sparsity", help="attention sparsity and the attention error of low-rank W_q/W_k, per "
                         "layer (the paper's figure)",
        description="For every decoder layer of the language model, measure the sparsity of "
                    "the original model's attention S = softmax(QK^T/sqrt(d) + causal mask) and "
                    "MSE(S - S'), S' the attention with W_q and W_k from a casp low-rank "
                    "checkpoint, computed on the same layer inputs (the original model's hidden "
                    "states), on text windows and, with --mm-data, on image+text samples. "
                    "Sparsity: the fraction of unmasked entries whose probability is below "
                    "THRESHOLD/n, n the number of unmasked entries in its row (with "
                    "--threshold-mode absolute: below THRESHOLD). MSE: the mean over unmasked "
                    "entries, heads and samples. Writes OUT/attention_sparsity_NAME.json "
                    "(per-layer values, per-sample values, settings) and .png (per-layer "
                    "sparsity and MSE, MSE against sparsity).")
    p.add_argument("--model", required=True,
                   help="the ORIGINAL model the low-rank checkpoint was made from: a local "
                        "Hugging Face directory, a .gguf file, a hub id, 'smollm2-135m' or "
                        "'mini-llava'")
    p.add_argument("--lowrank", required=True,
                   help="the casp low-rank checkpoint (the output of casp lowrank) whose W_q "
                        "and W_k are compared")
    p.add_argument("--device", default="auto",
                   help="compute device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto",
                   help="weight dtype of both models: auto (float16 on CUDA, float32 on CPU), "
                        "float32, float16, bfloat16; attention is computed in float32")
    g = p.add_argument_group("text inputs (always analysed)")
    add_text_source_args(g, "text")
    g.add_argument("--nsamples", type=positive, default=16,
                   help="random text windows, analysed one at a time (default: 16)")
    g.add_argument("--seqlen", type=positive, default=1024,
                   help="tokens per text window (default: 1024)")
    g.add_argument("--seed", type=int, default=3,
                   help="seed for picking text windows and image+text samples (default: 3)")
    g = p.add_argument_group("image+text inputs (multimodal models)")
    g.add_argument("--mm-data", default=None,
                   help="LLaVA-Instruct JSON of image+text samples, or easy-vqa (the "
                        "built-in easy-vqa training questions); also analyse those (needs a "
                        "multimodal model)")
    g.add_argument("--image-root", default=None,
                   help="folder the image paths in --mm-data are relative to (default: the "
                        "JSON's folder)")
    g.add_argument("--mm-samples", type=positive, default=16,
                   help="image+text samples picked at random from --mm-data (default: 16)")
    g = p.add_argument_group("measure and output")
    g.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                   help="an attention entry counts as zero below THRESHOLD/n, n the number of "
                        "unmasked entries in its row, i.e. below THRESHOLD times an even share "
                        f"(default: {DEFAULT_THRESHOLD}); with --threshold-mode absolute, below "
                        "THRESHOLD itself (e.g. 0.01)")
    g.add_argument("--threshold-mode", choices=THRESHOLD_MODES, default="relative",
                   help="relative: THRESHOLD is a multiple of 1/n (independent of sequence "
                        "length; default); absolute: THRESHOLD is a probability")
    g.add_argument("--out", default="assets",
                   help="directory for attention_sparsity_NAME.json and .png (default: assets)")
    g.add_argument("--name", default=None,
                   help="NAME in the file names (default: the low-rank checkpoint's folder name)")
    p.set_defaults(func=cmd_sparsity)
