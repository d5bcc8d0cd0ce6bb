"""Module swapping: replace parts of a model with fast modules, in place.

Modelled on torchao's ``quantize_(model, config, filter_fn)``: the config's *type* selects a
handler from a registry (:func:`register_swap_handler`, like torchao's
``register_quantize_module_handler``); the handler names the modules it can replace (by default
every ``nn.Linear``; a handler for whole blocks finds attention, FFN or embedding modules through
the model adapters, see :func:`layer_blocks`) and builds each replacement;
``filter_fn(module, fully_qualified_name)`` chooses among them. All replacements are built before
the first one is installed, so a failure (say, a rank too large for one layer) leaves the model
untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn

from rosita_fast.modules.lowrank_linear import LowRankLinear

FilterFn = Callable[[nn.Module, str], bool]
Targets = Callable[[nn.Module], Iterable[tuple[str, nn.Module]]]
Replace = Callable[[nn.Module, "SwapConfig", str], nn.Module]

__all__ = [
    "LayerSwap",
    "LowRankConfig",
    "SwapConfig",
    "SwapHandler",
    "SwapReport",
    "layer_blocks",
    "linear_layers",
    "register_swap_handler",
    "swap_",
]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class LayerSwap:
    """What happened to one replaced module (``in_features``/``out_features``/``rank``/``error``
    are filled where they apply: linear layers and their factorizations)."""

    name: str
    in_features: int | None
    out_features: int | None
    rank: int | None
    params_before: int
    params_after: int
    error: float | None  # relative Frobenius error of a factorization
    replaced: str = ""  # "OldType -> NewType"


@dataclass
class SwapReport:
    """Parameters before and after, and one :class:`LayerSwap` per replaced module."""

    params_before: int
    params_after: int
    layers: list[LayerSwap] = field(default_factory=list)

    def __str__(self) -> str:
        def cell(value, spec=""):
            return "-" if value is None else format(value, spec)

        lines = [f"{'module':<56} {'in':>6} {'out':>6} {'rank':>5} {'params':>10} {'rel.err':>9}"]
        for s in self.layers:
            lines.append(
                f"{s.name:<56} {cell(s.in_features):>6} {cell(s.out_features):>6} "
                f"{cell(s.rank):>5} {s.params_after:>10,} {cell(s.error, '.3e'):>9}"
            )
        ratio = self.params_before / max(self.params_after, 1)
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.2f}x smaller), "
            f"{len(self.layers)} layers replaced"
        )
        return "\n".join(lines)


class SwapConfig:
    """Base class of swap configs; each concrete config type has a registered handler."""


@dataclass(frozen=True)
class SwapHandler:
    """How :func:`swap_` applies one config type: which modules, and what replaces each."""

    replace: Replace
    targets: Targets
    needs_model: bool = False
    """Whether ``replace`` takes the model as a fourth argument (for its config and adapter)."""
    finalize: Callable[[nn.Module, SwapConfig], None] | None = None
    """Called once with the model after every replacement is installed."""


_HANDLERS: dict[type, SwapHandler] = {}


def linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every plain ``nn.Linear`` of ``model`` (subclasses excluded: they carry other semantics)."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            yield name, module


def layer_blocks(model: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The module at ``path`` inside every Transformer layer, found through the model's adapter.

    ``path`` is an adapter attribute name (``"self_attention"``, ``"ffn_input"``, ...) or a dotted
    path relative to one layer. Yields fully qualified names, so handlers for whole blocks
    (attention, the FFN pair, ...) work on every supported architecture and on students.
    """
    from rosita_fast.models.adapter import adapter_for

    adapter = adapter_for(model)
    relative = getattr(adapter, path, path)
    layers = adapter.layer_list(model)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        block = layer.get_submodule(relative)
        yield names[id(block)], block


