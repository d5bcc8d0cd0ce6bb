"""Triton kernels for ``linear_act``: ``act(x @ weight^T + bias)``, and the dense GEMM building
blocks that :mod:`rosita_fast.kernels.linear_residual_layernorm` and
:mod:`rosita_fast.kernels.embedding_layernorm` reuse (tile loads, the grouped tile order, the
K loop, :func:`matmul_kernel`, the launch-table tiles and :func:`forced_tiles`).

Forward (:func:`linear_act_fwd_kernel`): one GEMM, a program per ``[BLOCK_M, BLOCK_N]`` output
tile (programs ordered in groups of ``GROUP_M`` row blocks so neighbours share weight tiles in L2),
fp32 accumulation over K, bias and activation in the epilogue. The training forward runs the same
kernel with ``STORE_Z``: it also stores the pre-activation ``z = x weight^T + bias`` (in the op's
``gemm_dtype``: x's, fp32 for fp16) that the backward uses for ``act'(z)``.

Backward:

- :func:`linear_act_dz_kernel` (elementwise, skipped without an activation, where ``dz`` is the
  incoming gradient): ``dz = grad * act'(z)`` written in the GEMM operand dtype, and each row
  block's column sums of ``dz`` (fp32, before rounding) into a ``[row_blocks, N]`` buffer whose
  sum (torch) is the bias gradient. ``z`` is the training forward's (for ReLU anything with its
  sign, e.g. the output); without one the training forward is run again to get it;
- :func:`matmul_kernel` twice: ``dx = dz @ weight`` and ``dweight = dz^T @ x`` (a transposed view:
  the kernel takes any strides). Without an activation the bias gradient is a torch column sum
  of the gradient (fp32 accumulation).

Precision, as in :mod:`rosita_fast.kernels.lowrank_linear`: fp32 inputs run every product with
``input_precision="tf32x3"``; fp16/bf16 operands go to ``tl.dot`` in their own dtype (fp32
accumulation) and the ``dz`` buffer is rounded to the input dtype; under the CPU interpreter
(``UPCAST``, the default there) fp16/bf16 operands are upcast to fp32 after loading and ``dz``
stays fp32, because the interpreter multiplies bf16 wrongly. Tile pointer offsets are 64-bit
(:func:`offsets_2d`).

The ``packed`` argument of the forward (the oneDNN-prepacked weight) is a CPU-only hint: the
Triton launchers accept it for the op's call signature and ignore it.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    ACTIVATION_CODES,
    DTYPES,
    TL_DTYPES,
    Launch,
    LaunchSpec,
    TileConfig,
    act_forward,
    act_grad,
    dot_precision,
    empty,
    load_tile,
    offsets_2d,
    sm_count,
    triton_interpreting,
)

# ----------------------------------------------------------------------------------------------
# Shared device code (imported by the other dense-GEMM kernel modules)
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program in a 1-D grid of ``cdiv(M, BLOCK_M) x
    cdiv(N, BLOCK_N)`` tiles, in groups of GROUP_M row blocks (the L2-friendly order)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def matmul_tile(
    a_ptr, a_rows, stride_am, stride_ak, b_ptr, b_cols, stride_bk, stride_bn, m_mask, n_mask, K,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``A[a_rows, :] @ B[:, b_cols]`` as a [BLOCK_M, BLOCK_N] fp32 block (zero where masked).
    ``a_rows`` may be gathered row indices (any integer tensor of BLOCK_M elements)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = load_tile(a_ptr, a_rows, offs_k, stride_am, stride_ak, m_mask, k_mask, UPCAST)
        b = load_tile(b_ptr, offs_k, b_cols, stride_bk, stride_bn, k_mask, n_mask, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def load_vector(ptr, offs, mask, stride):
    """A 1-D fp32 vector (a bias, LayerNorm parameters) read through its stride."""
    return tl.load(ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["HAS_BIAS", "ACTIVATION", "STORE_Z"])
def linear_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
    stride_om, stride_on, stride_zm, stride_zn,
    HAS_BIAS, ACTIVATION, STORE_Z,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile: ``act(x @ w^T + b)``; with STORE_Z also ``z = x @ w^T + b``."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # B[k, n] = w[n, k]: the weight read through swapped strides.
    acc = matmul_tile(
        x_ptr, offs_m, stride_xm, stride_xk, w_ptr, offs_n, stride_wk, stride_wn, m_mask, n_mask,
        K, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_BIAS:
        acc += load_vector(b_ptr, offs_n, n_mask, stride_b)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if STORE_Z:
        tl.store(
            z_ptr + offsets_2d(offs_m, offs_n, stride_zm, stride_zn),
            acc.to(z_ptr.dtype.element_ty),
            mask=mask,
        )
    y = act_forward(acc, ACTIVATION)
    tl.store(
        out_ptr + offsets_2d(offs_m, offs_n, stride_om, stride_on),
        y.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit(do_not_specialize=["ACTIVATION"])
def linear_act_dz_kernel(
    g_ptr, z_ptr, dz_ptr, dbp_ptr,
    M, N,
    stride_gm, stride_gn, stride_zm, stride_zn, stride_dzm, stride_dzn,
    ACTIVATION,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row block, column block): ``dz = grad * act'(z)`` and the block's column sums
    of dz into row ``pid_m`` of the contiguous fp32 ``dbp [row_blocks, N]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, m_mask, n_mask, True)
    z = load_tile(z_ptr, offs_m, offs_n, stride_zm, stride_zn, m_mask, n_mask, True)
    dz = g * act_grad(z, ACTIVATION)  # masked elements: g = 0, z = 0 (finite act'), dz = 0
    tl.store(
        dz_ptr + offsets_2d(offs_m, offs_n, stride_dzm, stride_dzn),
        dz.to(dz_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )
    tl.store(dbp_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(dz, 0), mask=n_mask)


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C = A @ B`` for any strides (transposes are stride swaps), fp32 accumulation, C in its
    own dtype. ``K = 0`` writes zeros."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = matmul_tile(
        a_ptr, offs_m, stride_am, stride_ak, b_ptr, offs_n, stride_bk, stride_bn, m_mask, n_mask,
        K, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    tl.store(
        c_ptr + offsets_2d(offs_m, offs_n, stride_cm, stride_cn),
        acc.to(c_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Launch configurations: every tile the launchers can pick on the GPU (no autotuning), so the
# lowering tests compile each ahead of time. Keyed by (fp32 operands, size class): fp32 operands
# take twice the shared memory per tile (and tf32x3 three products each). "small" is used when
# the "large" tiles would leave SMs idle (few output tiles: short batches, narrow outputs).
# ----------------------------------------------------------------------------------------------

GROUP_M = 8

GEMM_TILES: dict[tuple[bool, str], TileConfig] = {
    (False, "large"): TileConfig(128, 128, 64, 8, 3),
    (False, "small"): TileConfig(64, 64, 64, 4, 3),
    (True, "large"): TileConfig(128, 64, 32, 8, 3),
    (True, "small"): TileConfig(64, 64, 32, 4, 3),
}
#: linear_act_dz_kernel (elementwise; block_k unused).
DZ_TILE = TileConfig(64, 128, 0, 4, 1)


@dataclass(frozen=True)
class ForcedTiles:
    """Tiles forced by :func:`forced_tiles` (tests)."""

    block: int  # BLOCK_M = BLOCK_N = BLOCK_K of every GEMM and elementwise tile
    rows: int  # rows per program of the LayerNorm row kernels
    programs: int | None  # programs of the backward row kernels (None: one per row block)


_forced: contextvars.ContextVar[ForcedTiles | None] = contextvars.ContextVar(
    "rosita_fast_dense_tiles", default=None
)


@contextlib.contextmanager
def forced_tiles(block: int = 16, rows: int = 2, programs: int | None = None) -> Iterator[None]:
    """Inside the block every launch of the ``linear_act``, ``linear_residual_layernorm`` and
    ``embedding_layernorm`` kernels uses ``block``-wide GEMM / elementwise tiles, ``rows`` rows
    per LayerNorm row program and (``programs``) that many programs for the backward row kernels,
    which then loop over several row blocks each. Tests: small tiles make small shapes cross
    several blocks in every dimension under the interpreter, also through the public ops. On the
    GPU such tiles are outside the launch tables (not lowering-checked): tests only."""
    for name, v in (("block", block), ("rows", rows)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"a forced {name} must be a power of two, got {v}")
    if block < 16:
        raise ValueError(f"tl.dot needs tiles of at least 16, got block {block}")
    if programs is not None and programs < 1:
        raise ValueError(f"forced programs must be >= 1, got {programs}")
    token = _forced.set(ForcedTiles(block, rows, programs))
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> ForcedTiles | None:
    """The tiles forced by an enclosing :func:`forced_tiles`, or None."""
    return _forced.get()


def gemm_tile(dtype: torch.dtype, m: int, n: int, device: torch.device) -> TileConfig:
    """The GEMM tile for an ``[m, n]`` output with operands of ``dtype``: the forced one, else
    the launch table's ("small" on a GPU when "large" tiles would not give every SM one)."""
    f = _forced.get()
    if f is not None:
        return TileConfig(f.block, f.block, f.block, 4, 1)
    fp32 = dtype == torch.float32
    large = GEMM_TILES[(fp32, "large")]
    sms = sm_count(device)
    if sms is not None and triton.cdiv(m, large.block_m) * triton.cdiv(n, large.block_n) < sms:
        return GEMM_TILES[(fp32, "small")]
    return large


