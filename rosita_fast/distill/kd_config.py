"""Configuration of the distillation objective: terms, weights, and the method's quirks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .layer_map import LayerMapSpec

PREDICTION_LOSSES = ("soft_ce", "kl")


@dataclass(frozen=True)
class KDConfig:
    """Weights and options of :class:`~rosita_fast.distill.kd_loss.KDLoss`.

    The total loss is ``prediction_weight * L_pred + hidden_weight * sum_{m>=1} L_hidn^m
    + embedding_weight * L_hidn^0 + attention_weight * sum_m L_att^m + gold_weight * L_gold``.
    The defaults give prediction distillation alone (the method's first stages); ROSITA's final
    stage is ``KDConfig(hidden_weight=1.0)`` (the embedding term follows ``hidden_weight``).

    Attributes:
        prediction_weight: weight of the soft-label term (0 disables it).
        prediction_loss: ``"soft_ce"`` (method) or ``"kl"`` (same gradients, 0 at a perfect match).
            Regression heads (one output) always use the MSE between outputs.
        temperature: softening temperature (method: 1).
        scale_by_t2: multiply the soft-label term by ``T**2`` (no-op at ``T = 1``).
        hidden_weight: weight of the per-layer hidden-state MSE terms, summed over layers.
        embedding_weight: weight of the embedding-output term; ``None`` = ``hidden_weight``.
        layer_map: ``"rosita"`` (method 4.2: uniform if the depths divide, else the modulo rule),
            ``"uniform"``, a list of ``n_student + 1`` teacher indices, or ``{student: teacher}``.
        attention_weight: weight of attention-map MSE (not in the method; TinyBERT has it). Needs
            models loaded with ``attn_implementation="eager"`` so attention maps are returned.
        attention_average_heads: average maps over heads first, so students with fewer heads can
            be distilled; otherwise the head counts must match.
        gold_weight: weight of the cross-entropy against gold labels (not in the method).
        soft_ce_mean_over_classes: quirk 7.3 - average the soft CE over classes (divides it by the
            number of labels, shifting the balance towards the hidden terms).
        hidden_include_padding: quirk 7.4 - let padding positions count in the hidden MSE.
            Off by default: with per-batch dynamic padding the term would depend on batch makeup.
        teacher_dropout: quirk 7.1 - run the teacher in training mode (dropout on).
        relu_before_classifier: quirk 7.2 - apply ReLU to the pooled output and drop the dropout
            before the classifier, in teacher and student; the trainer applies it with
            :func:`~rosita_fast.distill.quirks.apply_relu_before_classifier`.
    """

    prediction_weight: float = 1.0
    prediction_loss: str = "soft_ce"
    temperature: float = 1.0
    scale_by_t2: bool = False
    hidden_weight: float = 0.0
    embedding_weight: float | None = None
    layer_map: LayerMapSpec = "rosita"
    attention_weight: float = 0.0
    attention_average_heads: bool = False
    gold_weight: float = 0.0
    soft_ce_mean_over_classes: bool = False
    hidden_include_padding: bool = False
    teacher_dropout: bool = False
    relu_before_classifier: bool = False

    def __post_init__(self) -> None:
        for name in ("prediction_weight", "hidden_weight", "attention_weight", "gold_weight",
                     "embedding_weight"):
            value = getattr(self, name)
            if name == "embedding_weight" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"KDConfig.{name} must be a number; got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"KDConfig.{name} must be a finite number >= 0; got {value}")
        if self.prediction_loss not in PREDICTION_LOSSES:
            raise ValueError(f"KDConfig.prediction_loss must be one of {PREDICTION_LOSSES}; "
                             f"got {self.prediction_loss!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) \
                or not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"KDConfig.temperature must be a positive number; "
                             f"got {self.temperature!r}")
        for field in dataclasses.fields(self):
            if field.type == "bool" and not isinstance(getattr(self, field.name), bool):
                raise TypeError(f"KDConfig.{field.name} must be true or false; "
                                f"got {getattr(self, field.name)!r}")
        if not isinstance(self.layer_map, str | list | tuple | Mapping):
            raise TypeError(f"KDConfig.layer_map must be a name, a list or a dict; "
                            f"got {self.layer_map!r}")
        if not any((self.prediction_weight, self.hidden_weight, self.effective_embedding_weight,
                    self.attention_weight, self.gold_weight)):
            raise ValueError("KDConfig: every loss weight is 0; nothing to train")

    @property
    def effective_embedding_weight(self) -> float:
        """The embedding-output weight after resolving ``None`` to ``hidden_weight``."""
        return self.hidden_weight if self.embedding_weight is None else self.embedding_weight

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KDConfig:
        """Build from a plain mapping (recipe files); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distillation option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    def with_method_quirks(self) -> KDConfig:
        """A copy with all four quirks of the authors' code switched on (method section 7)."""
        return dataclasses.replace(self, soft_ce_mean_over_classes=True,
                                   hidden_include_padding=True, teacher_dropout=True,
                                   relu_before_classifier=True)
