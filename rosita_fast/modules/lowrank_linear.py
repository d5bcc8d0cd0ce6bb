"""``LowRankLinear``: a linear layer stored as two factors and run by the fused low-rank op."""

from __future__ import annotations

import math

import torch
from torch import nn

from rosita_fast import ops
from rosita_fast.activations import check_activation


def svd_rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep ``energy`` of the squared spectrum."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = singular_values.double() ** 2
    total = s2.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    # A tiny tolerance so energy=1.0 does not demand the last rounding-error singular value.
    idx = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item())
    return min(idx + 1, singular_values.numel())


class LowRankLinear(nn.Module):
    """``y = act(x @ v.T @ u.T + bias)`` with ``u: [out, rank]``, ``v: [rank, in]``.

    A drop-in replacement for ``nn.Linear`` (plus an optional fused activation) with
    ``rank * (in + out)`` weights instead of ``in * out``. The forward runs
    :func:`rosita_fast.ops.lowrank_linear`, so the backend follows ``rosita_fast.use_backend``.

    Attributes:
        approximation_error: relative Frobenius error ``||W - u v|| / ||W||`` of the factorization
            when built by :meth:`from_linear`, else ``None``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        activation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankLinear: {name} must be a positive int, got {value!r}")
        if rank > min(in_features, out_features):
            raise ValueError(
                f"LowRankLinear: rank {rank} exceeds min(in_features, out_features) = "
                f"{min(in_features, out_features)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.activation = check_activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.approximation_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose product has the variance of ``nn.Linear``'s default init."""
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.rank)
        nn.init.uniform_(self.u, -bound, bound)
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -b, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lowrank_linear(x, self.u, self.v, self.bias, self.activation)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        energy: float | None = None,
        activation: str = "none",
    ) -> LowRankLinear:
        """Factorize ``linear`` by truncated SVD.

        Give ``rank`` or ``energy`` (the smallest rank keeping that fraction of the squared
        singular values), not both; with neither the factorization is full rank (exact up to
        rounding). The singular values are split evenly between the factors
        (``u = U sqrt(S)``, ``v = sqrt(S) V^T``), which keeps both factors equally scaled for
        further training. The SVD runs in float64; the factors take ``linear``'s dtype and device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if rank is not None and energy is not None:
            raise ValueError("from_linear: give rank or energy, not both")
        weight = linear.weight.detach()
        out_f, in_f = weight.shape
        full = min(in_f, out_f)
        if rank is not None and (not isinstance(rank, int) or not 1 <= rank <= full):
            raise ValueError(
                f"from_linear: rank must be an int in [1, min(in, out) = {full}], got {rank!r}"
            )
        w64 = weight.to(torch.float64)
        U, S, Vh = torch.linalg.svd(w64, full_matrices=False)
        if rank is None:
            rank = full if energy is None else svd_rank_for_energy(S, energy)
        module = cls(in_f, out_f, rank, bias=linear.bias is not None, activation=activation,
                     device=weight.device, dtype=weight.dtype)
        root = S[:rank].sqrt()
        with torch.no_grad():
            module.u.copy_(U[:, :rank] * root)
            module.v.copy_(root[:, None] * Vh[:rank])
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        total = (S**2).sum()
        tail = (S[rank:] ** 2).sum()
        module.approximation_error = float((tail / total).sqrt()) if total > 0 else 0.0
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )
