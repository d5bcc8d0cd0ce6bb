"""MPNet: adapter and student classes (``model_type`` ``rosita_mpnet``).

MPNet differs from BERT in one way that matters for head pruning: the relative position bias is
one ``num_buckets x num_attention_heads`` table owned by the encoder and shared by every layer,
added per head to the attention scores. A pruned layer therefore has to remember *which* of the
shared bias heads its remaining heads were (``relative_attention_heads_per_layer`` in the config);
its attention module selects those columns of the shared bias. The shared table itself is kept
whole, so layers keep sharing it exactly as the dense model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    MPNetConfig,
    MPNetForMaskedLM,
    MPNetForSequenceClassification,
    MPNetModel,
)
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from .adapter import ArchitectureAdapter, register_adapter
from .student import StudentConfigFields, StudentModelMixin

__all__ = [
    "MPNET_ADAPTER",
    "MPNetHeadSubsetSelfAttention",
    "RositaMPNetConfig",
    "RositaMPNetForMaskedLM",
    "RositaMPNetForSequenceClassification",
    "RositaMPNetModel",
]


class MPNetHeadSubsetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention over a subset of the encoder's shared relative-bias heads.

    ``bias_heads[i]`` is the column of the shared position bias that this layer's head ``i`` adds.
    Instances are made by switching the class of an existing ``MPNetSelfAttention`` (see
    :meth:`set_bias_heads`), so the weights and their names are the stock ones.
    """

    bias_heads: tuple[int, ...] | None = None
    _bias_index: torch.Tensor | None = None

    def set_bias_heads(self, heads: list[int], total_heads: int) -> None:
        """Select the shared-bias columns of this layer's heads (identity costs nothing)."""
        heads = tuple(int(h) for h in heads)
        self.bias_heads = None if heads == tuple(range(total_heads)) else heads
        self._bias_index = None

    def forward(self, hidden_states, attention_mask=None, position_bias=None, **kwargs):
        """Stock MPNet attention, with the shared position bias narrowed to this layer's heads."""
        if position_bias is not None and self.bias_heads is not None:
            index = self._bias_index
            # Built lazily on the bias's device and reused: no host-to-device copy per forward.
            if index is None or index.device != position_bias.device:
                index = torch.tensor(self.bias_heads, device=position_bias.device)
                self._bias_index = index
            position_bias = position_bias.index_select(1, index)
        return super().forward(hidden_states, attention_mask, position_bias, **kwargs)


@dataclass(kw_only=True, repr=False)
class _MPNetStudentFields:
    relative_attention_heads_per_layer: list[list[int]] | None = None
    """Per layer, the shared relative-bias head of each of its heads (``None``: all, in order)."""


class RositaMPNetConfig(_MPNetStudentFields, StudentConfigFields, MPNetConfig):
    """MPNet config with per-layer heads, per-layer FFN sizes and an optional embedding rank."""

    model_type = "rosita_mpnet"


class RositaMPNetModel(StudentModelMixin, MPNetModel):
    """MPNet encoder with per-layer shapes (see :class:`RositaMPNetConfig`)."""

    config_class = RositaMPNetConfig


class RositaMPNetForSequenceClassification(StudentModelMixin, MPNetForSequenceClassification):
    """MPNet sequence classifier with per-layer shapes."""

    config_class = RositaMPNetConfig


class RositaMPNetForMaskedLM(StudentModelMixin, MPNetForMaskedLM):
    """MPNet masked-LM with per-layer shapes; the decoder unties from a factorized embedding."""

    config_class = RositaMPNetConfig


@dataclass
class MPNetAdapter(ArchitectureAdapter):
    """MPNet paths, plus bookkeeping of which shared bias head each kept head uses."""

    def _attention(self, layer: nn.Module) -> MPNetHeadSubsetSelfAttention:
        attn = layer.get_submodule(self.self_attention)
        if not isinstance(attn, MPNetHeadSubsetSelfAttention):
            attn.__class__ = MPNetHeadSubsetSelfAttention
        return attn

    def _current_bias_heads(self, attn: MPNetHeadSubsetSelfAttention, config) -> list[int]:
        if attn.bias_heads is None:
            return list(range(config.num_attention_heads))
        return list(attn.bias_heads)

    def init_layer(self, layer: nn.Module, index: int, config) -> None:
        super().init_layer(layer, index, config)
        per_layer = getattr(config, "relative_attention_heads_per_layer", None)
        heads = per_layer[index] if per_layer is not None else range(config.num_attention_heads)
        if len(heads) != config.layer_heads()[index]:
            raise ValueError(
                f"relative_attention_heads_per_layer[{index}] lists {len(heads)} heads, the layer "
                f"has {config.layer_heads()[index]}"
            )
        self._attention(layer).set_bias_heads(list(heads), config.num_attention_heads)

    def set_heads(self, layer: nn.Module, kept: list[int], config) -> None:
        attn = self._attention(layer)
        previous = self._current_bias_heads(attn, config)
        super().set_heads(layer, kept, config)
        attn.set_bias_heads([previous[i] for i in kept], config.num_attention_heads)

    def extra_layer_config(self, layers: list[nn.Module], config) -> dict:
        per_layer = [
            getattr(layer.get_submodule(self.self_attention), "bias_heads", None)
            for layer in layers
        ]
        if all(heads is None for heads in per_layer):
            return {"relative_attention_heads_per_layer": None}
        # An identity-selection layer has all reference heads; written out so the list is whole.
        full = list(range(config.num_attention_heads))
        return {
            "relative_attention_heads_per_layer": [
                list(heads) if heads is not None else full for heads in per_layer
            ]
        }


MPNET_ADAPTER = register_adapter(
    MPNetAdapter(
        model_type="mpnet",
        student_model_type=RositaMPNetConfig.model_type,
        query="attention.attn.q",
        key="attention.attn.k",
        value="attention.attn.v",
        attention_output="attention.attn.o",
        self_attention="attention.attn",
        attention_layernorm="attention.LayerNorm",
        layer_style="mpnet",
        student_config_class=RositaMPNetConfig,
        student_classes={
            MPNetModel: RositaMPNetModel,
            MPNetForSequenceClassification: RositaMPNetForSequenceClassification,
            MPNetForMaskedLM: RositaMPNetForMaskedLM,
        },
    )
)
