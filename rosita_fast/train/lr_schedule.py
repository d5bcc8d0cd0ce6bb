"""Learning-rate multipliers per update, re-anchored at pruning events (method section 3.4)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LRSchedule"]


class LRSchedule:
    """The factor applied to each param group's base learning rate at every update.

    ``step`` below is the number of updates already done, so the first update is step 0.

    * ``"none"``: factor 1 throughout, and again 1 after a pruning event.
    * ``"linear"``: warm-up ``(step + 1) / W`` over the first ``W`` updates (the first update is
      not wasted at LR 0), then ``(N - step) / (N - W)``, reaching 0 at the nominal end ``N``.

    At a pruning event at step ``s`` the method builds a new optimizer with no warm-up whose LR
    starts at the current value and decays linearly to 0 at the nominal end. :meth:`reanchor`
    reproduces that: afterwards the factor is ``f(s) * (N - step) / (N - s)``. After the warm-up
    this continues the same line; an event during warm-up ends the warm-up early.

    Args:
        kind: ``"none"`` or ``"linear"``.
        total_steps: the nominal number of updates ``N`` of the stage.
        warmup_steps: ``W``; only for ``"linear"``.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0) -> None:
        if kind not in ("none", "linear"):
            raise ValueError(f"lr schedule must be 'none' or 'linear', got {kind!r}")
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps "
                             f"({total_steps})")
        if kind == "none" and warmup_steps:
            raise ValueError("the 'none' schedule has no warm-up")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.anchor_step: int | None = None
        self.anchor_factor = 1.0

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for the update after ``step`` updates."""
        n = self.total_steps
        if self.kind == "none":
            return 1.0
        if self.anchor_step is not None:
            remaining = n - self.anchor_step
            return self.anchor_factor * max(0.0, (n - step) / remaining) if remaining > 0 else 0.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return max(0.0, (n - step) / (n - self.warmup_steps))

    def reanchor(self, step: int) -> None:
        """Restart the decay at ``step`` from the current factor (a pruning event fired)."""
        if self.kind == "none":
            return
        self.anchor_factor = self.factor(step)
        self.anchor_step = int(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` to its ``base_lr`` times :meth:`factor`; return the factor.

        Groups without ``base_lr`` get it recorded from their current ``lr`` first.
        """
        f = self.factor(step)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * f
        return f

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule after a resume."""
        return {"kind": self.kind, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "anchor_step": self.anchor_step,
                "anchor_factor": self.anchor_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (it must describe the same schedule)."""
        same = (state["kind"], state["total_steps"], state["warmup_steps"]) == (
            self.kind, self.total_steps, self.warmup_steps)
        if not same:
            raise ValueError(f"saved LR schedule {state} does not match this one "
                             f"({self.kind}, {self.total_steps}, {self.warmup_steps})")
        self.anchor_step = state["anchor_step"]
        self.anchor_factor = float(state["anchor_factor"])
