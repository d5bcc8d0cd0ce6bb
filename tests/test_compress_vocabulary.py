"""Vocabulary pruning: smaller embedding and tied head, and a tokenizer that matches it."""

from __future__ import annotations

import random

import pytest
import torch
from conftest_compress import assert_same_snapshot, snapshot, tiny_model
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    MPNetConfig,
    MPNetForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rosita_fast.compress import prune_, prune_vocabulary_
from rosita_fast.models import minilm_path, mpnet_path

WORDS = (
    "the film is a charming and often affecting journey , but its screenplay feels unbelievably "
    "tedious ; performances from everyone involved are xylophonically overwrought ! who knew "
    "2019 could deliver such rapturous , heartbreaking cinema ?"
).split()


def _corpus(seed: int, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(n)]


def _remapped(old_ids: list[int], old_tok, new_tok) -> list[int]:
    # Independent of the pruning code: go through token strings.
    return [new_tok.convert_tokens_to_ids(t) for t in old_tok.convert_ids_to_tokens(old_ids)]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


def _tiny_mlm(vocab: int = 30522) -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    return BertForMaskedLM(config).eval()


@pytest.mark.parametrize("factorized", [False, True])
def test_pruned_vocabulary_keeps_corpus_tokenization_and_logits(
    minilm_tokenizer, factorized, seed, tmp_path
):
    old_tok = minilm_tokenizer
    model = _tiny_mlm()
    if factorized:
        prune_(model, embedding_rank=8)
    corpus = _corpus(seed)
    pairs = [(corpus[0], corpus[1]), (corpus[2], corpus[3])]
    dense = AutoModelForMaskedLM.from_config(model.config)
    dense.load_state_dict(model.state_dict())
    dense.eval()

    new_tok = prune_vocabulary_(model, old_tok, corpus + pairs, output_dir=tmp_path)

    assert len(new_tok) == model.config.vocab_size < 500
    kept = old_tok.convert_tokens_to_ids(new_tok.convert_ids_to_tokens(list(range(len(new_tok)))))
    assert kept == sorted(kept) and set(old_tok.all_special_ids) <= set(kept)
    for text in corpus:
        old_ids = old_tok(text)["input_ids"]
        assert new_tok(text)["input_ids"] == _remapped(old_ids, old_tok, new_tok)
    for a, b in pairs:
        assert new_tok(a, b)["input_ids"] == _remapped(old_tok(a, b)["input_ids"], old_tok, new_tok)

    old_batch = old_tok(corpus[:4], padding=True, return_tensors="pt")
    new_batch = new_tok(corpus[:4], padding=True, return_tensors="pt")
    expected = dense(**old_batch).logits[..., kept]
    torch.testing.assert_close(model(**new_batch).logits, expected, rtol=1e-6, atol=1e-6)
    decoder = model.cls.predictions.decoder
    assert decoder.bias is model.cls.predictions.bias and decoder.out_features == len(kept)
    emb = model.bert.embeddings.word_embeddings
    if not factorized:
        assert decoder.weight is emb.weight  # the tie survives
    assert model.config.pad_token_id == new_tok.pad_token_id == 0

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded_tok(corpus[5])["input_ids"] == new_tok(corpus[5])["input_ids"]
    assert torch.equal(reloaded(**new_batch).logits, model(**new_batch).logits)


def test_spell_ascii_spells_unseen_words_instead_of_unknown(minilm_tokenizer, seed):
    old_tok = minilm_tokenizer
    corpus = _corpus(seed)
    plain = prune_vocabulary_(_tiny_mlm(), old_tok, corpus)
    model = _tiny_mlm()
    spelled = prune_vocabulary_(model, old_tok, corpus, spell_ascii=True)
    unseen = "Zygomorphic qwxv-17 flummoxed, #42!"
    assert plain.unk_token_id in plain(unseen)["input_ids"]  # the plain cut loses the word
    ids = spelled(unseen)["input_ids"]
    assert spelled.unk_token_id not in ids
    # Spelled in pieces: the pieces join back to the lower-cased text.
    pieces = spelled.convert_ids_to_tokens(ids[1:-1])
    assert "".join(p.removeprefix("##") for p in pieces) == "".join(unseen.lower().split())
    vocab = set(spelled.get_vocab())
    assert all(c in vocab and "##" + c in vocab for c in "az09#!-")
    # Only characters are added: the corpus tokens plus at most 2 x 94 pieces.
    assert set(plain.get_vocab()) <= vocab and len(spelled) - len(plain) <= 2 * 94
    assert model.config.vocab_size == len(spelled)
    for text in corpus:  # the corpus still tokenizes as before
        assert spelled(text)["input_ids"] == _remapped(old_tok(text)["input_ids"], old_tok,
                                                        spelled)


def test_mpnet_keeps_its_padding_id_so_positions_do_not_move(seed):
    old_tok = AutoTokenizer.from_pretrained(str(mpnet_path()))
    config = MPNetConfig(
        vocab_size=len(old_tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=2,
    )
    model = MPNetForSequenceClassification(config).eval()
    corpus = _corpus(seed)
    old_batch = old_tok(corpus[:3], padding="longest", return_tensors="pt")
    expected = model(**old_batch).logits
    new_tok = prune_vocabulary_(model, old_tok, corpus)
    assert model.config.pad_token_id == new_tok.pad_token_id == 1
    new_batch = new_tok(corpus[:3], padding="longest", return_tensors="pt")
    torch.testing.assert_close(model(**new_batch).logits, expected, rtol=1e-6, atol=1e-6)


def test_bpe_tokenizers_are_refused_before_any_change(seed):
    bpe = Tokenizer(
        models.BPE(
            vocab={"a": 0, "b": 1, "ab": 2, "<unk>": 3}, merges=[("a", "b")], unk_token="<unk>"
        )
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    model = tiny_model("roberta", "mlm")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="supports WordPiece tokenizers, got BPE"):
        prune_vocabulary_(model, tokenizer, ["ab a b"])
    assert_same_snapshot(model, snap)


def test_tokenizer_larger_than_the_model_is_refused(minilm_tokenizer):
    model = tiny_model("bert", "mlm")  # vocab 80 < 30522
    snap = snapshot(model)
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens, the model only 80 rows"):
        prune_vocabulary_(model, minilm_tokenizer, ["the film"])
    assert_same_snapshot(model, snap)
