"""Text for calibration and perplexity: bundled corpora, local files and hub datasets.

Every source is a list of documents. ``train`` and ``test`` splits of a bundled or local
source are its first 80% and last 20% of characters, cut at a document boundary, so that
calibration never sees the evaluation text. Hub datasets use their own splits.
"""
from __future__ import annotations

import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from casp import assets
from casp.errors import CaspError

TRAIN_FRACTION = 0.8
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class HubText:
    """A hub corpus and the protocol the literature uses for it."""

    path: str
    name: str | None
    splits: dict                   # our split name -> the dataset's split name
    data_files: dict | None = None
    field: str = "text"
    max_docs: dict | None = None   # per split: how many documents (the first, or a shuffle)
    join: dict | None = None       # per split: join the documents into one with this string
    streaming: bool = False        # large corpora: read only what is used


HUB_DATASETS = {
    # GPTQ's protocol: every row of the split, empty ones included, joined by "\n\n".
    "wikitext2": HubText("wikitext", "wikitext-2-raw-v1", {"train": "train", "test": "test"},
                         join={"train": "\n\n", "test": "\n\n"}),
    # GPTQ's protocol: the first validation shard, its first 1100 documents joined by " "
    # (evaluate 256 windows of 2048 tokens with --max-windows 256); training from shard 0.
    "c4": HubText(
        "allenai/c4", None, {"train": "train", "test": "validation"},
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"},
        max_docs={"train": 20000, "validation": 1100}, join={"validation": " "}),
    # The paper calibrates with RedPajama; the 1T sample's JSON-lines files, read as a stream
    # and shuffled across its sources (arXiv, books, C4, CommonCrawl, GitHub, StackExchange,
    # Wikipedia).
    "redpajama": HubText(
        "json", None, {"train": "train"},
        data_files={"train": "hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/*.jsonl"},
        max_docs={"train": 20000}, streaming=True),
}
BUNDLED = ("wiki", "lee")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def bundled_wiki_documents() -> list[str]:
    """106 English Wikipedia articles (CC BY-SA; see casp/data/bundled/ATTRIBUTION.md)."""
    blob = resources.files("casp.data").joinpath("bundled/enwiki_sample.txt.xz").read_bytes()
    return [d for d in lzma.decompress(blob).decode("utf-8").split("\n\n") if d.strip()]


