"""easy-vqa: real questions about synthetic images, from the ``easy-vqa`` wheel on PyPI.

4,000 training and 1,000 test images (64x64 PNG, one coloured shape each) with 38,575 /
9,673 [question, answer, image id] triples and 13 possible answers (yes, no, three shapes,
eight colours). It serves the mini LLaVA three ways: the projector's training data,
multimodal calibration (LLaVA-Instruct JSON, the form ``--mm-data`` reads), and evaluation
(answer accuracy and answer perplexity; an lmms-eval task reads the same records).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from casp.errors import CaspError

EASY_VQA_WHEEL = ("easy-vqa", "1.0", "easy_vqa/data")
SPLITS = ("train", "test")
# What the model is asked to do, after the question; part of every prompt (train and test).
ANSWER_HINT = "Answer with one word."


@dataclass(frozen=True)
class VQARecord:
    question: str
    answer: str
    image: Path
    image_id: int


def data_dir() -> Path:
    from casp.assets import wheel_folder

    return wheel_folder(*EASY_VQA_WHEEL)


def answers() -> list[str]:
    return [a.strip() for a in (data_dir() / "answers.txt").read_text().splitlines() if a.strip()]


def load_split(split: str, root: str | Path | None = None) -> list[VQARecord]:
    """Every [question, answer, image] record of ``split``, in the file's order."""
    if split not in SPLITS:
        raise CaspError(f"unknown easy-vqa split {split!r}; use one of {', '.join(SPLITS)}")
    base = Path(root) if root else data_dir()
    qfile = base / split / "questions.json"
    if not qfile.is_file():
        raise CaspError(f"{qfile} does not exist; point at an easy-vqa data folder")
    records = []
    for question, answer, image_id in json.loads(qfile.read_text()):
        records.append(VQARecord(question=question, answer=answer,
                                 image=base / split / "images" / f"{image_id}.png",
                                 image_id=int(image_id)))
    return records


def subset(records: list[VQARecord], n: int | None, seed: int = 0) -> list[VQARecord]:
    """``n`` records drawn at random (all of them, in order, when ``n`` is None)."""
    if n is None or n >= len(records):
        return list(records)
    if n <= 0:
        raise CaspError(f"asked for {n} easy-vqa samples; give a positive number")
    return random.Random(seed).sample(records, n)


def by_image(records: list[VQARecord]) -> dict[int, list[VQARecord]]:
    groups: dict[int, list[VQARecord]] = {}
    for r in records:
        groups.setdefault(r.image_id, []).append(r)
    return groups


def normalize_answer(text: str) -> str:
    """Lower case, first word, punctuation and articles stripped: ``"Yes."`` -> ``yes``."""
    words = re.sub(r"[^a-z ]", " ", text.lower()).split()
    words = [w for w in words if w not in ("a", "an", "the", "it", "is")]
    return words[0] if words else ""


def question_text(record: VQARecord) -> str:
    return f"{record.question} {ANSWER_HINT}"


def instruct_records(split: str, nsamples: int | None, seed: int,
                     with_answer: bool = True) -> list[dict]:
    """LLaVA-Instruct records (image + question [+ answer]) of ``nsamples`` random questions."""
    items = []
    for i, r in enumerate(subset(load_split(split), nsamples, seed)):
        conv = [{"from": "human", "value": "<image>\n" + question_text(r)}]
        if with_answer:
            conv.append({"from": "gpt", "value": r.answer})
        items.append({"id": f"easy-vqa-{split}-{i}", "image": str(r.image),
                      "conversations": conv})
    return items


BUILTIN_NAMES = {"easy-vqa": "train", "easy-vqa:train": "train", "easy-vqa:test": "test"}


def is_builtin(name) -> bool:
    """``--mm-data`` names the built-in easy-vqa questions (and no file of that name exists)."""
    return str(name) in BUILTIN_NAMES and not Path(str(name)).exists()


def builtin_records(name: str, nsamples: int | None, seed: int) -> list[dict]:
    """The LLaVA-Instruct records ``--mm-data easy-vqa`` (train split) or ``easy-vqa:test``
    names (casp.data.multimodal turns them into calibration samples)."""
    if name not in BUILTIN_NAMES:
        raise CaspError(f"unknown built-in multimodal data {name!r}; use easy-vqa or "
                        "easy-vqa:test, or a LLaVA-Instruct JSON file")
    return instruct_records(BUILTIN_NAMES[name], nsamples, seed)


def write_llava_instruct(path: str | Path, split: str = "train", nsamples: int = 128,
                         seed: int = 3, with_answer: bool = True) -> Path:
    """LLaVA-Instruct JSON of ``nsamples`` random records (image + question [+ answer]),
    the calibration form ``--mm-data`` reads. Image paths are absolute."""
    items = instruct_records(split, nsamples, seed, with_answer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(items, indent=1))
    tmp.replace(path)
    return path
