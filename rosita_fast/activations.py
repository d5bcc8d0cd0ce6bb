"""The activations the fused kernels apply in their epilogue, by name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The one definition of the activation codes: the Triton kernels import it (kernels/_common.py)
# and a test checks that csrc/include/rosita_fast/epilogue.h (enum Activation) agrees.
ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}


def check_activation(name: str) -> str:
    """Return ``name`` if it is a supported activation, else raise ``ValueError``."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        )
    return name


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """Apply activation ``name`` with plain PyTorch (the reference semantics)."""
    if name == "none":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")



def activation_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """``d act(z) / dz`` written out (ops run below autograd, so it cannot be taped there)."""
    if name == "none":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5)))
        return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
