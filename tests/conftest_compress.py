"""Helpers shared by the compression-engine and student-model tests (tiny random models)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    MPNetConfig,
    MPNetForMaskedLM,
    MPNetForSequenceClassification,
    MPNetModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

import rosita_fast  # noqa: F401  (registers the student classes with the Auto classes)
from rosita_fast.models import adapter_for

ARCHS = ("bert", "roberta", "mpnet")
HEADS = ("base", "seq", "mlm")

_CLASSES = {
    "bert": (
        BertConfig,
        {"base": BertModel, "seq": BertForSequenceClassification, "mlm": BertForMaskedLM},
    ),
    "roberta": (
        RobertaConfig,
        {"base": RobertaModel, "seq": RobertaForSequenceClassification, "mlm": RobertaForMaskedLM},
    ),
    "mpnet": (
        MPNetConfig,
        {"base": MPNetModel, "seq": MPNetForSequenceClassification, "mlm": MPNetForMaskedLM},
    ),
}

VOCAB = 80
HIDDEN = 32
NUM_HEADS = 4  # head size 8
FFN = 48
LAYERS = 3


def tiny_config(arch: str, **overrides):
    """A small dense config of ``arch``: 3 layers, hidden 32, 4 heads of 8, FFN 48, vocab 80."""
    config_cls, _ = _CLASSES[arch]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        num_labels=3,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(arch: str, head: str = "seq", **overrides) -> nn.Module:
    """A randomly initialized dense model in eval mode (biases and LayerNorms randomized too)."""
    _, classes = _CLASSES[arch]
    model = classes[head](tiny_config(arch, **overrides)).eval()
    with torch.no_grad():
        # HF init zeroes biases and sets LayerNorm to identity; random values make slicing
        # mistakes (a bias left unsliced, a wrong column) visible in the outputs.
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def random_batch(model: nn.Module, batch: int = 3, seq: int = 11) -> dict[str, torch.Tensor]:
    """Random ids that avoid the special low ids, with the last row padded."""
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id
    ids[-1, seq - 3 :] = pad
    mask[-1, seq - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output: logits if it has a head, else the last hidden state."""
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def clone(model: nn.Module) -> nn.Module:
    """An independent deep copy."""
    return copy.deepcopy(model)


def mask_units_(model: nn.Module, heads: dict[int, list[int]], ffn: dict[int, list[int]]) -> list:
    """Zero the context vectors of dropped heads / activations of dropped FFN neurons via hooks.

    ``heads[l]`` / ``ffn[l]`` are the units layer ``l`` *keeps*. Returns the hook handles.
    """
    adapter = adapter_for(model)
    head_size = adapter.head_size(model.config)
    handles = []
    for index, layer in enumerate(adapter.layer_list(model)):
        o = adapter.attention_linears(layer)[3]
        ffn_out = adapter.ffn_linears(layer)[1]
        if index in heads:
            keep = torch.zeros(o.in_features)
            for h in heads[index]:
                keep[h * head_size : (h + 1) * head_size] = 1
            handles.append(o.register_forward_pre_hook(lambda m, a, k=keep: (a[0] * k,)))
        if index in ffn:
            keep = torch.zeros(ffn_out.in_features)
            keep[ffn[index]] = 1
            handles.append(ffn_out.register_forward_pre_hook(lambda m, a, k=keep: (a[0] * k,)))
    return handles


def skip_layers_(model: nn.Module, dropped: list[int]) -> list:
    """Make the given layers pass their input through unchanged (for layer-drop equivalence)."""
    adapter = adapter_for(model)
    handles = []

    def identity(module, args, out):
        return (args[0], *out[1:]) if isinstance(out, tuple) else args[0]

    for index in dropped:
        handles.append(adapter.layer_list(model)[index].register_forward_hook(identity))
    return handles


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, type]:
    """Everything a failed call must leave unchanged: tensors, config and class."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, model.config.to_dict(), type(model)


def assert_same_snapshot(model: nn.Module, snap) -> None:
    """Assert ``model`` still matches a :func:`snapshot`."""
    state, config, cls = snap
    assert type(model) is cls
    assert model.config.to_dict() == config
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
