"""RoBERTa: adapter and student classes (``model_type`` ``rosita_roberta``)."""

from __future__ import annotations

from transformers import (
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

from .adapter import ArchitectureAdapter, register_adapter
from .student import StudentConfigFields, StudentModelMixin

__all__ = [
    "ROBERTA_ADAPTER",
    "RositaRobertaConfig",
    "RositaRobertaForMaskedLM",
    "RositaRobertaForSequenceClassification",
    "RositaRobertaModel",
]


class RositaRobertaConfig(StudentConfigFields, RobertaConfig):
    """RoBERTa config with per-layer heads, per-layer FFN sizes and an optional embedding rank."""

    model_type = "rosita_roberta"


class RositaRobertaModel(StudentModelMixin, RobertaModel):
    """RoBERTa encoder with per-layer shapes (see :class:`RositaRobertaConfig`)."""

    config_class = RositaRobertaConfig


class RositaRobertaForSequenceClassification(StudentModelMixin, RobertaForSequenceClassification):
    """RoBERTa sequence classifier with per-layer shapes."""

    config_class = RositaRobertaConfig


class RositaRobertaForMaskedLM(StudentModelMixin, RobertaForMaskedLM):
    """RoBERTa masked-LM with per-layer shapes; the decoder unties from a factorized embedding."""

    config_class = RositaRobertaConfig


ROBERTA_ADAPTER = register_adapter(
    ArchitectureAdapter(
        model_type="roberta",
        student_model_type=RositaRobertaConfig.model_type,
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        self_attention="attention.self",
        student_config_class=RositaRobertaConfig,
        student_classes={
            RobertaModel: RositaRobertaModel,
            RobertaForSequenceClassification: RositaRobertaForSequenceClassification,
            RobertaForMaskedLM: RositaRobertaForMaskedLM,
        },
    )
)
