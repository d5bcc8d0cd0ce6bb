"""Which evaluated model is kept, and when to stop early (method section 3.6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Decision", "ModelSelection"]


@dataclass(frozen=True)
class Decision:
    """What to do after one evaluation."""

    save: bool
    """Write this model as the stage's selected model."""
    improved: bool
    """The metric beat the best value seen since pruning ended."""
    stop: bool
    """Patience ran out: end the stage now."""


@dataclass
class ModelSelection:
    """Best-checkpoint selection that only starts once pruning has ended, plus patience.

    While pruning is still in progress every evaluation replaces the saved model (earlier shapes
    are not candidates: the stage must end in its target shape). From the first evaluation after
    the last pruning event on, a model is saved only when the metric improves on the best
    post-pruning value. Early stopping counts steps without improvement from the later of the
    end of pruning and the last improvement.

    Attributes:
        patience_steps: stop after this many updates without improvement (``None``: never).
    """

    patience_steps: int | None = None
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    saved_step: int | None = None
    last_improvement: int | None = None

    def observe(
        self,
        step: int,
        metrics: dict[str, float],
        metric: str,
        *,
        pruning_done: bool,
        pruning_end_step: int,
    ) -> Decision:
        """Record the evaluation after ``step`` updates and decide what to do."""
        value = metrics[metric]
        if not pruning_done:
            self.saved_step = step
            return Decision(save=True, improved=False, stop=False)
        improved = self.best_metric is None or value > self.best_metric
        if improved:
            self.best_metric, self.best_step = value, step
            self.best_metrics = dict(metrics)
            self.saved_step = self.last_improvement = step
        clock = max(pruning_end_step, self.last_improvement or 0)
        stop = self.patience_steps is not None and step - clock >= self.patience_steps
        return Decision(save=improved, improved=improved, stop=stop)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for checkpoints."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        for key, value in state.items():
            setattr(self, key, value)
