"""Position-table truncation: exact on inputs within the kept positions, refused beyond them,
and what is saved loads back (stock and student classes, tokenizer included)."""

from __future__ import annotations

import pytest
import torch
from conftest_compress import ARCHS, assert_same_snapshot, clone, outputs, snapshot, tiny_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import rosita_fast  # noqa: F401  (registers the student models with the Auto classes)
from rosita_fast import FastModulesConfig, swap_
from rosita_fast.compress import count_parameters, position_count, prune_, prune_positions_
from rosita_fast.models import minilm_path

TABLE = 64  # tiny_model's max_position_embeddings


def _batch(model, seq: int) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (3, seq))
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id
    ids[-1, seq - seq // 3:] = pad
    mask[-1, seq - seq // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _offset(arch: str, model) -> int:
    # RoBERTa/MPNet number positions from padding_idx + 1.
    return 0 if arch == "bert" else model.config.pad_token_id + 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("student", [False, True])
def test_cut_is_exact_within_the_kept_positions(arch, student, seed):
    model = tiny_model(arch)
    if student:
        prune_(model, heads=[[0, 2], [1, 2, 3], [3]], ffn=[list(range(9)), [4, 7], [1]],
               embedding_rank=6)
    usable = TABLE - _offset(arch, model)
    keep = int(torch.randint(3, usable - 1, ()).item())
    # Inputs as long as the kept table, and shorter ones.
    batches = [_batch(model, keep), _batch(model, max(2, keep // 2))]
    with torch.no_grad():
        before = [outputs(model, b) for b in batches]
    params = count_parameters(model)
    assert position_count(model) == usable
    removed = prune_positions_(model, keep)
    assert removed == (usable - keep) * model.config.hidden_size
    assert count_parameters(model) == params - removed
    assert position_count(model) == keep
    assert model.config.max_position_embeddings == _offset(arch, model) + keep
    with torch.no_grad():
        for batch, ref in zip(batches, before, strict=True):
            assert torch.equal(outputs(model, batch), ref)
        with pytest.raises((RuntimeError, IndexError)):
            model(**_batch(model, keep + 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_loads_back_with_the_short_table(arch, tmp_path, seed):
    model = tiny_model(arch)
    prune_(model, heads=[[1, 3]] * 3, ffn=[list(range(0, 48, 3))] * 3, embedding_rank=8)
    prune_positions_(model, 20)
    batch = _batch(model, 20)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert position_count(loaded) == 20
    with torch.no_grad():
        assert torch.equal(outputs(loaded, batch), outputs(model, batch))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_modules_run_the_cut_table(arch, seed):
    model = tiny_model(arch)
    prune_positions_(model, 24)
    batch = _batch(model, 24)
    with torch.no_grad():
        ref = outputs(model, batch).double()
        fast = clone(model)
        swap_(fast, FastModulesConfig())
        out = outputs(fast, batch).double()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        # The fused lookup refuses a position past the table instead of reading past it.
        with pytest.raises((ValueError, IndexError), match="positions|out of range"):
            fast(**_batch(model, 25))


def test_tokenizer_follows_the_table(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    assert tokenizer.model_max_length > 64
    prune_positions_(model, 64, tokenizer)
    assert tokenizer.model_max_length == 64
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 64
    encoded = reloaded(["word " * 200], truncation=True, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == 64
    with torch.no_grad():
        assert model(**encoded).logits.shape == (1, 2)
    # A tokenizer that already stops earlier is left alone.
    tokenizer.model_max_length = 32
    prune_positions_(model, 64, tokenizer)
    assert tokenizer.model_max_length == 32


def test_keeping_every_position_changes_nothing():
    model = tiny_model("roberta")
    snap = snapshot(model)
    assert prune_positions_(model, position_count(model)) == 0
    assert_same_snapshot(model, snap)


@pytest.mark.parametrize("value, match", [
    (0, "positive integer"),
    (-1, "positive integer"),
    (True, "positive integer"),
    (2.0, "positive integer"),
    (TABLE + 1, "exceeds the model's 64 positions"),
])
def test_bad_max_positions_are_refused_before_any_change(value, match):
    model = tiny_model("bert")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune_positions_(model, value)
    assert_same_snapshot(model, snap)


def test_roberta_counts_usable_positions_after_the_padding_rows():
    model = tiny_model("roberta")
    usable = TABLE - model.config.pad_token_id - 1
    with pytest.raises(ValueError, match=f"exceeds the model's {usable} positions"):
        prune_positions_(model, usable + 1)


def test_a_model_on_the_fast_modules_is_refused():
    model = tiny_model("bert")
    swap_(model, FastModulesConfig())
    with pytest.raises(ValueError, match="before swapping"):
        prune_positions_(model, 16)
