"""Architecture adapters and student models; importing this registers them with the Auto classes.

After ``import rosita_fast`` (which imports this package), a saved student loads with the stock
``transformers.AutoModel*.from_pretrained(path)``: the student configs are registered with
``AutoConfig`` under ``rosita_bert``, ``rosita_roberta`` and ``rosita_mpnet``, the student model
classes with ``AutoModel``, ``AutoModelForSequenceClassification`` and ``AutoModelForMaskedLM``,
and the dense architecture's tokenizer with ``AutoTokenizer``. Nothing inside transformers is
patched; other models are unaffected.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
    MPNetTokenizer,
    RobertaTokenizer,
)

from .adapter import (
    ArchitectureAdapter,
    UnsupportedArchitectureError,
    adapter_for,
    register_adapter,
    registered_adapters,
)
from .bert import (
    BERT_ADAPTER,
    RositaBertConfig,
    RositaBertForMaskedLM,
    RositaBertForSequenceClassification,
    RositaBertModel,
)
from .factorized_embedding import FactorizedEmbedding
from .mpnet import (
    MPNET_ADAPTER,
    RositaMPNetConfig,
    RositaMPNetForMaskedLM,
    RositaMPNetForSequenceClassification,
    RositaMPNetModel,
)
from .pretrained import cache_dir, minilm_path, mpnet_path
from .roberta import (
    ROBERTA_ADAPTER,
    RositaRobertaConfig,
    RositaRobertaForMaskedLM,
    RositaRobertaForSequenceClassification,
    RositaRobertaModel,
)
from .student import (
    ModelLayout,
    StudentConfigFields,
    StudentModelMixin,
    convert_to_student_,
    model_layout,
)

__all__ = [
    "ArchitectureAdapter",
    "BERT_ADAPTER",
    "FactorizedEmbedding",
    "MPNET_ADAPTER",
    "ModelLayout",
    "ROBERTA_ADAPTER",
    "RositaBertConfig",
    "RositaBertForMaskedLM",
    "RositaBertForSequenceClassification",
    "RositaBertModel",
    "RositaMPNetConfig",
    "RositaMPNetForMaskedLM",
    "RositaMPNetForSequenceClassification",
    "RositaMPNetModel",
    "RositaRobertaConfig",
    "RositaRobertaForMaskedLM",
    "RositaRobertaForSequenceClassification",
    "RositaRobertaModel",
    "StudentConfigFields",
    "StudentModelMixin",
    "UnsupportedArchitectureError",
    "adapter_for",
    "cache_dir",
    "convert_to_student_",
    "minilm_path",
    "model_layout",
    "mpnet_path",
    "register_adapter",
    "registered_adapters",
]

_AUTO_HEADS = {
    AutoModel: ("Model",),
    AutoModelForSequenceClassification: ("ForSequenceClassification",),
    AutoModelForMaskedLM: ("ForMaskedLM",),
}
_TOKENIZERS = {
    RositaBertConfig: BertTokenizer,
    RositaRobertaConfig: RobertaTokenizer,
    RositaMPNetConfig: MPNetTokenizer,
}


def _register_auto_classes() -> None:
    # exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
    for adapter in registered_adapters():
        config_cls = adapter.student_config_class
        AutoConfig.register(adapter.student_model_type, config_cls, exist_ok=True)
        AutoTokenizer.register(config_cls, tokenizer_class=_TOKENIZERS[config_cls], exist_ok=True)
        for student_cls in adapter.student_classes.values():
            for auto_cls, suffixes in _AUTO_HEADS.items():
                if student_cls.__name__.endswith(suffixes):
                    auto_cls.register(config_cls, student_cls, exist_ok=True)


_register_auto_classes()
