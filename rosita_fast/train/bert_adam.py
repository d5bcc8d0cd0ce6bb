"""BertAdam: the Adam variant of the original BERT code that ROSITA trains with (method 5.1).

It differs from ``torch.optim.AdamW`` in two ways that change the trajectory: there is no bias
correction of the moment estimates (so early updates are smaller than AdamW's), and each
parameter tensor's gradient is clipped to ``max_grad_norm`` on its own rather than all gradients
together. Weight decay is decoupled (added to the update, scaled by the learning rate).

With ``fused=True`` the update runs as torch's fused AdamW kernel (``torch._fused_adamw_``: one
pass over each tensor's values, moments and gradient instead of a dozen, most allocating), which
computes the same update once its bias corrections are 1 and each tensor's clipping factor is
passed as the gradient's scale: the kernel is given a step count so large that ``beta ** step``
is 0 (BertAdam's own count stays in the state), and one ``torch._foreach_norm`` call gives every
tensor's norm.
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
        fused: update through torch's fused AdamW kernel (see the module docstring; the same
            update up to float rounding). Every parameter must be a floating-point tensor on a
            device torch has the kernel for (CPU, CUDA). The gradients are used as scratch
            space (they are about to be zeroed).
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
        fused: bool = False,
    ) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid BertAdam hyper-parameters: lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "max_grad_norm": max_grad_norm or 0.0, "fused": fused}
        super().__init__(params, defaults)
        if fused:
            from torch.optim.optimizer import _device_dtype_check_for_fused

            for group in self.param_groups:
                for p in group["params"]:
                    _device_dtype_check_for_fused(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("fused"):
                self._fused_step(group)
                continue
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

    def _fused_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        beta1, beta2 = group["betas"]
        # beta ** 2**30 is 0 for every beta < 1 (and 0 ** n is 0): no bias correction.
        steps = [_no_correction_step(p.device) for p in params]
        options = {"lr": group["lr"], "beta1": beta1, "beta2": beta2,
                   "weight_decay": group["weight_decay"], "eps": group["eps"],
                   "amsgrad": False, "maximize": False}
        if group["max_grad_norm"] <= 0:
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, **options)
            torch.autograd.graph.increment_version(params)
            return
        norms = torch._foreach_norm(grads)
        # The kernel divides a gradient by grad_scale: 1 / the clipping factor of its tensor.
        scales = [torch.clamp((n + 1e-6) / group["max_grad_norm"], min=1.0).to(torch.float32)
                  for n in norms]
        for i in range(len(params)):
            torch._fused_adamw_([params[i]], [grads[i]], [exp_avgs[i]], [exp_avg_sqs[i]], [],
                                [steps[i]], grad_scale=scales[i], **options)
        # The kernel writes the parameters without bumping their version counters, which caches
        # of values derived from them (the fast modules' packed weights) check.
        torch.autograd.graph.increment_version(params)


_STEPS: dict[torch.device, torch.Tensor] = {}


def _no_correction_step(device: torch.device) -> torch.Tensor:
    step = _STEPS.get(device)
    if step is None:
        step = _STEPS[device] = torch.tensor(float(2**30), dtype=torch.float32, device=device)
    return step
