"""Parameter counts and a per-layer summary table of a (dense or student) model."""

from __future__ import annotations

from torch import nn

from ..models.adapter import adapter_for
from ..models.student import model_layout

__all__ = ["count_parameters", "summary"]


def count_parameters(
    model: nn.Module, *, base_only: bool = False, trainable_only: bool = False
) -> int:
    """Number of parameters of ``model``, each shared (tied) tensor counted once.

    Args:
        base_only: count only the encoder body (``model.base_model``: embeddings, layers and, for
            BERT/RoBERTa, the pooler), i.e. without the task head. ROSITA's 14,473,216 for
            (L8, H2, F512, E128) is this count for a BERT-base shape.
        trainable_only: count only parameters with ``requires_grad``.
    """
    target = getattr(model, "base_model", model) if base_only else model
    return sum(p.numel() for p in target.parameters() if p.requires_grad or not trainable_only)


def _own_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(model: nn.Module) -> str:
    """A text table of the model's shape: per layer heads, FFN size and parameters.

    Rows follow for the embeddings (vocabulary and factorization rank), everything else
    (pooler, task head, shared position bias) and the total, which equals
    :func:`count_parameters`. Works on any model with a registered adapter.
    """
    adapter = adapter_for(model)
    layout = model_layout(model)
    layers = adapter.layer_list(model)
    base = adapter.base_model(model)
    embeddings = base.get_submodule(adapter.word_embeddings.rpartition(".")[0] or "")
    total = count_parameters(model)
    layer_counts = [_own_count(layer) for layer in layers]
    emb_count = _own_count(embeddings)
    rank = "dense" if layout.embedding_rank is None else f"rank {layout.embedding_rank}"
    lines = [
        f"{type(model).__name__} ({model.config.model_type}): {layout.num_layers} layers, "
        f"hidden {layout.hidden_size}, head size {layout.head_size}",
        f"{'layer':>6} {'heads':>6} {'ffn':>7} {'params':>14}",
    ]
    for i, (h, f, n) in enumerate(
        zip(layout.heads, layout.intermediate_sizes, layer_counts, strict=True)
    ):
        lines.append(f"{i:>6} {h:>6} {f:>7} {n:>14,}")
    lines += [
        f"{'embeddings':<22}{f'vocab {layout.vocab_size}, {rank}':>20} {emb_count:>14,}",
        f"{'other (pooler, heads)':<42} {total - sum(layer_counts) - emb_count:>14,}",
        f"{'total':<42} {total:>14,}",
    ]
    return "\n".join(lines)
