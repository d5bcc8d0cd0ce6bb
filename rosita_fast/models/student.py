"""Student models: dense Hugging Face encoders whose layers need not share one shape.

A student config is the dense config plus per-layer fields (:class:`StudentConfigFields`); a
student model class is the dense class plus :class:`StudentModelMixin`, which rebuilds each layer's
projections at the sizes the config records. ``num_attention_heads`` and ``intermediate_size``
keep their dense (reference) values: the head width is still ``hidden_size /
num_attention_heads``, exactly as in the teacher, while the per-layer lists say how many heads and
FFN neurons each layer actually has.

The module structure (and therefore every state-dict key) is the dense one, so a student
checkpoint is an ordinary safetensors file of a smaller BERT; loading goes through the stock
``from_pretrained`` once the student classes are registered with the Auto classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapter import ArchitectureAdapter, adapter_for
from .factorized_embedding import FactorizedEmbedding

__all__ = [
    "ModelLayout",
    "StudentConfigFields",
    "StudentModelMixin",
    "convert_to_student_",
    "model_layout",
    "untie_factorized_embedding_",
    "validate_student_config",
]


@dataclass(kw_only=True, repr=False)
class StudentConfigFields:
    """Per-layer shape fields shared by every student config (``None`` means "dense value")."""

    num_attention_heads_per_layer: list[int] | None = None
    """Attention heads in each layer; head width stays ``hidden_size // num_attention_heads``."""
    intermediate_size_per_layer: list[int] | None = None
    """FFN neurons in each layer."""
    embedding_rank: int | None = None
    """Rank ``E`` of the factorized word embedding, or ``None`` for a dense table."""

    def layer_heads(self) -> list[int]:
        """Heads per layer, filling in the dense value where no list is recorded."""
        heads = self.num_attention_heads_per_layer
        return (
            list(heads)
            if heads is not None
            else [self.num_attention_heads] * self.num_hidden_layers
        )

    def layer_intermediate_sizes(self) -> list[int]:
        """FFN neurons per layer, filling in the dense value where no list is recorded."""
        sizes = self.intermediate_size_per_layer
        return (
            list(sizes) if sizes is not None else [self.intermediate_size] * self.num_hidden_layers
        )


def validate_student_config(config) -> None:
    """Raise ``ValueError`` if the per-layer fields do not describe a buildable model."""
    n = config.num_hidden_layers
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of the reference "
            f"num_attention_heads {config.num_attention_heads}"
        )
    for name, values in (
        ("num_attention_heads_per_layer", config.num_attention_heads_per_layer),
        ("intermediate_size_per_layer", config.intermediate_size_per_layer),
    ):
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} layers")
        if any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must hold positive integers, got {values}")
    rank = config.embedding_rank
    if rank is not None and not (isinstance(rank, int) and 1 <= rank <= config.hidden_size):
        raise ValueError(f"embedding_rank must be in [1, {config.hidden_size}], got {rank}")


@dataclass
class ModelLayout:
    """The shape a (dense or student) model actually has, read from its modules."""

    heads: list[int]
    intermediate_sizes: list[int]
    embedding_rank: int | None
    vocab_size: int
    hidden_size: int
    head_size: int

    @property
    def num_layers(self) -> int:
        """Number of Transformer layers."""
        return len(self.heads)


