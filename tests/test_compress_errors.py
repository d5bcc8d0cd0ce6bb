"""Bad targets raise a clear error before anything is modified; the model is never half-pruned."""

from __future__ import annotations

import pytest
import torch
from conftest_compress import assert_same_snapshot, snapshot, tiny_model
from transformers import BertForTokenClassification, DistilBertConfig, DistilBertModel

from rosita_fast.compress import ImportanceScores, compress, prune_
from rosita_fast.models import UnsupportedArchitectureError


def _scores(model):
    return ImportanceScores(
        heads=[torch.rand(4) for _ in range(3)],
        ffn=[torch.rand(48) for _ in range(3)],
        num_batches=1,
        method="taylor",
    )


CASES = [
    # Valid first targets, then one that does not fit: nothing at all may change.
    (
        {"ffn": 10, "heads": 5},
        ValueError,
        "heads of layer 0: asked to keep 5 but the layer has only 4",
    ),
    ({"ffn": 10, "heads": 0}, ValueError, "cannot keep 0 heads"),
    ({"heads": 2, "ffn": [10, 10, 0]}, ValueError, "ffn of layer 2: cannot keep 0"),
    ({"heads": [[0, 1], [], [2]]}, ValueError, "cannot keep zero heads"),
    ({"heads": [[0, 4], [1], [2]]}, ValueError, r"indices \[4\] out of range"),
    ({"heads": [[1, 1], [1], [2]]}, ValueError, "duplicate"),
    ({"heads": [2, 2]}, ValueError, "2 per-layer entries for 3 kept layers"),
    ({"layers": 2, "heads": [2, 2, 2]}, ValueError, "3 per-layer entries for 2 kept layers"),
    ({"heads": 2, "embedding_rank": 33}, ValueError, "embedding_rank=33 must be in 1..32"),
    ({"heads": 2, "embedding_rank": 0}, ValueError, "embedding_rank=0"),
    ({"heads": 2, "layers": 4}, ValueError, "the model has 3 layers"),
    ({"heads": 2, "layers": 0}, ValueError, "the model has 3 layers"),
    (
        {"heads": 2, "layers": [0, 3]},
        ValueError,
        r"layers: indices \[3\] out of range, there are 3",
    ),
    ({"heads": 2, "layers": [1, 1]}, ValueError, "duplicate"),
    ({"heads": 2, "layers": []}, ValueError, "cannot keep zero layers"),
    ({"heads": 2.5}, TypeError, "must be an integer"),
    ({"heads": True}, TypeError, "must be an integer"),
]


@pytest.mark.parametrize("kwargs, error, message", CASES)
def test_invalid_target_leaves_model_untouched(kwargs, error, message, seed):
    model = tiny_model("mpnet", "seq")
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        prune_(model, scores=_scores(model), **kwargs)
    assert_same_snapshot(model, snap)


def test_counts_below_the_layer_size_need_scores(seed):
    model = tiny_model("bert", "seq")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="needs importance scores"):
        prune_(model, layers=2, heads=2)
    with pytest.raises(ValueError, match="needs scores=... or batches"):
        compress(model, heads=2)
    assert_same_snapshot(model, snap)


def test_stale_scores_are_rejected(seed):
    model = tiny_model("bert", "seq")
    stale = _scores(model)
    prune_(model, ffn=[list(range(20))] * 3)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="stale scores"):
        prune_(model, heads=2, scores=stale)
    assert_same_snapshot(model, snap)


def test_a_factorized_embedding_cannot_grow(seed):
    model = prune_(tiny_model("roberta", "seq"), embedding_rank=8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="can only be truncated to 1..8"):
        prune_(model, embedding_rank=9)
    assert_same_snapshot(model, snap)


def test_unknown_architecture_and_unsupported_head_are_rejected(seed):
    distil = DistilBertModel(
        DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=8)
    )
    with pytest.raises(
        UnsupportedArchitectureError, match="no compression adapter for model_type 'distilbert'"
    ):
        prune_(distil, layers=1)
    token_clf = BertForTokenClassification(tiny_model("bert", "base").config)
    snap = snapshot(token_clf)
    with pytest.raises(
        UnsupportedArchitectureError, match="BertForTokenClassification has no student"
    ):
        prune_(token_clf, layers=1)
    assert_same_snapshot(token_clf, snap)


def test_compress_checks_targets_before_the_scoring_pass(seed):
    model = tiny_model("bert", "seq")

    def never(*_):
        raise AssertionError("scoring must not start for an invalid target")

    with pytest.raises(ValueError, match="asked to keep 9"):
        compress(model, heads=9, batches=iter([{}]), loss_fn=never)
