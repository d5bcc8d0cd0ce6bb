"""Turning scores into kept indices: per-layer top-k (ROSITA) or one global budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .importance import ImportanceScores

__all__ = ["global_targets", "select_global", "top_k"]


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in ascending index order.

    Ties are broken towards the lower index, so selection is deterministic.
    """
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def _normalized(values: list[torch.Tensor], normalize: bool) -> list[torch.Tensor]:
    if not normalize:
        return [v.float() for v in values]
    # Raw Taylor/mask scores differ in scale from layer to layer; without this the global budget
    # goes to whichever layers have the largest gradients rather than the most useful units.
    return [v.float() / v.float().norm().clamp_min(1e-30) for v in values]


def _global_pick(
    values: list[torch.Tensor], budget: int, minimum: int, what: str
) -> list[list[int]]:
    total = sum(len(v) for v in values)
    if minimum < 1:
        raise ValueError(f"min_{what} must be at least 1, got {minimum}")
    low = sum(min(minimum, len(v)) for v in values)
    if not low <= budget <= total:
        raise ValueError(
            f"global {what} budget {budget} must lie in [{low}, {total}] "
            f"(at least min_{what}={minimum} per layer, at most all {total})"
        )
    kept = [set(top_k(v, min(minimum, len(v)))) for v in values]
    candidates = [
        (float(score), layer, index)
        for layer, v in enumerate(values)
        for index, score in enumerate(v.tolist())
        if index not in kept[layer]
    ]
    # Highest score first; ties go to the lower layer, then the lower index.
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    for _, layer, index in candidates[: budget - low]:
        kept[layer].add(index)
    return [sorted(k) for k in kept]


def select_global(
    scores: ImportanceScores,
    *,
    heads: int | None = None,
    ffn: int | None = None,
    layers: Sequence[int] | None = None,
    normalize: bool = True,
    min_heads: int = 1,
    min_ffn: int = 1,
) -> dict[str, list[list[int]]]:
    """Choose heads and/or FFN neurons against one budget shared by all layers.

    ``heads`` / ``ffn`` are total counts over the considered ``layers`` (default: all scored
    layers). Every layer keeps at least ``min_heads`` / ``min_ffn`` of its best units; the rest of
    the budget goes to the highest scores anywhere, after dividing each layer's scores by their
    L2 norm when ``normalize`` is true. The result plugs straight into :func:`prune_`::

        prune_(model, layers=8, scores=s, **select_global(s, heads=16, ffn=4096, layers=range(8)))

    Returns:
        ``{"heads": [...], "ffn": [...]}`` with one sorted index list per considered layer, only
        for the budgets that were given.

    Raises:
        ValueError: a budget is outside what the layers can hold, or a layer index is invalid.
    """
    layer_ids = list(range(scores.num_layers)) if layers is None else [int(i) for i in layers]
    if any(not 0 <= i < scores.num_layers for i in layer_ids) or len(set(layer_ids)) != len(
        layer_ids
    ):
        raise ValueError(f"layers must be distinct indices below {scores.num_layers}: {layer_ids}")
    out: dict[str, list[list[int]]] = {}
    if heads is not None:
        values = _normalized([scores.heads[i] for i in layer_ids], normalize)
        out["heads"] = _global_pick(values, int(heads), min_heads, "heads")
    if ffn is not None:
        values = _normalized([scores.ffn[i] for i in layer_ids], normalize)
        out["ffn"] = _global_pick(values, int(ffn), min_ffn, "ffn")
    return out


def _budget(spec: object, num_layers: int) -> int | None:
    if spec is None:
        return None
    if isinstance(spec, int):
        return spec * num_layers
    entries = list(spec)  # type: ignore[call-overload]
    if all(isinstance(e, int) for e in entries):
        return sum(entries)
    return None  # explicit indices: nothing to select


def global_targets(
    scores: ImportanceScores,
    kept_layers: Sequence[int],
    *,
    heads: object = None,
    ffn: object = None,
    normalize: bool = True,
) -> dict[str, object]:
    """Rewrite per-layer counts as a global selection of the same total size.

    A uniform count ``k`` becomes a budget of ``k * len(kept_layers)`` units, a per-layer count
    list its sum; explicit index lists pass through. Returns ``heads``/``ffn`` arguments for
    :func:`prune_`.
    """
    out: dict[str, object] = {"heads": heads, "ffn": ffn}
    budgets = {
        "heads": _budget(heads, len(kept_layers)),
        "ffn": _budget(ffn, len(kept_layers)),
    }
    chosen = select_global(
        scores, heads=budgets["heads"], ffn=budgets["ffn"], layers=kept_layers, normalize=normalize
    )
    out.update(chosen)
    return out
