"""Dev-set evaluation of a sequence classifier with the task's GLUE metrics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..data import DataError, GlueTask, compute_metrics
from ..fast_modules import logits_context

__all__ = ["evaluate"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    task: GlueTask,
    device: torch.device,
) -> dict[str, float]:
    """All of ``task``'s metrics of ``model`` on labelled ``batches`` (dropout off).

    Only the logits are read, so a fast first-token classifier runs its last layer for the first
    position only (:func:`rosita_fast.fast_modules.logits_context`). The model's train/eval mode
    is restored afterwards.

    Raises:
        DataError: a batch has no labels (an unlabelled test split passed as dev data).
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with logits_context(model):
            for batch in batches:
                if "labels" not in batch:
                    raise DataError("the evaluation data has no labels; pass a labelled dev split")
                inputs = {k: batch[k].to(device) for k in _INPUTS if k in batch}
                logits.append(model(**inputs).logits.float().cpu())
                labels.append(batch["labels"])
    finally:
        model.train(was_training)
    if not logits:
        raise DataError("the evaluation data is empty")
    return compute_metrics(task, torch.cat(logits).numpy(), np.concatenate(
        [label.numpy() for label in labels]))
