"""Perplexity, the usual protocol: concatenate the evaluation text, cut it into
non-overlapping windows of ``seqlen`` tokens, and average the next-token negative
log-likelihood over every predicted token (seqlen - 1 per window)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from casp.data import consecutive_windows


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    seqlen: int
    windows: int
    tokens: int           # tokens predicted (windows x (seqlen - 1))
    text_tokens: int      # tokens in the whole evaluation text

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"PPL {self.ppl:.3f} ({self.windows} windows x {self.seqlen} tokens, "
                f"{self.tokens} predicted tokens, of {self.text_tokens} in the text)")


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int,
               max_windows: int | None = None, batch_size: int = 1,
               device: torch.device | str = "cpu", progress: bool = True) -> PerplexityResult:
    windows = consecutive_windows(ids, seqlen, max_windows)
    model.to(device)
    total_nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch",
                      disable=not progress):
        batch = windows[start: start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
    mean = total_nll / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, seqlen=seqlen, windows=len(windows),
                            tokens=count, text_tokens=int(ids.numel()))


def corpus_perplexity(loaded, dataset: str, split: str, seqlen: int, max_windows: int | None,
                      device, text_field: str = "text") -> PerplexityResult:
    """:func:`perplexity` of a LoadedModel on a corpus as ``casp ppl`` names it (wiki, lee, a
    hub corpus or a local file; ``split`` of it), after checking the model takes ``seqlen``."""
    from casp.data import load_documents, tokenize_documents
    from casp.data.calibration import check_seqlen

    check_seqlen(loaded.model, seqlen)
    ids = tokenize_documents(loaded.tokenizer, load_documents(dataset, split, text_field))
    return perplexity(loaded.model, ids, seqlen, max_windows=max_windows, device=device)
