"""Module swapping: replace ``nn.Linear`` layers of a model with fast modules, in place.

Modelled on torchao's ``quantize_(model, config, filter_fn)``: a config says what to turn each
matching linear layer into, ``filter_fn(module, fully_qualified_name)`` chooses the layers, and the
model is changed in place. All replacements are built before the first one is installed, so a
failure (say, a rank too large for one layer) leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from rosita_fast.modules.lowrank_linear import LowRankLinear

FilterFn = Callable[[nn.Module, str], bool]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LayerSwap:
    """What happened to one layer."""

    name: str
    in_features: int
    out_features: int
    rank: int
    params_before: int
    params_after: int
    error: float | None  # relative Frobenius error of the factorization


@dataclass
class SwapReport:
    """Parameters before and after, and one :class:`LayerSwap` per replaced layer."""

    params_before: int
    params_after: int
    layers: list[LayerSwap] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'layer':<56} {'in':>6} {'out':>6} {'rank':>5} {'params':>10} {'rel.err':>9}"]
        for s in self.layers:
            err = f"{s.error:.3e}" if s.error is not None else "-"
            lines.append(
                f"{s.name:<56} {s.in_features:>6} {s.out_features:>6} {s.rank:>5} "
                f"{s.params_after:>10,} {err:>9}"
            )
        ratio = self.params_before / max(self.params_after, 1)
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.2f}x smaller), "
            f"{len(self.layers)} layers replaced"
        )
        return "\n".join(lines)


class SwapConfig:
    """Base class: a config turns one ``nn.Linear`` into its replacement."""

    def replace(self, linear: nn.Linear, name: str) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class LowRankConfig(SwapConfig):
    """Replace each linear layer with a :class:`LowRankLinear` by truncated SVD.

    ``rank``: the same rank for every layer; ``energy``: per layer, the smallest rank keeping that
    fraction of the squared singular values; neither: full rank (exact, for checking).
    A layer whose factorization would not save parameters is still replaced if selected; use
    ``filter_fn`` to leave such layers (e.g. a small classifier) alone.
    """

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise ValueError("LowRankConfig: give rank or energy, not both")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LowRankConfig: rank must be a positive int, got {self.rank!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"LowRankConfig: energy must be in (0, 1], got {self.energy!r}")

    def replace(self, linear: nn.Linear, name: str) -> nn.Module:
        full = min(linear.in_features, linear.out_features)
        if self.rank is not None and self.rank > full:
            raise ValueError(
                f"LowRankConfig(rank={self.rank}) does not fit layer {name!r} "
                f"({linear.in_features}->{linear.out_features}, max rank {full}); "
                "exclude it with filter_fn"
            )
        return LowRankLinear.from_linear(linear, rank=self.rank, energy=self.energy)


def _default_filter(module: nn.Module, name: str) -> bool:
    return True


def swap_(
    model: nn.Module, config: SwapConfig, filter_fn: FilterFn | None = None
) -> SwapReport:
    """Replace the ``nn.Linear`` modules of ``model`` selected by ``filter_fn``, in place.

    Args:
        model: any module tree (e.g. a Hugging Face ``BertModel``).
        config: what to replace each layer with, e.g. ``LowRankConfig(rank=64)``.
        filter_fn: ``filter_fn(module, fully_qualified_name) -> bool``; default: every
            ``nn.Linear``.

    Returns a :class:`SwapReport`. Nothing is modified if building any replacement fails.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, SwapConfig):
        raise TypeError(f"swap_: config must be a SwapConfig, got {type(config).__name__}")
    keep = filter_fn or _default_filter
    before = _count(model)
    planned: list[tuple[str, nn.Module, nn.Linear]] = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and keep(module, name):
            planned.append((name, config.replace(module, name), module))
    report = SwapReport(params_before=before, params_after=before)
    for name, new, old in planned:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        old_n = sum(p.numel() for p in old.parameters())
        new_n = sum(p.numel() for p in new.parameters())
        report.layers.append(
            LayerSwap(
                name=name,
                in_features=old.in_features,
                out_features=old.out_features,
                rank=getattr(new, "rank", min(old.in_features, old.out_features)),
                params_before=old_n,
                params_after=new_n,
                error=getattr(new, "approximation_error", None),
            )
        )
    report.params_after = _count(model)
    return report
