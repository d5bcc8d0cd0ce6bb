"""Plain-PyTorch implementations of every rosita_fast op: the ``reference`` backend.

They are the semantics the fused kernels must reproduce, and the CPU fallback when the C++
extension is missing. The backward formulas here are written out (not obtained by autograd) so the
reference backend exercises the same decomposition as the kernels; the tests compare all backends,
this one included, with float64 autograd of :func:`lowrank_linear_forward`.
"""

from __future__ import annotations

import math

import torch

from rosita_fast.activations import apply_activation


def _acc(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def lowrank_linear_forward(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """``act(x @ v^T @ u^T + bias)`` in plain PyTorch."""
    z = (_acc(x) @ _acc(v).t()) @ _acc(u).t()
    if bias is not None:
        z = z + _acc(bias)
    return apply_activation(z, activation).to(x.dtype)


def _activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz, written out (ops run below autograd, so it cannot be taped here)."""
    if activation == "none":
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5)))
        return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if activation == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
    raise ValueError(f"unknown activation {activation!r}")


def lowrank_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, du, dv, dbias)`` of :func:`lowrank_linear_forward`."""
    x2d = _acc(x.reshape(-1, x.shape[-1]))
    g2d = _acc(grad.reshape(-1, u.shape[0]))
    u_, v_ = _acc(u), _acc(v)
    h = x2d @ v_.t()
    dz = g2d
    if activation != "none":
        z = h @ u_.t()
        if bias is not None:
            z = z + _acc(bias)
        dz = g2d * _activation_grad(z, activation)
    g = dz @ u_
    dx = (g @ v_).to(x.dtype).view(x.shape)
    du = (dz.t() @ h).to(u.dtype)
    dv = (g.t() @ x2d).to(v.dtype)
    dbias = dz.sum(0).to(bias.dtype) if bias is not None else None
    return dx, du, dv, dbias
