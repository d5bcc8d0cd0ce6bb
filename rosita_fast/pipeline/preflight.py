"""Checks of a whole recipe against the model and the data, before the first stage trains.

The stage trainer validates its pruning schedule when the stage starts; in a pipeline that can
be an hour in. Here the shape every stage starts from is followed through the recipe (layers
and heads only: the quantities that decide how many pruning events a schedule has), so targets
that do not fit and schedules with less than one update between events fail up front.
"""

from __future__ import annotations

from typing import Any

from ..train import TrainConfig
from .errors import PipelineError
from .recipe import PRETRAINED, Recipe

__all__ = ["check_positions", "check_schedules"]


def _count(value: int | list[int] | None, default: int) -> int:
    if value is None:
        return default
    return min(value) if isinstance(value, list) else value


def check_schedules(recipe: Recipe, configs: dict[str, TrainConfig], model_config: Any,
                    n_train: int) -> None:
    """Raise :class:`PipelineError` for a stage whose pruning cannot run as configured.

    Args:
        recipe: the recipe.
        configs: each stage's full train config, by stage name.
        model_config: the starting model's Hugging Face config.
        n_train: training examples available to stages without ``train_examples`` (stages on
            augmented data are skipped: their size is known only once augmentation ran).
    """
    shapes: dict[str, tuple[int, int]] = {}
    base = (model_config.num_hidden_layers, model_config.num_attention_heads)
    for spec in recipe.stages:
        layers, heads = base if spec.init == PRETRAINED else shapes[spec.init]
        if spec.keep_layers is not None:
            if spec.keep_layers > layers:
                raise PipelineError(f"stage {spec.name}: keep_layers {spec.keep_layers} exceeds "
                                    f"the {layers} layers it starts from")
            layers = spec.keep_layers
        config = configs[spec.name]
        pruning = config.pruning
        if pruning is not None:
            where = f"stage {spec.name}: pruning"
            target_layers = pruning.layers if pruning.layers is not None else layers
            target_heads = _count(pruning.heads, heads)
            if not 1 <= target_layers <= layers:
                raise PipelineError(f"{where}: cannot go from {layers} to {target_layers} layers")
            if not 1 <= target_heads <= heads:
                raise PipelineError(f"{where}: cannot go from {heads} to {target_heads} heads")
            if pruning.mode == "depth":
                events = layers - target_layers
            elif pruning.mode == "width":
                events = pruning.num_events or (heads - target_heads)
            else:
                events = 1
            augmented = spec.data == "augmented" and recipe.data.augment is not None
            if events > 0 and not augmented:
                _check_spacing(where, config, events, spec.train_examples or n_train)
            layers, heads = target_layers, target_heads
        shapes[spec.name] = (layers, heads)


def _check_spacing(where: str, config: TrainConfig, events: int, n_examples: int) -> None:
    total = config.max_steps or (n_examples // config.batch_size) * config.epochs
    pruning = config.pruning
    if pruning.mode == "one_step":
        if pruning.at_step >= total:
            raise PipelineError(f"{where}: at_step {pruning.at_step} is not before the stage's "
                                f"end ({total} updates)")
        return
    if pruning.interval is not None:
        interval = pruning.interval
    else:
        interval = int(pruning.prune_fraction * total) // events
    if interval < 1 or interval * events >= total:
        raise PipelineError(f"{where}: {events} events do not fit in {total} updates with "
                            f"prune_fraction={pruning.prune_fraction}, interval="
                            f"{pruning.interval}; train longer or prune over a larger fraction")


def check_positions(recipe: Recipe, max_length: int, model_config: Any) -> None:
    """Raise :class:`PipelineError` for a stage's ``max_positions`` that the recipe's inputs
    (``max_length`` tokens) or the model's position table (an upper bound: RoBERTa-style tables
    also hold a padding row, which :func:`~rosita_fast.compress.prune_positions_` checks
    exactly when the stage starts) cannot satisfy."""
    table = getattr(model_config, "max_position_embeddings", None)
    for spec in recipe.stages:
        if spec.max_positions is None:
            continue
        if spec.max_positions < max_length:
            raise PipelineError(f"stage {spec.name}: max_positions {spec.max_positions} is "
                                f"shorter than data.max_length {max_length}; the stage's own "
                                "inputs would not fit")
        if table is not None and spec.max_positions > table:
            raise PipelineError(f"stage {spec.name}: max_positions {spec.max_positions} exceeds "
                                f"the model's {table} positions")
