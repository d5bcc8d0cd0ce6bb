"""``PrunedSelfAttention``: a BERT-family attention block (self-attention, output projection,
residual add, LayerNorm) on the fused ops, for any number of heads.

It takes over the Hugging Face attention block's children under their own names (``self.query``
..., ``output.dense``, ``output.LayerNorm`` for BERT/RoBERTa; ``attn.q`` ..., ``LayerNorm`` for
MPNet), so state-dict keys, the compression engine's adapter paths and pruning all still see the
stock layout. The head count is read from the projection shapes on every call: pruning heads
needs no rebuild.

Per call: one GEMM for Q, K and V together (their weights concatenated; cached and prepacked for
the C++ backend while no gradient is recorded), the attention op (online softmax, any head
count), and the output projection with bias, residual add and LayerNorm in one op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rosita_fast.modules._derived import (
    DerivedCache,
    DerivedCacheOwner,
    has_hooks,
    pack_for_inference,
    records_grad,
)
from rosita_fast.ops import attention, linear_act, linear_residual_layernorm

__all__ = ["PrunedSelfAttention"]


def _relative(path: str, prefix: str) -> str:
    if not path.startswith(prefix + "."):
        raise ValueError(f"adapter path {path!r} is not inside the attention block {prefix!r}")
    return path[len(prefix) + 1 :]


class PrunedSelfAttention(DerivedCacheOwner):
    """Self-attention block with ``H`` heads of width ``head_size`` (any ``H >= 1``).

    Build it with :meth:`from_block` from a model's attention block; the block's children are
    adopted, not copied. ``forward(x, key_mask=None, position_bias=None)`` returns
    ``LayerNorm(x + O(attention(Q(x), K(x), V(x))))`` of shape ``x.shape``.

    In training mode, dropout follows the source model's config and runs inside the fused ops
    (their counter-based dropout: the masks differ from ``nn.Dropout``'s draws but have the same
    distribution): attention-probability dropout in ``attention``, hidden dropout in
    ``linear_residual_layernorm``. Forward hooks on a projection unfuse the part they touch;
    ``fused_paths()`` says which parts are fused now.
    """

    def __init__(
        self,
        block: nn.Module,
        *,
        query: str,
        key: str,
        value: str,
        output: str,
        layernorm: str,
        head_size: int,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self._paths = (query, key, value, output, layernorm)
        self._parts = tuple(tuple(p.split(".")) for p in self._paths)
        for path in self._paths:
            self.get_submodule(path)  # fail now, not on the first forward
        self.head_size = head_size
        self.scale = 1.0 / math.sqrt(head_size)
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        # MPNet: the self-attention child knows which shared relative-bias heads it uses.
        self._bias_owner_path = query.rpartition(".")[0]
        self._derived = DerivedCache()
        self._bias_index: tuple | None = None

    @classmethod
    def from_block(cls, layer: nn.Module, adapter, config) -> PrunedSelfAttention:
        """Build from the attention block of one Transformer ``layer`` via its ``adapter``."""
        block_path = adapter.attention_block
        block = layer.get_submodule(block_path)
        return cls(
            block,
            query=_relative(adapter.query, block_path),
            key=_relative(adapter.key, block_path),
            value=_relative(adapter.value, block_path),
            output=_relative(adapter.attention_output, block_path),
            layernorm=_relative(adapter.attention_layernorm, block_path),
            head_size=adapter.head_size(config),
            attention_dropout=float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0),
            hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
        )

    # ---- parts ----------------------------------------------------------------------------------

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear, nn.LayerNorm]:
        """The (Q, K, V, O) linears and the LayerNorm, as currently installed."""
        # Resolved on every call (pruning or a user may install new modules), through the module
        # dicts directly: get_submodule costs microseconds per path, which add up at batch 1.
        out = []
        for parts in self._parts:
            module = self
            for part in parts:
                module = module._modules[part]
            out.append(module)
        return tuple(out)

    @property
    def num_heads(self) -> int:
        """Heads this block runs now (read from the Q projection)."""
        return self.projections()[0].out_features // self.head_size

    def fused_paths(self) -> dict[str, bool]:
        """Which parts run fused now: dropout in training, and forward hooks on a projection (the
        stock module is then called so the hooks fire), unfuse the part they touch."""
        q, k, v, o, _ = self.projections()
        return self._fused(q, k, v, o)

    def _fused(self, q, k, v, o) -> dict[str, bool]:
        return {
            "qkv": not (has_hooks(q) or has_hooks(k) or has_hooks(v)),
            "attention": True,
            "output_layernorm": not has_hooks(o),
        }

    def _stacked(self, name: str, linears: tuple[nn.Linear, ...], rows: int):
        """The linears' weights (and biases) stacked into one GEMM: cached and prepacked while no
        gradient is recorded, rebuilt on every call otherwise (the cat is then part of the
        graph). One linear is used as it is."""
        sources = tuple(lin.weight for lin in linears) + tuple(lin.bias for lin in linears)
        biases = tuple(lin.bias for lin in linears)

        def fused():
            if len(linears) == 1:  # nothing to stack: no copy
                return linears[0].weight, linears[0].bias
            weight = torch.cat([lin.weight for lin in linears])
            if all(b is None for b in biases):
                return weight, None
            parts = [b if b is not None else lin.weight.new_zeros(lin.out_features)
                     for b, lin in zip(biases, linears, strict=True)]
            return weight, torch.cat(parts)

        if records_grad(*sources):
            weight, bias = fused()
            return weight, bias, None

        def build():
            weight, bias = fused()
            return weight, bias, pack_for_inference(weight, rows)

        return self._derived.get(name, sources, build)

    def _packed(self, name: str, linear: nn.Linear, rows: int):
        if records_grad(linear.weight, linear.bias):
            return None
        return self._derived.get(
            name, (linear.weight,), lambda: pack_for_inference(linear.weight, rows)
        )

    def _bias(self, position_bias: torch.Tensor | None, heads: int) -> torch.Tensor | None:
        if position_bias is None:
            return None
        # MPNet's bias is identical for every sequence of the batch: pass one, broadcast.
        bias = position_bias[:1]
        selected = getattr(self.get_submodule(self._bias_owner_path), "bias_heads", None)
        if selected is not None:
            key = (selected, bias.device)
            if self._bias_index is None or self._bias_index[0] != key:
                self._bias_index = (key, torch.tensor(selected, device=bias.device))
            bias = bias.index_select(1, self._bias_index[1])
        if bias.shape[1] != heads:
            raise ValueError(
                f"position_bias has {bias.shape[1]} heads for a block with {heads} heads"
            )
        return bias

    # ---- forward --------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        query_rows: int | None = None,
    ) -> torch.Tensor:
        """``LayerNorm(x + O(attention))`` for ``x`` of shape ``[B, L, hidden]``.

        ``key_mask``: bool ``[B, L]`` (True = attend) or ``None``; ``position_bias``: additive
        score bias ``[B or 1, heads of the encoder, L, L]`` (MPNet), narrowed to this block's heads.
        ``query_rows``: compute the output of the first ``query_rows`` positions only (they still
        attend to all ``L`` keys), ``[B, query_rows, hidden]``: what a classifier that reads the
        first token needs from the last layer; ``None``: every position.
        """
        q, k, v, o, ln = self.projections()
        batch, length, _ = hidden_states.shape
        size = self.head_size
        heads = q.out_features // size
        rows = batch * length
        fused = self._fused(q, k, v, o)
        if query_rows is None:
            qlen, residual = length, hidden_states
            if fused["qkv"]:
                weight, bias, packed = self._stacked("qkv", (q, k, v), rows)
                qkv = linear_act(hidden_states, weight, bias, "none", packed)
                qh, kh, vh = (qkv.view(batch, length, 3, heads, size).permute(2, 0, 3, 1, 4)
                              .unbind(0))
            else:
                qh, kh, vh = (m(hidden_states).view(batch, length, heads, size).transpose(1, 2)
                              for m in (q, k, v))
        else:
            if not isinstance(query_rows, int) or not 1 <= query_rows <= length:
                raise ValueError(f"query_rows must be an int in [1, {length}], got {query_rows!r}")
            qlen, residual = query_rows, hidden_states[:, :query_rows]
            if fused["qkv"]:
                weight, bias, packed = self._stacked("q", (q,), batch * qlen)
                qh = linear_act(residual, weight, bias, "none", packed)
                weight, bias, packed = self._stacked("kv", (k, v), rows)
                kv = linear_act(hidden_states, weight, bias, "none", packed)
                kh, vh = kv.view(batch, length, 2, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                qh = q(residual)
                kh, vh = (m(hidden_states).view(batch, length, heads, size).transpose(1, 2)
                          for m in (k, v))
            qh = qh.view(batch, qlen, heads, size).transpose(1, 2)
        score_bias = self._bias(position_bias, heads)
        if score_bias is not None and qlen != length:
            score_bias = score_bias[:, :, :qlen]
        train = self.training
        context = attention(qh, kh, vh, key_mask, score_bias, self.scale,
                            dropout_p=self.attention_dropout if train else 0.0)
        context = context.transpose(1, 2).reshape(batch, qlen, heads * size)
        drop = self.hidden_dropout if train else 0.0
        if fused["output_layernorm"]:
            return linear_residual_layernorm(
                context, o.weight, o.bias, residual, ln.weight, ln.bias, ln.eps,
                self._packed("o", o, batch * qlen) if drop == 0 else None, dropout_p=drop,
            )
        z = o(context) if has_hooks(o) else linear_act(context, o.weight, o.bias, "none")
        z = F.dropout(z, self.hidden_dropout, training=self.training)
        return F.layer_norm(z + residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
