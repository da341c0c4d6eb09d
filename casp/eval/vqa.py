"""Multimodal evaluation on easy-vqa: answer accuracy and answer perplexity.

- Accuracy: greedy generation from image + question (the model's chat template), the reply
  normalised (lower case, first word, punctuation and articles dropped) and compared exactly
  with the reference answer (13 possible answers).
- Answer perplexity: exp of the mean negative log-likelihood of the reference answer's
  tokens given image and question (teacher forcing), over all answer tokens: the analogue of
  the paper's LiveBench / LLaVA-Bench perplexities. ``answer_ppl_per_answer`` averages each
  answer's whole NLL instead (what lmms-eval's ``perplexity`` aggregation computes); the two
  differ when answers have several tokens ("rect|angle").
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from tqdm import tqdm

from casp.data.easy_vqa import VQARecord, normalize_answer, question_text
from casp.errors import CaspError


def user_prompt(processor, record: VQARecord) -> str:
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question_text(record)}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    return f"USER: {image_token}\n{question_text(record)} ASSISTANT:"


def answer_text(prompt: str, answer: str) -> str:
    """The answer as it follows the prompt: after a space unless the prompt ends in one."""
    return answer if not prompt or prompt[-1].isspace() else " " + answer


def _inputs(processor, records: list[VQARecord], texts: list[str]) -> dict:
    from PIL import Image

    images = [Image.open(r.image).convert("RGB") for r in records]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def question_type(record: VQARecord) -> str:
    if record.answer in ("yes", "no"):
        return "yes/no"
    return "shape" if record.answer in ("circle", "rectangle", "triangle") else "color"


@torch.no_grad()
def evaluate_vqa(model, processor, records: list[VQARecord], batch_size: int = 16,
                 max_new_tokens: int = 4, desc: str = "easy-vqa") -> dict:
    """Accuracy (generation, exact match) and answer perplexity on ``records``."""
    if not records:
        raise CaspError("no easy-vqa records to evaluate; give --samples > 0")
    if processor is None:
        raise CaspError("the model has no processor; multimodal evaluation needs a LLaVA model "
                        "directory with its preprocessor files")
    tok = processor.tokenizer
    saved_side, saved_pad = tok.padding_side, tok.pad_token
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CaspError("the model's tokenizer has neither a pad nor an end token; batched "
                            "evaluation cannot pad; use --batch-size 1")
        tok.pad_token = tok.eos_token
    device = next(model.parameters()).device
    correct = 0
    nll, n_tokens = 0.0, 0
    per_answer: list[float] = []
    by_type: Counter = Counter()
    totals: Counter = Counter()
    end_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "<|im_end|>" in tok.get_vocab():     # ChatML models end a turn with it
        end_ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    try:
        for start in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
            chunk = records[start: start + batch_size]
            prompts = [user_prompt(processor, r) for r in chunk]
            # accuracy: greedy generation, left padded
            tok.padding_side = "left"
            inputs = {k: v.to(device) for k, v in _inputs(processor, chunk, prompts).items()}
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end_ids or None,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                 else (end_ids[0] if end_ids else 0))
            replies = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
            for r, reply in zip(chunk, replies):
                ok = normalize_answer(reply) == r.answer
                correct += ok
                by_type[question_type(r)] += ok
                totals[question_type(r)] += 1
            # answer perplexity: teacher forcing, right padded
            tok.padding_side = "right"
            answers = [answer_text(p, r.answer) for p, r in zip(prompts, chunk)]
            full = [p + a for p, a in zip(prompts, answers)]
            inputs = {k: v.to(device) for k, v in _inputs(processor, chunk, full).items()}
            logits = model(**inputs).logits.float()
            ids = inputs["input_ids"]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:]
            for b, (p, f) in enumerate(zip(prompts, full)):
                # the answer's tokens in context (a word may split differently on its own)
                n_ans = (len(tok(f, add_special_tokens=False)["input_ids"])
                         - len(tok(p, add_special_tokens=False)["input_ids"]))
                length = int(inputs["attention_mask"][b].sum())
                positions = torch.arange(length - 1 - n_ans, length - 1, device=logp.device)
                answer_nll = -logp[b, positions, target[b, positions]].sum().item()
                nll += answer_nll
                n_tokens += n_ans
                per_answer.append(answer_nll)
    finally:
        tok.padding_side, tok.pad_token = saved_side, saved_pad
    return {"accuracy": correct / len(records), "answer_ppl": math.exp(nll / max(n_tokens, 1)),
            # exp of the mean over answers of each answer's NLL (lmms-eval's perplexity)
            "answer_ppl_per_answer": math.exp(sum(per_answer) / len(per_answer)),
            "samples": len(records),
            "accuracy_by_type": {k: by_type[k] / totals[k] for k in sorted(totals)}}
