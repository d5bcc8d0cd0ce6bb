"""``FusedFFN``: a Transformer FFN, ``LayerNorm(x + W2 act(W1 x + b1) + b2)``, in two fused ops.

The first linear carries bias and activation (GELU in its erf or tanh form, or ReLU) in its
epilogue; the second carries bias, residual add and LayerNorm. Any width (pruned FFNs keep odd
sizes). The module adopts Hugging Face's ``intermediate`` and ``output`` modules under those names,
so the parameters keep their stock names (``intermediate.dense``, ``output.dense``,
``output.LayerNorm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rosita_fast.modules._derived import (
    DerivedCache,
    DerivedCacheOwner,
    has_hooks,
    pack_for_inference,
    records_grad,
)
from rosita_fast.ops import linear_act, linear_residual_layernorm

__all__ = ["FusedFFN", "activation_for"]

# Hugging Face ``hidden_act`` names -> the fused ops' activations. gelu_new/gelu_fast are the tanh
# approximation written out; the op's tanh form is the same function.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def activation_for(hidden_act) -> str:
    """The fused ops' activation for a Hugging Face ``config.hidden_act`` (or ``ValueError``)."""
    if isinstance(hidden_act, str) and hidden_act in _HF_ACTIVATIONS:
        return _HF_ACTIVATIONS[hidden_act]
    raise ValueError(
        f"fast modules: hidden_act {hidden_act!r} has no fused form; supported: "
        f"{sorted(_HF_ACTIVATIONS)}"
    )


class FusedFFN(DerivedCacheOwner):
    """``LayerNorm(x + dropout(W2 act(W1 x + b1) + b2))`` with ``W1``/``W2`` any width.

    Children: ``intermediate`` (holds the first linear as ``dense``) and ``output`` (holds
    ``dense`` and ``LayerNorm``), the Hugging Face modules themselves. In training mode the hidden
    dropout runs inside ``linear_residual_layernorm`` (its counter-based dropout; the mask differs
    from ``nn.Dropout``'s draw but has the same distribution). A forward hook on the second linear
    unfuses the output block (the stock module is called so the hook fires); :meth:`fused_paths`
    says so.
    """

    def __init__(
        self,
        intermediate: nn.Module,
        output: nn.Module,
        *,
        activation: str,
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.output = output
        self.activation = activation
        self.hidden_dropout = hidden_dropout
        self._derived = DerivedCache()

    @classmethod
    def from_layer(cls, layer: nn.Module, adapter, config) -> FusedFFN:
        """Build from one Transformer ``layer`` (its ``intermediate`` and ``output`` blocks)."""
        for path in (adapter.ffn_input, adapter.ffn_output, adapter.ffn_layernorm):
            layer.get_submodule(path)
        return cls(
            layer.get_submodule("intermediate"),
            layer.get_submodule("output"),
            activation=activation_for(getattr(config, "hidden_act", None)),
            hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
        )

    def fused_paths(self, training: bool | None = None) -> dict[str, bool]:
        """Which parts run fused in the given (default: current) mode."""
        training = self.training if training is None else training
        return {"input_activation": not has_hooks(self.intermediate.dense),
                "output_layernorm": not has_hooks(self.output.dense)}

    def _packed(self, name: str, linear: nn.Linear, rows: int):
        if records_grad(linear.weight, linear.bias):
            return None
        return self._derived.get(
            name, (linear.weight,), lambda: pack_for_inference(linear.weight, rows)
        )

    def run(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """The FFN of ``x`` (``[..., hidden]``) in training mode or not."""
        first, second = self.intermediate.dense, self.output.dense
        ln = self.output.LayerNorm
        rows = x.numel() // x.shape[-1]
        fused = self.fused_paths(training)
        if fused["input_activation"]:
            h = linear_act(x, first.weight, first.bias, self.activation,
                           self._packed("in", first, rows))
        else:
            h = self.intermediate(x)
        drop = self.hidden_dropout if training else 0.0
        if fused["output_layernorm"]:
            return linear_residual_layernorm(
                h, second.weight, second.bias, x, ln.weight, ln.bias, ln.eps,
                self._packed("out", second, rows) if drop == 0 else None, dropout_p=drop,
            )
        z = second(h) if has_hooks(second) else linear_act(h, second.weight, second.bias, "none")
        z = F.dropout(z, self.hidden_dropout, training=training)
        return F.layer_norm(z + x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(x + W2 act(W1 x + b1) + b2)``."""
        return self.run(x, self.training)
