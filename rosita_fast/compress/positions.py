"""Position-table truncation: keep the positions a deployment can reach.

A BERT-family model learns one position embedding per position up to
``max_position_embeddings`` (512 for BERT and MiniLM). A student that only ever sees inputs of at
most ``n`` tokens (the recipe's ``max_length``) never reads the other rows, so cutting the table to
``n`` rows changes no output on those inputs and frees ``(512 - n) x hidden`` parameters; for
all-MiniLM-L6-v2 at ``n = 64`` that is 172k, 6 % of a 3M-parameter student, which the budget can
spend on width instead. Longer inputs are refused afterwards rather than wrapped or clamped: the
tokenizer's ``model_max_length`` is lowered to ``n`` so ``truncation=True`` stops at the table's
end, and the stock embeddings module fails on an over-long input instead of computing garbage.

RoBERTa and MPNet number positions from ``padding_idx + 1`` (the rows below are the padding row
and unused ones); those leading rows stay, so ``n`` still counts usable positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.adapter import adapter_for
from .surgery import replace_parameter_

__all__ = ["position_count", "prune_positions_"]

_BUFFERS = ("position_ids", "token_type_ids")
"""Per-position buffers the stock embeddings modules size by the table (HF BERT/RoBERTa)."""


def _position_offset(table: nn.Embedding) -> int:
    return 0 if table.padding_idx is None else table.padding_idx + 1


def _position_table(model: nn.Module) -> tuple[nn.Module, nn.Embedding | None]:
    adapter = adapter_for(model)
    embeddings = adapter.base_model(model).get_submodule(adapter.embeddings)
    table = getattr(embeddings, "position_embeddings", None)
    return embeddings, table if isinstance(table, nn.Embedding) else None


def position_count(model: nn.Module) -> int | None:
    """Usable positions of ``model``'s position table (the longest input it accepts, in tokens);
    ``None`` for a model without one."""
    _, table = _position_table(model)
    return None if table is None else table.num_embeddings - _position_offset(table)


@torch.no_grad()
def prune_positions_(model: nn.Module, max_positions: int, tokenizer: Any | None = None) -> int:
    """Cut ``model``'s position-embedding table to its first ``max_positions`` usable positions.

    Args:
        model: a supported model (dense or student) whose embeddings module has a
            ``position_embeddings`` table, before its modules are swapped onto the fast ones.
        max_positions: positions to keep, counted as tokens of one input (``[CLS]`` and
            ``[SEP]`` included), so an input of ``max_positions`` tokens is the longest the model
            accepts afterwards.
        tokenizer: if given, its ``model_max_length`` is lowered to ``max_positions`` where it
            is larger (and saved with it), so that ``truncation=True`` and Hugging Face
            pipelines stay within the table.

    Returns:
        The number of parameters removed (0 when the table already has no more rows).

    Raises:
        ValueError: ``max_positions`` is not a positive integer, or the model has fewer usable
            positions than asked for, or no position table. Checked before anything changes.
    """
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    embeddings, table = _position_table(model)
    if hasattr(embeddings, "_stock"):
        raise ValueError("prune_positions_: the model runs on the fast modules; cut the position "
                         "table before swapping them in")
    if table is None:
        raise ValueError(f"{type(model).__name__} has no position_embeddings table to cut")
    offset = _position_offset(table)
    rows = offset + max_positions
    usable = table.num_embeddings - offset
    if max_positions > usable:
        raise ValueError(f"max_positions {max_positions} exceeds the model's {usable} positions")
    removed = (table.num_embeddings - rows) * table.embedding_dim
    if removed:
        old = table.weight
        new = nn.Parameter(old.data[:rows].clone(), requires_grad=old.requires_grad)
        replace_parameter_(model, old, new)
        table.num_embeddings = rows
        for name in _BUFFERS:
            buf = getattr(embeddings, name, None)
            if isinstance(buf, torch.Tensor) and buf.dim() == 2 and buf.shape[1] > rows:
                persistent = name not in embeddings._non_persistent_buffers_set
                embeddings.register_buffer(name, buf[:, :rows].clone(), persistent=persistent)
        model.config.max_position_embeddings = rows
    if tokenizer is not None and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
        tokenizer.init_kwargs["model_max_length"] = max_positions
    return removed
