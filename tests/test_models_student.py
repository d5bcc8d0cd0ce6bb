"""Student models are first-class Hugging Face models: per-layer shapes, Auto loading, exact."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest_compress import ARCHS, HEADS, outputs, random_batch, tiny_config, tiny_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
)

from rosita_fast.compress import count_parameters, prune_
from rosita_fast.models import (
    FactorizedEmbedding,
    RositaBertConfig,
    RositaBertModel,
    RositaMPNetConfig,
    RositaMPNetModel,
    UnsupportedArchitectureError,
    adapter_for,
    model_layout,
)

AUTO = {"base": AutoModel, "seq": AutoModelForSequenceClassification, "mlm": AutoModelForMaskedLM}


def _random_subset(n: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(n), rng.randint(1, n)))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_student_round_trips_bit_for_bit(arch, head, seed, tmp_path):
    rng = random.Random(seed)
    model = tiny_model(arch, head)
    kept_layers = sorted(rng.sample(range(3), 2))
    heads = [_random_subset(4, rng) for _ in kept_layers]
    ffn = [_random_subset(48, rng) for _ in kept_layers]
    prune_(model, layers=kept_layers, heads=heads, ffn=ffn, embedding_rank=rng.randint(2, 20))
    batch = random_batch(model)
    expected = outputs(model, batch)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"rosita_{arch}"
    assert saved["num_attention_heads_per_layer"] == [len(h) for h in heads]
    assert saved["intermediate_size_per_layer"] == [len(f) for f in ffn]
    assert saved["num_hidden_layers"] == 2
    assert list(tmp_path.glob("*.safetensors"))

    loaded, info = AUTO[head].from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(outputs(loaded, batch), expected)
    assert model_layout(loaded) == model_layout(model)


def test_reloaded_student_saves_and_loads_again(tmp_path, seed):
    model = tiny_model("mpnet", "mlm")
    prune_(
        model, heads=[[1, 3], [0], [0, 2, 3]], ffn=[[5, 9], list(range(48)), [7]], embedding_rank=9
    )
    model.save_pretrained(tmp_path / "a")
    first = AutoModelForMaskedLM.from_pretrained(tmp_path / "a").eval()
    first.save_pretrained(tmp_path / "b")
    second = AutoModelForMaskedLM.from_pretrained(tmp_path / "b").eval()
    batch = random_batch(model)
    assert torch.equal(outputs(second, batch), outputs(model, batch))
    assert second.config.relative_attention_heads_per_layer == [[1, 3], [0], [0, 2, 3]]


@pytest.mark.parametrize(
    "config_cls, model_cls",
    [(RositaBertConfig, RositaBertModel), (RositaMPNetConfig, RositaMPNetModel)],
)
def test_student_built_from_config_has_per_layer_shapes(config_cls, model_cls):
    extra = (
        {"relative_attention_heads_per_layer": [[3], [0, 1, 2]]}
        if config_cls is RositaMPNetConfig
        else {}
    )
    config = config_cls(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        num_attention_heads_per_layer=[1, 3],
        intermediate_size_per_layer=[100, 7],
        embedding_rank=12,
        **extra,
    )
    model = model_cls(config)
    adapter = adapter_for(model)
    layers = adapter.layer_list(model)
    for layer, heads, ffn in zip(layers, [1, 3], [100, 7], strict=True):
        q, k, v, o = adapter.attention_linears(layer)
        assert q.weight.shape == k.weight.shape == v.weight.shape == (heads * 16, 64)
        assert o.weight.shape == (64, heads * 16)
        ffn_in, ffn_out = adapter.ffn_linears(layer)
        assert ffn_in.weight.shape == (ffn, 64) and ffn_out.weight.shape == (64, ffn)
    emb = model.embeddings.word_embeddings
    assert isinstance(emb, FactorizedEmbedding) and emb.rank == 12
    # Rebuilt modules get Hugging Face init (normal, std 0.02; zero bias), not PyTorch's default
    # (uniform with bound 1/sqrt(fan_in) = 0.125 here).
    ffn_in = adapter.ffn_linears(layers[0])[0]
    assert 0.015 < ffn_in.weight.std().item() < 0.025
    assert torch.count_nonzero(ffn_in.bias) == 0
    assert 0.015 < emb.project.weight.std().item() < 0.025
    layout = model_layout(model)
    assert layout.heads == [1, 3] and layout.intermediate_sizes == [100, 7]
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_auto_classes_resolve_student_types():
    config = AutoConfig.for_model(
        "rosita_roberta",
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=8,
        vocab_size=40,
    )
    assert type(config).__name__ == "RositaRobertaConfig"
    model = AutoModelForSequenceClassification.from_config(config)
    assert type(model).__name__ == "RositaRobertaForSequenceClassification"
    # Dense types still resolve to the stock classes: nothing in transformers was patched.
    dense = AutoModel.from_config(tiny_config("bert"))
    assert type(dense).__name__ == "BertModel"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_attention_heads_per_layer": [2, 2, 2]}, "3 entries for 2 layers"),
        ({"intermediate_size_per_layer": [4, 0]}, "positive integers"),
        ({"embedding_rank": 65}, "embedding_rank"),
    ],
)
def test_invalid_student_config_is_rejected(fields, message):
    config = RositaBertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        vocab_size=50,
        **fields,
    )
    with pytest.raises(ValueError, match=message):
        RositaBertModel(config)


def test_unknown_architecture_has_no_adapter():
    model = DistilBertModel(
        DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=8)
    )
    with pytest.raises(UnsupportedArchitectureError, match="distilbert"):
        adapter_for(model)


def test_dense_model_loaded_from_disk_becomes_a_student_type(tmp_path, seed):
    tiny_model("bert", "seq").save_pretrained(tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    assert model.config.model_type == "bert"
    prune_(model, heads=[[0], [1], [2]])
    assert model.config.model_type == "rosita_bert"
    assert type(model.config).__name__ == "RositaBertConfig"
