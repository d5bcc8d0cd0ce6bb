"""Where each supported architecture keeps the pieces that compression touches.

An :class:`ArchitectureAdapter` names, as dotted attribute paths, the Q/K/V/O projections and the
two FFN projections inside one Transformer layer, the layer list, and the word embedding. All
surgery in :mod:`rosita_fast.compress` goes through an adapter, so supporting a new BERT-like
architecture means writing one adapter (plus its student classes) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ArchitectureAdapter",
    "UnsupportedArchitectureError",
    "adapter_for",
    "register_adapter",
    "registered_adapters",
]


class UnsupportedArchitectureError(ValueError):
    """Raised when a model or config belongs to no registered architecture adapter."""


@dataclass
class ArchitectureAdapter:
    """Attribute paths of one architecture, plus the student classes that mirror its dense classes.

    Paths under "layer" are relative to one Transformer layer; ``layers`` and ``word_embeddings``
    are relative to the base model (``model.base_model``).
    """

    model_type: str
    """``model_type`` of the dense Hugging Face config, e.g. ``"bert"``."""
    student_model_type: str
    """``model_type`` of the student config registered with ``AutoConfig``."""
    query: str
    key: str
    value: str
    attention_output: str
    """The projection whose input columns are the concatenated per-head context vectors."""
    self_attention: str
    """The module that owns the per-head attributes (``num_attention_heads``, ``all_head_size``)."""
    ffn_input: str = "intermediate.dense"
    ffn_output: str = "output.dense"
    layers: str = "encoder.layer"
    word_embeddings: str = "embeddings.word_embeddings"
    attention_block: str = "attention"
    """The module that runs self-attention, output projection, residual add and LayerNorm."""
    attention_layernorm: str = "attention.output.LayerNorm"
    ffn_layernorm: str = "output.LayerNorm"
    embeddings: str = "embeddings"
    """The embeddings module (relative to the base model)."""
    layer_style: str = "bert"
    """How the stock encoder calls a layer (``"bert"``: returns a tensor; ``"mpnet"``: takes the
    position bias and returns a tuple); the fast layer answers the same way."""
    student_config_class: type | None = None
    student_classes: dict[type, type] = field(default_factory=dict)
    """Dense model class -> student model class with the same head."""

    # ---- navigation -------------------------------------------------------------------------

    def base_model(self, model: nn.Module) -> nn.Module:
        """Return the encoder body (the module that owns embeddings and layers)."""
        return getattr(model, "base_model", model)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """Return the ``nn.ModuleList`` of Transformer layers."""
        return self.base_model(model).get_submodule(self.layers)

    def attention_linears(
        self, layer: nn.Module
    ) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """Return the (Q, K, V, O) projections of one layer."""
        return tuple(
            layer.get_submodule(p)
            for p in (self.query, self.key, self.value, self.attention_output)
        )

    def ffn_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        """Return the (input, output) projections of one layer's FFN."""
        return layer.get_submodule(self.ffn_input), layer.get_submodule(self.ffn_output)

    def word_embedding_owner(self, model: nn.Module) -> tuple[nn.Module, str]:
        """Return (parent module, attribute name) of the word embedding, for replacing it."""
        parent, _, name = self.word_embeddings.rpartition(".")
        base = self.base_model(model)
        return (base.get_submodule(parent) if parent else base), name

    def head_size(self, config) -> int:
        """Width of one attention head; fixed by the dense reference shape, never pruned."""
        return config.hidden_size // config.num_attention_heads

    # ---- per-architecture hooks (override where an architecture needs more) -----------------

    def set_heads(self, layer: nn.Module, kept: list[int], config) -> None:
        """Record on the attention module that the layer now runs ``len(kept)`` heads.

        ``kept`` are indices into the layer's heads *before* this change. BERT-like attention
        reshapes with ``-1`` heads, so only the bookkeeping attributes need updating.
        """
        attn = layer.get_submodule(self.self_attention)
        attn.num_attention_heads = len(kept)
        attn.all_head_size = len(kept) * self.head_size(config)

    def init_layer(self, layer: nn.Module, index: int, config) -> None:
        """Set a freshly built student layer's per-head attributes from ``config``."""
        attn = layer.get_submodule(self.self_attention)
        attn.num_attention_heads = config.layer_heads()[index]
        attn.all_head_size = attn.num_attention_heads * self.head_size(config)

    def extra_layer_config(self, layers: list[nn.Module], config) -> dict:
        """Per-layer config fields beyond head counts and FFN sizes (none for BERT-like models)."""
        return {}

    def student_class(self, model_class: type) -> type:
        """Return the student class for a dense (or already student) model class."""
        if model_class in self.student_classes.values():
            return model_class
        try:
            return self.student_classes[model_class]
        except KeyError:
            supported = ", ".join(sorted(c.__name__ for c in self.student_classes))
            raise UnsupportedArchitectureError(
                f"{model_class.__name__} has no student class; supported heads: {supported}"
            ) from None


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Register an adapter under both its dense and its student ``model_type``."""
    _ADAPTERS[adapter.model_type] = adapter
    _ADAPTERS[adapter.student_model_type] = adapter
    return adapter


def registered_adapters() -> list[ArchitectureAdapter]:
    """Return every registered adapter once."""
    return list({id(a): a for a in _ADAPTERS.values()}.values())


def adapter_for(model_or_config) -> ArchitectureAdapter:
    """Return the adapter for a model or config, by its ``config.model_type``.

    Raises:
        UnsupportedArchitectureError: no adapter is registered for that model type.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        known = ", ".join(sorted(a.model_type for a in registered_adapters()))
        raise UnsupportedArchitectureError(
            f"no compression adapter for model_type {model_type!r} "
            f"({type(model_or_config).__name__}); supported: {known}"
        ) from None
