"""Parameter counts (the ROSITA shape from a BERT-base config) and the summary table."""

from __future__ import annotations

import torch
from conftest_compress import tiny_model
from transformers import BertConfig, BertForSequenceClassification, BertModel

from rosita_fast.compress import count_parameters, prune_, summary
from rosita_fast.models import RositaBertConfig, RositaBertForSequenceClassification


def _on_meta(cls, config):
    # BERT-base sized shapes without allocating weights: counts need shapes only.
    with torch.device("meta"):
        return cls(config)


def test_rosita_shape_from_a_bert_base_config_has_14_473_216_parameters():
    config = RositaBertConfig(
        num_hidden_layers=8,
        num_attention_heads_per_layer=[2] * 8,
        intermediate_size_per_layer=[512] * 8,
        embedding_rank=128,
        num_labels=2,
    )
    student = _on_meta(RositaBertForSequenceClassification, config)
    assert count_parameters(student, base_only=True) == 14_473_216
    assert count_parameters(student) == 14_474_754  # + the 2-way classifier
    assert count_parameters(_on_meta(BertModel, BertConfig())) == 109_482_240
    assert count_parameters(_on_meta(BertModel, BertConfig(num_hidden_layers=8))) == 81_130_752


def test_pruning_a_bert_base_shape_reaches_the_rosita_count():
    # The same shape, reached by pruning (explicit indices: meta tensors carry no scores).
    teacher = _on_meta(BertForSequenceClassification, BertConfig(num_labels=2))
    with torch.device("meta"):
        prune_(teacher, layers=8, heads=[[0, 1]] * 8, ffn=[list(range(512))] * 8)
    assert (
        count_parameters(teacher, base_only=True)
        == 14_473_216 - 30522 * 128 - 128 * 768 + 30522 * 768
    )


def test_trainable_only_and_tied_weights_count_once(seed):
    model = tiny_model("bert", "mlm")
    total = count_parameters(model)
    assert total == sum(p.numel() for p in set(model.parameters()))
    model.bert.embeddings.requires_grad_(False)
    frozen = sum(p.numel() for p in model.bert.embeddings.parameters())
    assert count_parameters(model, trainable_only=True) == total - frozen


def test_summary_lists_every_layer_and_adds_up(seed):
    model = tiny_model("mpnet", "seq")
    prune_(
        model,
        layers=[0, 2],
        heads=[[1], [0, 3]],
        ffn=[[4, 5, 6], list(range(20))],
        embedding_rank=6,
    )
    text = summary(model)
    lines = text.splitlines()
    assert lines[0].startswith("RositaMPNetForSequenceClassification (rosita_mpnet): 2 layers")
    layer0, layer1 = lines[2].split(), lines[3].split()
    assert layer0[:3] == ["0", "1", "3"] and layer1[:3] == ["1", "2", "20"]
    # Layer 0: Q/K/V 3*(32*8+8), O 8*32+32, FFN 32*3+3 + 3*32+32, two LayerNorms 2*64.
    assert int(layer0[3].replace(",", "")) == 3 * 264 + 288 + 99 + 128 + 128
    assert "vocab 80, rank 6" in text
    numbers = [int(line.split()[-1].replace(",", "")) for line in lines[2:]]
    assert sum(numbers[:-1]) == numbers[-1] == count_parameters(model)
