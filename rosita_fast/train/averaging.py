"""An exponential moving average of a model's weights (Polyak averaging), for selection.

A small student's dev metric moves by several points from one evaluation to the next (CoLA's
MCC on 1,000 rows: about +-0.03), so picking the best of a dozen evaluations mostly picks noise.
The average of the weights over the last few hundred updates is a smoother model; evaluating
and saving it instead of the raw weights makes selection choose between models rather than
between fluctuations.

The average restarts at every pruning event (the shapes change) with a short warm-up,
``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so it follows the freshly
pruned model at first instead of remembering its initial values for ``1 / (1 - decay)`` steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage"]


def _float_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]


class WeightAverage:
    """The exponential moving average of ``model``'s floating-point parameters.

    Args:
        model: the model whose parameters are averaged (bound now, and by :meth:`reset`).
        decay: the long-run decay, in (0, 1): the average spans about ``1 / (1 - decay)``
            updates.

    Call :meth:`update` after every optimizer step and :meth:`reset` after anything that
    replaces the model's parameters (a pruning event); :meth:`applied` puts the average into
    the model for the duration of a ``with`` block.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start over from ``model``'s current parameters."""
        self._bound = _float_parameters(model)
        self.shadow = [p.detach().clone() for _, p in self._bound]
        self.updates = 0

    def _check_bound(self, model: nn.Module) -> list[torch.Tensor]:
        current = _float_parameters(model)
        if [id(p) for _, p in current] != [id(p) for _, p in self._bound]:
            raise RuntimeError("the model's parameters were replaced since the weight average "
                               "was bound (a pruning event?); call reset(model) first")
        return [p for _, p in current]

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average."""
        params = self._check_bound(model)
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Run the block with the average in ``model``'s parameters; restore them after.

        The copies go through ``copy_`` under ``no_grad``, which bumps the parameters' version
        counters, so caches of derived weights (the fast modules') see the change both ways.
        """
        params = self._check_bound(model)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def state_dict(self) -> dict[str, Any]:
        """The average and its update count, keyed by parameter name (for checkpoints)."""
        names = [name for name, _ in self._bound]
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {n: t.clone() for n, t in zip(names, self.shadow, strict=True)}}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore :meth:`state_dict` output onto ``model`` (already in the saved shape).

        Raises:
            ValueError: the state's decay, names or shapes do not match ``model``.
        """
        if state["decay"] != self.decay:
            raise ValueError(f"the saved average has decay {state['decay']}, this one "
                             f"{self.decay}")
        bound = _float_parameters(model)
        shadow = state["shadow"]
        names = [n for n, _ in bound]
        if sorted(shadow) != sorted(names):
            raise ValueError("the saved average holds other parameters than the model: "
                             f"{sorted(set(shadow) ^ set(names))[:5]}")
        for name, p in bound:
            if shadow[name].shape != p.shape:
                raise ValueError(f"the saved average of {name} has shape "
                                 f"{tuple(shadow[name].shape)}, the model {tuple(p.shape)}")
        self._bound = bound
        self.shadow = [shadow[n].to(device=p.device, dtype=p.dtype).clone() for n, p in bound]
        self.updates = int(state["updates"])