def upcast_operands(dtype: torch.dtype, upcast: bool | None) -> bool:
    """Whether fp16/bf16 operands are upcast to fp32 in the kernels (see the module docstring)."""
    if dtype == torch.float32:
        return False
    return triton_interpreting() if upcast is None else bool(upcast)


def check_dtype(t: torch.Tensor, op: str) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(
            f"the Triton {op} kernels support {', '.join(map(str, DTYPES))}; got {t.dtype} "
            "(use the 'cpp' or 'reference' backend for float64)"
        )


def matmul_launch(a, b, c, upcast: bool, cfg: TileConfig | None = None) -> Launch:
    """``c = a @ b`` (2-D tensors, any strides; ``a``/``b`` of one dtype, or fp32 and
    fp16/bf16 under ``upcast``)."""
    m, k = a.shape
    n = b.shape[1]
    cfg = cfg or gemm_tile(b.dtype, m, n, a.device)
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=c, M=m, N=n, K=k,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_cm=c.stride(0), stride_cn=c.stride(1),
        UPCAST=upcast, PRECISION=dot_precision(b.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M,
    )
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    return Launch(matmul_kernel, grid, args, cfg)


def linear_grads(dz, x2d, weight, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight) = (dz @ weight, dz^T @ x2d)`` with :func:`matmul_kernel` (``dx`` in x's
    dtype, ``[rows, in_features]``; ``dweight`` in the weight's)."""
    m, k = x2d.shape
    n = weight.shape[0]
    dx = empty((m, k), x2d.dtype, x2d.device)
    dw = empty((n, k), weight.dtype, x2d.device)
    matmul_launch(dz, weight, dx, upcast)()
    matmul_launch(dz.t(), x2d, dw, upcast)()
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Argument dicts
# ----------------------------------------------------------------------------------------------


def z_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the training forward's z for inputs of ``dtype``: the op's contract
    (``rosita_fast.ops.linear_act.gemm_dtype``, its fake): fp32 for fp16, else the input's."""
    return torch.float32 if dtype == torch.float16 else dtype


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An argument the kernel does not touch (a runtime flag is off): a ``[1, 16]`` tensor of the
    real argument's dtype (same pointer type, 16-byte aligned, a row stride of 16 like a real
    contiguous one), so both launches share one compiled variant."""
    return torch.empty((1, 16), dtype=dtype, device=device)


def _forward_launch(x2d, weight, bias, out, z, act: int, upcast: bool,
                    cfg: TileConfig | None = None) -> Launch:
    m, k = x2d.shape
    n = weight.shape[0]
    cfg = cfg or gemm_tile(x2d.dtype, m, n, x2d.device)
    # never written without STORE_Z
    zt = z if z is not None else placeholder(z_dtype(x2d.dtype), x2d.device)
    args = dict(
        x_ptr=x2d, w_ptr=weight, b_ptr=bias if bias is not None else out, out_ptr=out, z_ptr=zt,
        M=m, N=n, K=k,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_b=bias.stride(0) if bias is not None else 1,
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_zm=zt.stride(0), stride_zn=zt.stride(1),
        HAS_BIAS=int(bias is not None), ACTIVATION=act, STORE_Z=int(z is not None),
        UPCAST=upcast, PRECISION=dot_precision(x2d.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M,
    )
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    return Launch(linear_act_fwd_kernel, grid, args, cfg)


def _dz_launch(g2d, z2d, dz, dbp, act: int, cfg: TileConfig) -> Launch:
    m, n = g2d.shape
    args = dict(
        g_ptr=g2d, z_ptr=z2d, dz_ptr=dz, dbp_ptr=dbp, M=m, N=n,
        stride_gm=g2d.stride(0), stride_gn=g2d.stride(1),
        stride_zm=z2d.stride(0), stride_zn=z2d.stride(1),
        stride_dzm=dz.stride(0), stride_dzn=dz.stride(1),
        ACTIVATION=act, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    return Launch(linear_act_dz_kernel, grid, args, cfg)


def _dz_tile() -> TileConfig:
    f = _forced.get()
    return TileConfig(f.block, f.block, 0, 4, 1) if f is not None else DZ_TILE


# ----------------------------------------------------------------------------------------------
# Launchers: the op's backend entries (same arguments and results as its "cpp" entries)
# ----------------------------------------------------------------------------------------------


def _forward(x, weight, bias, activation, keep_z: bool, upcast):
    check_dtype(x, "linear_act")
    act = ACTIVATION_CODES[activation]
    k = x.shape[-1]
    n = weight.shape[0]
    m = math.prod(x.shape[:-1])
    x2d = x.reshape(m, k)
    out = empty((m, n), x.dtype, x.device)
    z = empty((m, n), z_dtype(x.dtype), x.device) if keep_z else None
    _forward_launch(x2d, weight, bias, out, z, act, upcast_operands(x.dtype, upcast))()
    return out.view(*x.shape[:-1], n), z


def linear_act_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    packed: torch.Tensor | None = None,
    *,
    upcast: bool | None = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` as ``[..., out_features]`` in x's dtype (contiguous): one
    GEMM with bias and activation in its epilogue. ``packed`` (the C++ backend's prepacked
    weight, a CPU-only hint) is ignored. ``upcast`` forces the fp32-operand path for fp16/bf16
    (default: exactly under the interpreter); tests only, like :func:`forced_tiles`."""
    return _forward(x, weight, bias, activation, False, upcast)[0]


