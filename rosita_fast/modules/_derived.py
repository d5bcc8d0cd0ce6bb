"""Tensors derived from parameters (a fused QKV weight, a prepacked GEMM weight), kept between
inference calls and rebuilt when a source parameter changes.

A source "changes" when it is replaced (pruning installs new parameter objects), updated in place
(an optimizer step bumps its version counter) or moved/cast (``.to()`` swaps its storage). While
autograd records, derived tensors are built fresh on every call so gradients flow to the
parameters; no cache is kept then.

Some in-place writes do not bump the version counter: torch's fused optimizers
(``AdamW(fused=True)``) and writes through ``.data``. Every switch between training and eval
mode (``model.train()`` / ``model.eval()`` that changes the mode; it is where a training loop
hands the weights to its evaluation) therefore drops the cache too, and code that writes
parameters that way between two inference calls without a mode switch calls
``torch.autograd.graph.increment_version`` on them (rosita_fast's trainer and fused BertAdam
do).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["DerivedCache", "DerivedCacheOwner", "has_hooks", "pack_for_inference",
           "records_grad"]


def records_grad(*params: torch.Tensor | None) -> bool:
    """Whether a call with these parameters records an autograd graph."""
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


def pack_for_inference(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The prepacked form of a GEMM weight for the C++ backend, or ``None`` (under
    ``torch.compile`` the graph keeps plain weights, inductor does its own packing; and where the
    fp32 GEMM route sends forward products to ATen, which would never read the packed copy)."""
    if torch.compiler.is_compiling():
        return None
    from rosita_fast.ops import gemm_route, pack_linear_weight

    if weight.dtype in (torch.float32, torch.float16):
        route = gemm_route()
        if route is not None and route["forward"] == "aten":
            return None

    return pack_linear_weight(weight, batch_hint=rows)


def has_hooks(module) -> bool:
    """Whether ``module`` has forward (pre-)hooks: a fused path that reads its weights without
    calling it would skip them (the importance tracker's mask method relies on such hooks), so
    the fast modules call hooked children the stock way."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _stamp(t: torch.Tensor | None) -> tuple:
    if t is None:
        return (None,)
    # An inference tensor has no version counter: a fresh object each time never matches, so
    # values derived from it are rebuilt on every call.
    version = object() if t.is_inference() else t._version
    return (weakref.ref(t), version, t.data_ptr(), t.dtype, t.device)


class DerivedCache:
    """One cached value per name, valid while its source tensors are unchanged."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Any]] = {}

    def get(self, name: str, sources: Sequence[torch.Tensor | None], build: Callable[[], Any]):
        """The value ``build()`` made for the current ``sources`` (rebuilt if any changed)."""
        if torch.compiler.is_compiling():
            return build()
        key = tuple(_stamp(t) for t in sources)
        entry = self._entries.get(name)
        if entry is not None and _same(entry[0], key):
            return entry[1]
        value = build()
        self._entries[name] = (key, value)
        return value

    def clear(self) -> None:
        """Drop every cached value (e.g. to free prepacked weights)."""
        self._entries.clear()


def _same(old: tuple, new: tuple) -> bool:
    for a, b in zip(old, new, strict=True):
        if len(a) == 1 or len(b) == 1:
            if a != b:
                return False
            continue
        if a[0]() is not b[0]() or a[1:] != b[1:]:
            return False
    return True


class DerivedCacheOwner(torch.nn.Module):
    """A module with a :class:`DerivedCache` in ``_derived``, dropped on every mode switch (see
    the module docstring)."""

    _derived: DerivedCache

    def train(self, mode: bool = True):
        """Set the mode (``nn.Module.train``); a switch drops the derived tensors."""
        # Only a switch: a teacher put in eval mode before every forward keeps its packed weights.
        if bool(mode) != self.training:
            self._derived.clear()
        return super().train(mode)
