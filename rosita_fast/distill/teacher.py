"""Running the teacher for distillation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .kd_loss import KDLoss

# Only these batch entries are model inputs; labels must not reach the teacher (it would compute
# a loss nobody uses).
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def teacher_forward(
    teacher: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    kd: KDLoss,
    *,
    keep_dropout: bool | None = None,
) -> Any:
    """Run the teacher without gradients and with the outputs ``kd`` needs.

    By default the teacher is put in eval mode (dropout off). ``keep_dropout=True`` - or
    ``kd.config.teacher_dropout`` when not given - reproduces the method's quirk 7.1 (teacher left
    in training mode, so its targets carry dropout noise).
    """
    if keep_dropout is None:
        keep_dropout = kd.config.teacher_dropout
    teacher.train(keep_dropout)
    inputs = {k: batch[k] for k in _INPUT_KEYS if k in batch}
    with torch.no_grad(), kd.forward_context(teacher):
        return teacher(**inputs, **kd.model_kwargs())
