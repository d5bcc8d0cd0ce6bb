"""Fast drop-in modules backed by rosita_fast ops."""

from rosita_fast.modules.lowrank_linear import LowRankLinear

__all__ = ["LowRankLinear"]
