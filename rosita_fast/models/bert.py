"""BERT: adapter and student classes (``model_type`` ``rosita_bert``)."""

from __future__ import annotations

from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

from .adapter import ArchitectureAdapter, register_adapter
from .student import StudentConfigFields, StudentModelMixin

__all__ = [
    "BERT_ADAPTER",
    "RositaBertConfig",
    "RositaBertForMaskedLM",
    "RositaBertForSequenceClassification",
    "RositaBertModel",
]


class RositaBertConfig(StudentConfigFields, BertConfig):
    """BERT config with per-layer heads, per-layer FFN sizes and an optional embedding rank."""

    model_type = "rosita_bert"


class RositaBertModel(StudentModelMixin, BertModel):
    """BERT encoder with per-layer shapes (see :class:`RositaBertConfig`)."""

    config_class = RositaBertConfig


class RositaBertForSequenceClassification(StudentModelMixin, BertForSequenceClassification):
    """BERT sequence classifier with per-layer shapes."""

    config_class = RositaBertConfig


class RositaBertForMaskedLM(StudentModelMixin, BertForMaskedLM):
    """BERT masked-LM with per-layer shapes; the decoder unties from a factorized embedding."""

    config_class = RositaBertConfig


BERT_ADAPTER = register_adapter(
    ArchitectureAdapter(
        model_type="bert",
        student_model_type=RositaBertConfig.model_type,
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        self_attention="attention.self",
        student_config_class=RositaBertConfig,
        student_classes={
            BertModel: RositaBertModel,
            BertForSequenceClassification: RositaBertForSequenceClassification,
            BertForMaskedLM: RositaBertForMaskedLM,
        },
    )
)
