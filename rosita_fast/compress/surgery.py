"""In-place structural edits of one model, each exact for what it keeps.

Every edit builds new parameter tensors by index selection (never by dropping zero entries) and
installs them in the existing modules, so module objects, their names and any hooks survive; only
the affected parameters are new objects. Callers validate first (:mod:`.plan`); these functions
assume valid indices.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import ArchitectureAdapter
from ..models.factorized_embedding import FactorizedEmbedding

__all__ = [
    "factorize_embedding_",
    "keep_ffn_",
    "keep_heads_",
    "keep_layers_",
    "replace_parameter_",
    "slice_linear_",
    "truncate_embedding_",
]


def _parameter(data: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=like.requires_grad)


def slice_linear_(
    linear: nn.Linear,
    *,
    out_index: torch.Tensor | None = None,
    in_index: torch.Tensor | None = None,
) -> None:
    """Keep the output rows ``out_index`` and the input columns ``in_index`` of ``linear``."""
    weight = linear.weight
    data = weight.data
    if out_index is not None:
        data = data.index_select(0, out_index.to(data.device))
        if linear.bias is not None:
            linear.bias = _parameter(
                linear.bias.data.index_select(0, out_index.to(data.device)), linear.bias
            )
        linear.out_features = len(out_index)
    if in_index is not None:
        data = data.index_select(1, in_index.to(data.device))
        linear.in_features = len(in_index)
    linear.weight = _parameter(data, weight)


def _head_columns(kept: list[int], head_size: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in kept])


def keep_heads_(layer: nn.Module, adapter: ArchitectureAdapter, config, kept: list[int]) -> None:
    """Keep attention heads ``kept`` of ``layer``: Q/K/V rows and biases, O input columns.

    The O bias and the LayerNorm are untouched (they do not belong to any head). Kept heads stay
    in their original order; ROSITA writes them by descending importance, which computes the same
    function, and keeping the order makes "keep everything" an identity.
    """
    columns = _head_columns(kept, adapter.head_size(config))
    q, k, v, o = adapter.attention_linears(layer)
    for linear in (q, k, v):
        slice_linear_(linear, out_index=columns)
    slice_linear_(o, in_index=columns)
    adapter.set_heads(layer, kept, config)


def keep_ffn_(layer: nn.Module, adapter: ArchitectureAdapter, kept: list[int]) -> None:
    """Keep FFN neurons ``kept``: rows (and bias) of the input projection, output columns."""
    index = torch.tensor(kept, dtype=torch.long)
    ffn_in, ffn_out = adapter.ffn_linears(layer)
    slice_linear_(ffn_in, out_index=index)
    slice_linear_(ffn_out, in_index=index)


def keep_layers_(model: nn.Module, adapter: ArchitectureAdapter, kept: list[int]) -> None:
    """Keep the Transformer layers ``kept`` (in that order) and renumber them."""
    old = adapter.layer_list(model)
    new = nn.ModuleList([old[i] for i in kept])
    adapter.base_model(model).set_submodule(adapter.layers, new)
    for position, layer in enumerate(new):
        # Cache-aware modules index per-layer state by layer_idx; keep it equal to the position.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position


@torch.no_grad()
def factorize_embedding_(model: nn.Module, adapter: ArchitectureAdapter, rank: int) -> None:
    """Replace the dense word embedding by a rank-``rank`` factorization from its economy SVD.

    With ``A = U S V^T``, the lookup is ``U[:, :E] S[:E]`` (singular values folded into it, as in
    ROSITA) and the projection weight is ``V[:, :E]``. The decomposition goes through the
    ``hidden x hidden`` Gram matrix: its eigenvectors are ``V`` and ``U S = A V``, which costs a
    fraction of a full SVD of the ``vocab x hidden`` table and never forms ``U``. It runs in
    float64; a full-rank factorization reproduces the table to float32 rounding because ``V`` is
    orthonormal whatever the conditioning of ``A``.
    """
    parent, name = adapter.word_embedding_owner(model)
    dense: nn.Embedding = getattr(parent, name)
    table = dense.weight
    a = table.detach().double()
    _, vectors = torch.linalg.eigh(a.T @ a)  # ascending eigenvalues
    right = vectors.flip(-1)[:, :rank]
    factorized = FactorizedEmbedding(
        dense.num_embeddings,
        rank,
        dense.embedding_dim,
        padding_idx=dense.padding_idx,
        device=table.device,
        dtype=table.dtype,
    )
    factorized.lookup.weight = _parameter((a @ right).to(table.dtype), table)
    factorized.project.weight = _parameter(right.to(table.dtype), table)
    setattr(parent, name, factorized)


@torch.no_grad()
def truncate_embedding_(model: nn.Module, adapter: ArchitectureAdapter, rank: int) -> None:
    """Keep the leading ``rank`` directions of an already factorized embedding (no new SVD)."""
    parent, name = adapter.word_embedding_owner(model)
    emb: FactorizedEmbedding = getattr(parent, name)
    index = torch.arange(rank)
    lookup = emb.lookup
    lookup.weight = _parameter(lookup.weight.data[:, :rank], lookup.weight)
    lookup.embedding_dim = rank
    slice_linear_(emb.project, in_index=index)


def replace_parameter_(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> int:
    """Install ``new`` wherever ``old`` is registered (tied weights included); return the count."""
    count = 0
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is old:
                module._parameters[key] = new
                count += 1
    return count
