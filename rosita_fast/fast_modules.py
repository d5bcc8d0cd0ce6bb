"""``FastModulesConfig``: the swap that runs a whole BERT-family model on rosita_fast's kernels.

``rosita_fast.swap_(model, FastModulesConfig())`` replaces, in place, every encoder layer with a
:class:`~rosita_fast.modules.FastTransformerLayer` (a :class:`PrunedSelfAttention` and a
:class:`FusedFFN` over the stock children) and the embeddings with a :class:`FusedEmbedding`. It
works on stock Hugging Face models and on students (pruned, non-uniform heads and FFN widths,
factorized embedding) of every architecture with a model adapter (BERT, RoBERTa, MPNet). Parameter
objects and names are untouched: ``state_dict`` keys, ``save_pretrained`` output, optimizer state
and the compression engine's adapter paths (``prune_``, ``PruningSchedule``) keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from torch import nn

from rosita_fast.modules.embedding import FusedEmbedding
from rosita_fast.modules.layer import FastTransformerLayer
from rosita_fast.swap import SwapConfig, register_swap_handler

__all__ = ["FastModulesConfig", "can_output_first_token", "fast_targets", "first_token_output",
           "first_token_reader", "is_fast", "logits_context", "stock_copy"]


@dataclass
class FastModulesConfig(SwapConfig):
    """Swap a model's encoder layers (``layers``) and embeddings (``embeddings``) for fast modules.

    Use ``filter_fn`` of :func:`rosita_fast.swap_` to pick single layers by name.
    """

    layers: bool = True
    embeddings: bool = True

    def __post_init__(self) -> None:
        if not (self.layers or self.embeddings):
            raise ValueError("FastModulesConfig: nothing to swap (layers and embeddings are off)")


def fast_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The stock layers and embeddings of ``model`` (already-fast ones are skipped)."""
    from rosita_fast.models.adapter import adapter_for

    adapter = adapter_for(model)
    base = adapter.base_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    embeddings = base.get_submodule(adapter.embeddings)
    if not isinstance(embeddings, FusedEmbedding):
        yield names[id(embeddings)], embeddings
    for layer in adapter.layer_list(model):
        if not isinstance(layer, FastTransformerLayer):
            yield names[id(layer)], layer


def stock_copy(model: nn.Module) -> nn.Module:
    """A copy of a (swapped) Hugging Face model on the stock modules: the same class built from
    the same config, with the same weights, mode, device and dtype (the way back from
    :class:`FastModulesConfig`, e.g. for ONNX export)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "from_pretrained"):
        raise TypeError(f"stock_copy needs a Hugging Face model, got {type(model).__name__}")
    param = next(model.parameters())
    stock = type(model)(config).to(device=param.device, dtype=param.dtype)
    stock.load_state_dict(model.state_dict())
    return stock.train(model.training)


def is_fast(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a fast layer or fused embedding."""
    return any(isinstance(m, FastTransformerLayer | FusedEmbedding) for m in model.modules())


def first_token_reader(model: nn.Module) -> bool:
    """Whether ``model``'s head reads only the first position of the encoder's last layer: the
    sequence classifiers of BERT, RoBERTa and MPNet (and their students), whose pooler or
    classification head takes ``hidden_states[:, 0]``."""
    from transformers import (
        BertForSequenceClassification,
        MPNetForSequenceClassification,
        RobertaForSequenceClassification,
    )

    return isinstance(model, BertForSequenceClassification | RobertaForSequenceClassification
                      | MPNetForSequenceClassification)


def _last_layer(model: nn.Module) -> nn.Module | None:
    from rosita_fast.models.adapter import adapter_for

    try:
        layers = adapter_for(model).layer_list(model)
    except (AttributeError, TypeError, ValueError):
        return None
    return layers[-1] if len(layers) else None


def can_output_first_token(model: nn.Module) -> bool:
    """Whether :func:`first_token_output` applies to ``model``: a first-token sequence classifier
    (:func:`first_token_reader`) whose last encoder layer is a fast layer."""
    return first_token_reader(model) and isinstance(_last_layer(model), FastTransformerLayer)


def logits_context(model: nn.Module) -> AbstractContextManager:
    """For a forward pass whose caller reads only the logits: :func:`first_token_output` where
    it applies (:func:`can_output_first_token`), else a context that changes nothing."""
    return first_token_output(model) if can_output_first_token(model) else nullcontext()


@contextmanager
def first_token_output(model: nn.Module) -> Iterator[None]:
    """Within the block, the last encoder layer of a fast ``model`` computes the first position
    only: its keys and values still come from every position, but its queries, attention output
    and FFN run for one row per sequence instead of ``L``, so the logits are the same (to
    rounding) at a fraction of that layer's cost. For the logits of a sequence classifier; the
    encoder's ``last_hidden_state`` is ``[B, 1, hidden]`` meanwhile, so do not ask for hidden
    states (their last entry would be that) inside the block.

    Raises ``TypeError`` when ``model``'s head reads more than the first token
    (:func:`first_token_reader`) and ``ValueError`` when its last layer is not a fast layer
    (swap it first with :class:`FastModulesConfig`).
    """
    if not first_token_reader(model):
        raise TypeError(
            f"first_token_output: {type(model).__name__} may read more than the first token; "
            "only BERT/RoBERTa/MPNet sequence classifiers are supported"
        )
    last = _last_layer(model)
    if not isinstance(last, FastTransformerLayer):
        raise ValueError("first_token_output: the model's last layer is not a fast layer; swap "
                         "it with rosita_fast.swap_(model, FastModulesConfig()) first")
    before = last.first_token_only
    last.first_token_only = True
    try:
        yield
    finally:
        last.first_token_only = before


def _reinstall_output_recording(model: nn.Module, config: FastModulesConfig) -> None:
    # Hugging Face installs its output-recording hooks (output_hidden_states) once per model, on
    # the layer objects of that moment; the swapped-in layers need them too.
    for module in model.modules():
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


@register_swap_handler(FastModulesConfig, targets=fast_targets, needs_model=True,
                       finalize=_reinstall_output_recording)
def _swap_fast(module: nn.Module, config: FastModulesConfig, name: str, model: nn.Module):
    from rosita_fast.models.adapter import adapter_for

    adapter = adapter_for(model)
    base = adapter.base_model(model)
    if module is base.get_submodule(adapter.embeddings):
        return FusedEmbedding(module) if config.embeddings else module
    if not config.layers:
        return module
    return FastTransformerLayer.from_layer(module, adapter, model.config)
