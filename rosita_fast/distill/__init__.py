"""Knowledge distillation for rosita_fast: reference loss terms, layer mappings, the combined
:class:`KDLoss` (on the fused loss ops by default), and helpers for the teacher forward pass and
the method's quirks.
"""

from .kd_config import KDConfig
from .kd_loss import FUSED_FUNCTIONS, REFERENCE_FUNCTIONS, KDLoss, KDLossOutput, LossFunctions
from .layer_map import (
    LayerMapError,
    resolve_layer_map,
    rosita_layer_map,
    uniform_layer_map,
)
from .losses import (
    attention_mse,
    gold_label_loss,
    hidden_mse,
    kl_divergence,
    logits_mse,
    soft_cross_entropy,
)
from .quirks import ReluClassifierHandle, apply_relu_before_classifier
from .teacher import teacher_forward

__all__ = [
    "FUSED_FUNCTIONS", "REFERENCE_FUNCTIONS", "KDConfig", "KDLoss", "KDLossOutput",
    "LayerMapError", "LossFunctions",
    "ReluClassifierHandle", "apply_relu_before_classifier", "attention_mse", "gold_label_loss",
    "hidden_mse", "kl_divergence", "logits_mse", "resolve_layer_map", "rosita_layer_map",
    "soft_cross_entropy", "teacher_forward", "uniform_layer_map",
]
