"""The engine on the real pretrained encoders available offline (MiniLM: BERT; MPNet)."""

from __future__ import annotations

import random

import torch
from conftest_compress import mask_units_
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from rosita_fast.compress import compress, count_parameters, prune_, prune_vocabulary_, summary
from rosita_fast.models import minilm_path, model_layout, mpnet_path

SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "an utterly charming and hilarious film that reminded me of the best of 1930s screwball.",
    "it 's a lousy one at that .",
    "the performances are uniformly excellent , and the direction is assured .",
    "too long , too slow and too self-indulgent by half .",
    "one of the most exhilarating experiences i have had at the movies this year",
    "unfunny and lacking any sense of commitment to or affection for its characters",
]


def test_minilm_one_step_compression_with_vocabulary_round_trips(tmp_path, seed):
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    model.train()  # ROSITA scores with dropout on
    before = count_parameters(model)
    batches = []
    for start in (0, 4):
        batch = dict(tokenizer(SENTENCES[start : start + 4], padding=True, return_tensors="pt"))
        batch["labels"] = torch.randint(0, 2, (4,))
        batches.append(batch)
    compress(model, layers=4, heads=2, ffn=256, embedding_rank=64, batches=batches)
    model.eval()
    new_tokenizer = prune_vocabulary_(model, tokenizer, SENTENCES, output_dir=tmp_path)
    layout = model_layout(model)
    assert layout.heads == [2] * 4 and layout.intermediate_sizes == [256] * 4
    assert layout.embedding_rank == 64 and layout.vocab_size == len(new_tokenizer) < 200
    # Per layer: Q/K/V/O at 2 heads of 32, FFN 256, two LayerNorms (hidden 384).
    per_layer = (
        3 * (384 * 64 + 64) + (64 * 384 + 384) + (384 * 256 + 256) + (256 * 384 + 384) + 1536
    )
    embeddings = layout.vocab_size * 64 + 64 * 384 + 512 * 384 + 2 * 384 + 768
    head = (384 * 384 + 384) + (384 * 2 + 2)  # pooler + classifier
    assert count_parameters(model) == 4 * per_layer + embeddings + head < before / 14
    assert "vocab" in summary(model)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = loaded_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_mpnet_two_layer_truncation_is_exact_and_round_trips(tmp_path, seed):
    path = str(mpnet_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = dense(**batch, output_hidden_states=True).hidden_states
    prune_(dense, layers=2)  # a fast stand-in for the 12-layer model: the real weights of 2 layers
    with torch.no_grad():
        torch.testing.assert_close(dense(**batch).last_hidden_state, hidden[2], rtol=0, atol=0)

    rng = random.Random(seed)
    heads = {i: sorted(rng.sample(range(12), rng.randint(1, 11))) for i in range(2)}
    ffn = {i: sorted(rng.sample(range(3072), rng.randint(1, 3071))) for i in range(2)}
    student = AutoModel.from_config(dense.config)
    student.load_state_dict(dense.state_dict())
    prune_(student.eval(), heads=[heads[0], heads[1]], ffn=[ffn[0], ffn[1]])
    assert student.config.relative_attention_heads_per_layer == [heads[0], heads[1]]
    mask_units_(dense, heads, ffn)
    with torch.no_grad():
        expected = dense(**batch).last_hidden_state
        got = student(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    student.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, got)
