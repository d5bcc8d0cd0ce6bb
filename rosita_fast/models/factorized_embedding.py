"""A low-rank word embedding: a ``V x E`` lookup, then a bias-free ``E -> hidden`` projection."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FactorizedEmbedding"]


class FactorizedEmbedding(nn.Module):
    """Drop-in replacement for ``nn.Embedding(V, hidden)`` with ``V*E + E*hidden`` parameters.

    ``forward(ids) == lookup(ids) @ project.weight.T``. The two factors are ordinary
    ``nn.Embedding`` and ``nn.Linear`` modules, so Hugging Face weight init, dtype casting and
    kernel swapping (``rosita_fast.swap_`` on the projection) treat them like any other layer.
    """

    def __init__(
        self,
        num_embeddings: int,
        rank: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.lookup = nn.Embedding(
            num_embeddings, rank, padding_idx=padding_idx, device=device, dtype=dtype
        )
        self.project = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)

    @property
    def num_embeddings(self) -> int:
        """Vocabulary size ``V``."""
        return self.lookup.num_embeddings

    @property
    def embedding_dim(self) -> int:
        """Output width (the model's hidden size)."""
        return self.project.out_features

    @property
    def rank(self) -> int:
        """Inner rank ``E``."""
        return self.lookup.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        """Padding id of the lookup table (its row receives no gradient)."""
        return self.lookup.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``input_ids`` to ``(..., embedding_dim)``."""
        return self.project(self.lookup(input_ids))

    def full_weight(self) -> torch.Tensor:
        """Return the dense ``V x hidden`` table this factorization represents."""
        return self.lookup.weight @ self.project.weight.T

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, rank={self.rank}, {self.embedding_dim}"
