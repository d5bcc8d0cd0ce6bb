"""The activations the fused kernels apply in their epilogue, by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Codes shared with csrc/include/rosita_fast/epilogue.h and kernels/lowrank_linear.py.
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