def linear_act_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    *,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, z)``: the output and ``z = x @ weight^T + bias`` as ``[rows, out_features]``
    (stored by the same kernel's epilogue, unrounded fp32 accumulator -> :func:`z_dtype`: x's
    dtype, fp32 for fp16, as the op's contract says), for :func:`linear_act_backward`."""
    return _forward(x, weight, bias, activation, True, upcast)


def linear_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    z: torch.Tensor | None = None,
    *,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; ``dbias`` is an empty tensor without a bias (a custom op cannot
    return None), as the C++ backend returns. ``z``: the training forward's pre-activation
    (``[rows, out_features]`` or the output's shape, in x's dtype or :func:`z_dtype`; for ReLU
    anything with its sign, e.g. the output), ignored without an activation; None recomputes it
    with the training forward."""
    check_dtype(x, "linear_act")
    act = ACTIVATION_CODES[activation]
    up = upcast_operands(x.dtype, upcast)
    k = x.shape[-1]
    n = weight.shape[0]
    m = math.prod(x.shape[:-1])
    x2d = x.reshape(m, k)
    g2d = grad.reshape(m, n)
    dbias = None
    if act == 0:
        dz = g2d
        if bias is not None:
            dbias = g2d.sum(0, dtype=torch.float32)
    else:
        if z is None:
            z = _forward(x, weight, bias, activation, True, upcast)[1]
        z2d = z.reshape(m, n)
        if z2d.dtype not in (x.dtype, z_dtype(x.dtype)):
            z2d = z2d.to(z_dtype(x.dtype))  # keep the compiled variants to the lowered ones
        compute = torch.float32 if up else x.dtype
        dz = empty((m, n), compute, x.device)
        cfg = _dz_tile()
        dbp = empty((triton.cdiv(m, cfg.block_m), n), torch.float32, x.device)
        _dz_launch(g2d, z2d, dz, dbp, act, cfg)()
        if bias is not None:
            dbias = dbp.sum(0)
    dx, dw = linear_grads(dz, x2d, weight, up)
    if dbias is None:
        db = x.new_empty(0)
    else:
        db = dbias.to(bias.dtype)
    return dx.view(x.shape), dw, db


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------

_EXAMPLE_SIZE = 256  # M = K = N of the example launches: a multiple of 16, like BERT's sizes


def _example_launches(dtype: torch.dtype, cfg: TileConfig) -> list[Launch]:
    """The launches the launchers make on the GPU (native path) for contiguous, 16-byte aligned
    inputs whose sizes are multiples of 16, with GEMM tile ``cfg``. torch.empty only: the
    lowering worker forks after calling this (values are never read)."""
    s = _EXAMPLE_SIZE
    x, w, out = (torch.empty(s, s, dtype=dtype) for _ in range(3))
    z = torch.empty(s, s, dtype=z_dtype(dtype))
    bias = torch.empty(s, dtype=dtype)
    fwd = _forward_launch(x, w, bias, out, z, 1, False, cfg)
    dx = matmul_launch(out, w, x, False, cfg)
    dw = matmul_launch(out.t(), x, w, False, cfg)
    return [fwd, dx, dw]


def launch_specs() -> list[LaunchSpec]:
    """Every (kernel, dtype, tile) the launchers can use, twice: ``contig`` is the JIT's
    specialisation for contiguous aligned inputs with sizes divisible by 16 (unit inner strides
    folded to constants, sizes, leading strides and pointers marked divisible by 16; the dweight
    product's transposed ``dz`` operand has its unit stride on the other axis), ``generic`` the
    unspecialised variant (nothing folded or assumed), the bound of every other launch. Bias,
    activation and the z store are runtime arguments (uniform branches), so they do not multiply
    the compiled variants. The interpreter-only ``UPCAST`` path is not lowered."""
    specs = []
    for dtype, ((fp32, size), cfg) in itertools.product(DTYPES, GEMM_TILES.items()):
        if fp32 != (dtype == torch.float32):
            continue
        fwd, dx, dw = _example_launches(dtype, cfg)
        for variant, specialize in (("contig", True), ("generic", False)):
            label = f"{TL_DTYPES[dtype]},{size},{variant}"
            specs.append(fwd.spec(label, TL_DTYPES[dtype], specialize))
            specs.append(dx.spec(label, TL_DTYPES[dtype], specialize))
            if specialize:  # the transposed operand: its own contig specialisation
                specs.append(dw.spec(f"{TL_DTYPES[dtype]},{size},contig_t", TL_DTYPES[dtype],
                                     specialize))
    for dtype in DTYPES:
        s = _EXAMPLE_SIZE
        g, dz = torch.empty(s, s, dtype=dtype), torch.empty(s, s, dtype=dtype)
        dbp = torch.empty(s // DZ_TILE.block_m, s)
        # z: the training forward's, or the output (ReLU): two dtypes for fp16
        for zt in dict.fromkeys((z_dtype(dtype), dtype)):
            launch = _dz_launch(g, torch.empty(s, s, dtype=zt), dz, dbp, 1, DZ_TILE)
            z_label = "" if zt == dtype else f",z_{TL_DTYPES[zt]}"
            for variant, specialize in (("contig", True), ("generic", False)):
                specs.append(launch.spec(f"{TL_DTYPES[dtype]}{z_label},{variant}", None,
                                         specialize))
    return specs