def lee_documents() -> list[str]:
    """The Lee background corpus: 300 Australian news stories, one per line."""
    text = assets.lee_corpus_file().read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _local_documents(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise CaspError(f"text file {path} does not exist; check the path")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [d for d in text.split("\n\n") if d.strip()]
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise CaspError(f"could not read {path} as {kind}: {str(exc).splitlines()[0]}")
    if field not in table.column_names:
        raise CaspError(f"{path} has no {field!r} column (it has {table.column_names}); "
                        "name the text column with --text-field")
    return [t for t in table[field] if isinstance(t, str) and t.strip()]


def _hub_documents(spec: HubText, split: str) -> list[str]:
    if split not in spec.splits:
        raise CaspError(f"hub dataset {spec.path} has no {split!r} split here; use one of "
                        + ", ".join(spec.splits))
    import datasets

    hub_split = spec.splits[split]
    kwargs = {"data_files": {hub_split: spec.data_files[hub_split]}} if spec.data_files else {}
    limit = (spec.max_docs or {}).get(hub_split)
    try:
        if spec.streaming:
            stream = datasets.load_dataset(spec.path, spec.name, split=hub_split, streaming=True,
                                           **kwargs).shuffle(seed=0, buffer_size=10_000)
            texts = [row[spec.field] for row in stream.take(limit or 10_000)]
        else:
            sliced = f"{hub_split}[:{limit}]" if limit else hub_split
            texts = datasets.load_dataset(spec.path, spec.name, split=sliced, **kwargs)[spec.field]
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CaspError(f"could not load {spec.path} from the hub ({first}); without internet "
                        "use a bundled corpus (wiki, lee) or a local file")
    joiner = (spec.join or {}).get(hub_split)
    if joiner is not None:
        return [joiner.join(texts)]
    return [t for t in texts if t.strip()]


def split_documents(docs: list[str], split: str) -> list[str]:
    """First 80% / last 20% of the characters, cut at a document boundary."""
    if split == "all":
        return docs
    total = sum(len(d) for d in docs)
    seen, cut = 0, len(docs)
    for i, doc in enumerate(docs):
        if seen >= TRAIN_FRACTION * total:
            cut = i
            break
        seen += len(doc)
    part = docs[:cut] if split == "train" else docs[cut:]
    if not part:
        raise CaspError(f"the text has too few documents for a {split!r} split; use --split all")
    return part


def load_documents(source: str, split: str | None = None, field: str = "text") -> list[str]:
    """Documents of ``source``: a bundled name, a hub dataset name, or a local file.

    ``split`` defaults to ``all`` for local files and ``train`` otherwise.
    """
    if split is not None and split not in SPLITS:
        raise CaspError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    key = source.lower()
    if key in HUB_DATASETS:
        return _hub_documents(HUB_DATASETS[key], split or "train")
    if key in BUNDLED:
        docs = bundled_wiki_documents() if key == "wiki" else lee_documents()
        return split_documents(docs, split or "train")
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        return split_documents(_local_documents(path, field), split or "all")
    raise CaspError(f"unknown text source {source!r}; use a bundled corpus ({', '.join(BUNDLED)}), "
                    f"a hub dataset ({', '.join(HUB_DATASETS)}) or a .txt/.jsonl/.parquet file")


def tokenize_documents(tokenizer, docs: list[str], separator: str = "\n\n") -> torch.Tensor:
    """Concatenate the documents (joined by ``separator``) and tokenize them as one stream."""
    if tokenizer is None:
        raise CaspError("the model has no tokenizer; give a model directory that includes one")
    text = separator.join(docs)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets (reproducible by seed)."""
    if nsamples < 1 or seqlen < 2:
        raise CaspError("need at least one calibration sample of at least 2 tokens")
    if ids.numel() < nsamples * seqlen:
        raise CaspError(
            f"calibration text too short: {ids.numel()} tokens, fewer than {nsamples} samples x "
            f"{seqlen} tokens = {nsamples * seqlen}; lower --nsamples or --seqlen, or use more text")
    return torch.stack([ids[s: s + seqlen]
                        for s in random_window_starts(ids.numel(), nsamples, seqlen, seed)])


def random_window_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Where :func:`random_windows` cuts its windows."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=gen).tolist()


def windows_apart(ids: torch.Tensor, seqlen: int, count: int, avoid: list[int],
                  avoid_len: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``seqlen`` tokens, from the end of ``ids``
    backwards, none sharing a token with the windows of ``avoid_len`` tokens that start at
    ``avoid`` (held-out validation text beside random calibration windows)."""
    taken = sorted((s, s + avoid_len) for s in avoid)
    found, end = [], ids.numel()
    while len(found) < count and end - seqlen >= 0:
        start = end - seqlen
        clash = [a for a, b in taken if a < end and b > start]
        if clash:
            end = max(clash)       # jump below the latest overlapping window's start
            continue
        found.append(start)
        end = start
    if len(found) < count:
        raise CaspError(f"only {len(found)} validation windows of {seqlen} tokens fit beside "
                        f"the calibration windows; lower --val-windows or --nsamples, or use "
                        "more text")
    return torch.stack([ids[s: s + seqlen] for s in sorted(found)])


def consecutive_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None
                        ) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start; the remainder is dropped."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise CaspError(f"evaluation text too short: {ids.numel()} tokens, less than one window of "
                        f"{seqlen}; lower --seqlen or use more text")
    return ids[: count * seqlen].view(count, seqlen)
