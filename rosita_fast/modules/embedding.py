"""``FusedEmbedding``: word lookup (dense or factorized), position and token-type embeddings and
LayerNorm in one op, in place of a BERT/RoBERTa/MPNet embeddings module.

It adopts the stock module's children and buffers under their names (``word_embeddings``,
``position_embeddings``, ``token_type_embeddings``, ``LayerNorm``), so state-dict keys are
unchanged, and computes position ids the way the stock module does: ``0..L-1`` for BERT, and for
RoBERTa/MPNet (whose position table has a padding row) ``padding_idx + 1 + running count of
non-padding tokens``, with padding positions at ``padding_idx``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rosita_fast.models.factorized_embedding import FactorizedEmbedding
from rosita_fast.modules._mask import forget_masks
from rosita_fast.ops import embedding_layernorm

__all__ = ["FusedEmbedding"]


class FusedEmbedding(nn.Module):
    """Embeddings of a BERT-family model as one fused op (see the module docstring).

    Calls with ``inputs_embeds`` instead of ``input_ids`` run the stock module's own forward (there
    is no lookup to fuse); :attr:`last_call_fused` says which path the latest call took.
    """

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        for name, child in embeddings.named_children():
            self.add_module(name, child)
        for name, buf in embeddings.named_buffers(recurse=False):
            persistent = name not in embeddings._non_persistent_buffers_set
            self.register_buffer(name, buf, persistent=persistent)
        for required in ("word_embeddings", "position_embeddings", "LayerNorm"):
            if not hasattr(self, required):
                raise ValueError(
                    f"FusedEmbedding: {type(embeddings).__name__} has no {required!r}; "
                    "not a BERT-family embeddings module"
                )
        word = self.word_embeddings
        if not isinstance(word, nn.Embedding | FactorizedEmbedding):
            raise ValueError(
                f"FusedEmbedding: word_embeddings is a {type(word).__name__}; expected "
                "nn.Embedding or FactorizedEmbedding"
            )
        # Stock forward for inputs_embeds; it shares the adopted children, so it stays in sync.
        object.__setattr__(self, "_stock", embeddings)
        self.position_padding_idx = self.position_embeddings.padding_idx
        self.last_call_fused = True

    def _position_ids(self, input_ids: torch.Tensor, cache_length: int) -> torch.Tensor:
        pad = self.position_padding_idx
        length = input_ids.shape[1]
        if pad is None:
            rows = self.position_embeddings.num_embeddings
            if cache_length + length > rows:
                # The stock module fails here too, with a shape mismatch; say why.
                raise ValueError(f"FusedEmbedding: an input of {length} tokens (after "
                                 f"{cache_length} cached) exceeds the model's {rows} positions")
            if hasattr(self, "position_ids"):
                return self.position_ids[:, cache_length : cache_length + length]
            return torch.arange(cache_length, cache_length + length,
                                device=input_ids.device).unsqueeze(0)
        keep = input_ids.ne(pad).int()
        return ((torch.cumsum(keep, dim=1).type_as(keep) + cache_length) * keep).long() + pad

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_length: int = 0,
        **kwargs,
    ) -> torch.Tensor:
        """Embed ``input_ids`` ``[B, L]`` to ``[B, L, hidden]`` (the stock module's signature)."""
        forget_masks()  # a new forward of the model: its layers get a new mask
        if inputs_embeds is not None or input_ids is None:
            self.last_call_fused = False
            self._stock.train(self.training)
            kw = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, **kwargs}
            if hasattr(self, "token_type_embeddings"):
                kw["token_type_ids"] = token_type_ids
            return self._stock(input_ids=input_ids, **kw)
        self.last_call_fused = True
        if position_ids is None:
            position_ids = self._position_ids(input_ids, cache_length)
        token_table = getattr(self, "token_type_embeddings", None)
        if token_table is not None and token_type_ids is None:
            length = input_ids.shape[1]
            if hasattr(self, "token_type_ids"):
                token_type_ids = self.token_type_ids[:, :length]
            else:
                token_type_ids = input_ids.new_zeros((1, length))
        word = self.word_embeddings
        if isinstance(word, FactorizedEmbedding):
            table, proj, pad = word.lookup.weight, word.project.weight, word.lookup.padding_idx
        else:
            table, proj, pad = word.weight, None, word.padding_idx
        ln = self.LayerNorm
        out = embedding_layernorm(
            input_ids, table, position_ids, self.position_embeddings.weight,
            token_type_ids if token_table is not None else None,
            token_table.weight if token_table is not None else None,
            ln.weight, ln.bias, ln.eps,
            word_proj=proj, padding_idx=pad, position_padding_idx=self.position_padding_idx,
        )
        dropout = getattr(self, "dropout", None)
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            out = F.dropout(out, dropout.p, training=True)
        return out
