"""``FastTransformerLayer``: one encoder layer of a supported Hugging Face model on the fused ops.

It replaces the stock layer object in ``encoder.layer`` and keeps the stock child names
(``attention``, ``intermediate``, ``output``): the attention block becomes a
:class:`PrunedSelfAttention` that adopts the stock children, and the FFN runs as a
:class:`FusedFFN` over the stock ``intermediate``/``output`` modules. State-dict keys, adapter paths
(pruning) and ``save_pretrained`` output are therefore unchanged.

The layer answers the stock encoder's call convention of its architecture: BERT/RoBERTa layers
take ``(hidden_states, attention_mask, encoder_hidden_states, ...)`` and return a tensor; MPNet
layers take ``(hidden_states, attention_mask, position_bias, ...)`` and return a tuple.
"""

from __future__ import annotations

import torch
from torch import nn

from rosita_fast.modules._mask import key_padding_mask
from rosita_fast.modules.attention import PrunedSelfAttention
from rosita_fast.modules.ffn import FusedFFN

__all__ = ["FastTransformerLayer"]

LAYER_STYLES = ("bert", "mpnet")

# Per stock layer class, a subclass of (FastTransformerLayer, stock class): Hugging Face finds the
# layers whose outputs it records (``output_hidden_states``) with isinstance checks on the stock
# class, so the fast layer must still be one. Only the stock class's identity is inherited:
# FastTransformerLayer comes first in the MRO and never calls the stock __init__ or forward.
_FAST_CLASSES: dict[type, type] = {}


def _fast_class(stock: type) -> type:
    if issubclass(stock, FastTransformerLayer):
        return stock
    cls = _FAST_CLASSES.get(stock)
    if cls is None:
        name = f"Fast{stock.__name__}"
        cls = type(name, (FastTransformerLayer, stock), {"__module__": __name__,
                                                         "__qualname__": name})
        globals()[name] = cls  # picklable by name
        _FAST_CLASSES[stock] = cls
    return cls


class FastTransformerLayer(nn.Module):
    """A Transformer encoder layer: :class:`PrunedSelfAttention` then :class:`FusedFFN`.

    Build with :meth:`from_layer`, which returns an instance of a subclass that is also an
    instance of the stock layer class (so Hugging Face's ``output_hidden_states`` recording finds
    it). Unsupported on purpose (``ValueError`` at build or call): decoder layers with
    cross-attention, caches, and returning attention probabilities (the fused attention never
    forms them).

    ``first_token_only`` (default False): return only the first position's output, ``[B, 1,
    hidden]``; every position still serves as a key. Set it through
    :func:`rosita_fast.first_token_output`, which checks that nothing reads the other positions.
    """

    def __init__(self, attention: PrunedSelfAttention, ffn: FusedFFN, style: str) -> None:
        nn.Module.__init__(self)  # not the stock layer's __init__ (see _fast_class)
        if style not in LAYER_STYLES:
            raise ValueError(f"FastTransformerLayer: style must be one of {LAYER_STYLES}")
        self.attention = attention
        self.intermediate = ffn.intermediate
        self.output = ffn.output
        # The FFN wrapper shares the two children above; it is not registered a second time, so
        # every parameter keeps exactly one (stock) name.
        object.__setattr__(self, "_ffn", ffn)
        self.style = style
        # Output only the first position (rosita_fast.first_token_output sets it on a model's
        # last layer while only a first-token classifier reads the encoder's output).
        self.first_token_only = False

    @classmethod
    def from_layer(cls, layer: nn.Module, adapter, config) -> FastTransformerLayer:
        """Build from one stock (or student) layer through the model's ``adapter``."""
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("fast modules support encoders only (this config is a decoder)")
        head_size = adapter.head_size(config)
        if head_size % 8 or not 8 <= head_size <= 128:
            raise ValueError(
                f"fast attention needs a head size that is a multiple of 8 up to 128, got "
                f"{head_size}"
            )
        return _fast_class(type(layer))(
            PrunedSelfAttention.from_block(layer, adapter, config),
            FusedFFN.from_layer(layer, adapter, config),
            adapter.layer_style,
        )

    @property
    def ffn(self) -> FusedFFN:
        """The FFN of this layer (a view over ``intermediate`` and ``output``)."""
        return self._ffn

    def fused_paths(self) -> dict[str, bool]:
        """Which parts of the layer run fused in the current mode."""
        paths = {f"attention.{k}": v for k, v in self.attention.fused_paths().items()}
        paths.update({f"ffn.{k}": v for k, v in self._ffn.fused_paths(self.training).items()})
        return paths

    def run(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's output for a ``[B, Lk]`` bool key padding mask (or ``None``): ``[B, L,
        hidden]``, or ``[B, 1, hidden]`` (the first position only) while ``first_token_only``."""
        attended = self.attention(hidden_states, key_mask, position_bias,
                                  1 if self.first_token_only else None)
        return self._ffn.run(attended, self.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
        """The stock layer's call convention (see the module docstring)."""
        if kwargs.get("output_attentions"):
            raise ValueError(
                "fast modules do not return attention probabilities; run the stock model for "
                "output_attentions=True"
            )
        key_mask = key_padding_mask(attention_mask)
        if self.style == "mpnet":
            position_bias = args[0] if args else kwargs.get("position_bias")
            return (self.run(hidden_states, key_mask, position_bias),)
        encoder_states = args[0] if args else kwargs.get("encoder_hidden_states")
        if encoder_states is not None or kwargs.get("cache") is not None:
            raise ValueError("fast modules support encoder self-attention only (no "
                             "cross-attention, no cache)")
        return self.run(hidden_states, key_mask)
