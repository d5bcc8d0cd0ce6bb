"""BertAdam: the Adam variant of the original BERT code that ROSITA trains with (method 5.1).

It differs from ``torch.optim.AdamW`` in two ways that change the trajectory: there is no bias
correction of the moment estimates (so early updates are smaller than AdamW's), and each
parameter tensor's gradient is clipped to ``max_grad_norm`` on its own rather than all gradients
together. Weight decay is decoupled (added to the update, scaled by the learning rate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["BertAdam"]


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, with per-tensor gradient clipping and decoupled decay.

    Args:
        params: parameters or param groups.
        lr: learning rate (a scheduler may change each group's ``lr`` between steps).
        betas: moment decay rates.
        eps: added to the root of the second moment (method: 1e-6).
        weight_decay: decoupled weight decay.
        max_grad_norm: clip each tensor's gradient to this norm; ``None`` or 0 disables it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid BertAdam hyper-parameters: lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "max_grad_norm": max_grad_norm or 0.0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["max_grad_norm"] > 0:
                    norm = torch.linalg.vector_norm(grad)
                    # Same rule as torch's clip_grad_norm_, applied to this tensor alone.
                    grad = grad * torch.clamp(group["max_grad_norm"] / (norm + 1e-6), max=1.0)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss
