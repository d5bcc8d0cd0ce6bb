"""Model-side quirk of the method's code (7.2): ReLU, and no dropout, before the classifier.

The authors' distillation model computes ``classifier(relu(pooler_output))`` whereas a Hugging Face
``BertForSequenceClassification`` computes ``classifier(dropout(pooler_output))``. The switch below
changes a loaded HF model in place without touching its parameters, so checkpoints stay plain HF
checkpoints; it must be applied again after reloading.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ReluClassifierHandle:
    """Undo handle returned by :func:`apply_relu_before_classifier`."""

    def __init__(self, model: nn.Module, hook: Any, dropout: nn.Module | None) -> None:
        self._model, self._hook, self._dropout = model, hook, dropout

    def remove(self) -> None:
        """Restore the model's original classifier path."""
        self._hook.remove()
        if self._dropout is not None:
            # Detached while swapped out, it missed any train()/eval() calls on the model.
            self._dropout.train(self._model.training)
            self._model.dropout = self._dropout
            self._dropout = None


def _relu_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (F.relu(args[0]), *args[1:])


def apply_relu_before_classifier(model: nn.Module) -> ReluClassifierHandle:
    """Make a BERT-style sequence classifier compute ``classifier(relu(pooled))`` (quirk 7.2).

    The model must have a ``classifier`` ``nn.Linear`` (BERT, MiniLM, ...); its ``dropout`` in
    front of the classifier is replaced by identity.

    Raises:
        TypeError: the model has no linear ``classifier`` (e.g. RoBERTa's two-layer head).
    """
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear 'classifier'; the ReLU quirk only "
                        "applies to BERT-style sequence classifiers")
    dropout = getattr(model, "dropout", None)
    if isinstance(dropout, nn.Dropout):
        model.dropout = nn.Identity()
    else:
        dropout = None
    hook = classifier.register_forward_pre_hook(_relu_input)
    return ReluClassifierHandle(model, hook, dropout)