def register_swap_handler(
    config_type: type,
    *,
    targets: Targets = linear_layers,
    needs_model: bool = False,
    finalize: Callable[[nn.Module, SwapConfig], None] | None = None,
) -> Callable[[Replace], Replace]:
    """Register ``replace(module, config, name) -> new_module`` for configs of ``config_type``.

    ``targets(model)`` yields the ``(name, module)`` pairs the handler may replace (default:
    :func:`linear_layers`). Subclasses of ``config_type`` use the handler unless they register
    their own. ``needs_model=True``: the handler is called as ``replace(module, config, name,
    model)`` (whole-block handlers read the model's config and adapter). ``finalize(model,
    config)`` runs once after the replacements are installed. Used as a decorator::

        @register_swap_handler(MyConfig, targets=lambda m: layer_blocks(m, "self_attention"))
        def _swap_attention(module, config, name): ...
    """
    if not (isinstance(config_type, type) and issubclass(config_type, SwapConfig)):
        raise TypeError(f"register_swap_handler: {config_type!r} is not a SwapConfig subclass")

    def decorator(replace: Replace) -> Replace:
        _HANDLERS[config_type] = SwapHandler(replace=replace, targets=targets,
                                             needs_model=needs_model, finalize=finalize)
        return replace

    return decorator


def _handler_for(config: SwapConfig) -> SwapHandler:
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(
        f"swap_: no handler is registered for {type(config).__name__}; register one with "
        "rosita_fast.swap.register_swap_handler"
    )


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
        """The :class:`LowRankLinear` that replaces ``linear`` (``name`` is for error messages)."""
        full = min(linear.in_features, linear.out_features)
        if self.rank is not None and self.rank > full:
            raise ValueError(
                f"LowRankConfig(rank={self.rank}) does not fit layer {name!r} "
                f"({linear.in_features}->{linear.out_features}, max rank {full}); "
                "exclude it with filter_fn"
            )
        return LowRankLinear.from_linear(linear, rank=self.rank, energy=self.energy)


@register_swap_handler(LowRankConfig)
def _swap_lowrank(module: nn.Module, config: LowRankConfig, name: str) -> nn.Module:
    return config.replace(module, name)


def _default_filter(module: nn.Module, name: str) -> bool:
    return True


def swap_(
    model: nn.Module, config: SwapConfig, filter_fn: FilterFn | None = None
) -> SwapReport:
    """Replace the modules of ``model`` that ``config``'s handler targets, in place.

    Args:
        model: any module tree (e.g. a Hugging Face ``BertModel``); handlers for whole blocks
            need a model with a registered adapter (BERT, RoBERTa, MPNet and their students).
        config: what to replace, e.g. ``LowRankConfig(rank=64)``; its type picks the handler.
        filter_fn: ``filter_fn(module, fully_qualified_name) -> bool`` among the handler's
            targets; default: all of them.

    Returns a :class:`SwapReport`. Nothing is modified if building any replacement fails.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, SwapConfig):
        raise TypeError(f"swap_: config must be a SwapConfig, got {type(config).__name__}")
    handler = _handler_for(config)
    keep = filter_fn or _default_filter
    before = _count(model)
    planned: list[tuple[str, nn.Module, nn.Module]] = []
    for name, module in list(handler.targets(model)):
        if keep(module, name):
            extra = (model,) if handler.needs_model else ()
            new = handler.replace(module, config, name, *extra)
            if new is not module:  # a handler may decline a target by returning it
                new.train(module.training)  # new modules start in training mode
                planned.append((name, new, module))
    report = SwapReport(params_before=before, params_after=before)
    for name, new, old in planned:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        in_f = getattr(old, "in_features", None)
        out_f = getattr(old, "out_features", None)
        report.layers.append(
            LayerSwap(
                name=name,
                in_features=in_f,
                out_features=out_f,
                rank=getattr(new, "rank", min(in_f, out_f) if in_f and out_f else None),
                params_before=_count(old),
                params_after=_count(new),
                error=getattr(new, "approximation_error", None),
                replaced=f"{type(old).__name__} -> {type(new).__name__}",
            )
        )
    report.params_after = _count(model)
    if handler.finalize is not None and planned:
        handler.finalize(model, config)
    return report