def model_layout(model: nn.Module) -> ModelLayout:
    """Read the per-layer shape of ``model`` from its modules (not from its config)."""
    adapter = adapter_for(model)
    config = model.config
    head_size = adapter.head_size(config)
    heads, ffn = [], []
    for layer in adapter.layer_list(model):
        q = adapter.attention_linears(layer)[0]
        heads.append(q.out_features // head_size)
        ffn.append(adapter.ffn_linears(layer)[0].out_features)
    parent, name = adapter.word_embedding_owner(model)
    emb = getattr(parent, name)
    rank = emb.rank if isinstance(emb, FactorizedEmbedding) else None
    return ModelLayout(heads, ffn, rank, emb.num_embeddings, config.hidden_size, head_size)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    # Same device and dtype as the module it replaces: under from_pretrained that is "meta".
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def _build_layers_(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    config = model.config
    d = adapter.head_size(config)
    for index, (layer, heads, ffn) in enumerate(
        zip(
            adapter.layer_list(model),
            config.layer_heads(),
            config.layer_intermediate_sizes(),
            strict=True,
        )
    ):
        q, _, _, o = adapter.attention_linears(layer)
        if q.out_features != heads * d:
            for path in (adapter.query, adapter.key, adapter.value):
                old = layer.get_submodule(path)
                layer.set_submodule(path, _linear_like(old, old.in_features, heads * d))
            layer.set_submodule(
                adapter.attention_output, _linear_like(o, heads * d, o.out_features)
            )
        adapter.init_layer(layer, index, config)
        ffn_in, ffn_out = adapter.ffn_linears(layer)
        if ffn_in.out_features != ffn:
            layer.set_submodule(adapter.ffn_input, _linear_like(ffn_in, ffn_in.in_features, ffn))
            layer.set_submodule(
                adapter.ffn_output, _linear_like(ffn_out, ffn, ffn_out.out_features)
            )


def _build_embedding_(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    rank = model.config.embedding_rank
    if rank is None:
        return
    parent, name = adapter.word_embedding_owner(model)
    old = getattr(parent, name)
    setattr(
        parent,
        name,
        FactorizedEmbedding(
            old.num_embeddings,
            rank,
            old.embedding_dim,
            padding_idx=old.padding_idx,
            device=old.weight.device,
            dtype=old.weight.dtype,
        ),
    )


def _input_embedding_key(model: nn.Module, adapter: ArchitectureAdapter) -> str:
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    return f"{prefix}{adapter.word_embeddings}.weight"


def untie_factorized_embedding_(model: nn.Module) -> None:
    """Drop the output-head tie to a word embedding that has been factorized.

    A tied MLM decoder cannot share a ``V x E`` lookup, so it keeps its own dense ``V x hidden``
    weight (the table at the moment of factorization; logits are unchanged). Other ties, such as
    the decoder bias, are kept.
    """
    if model.config.embedding_rank is None:
        return
    adapter = adapter_for(model)
    key = _input_embedding_key(model, adapter)
    ties = getattr(type(model), "_tied_weights_keys", None) or {}
    model._tied_weights_keys = {t: s for t, s in ties.items() if key not in (t, s)}
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


class StudentModelMixin:
    """Put first in the bases of a dense model class to make it build per-layer shapes.

    The dense constructor runs first (at the reference shape; on the meta device when called by
    ``from_pretrained``, so it costs nothing there), then each layer's projections and the word
    embedding are rebuilt at the sizes the config records, and ``post_init`` runs again so that
    only the rebuilt modules are initialized and weight ties are recomputed.
    """

    def __init__(self, config, *args, **kwargs):
        validate_student_config(config)
        super().__init__(config, *args, **kwargs)
        adapter = adapter_for(config)
        _build_layers_(self, adapter)
        _build_embedding_(self, adapter)
        untie_factorized_embedding_(self)
        self.post_init()


def convert_to_student_(model: nn.Module) -> nn.Module:
    """Turn ``model`` (dense or student, already reshaped) into its student class, in place.

    The config becomes the student config class and records the shape read from the modules; the
    model's class becomes the student class with the same head. Both are class swaps on the same
    objects, so every reference to the model or its config stays valid.

    Raises:
        UnsupportedArchitectureError: no adapter or no student class for this model.
    """
    adapter = adapter_for(model)
    student_cls = adapter.student_class(type(model))
    layout = model_layout(model)
    config = model.config
    config.__class__ = adapter.student_config_class
    # Configs read from disk carry model_type as an instance attribute that would hide the class's.
    vars(config).pop("model_type", None)
    config.num_hidden_layers = layout.num_layers
    config.num_attention_heads_per_layer = layout.heads
    config.intermediate_size_per_layer = layout.intermediate_sizes
    config.embedding_rank = layout.embedding_rank
    config.vocab_size = layout.vocab_size
    for name, value in adapter.extra_layer_config(list(adapter.layer_list(model)), config).items():
        setattr(config, name, value)
    model.__class__ = student_cls
    untie_factorized_embedding_(model)
    return model
