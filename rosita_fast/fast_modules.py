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
from dataclasses import dataclass

from torch import nn

from rosita_fast.modules.embedding import FusedEmbedding
from rosita_fast.modules.layer import FastTransformerLayer
from rosita_fast.swap import SwapConfig, register_swap_handler

__all__ = ["FastModulesConfig", "fast_targets", "is_fast", "stock_copy"]


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
