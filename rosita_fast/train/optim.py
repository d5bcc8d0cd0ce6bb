"""Building the stage's optimizer with the method's weight-decay grouping."""

from __future__ import annotations

import torch
from torch import nn

from .bert_adam import BertAdam
from .config import TrainConfig

__all__ = ["build_optimizer", "decay_group_names"]


def decay_group_names(model: nn.Module) -> list[list[str]]:
    """Parameter names of the two groups: ``[decayed, not decayed]``.

    Biases and normalisation weights are the one-dimensional parameters of these encoders; they
    are not decayed (method 5.1). Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(name)
    return [decay, no_decay]


def build_optimizer(
    model: nn.Module, config: TrainConfig, group_names: list[list[str]] | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``config`` asks for over ``model``'s trainable parameters.

    Args:
        group_names: parameter names per group, in order (``[decayed, not decayed]``). Default:
            :func:`decay_group_names`. A resumed run passes the names saved with the optimizer
            state so that positions in the saved state line up with the same tensors.

    Every group records ``base_lr``, which :class:`~.lr_schedule.LRSchedule` scales.
    """
    names = group_names if group_names is not None else decay_group_names(model)
    if len(names) != 2:
        raise ValueError(f"expected [decayed, not decayed] parameter names; got {len(names)} "
                         "groups")
    params = dict(model.named_parameters())
    missing = [n for group in names for n in group if n not in params]
    if missing:
        raise KeyError(f"optimizer parameters not in the model: {missing[:5]}")
    groups = [
        {"params": [params[n] for n in group], "weight_decay": wd, "base_lr": config.learning_rate}
        for group, wd in zip(names, (config.weight_decay, 0.0), strict=True)
    ]
    betas = (config.adam_beta1, config.adam_beta2)
    fused = config.fused_optimizer and all(_fusable(p) for g in groups for p in g["params"])
    if config.optimizer == "bert_adam":
        return BertAdam(groups, lr=config.learning_rate, betas=betas, eps=config.epsilon,
                        max_grad_norm=config.max_grad_norm, fused=fused)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, eps=config.epsilon,
                             fused=fused or None)


def _fusable(param: torch.Tensor) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return (param.is_floating_point() and type(param) in (torch.Tensor, nn.Parameter)
            and param.device.type in _get_fused_kernels_supported_devices())
