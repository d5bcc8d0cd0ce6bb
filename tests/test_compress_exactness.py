"""Every pruning operation is exact for what it keeps (BERT, RoBERTa and MPNet)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest_compress import (
    ARCHS,
    clone,
    mask_units_,
    outputs,
    random_batch,
    skip_layers_,
    tiny_model,
)

from rosita_fast.compress import count_parameters, prune_
from rosita_fast.models import FactorizedEmbedding, adapter_for

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("head", ["seq", "mlm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_everything_reproduces_outputs(arch, head, seed):
    model = tiny_model(arch, head)
    batch = random_batch(model)
    expected = outputs(model, batch)
    before = count_parameters(model)
    prune_(model, layers=3, heads=4, ffn=48)
    assert type(model).__name__.startswith("Rosita")
    assert count_parameters(model) == before
    torch.testing.assert_close(outputs(model, batch), expected, rtol=0, atol=0)
    # A full-rank factorization changes the arithmetic, not the function.
    prune_(model, embedding_rank=32)
    torch.testing.assert_close(outputs(model, batch), expected, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_and_neuron_subsets_equal_masking_the_rest(arch, seed):
    rng = random.Random(seed)
    dense = tiny_model(arch, "seq")
    heads = {i: sorted(rng.sample(range(4), rng.randint(1, 3))) for i in range(3)}
    ffn = {i: sorted(rng.sample(range(48), rng.randint(1, 47))) for i in range(3)}
    batch = random_batch(dense)
    pruned = clone(dense)
    prune_(pruned, heads=[heads[i] for i in range(3)], ffn=[ffn[i] for i in range(3)])
    mask_units_(dense, heads, ffn)
    torch.testing.assert_close(outputs(pruned, batch), outputs(dense, batch), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropping_layers_equals_skipping_them(arch, seed):
    rng = random.Random(seed)
    dense = tiny_model(arch, "seq", num_hidden_layers=4)
    kept = sorted(rng.sample(range(4), 2))
    batch = random_batch(dense)
    pruned = clone(dense)
    prune_(pruned, layers=kept)
    skip_layers_(dense, [i for i in range(4) if i not in kept])
    torch.testing.assert_close(outputs(pruned, batch), outputs(dense, batch), **TOL)
    assert pruned.config.num_hidden_layers == 2


def test_layers_count_keeps_the_bottom_layers(seed):
    dense = tiny_model("bert", "base", num_hidden_layers=4)
    batch = random_batch(dense)
    hidden = dense(**batch, output_hidden_states=True).hidden_states
    pruned = prune_(clone(dense), layers=2)
    torch.testing.assert_close(pruned(**batch).last_hidden_state, hidden[2], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_factorization_reproduces_the_table_and_truncation_equals_a_fresh_svd(arch, seed):
    model = tiny_model(arch, "base", vocab_size=120, hidden_size=48, num_attention_heads=4)
    table = model.embeddings.word_embeddings.weight.detach().clone()
    full = prune_(clone(model), embedding_rank=48).embeddings.word_embeddings
    assert isinstance(full, FactorizedEmbedding) and full.rank == 48
    torch.testing.assert_close(full.full_weight(), table, rtol=1e-5, atol=1e-6)
    assert full.padding_idx == model.config.pad_token_id

    # Truncating an existing factorization keeps its leading directions: the same table as a
    # first factorization at the lower rank (the best rank-r approximation, by Eckart-Young).
    truncated = prune_(clone(model), embedding_rank=30)
    prune_(truncated, embedding_rank=12)
    fresh = prune_(clone(model), embedding_rank=12)
    emb_t = truncated.embeddings.word_embeddings
    emb_f = fresh.embeddings.word_embeddings
    assert emb_t.rank == 12
    torch.testing.assert_close(emb_t.full_weight(), emb_f.full_weight(), rtol=1e-4, atol=1e-5)
    s = torch.linalg.svdvals(table.double())
    err = (emb_f.full_weight().double() - table.double()).norm()
    torch.testing.assert_close(err, s[12:].norm(), rtol=1e-4, atol=1e-6)


def test_pruning_twice_composes(seed):
    dense = tiny_model("mpnet", "seq")
    batch = random_batch(dense)
    once = prune_(
        clone(dense), heads=[[0, 2, 3], [1, 3], [0, 1, 2, 3]], ffn=[list(range(0, 48, 2))] * 3
    )
    # Keep, of what is left, heads [1, 2] / [0] / [3] and neurons 0, 3, 6, ...: originals below.
    prune_(once, heads=[[1, 2], [0], [3]], ffn=[list(range(0, 24, 3))] * 3)
    direct = {0: [2, 3], 1: [1], 2: [3]}
    neurons = {i: list(range(0, 48, 6)) for i in range(3)}
    assert once.config.relative_attention_heads_per_layer == [direct[i] for i in range(3)]
    mask_units_(dense, direct, neurons)
    torch.testing.assert_close(outputs(once, batch), outputs(dense, batch), **TOL)


def test_pruned_parameters_are_new_leaves_and_the_rest_untouched(seed):
    model = tiny_model("bert", "seq")
    adapter = adapter_for(model)
    layer = adapter.layer_list(model)[0]
    ln_before = layer.output.LayerNorm.weight
    o_before = adapter.attention_linears(layer)[3]
    prune_(model, heads=[[1, 2], [0, 1, 2, 3], [3]])
    o_after = adapter.attention_linears(layer)[3]
    assert o_after is o_before  # same module object, new parameter
    assert o_after.in_features == 16 and o_after.weight.shape == (32, 16)
    assert layer.output.LayerNorm.weight is ln_before
    assert all(p.is_leaf and p.requires_grad for p in model.parameters())
    assert layer.attention.self.num_attention_heads == 2
