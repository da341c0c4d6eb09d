"""Calibration and evaluation text: bundled corpora, local files, windows."""
import json

import pytest
import torch

from casp.data import load_documents, random_windows, consecutive_windows, tokenize_documents
from casp.data.text import bundled_wiki_documents, split_documents
from casp.errors import CaspError
from tiny import tiny_tokenizer


def test_bundled_wikipedia_is_real_clean_text():
    docs = bundled_wiki_documents()
    assert len(docs) == 106
    total = sum(len(d) for d in docs)
    assert 2_500_000 < total < 3_200_000
    assert docs[0].startswith("Anarchism\n")
    text = "\n".join(docs)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "'''"):
        assert text.count(markup) < 20, markup


def test_train_and_test_splits_partition_the_documents():
    docs = bundled_wiki_documents()
    train, test = split_documents(docs, "train"), split_documents(docs, "test")
    assert train + test == docs
    share = sum(map(len, train)) / sum(map(len, docs))
    assert 0.8 <= share < 0.85
    assert load_documents("wiki") == train          # calibration defaults to train
    assert load_documents("wiki", "test") == test


def test_random_windows_are_reproducible_and_seeded():
    ids = torch.arange(10_000)
    a = random_windows(ids, 16, 64, seed=3)
    b = random_windows(ids, 16, 64, seed=3)
    c = random_windows(ids, 16, 64, seed=4)
    assert a.shape == (16, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 63, dtype=torch.long))  # contiguous


def test_too_short_text_is_refused_with_the_numbers():
    with pytest.raises(CaspError, match=r"too short: 1000 tokens, fewer than 16 samples x 64"):
        random_windows(torch.arange(1000), 16, 64, seed=3)


def test_consecutive_windows_drop_the_remainder_and_cap():
    ids = torch.arange(1000)
    w = consecutive_windows(ids, 300)
    assert w.shape == (3, 300) and w[2, 0] == 600
    assert consecutive_windows(ids, 100, max_windows=4).shape == (4, 100)
    with pytest.raises(CaspError, match="less than one window"):
        consecutive_windows(ids, 2000)


def test_local_txt_jsonl_parquet_give_the_same_documents(tmp_path):
    docs = ["the cat is red", "a dog was blue", "the river of the north"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i})
                                                for i, d in enumerate(docs)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    assert load_documents(str(tmp_path / "a.txt")) == docs
    assert load_documents(str(tmp_path / "a.jsonl")) == docs
    assert load_documents(str(tmp_path / "a.parquet"), field="body") == docs
    with pytest.raises(CaspError, match="no 'text' column"):
        load_documents(str(tmp_path / "a.parquet"))
    with pytest.raises(CaspError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(CaspError, match="unknown text source"):
        load_documents("no-such-corpus")


def test_tokenize_joins_documents():
    tok = tiny_tokenizer()
    ids = tokenize_documents(tok, ["the cat", "a dog"])
    assert ids.tolist() == tok("the cat a dog", add_special_tokens=False)["input_ids"]
