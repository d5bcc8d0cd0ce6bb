"""Fast drop-in modules backed by rosita_fast ops."""

from rosita_fast.modules.attention import PrunedSelfAttention
from rosita_fast.modules.embedding import FusedEmbedding
from rosita_fast.modules.ffn import FusedFFN
from rosita_fast.modules.layer import FastTransformerLayer
from rosita_fast.modules.lowrank_linear import LowRankLinear

__all__ = [
    "FastTransformerLayer",
    "FusedEmbedding",
    "FusedFFN",
    "LowRankLinear",
    "PrunedSelfAttention",
]
