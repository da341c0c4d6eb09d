"""``casp generate``: a reply to one prompt (and, for a LLaVA model, one image) from any model
or casp checkpoint, streamed to stdout, then its speed and memory on stderr. The decoding
loop is casp.generation's."""
from __future__ import annotations

import sys

from casp.cli.args import add_model_args, positive
from casp.errors import CaspError


def _named(flag: str, parse):
    """``parse`` with ``flag`` in its error message."""
    def parse_flag(text: str):
        try:
            return parse(text)
        except CaspError as exc:
            raise CaspError(f"{flag} {exc}")
    return parse_flag


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CaspError(f"{text!r} is not a number; give 0 (greedy) or e.g. 0.7")
    if not value >= 0:
        raise CaspError(f"{value} is negative; give 0 (greedy) or e.g. 0.7")
    return value


def top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CaspError(f"{text!r} is not a number; give a value in (0, 1], e.g. 0.9")
    if not 0.0 < value <= 1.0:
        raise CaspError(f"{value} is outside (0, 1]; give e.g. 0.9, or 1 for no cut")
    return value


def cmd_generate(args) -> int:
    import torch

    from casp.devices import resolve_device
    from casp.generation import generate, read_image
    from casp.loading import load_pretrained, read_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_device(args.device)                  # a bad --device before anything is read
    image = None
    if args.image is not None:
        image = read_image(args.image)
        if not read_spec(args.model).multimodal:
            raise CaspError(f"{args.model} takes text only; --image needs a LLaVA-family "
                            "model (e.g. --model mini-llava)")
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(loaded, args.prompt, image=image, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      chat_template=not args.no_chat_template, device=args.device,
                      write=write)
    print(flush=True)
    print(result.summary(), file=sys.stderr, flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a reply to a prompt (and an image), with "
                                        "speed and memory",
                       description="Generate text from one prompt with a KV cache: the prompt "
                                   "is run once (prefill), then one token per step, greedy or "
                                   "sampled, until an end token or --max-new-tokens. The reply "
                                   "is streamed to stdout; a summary (prompt tokens, prefill "
                                   "time, new tokens, decode tokens/s, peak memory) goes to "
                                   "stderr. Attention is eager, as in the paper's speed "
                                   "measurements.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the user's message (put in the model's chat template unless "
                        "--no-chat-template)")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="an image file to ask about (LLaVA-family models only)")
    p.add_argument("--max-new-tokens", type=_named("--max-new-tokens", positive), default=128,
                   metavar="N",
                   help="stop after this many new tokens (default: 128)")
    p.add_argument("--temperature", type=_named("--temperature", temperature), default=0.0,
                   metavar="T",
                   help="sampling temperature; 0 takes the most likely token each step "
                        "(default: 0, greedy)")
    p.add_argument("--top-p", type=_named("--top-p", top_p), default=1.0, metavar="P",
                   help="sample only from the most likely tokens whose probabilities sum to "
                        "this (nucleus sampling; default: 1, no cut; used with --temperature "
                        "> 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the sampling generator (default: 0)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as it is instead of in the model's chat template")
    p.add_argument("--threads", type=_named("--threads", positive), default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_generate)
