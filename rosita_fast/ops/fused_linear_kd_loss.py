"""``fused_linear_kd_loss``: logit distillation through two output layers (e.g. masked-LM heads
over a 30,522-token vocabulary) without ever holding the ``[tokens, vocabulary]`` logits whole.

The student logits are ``student_hidden @ student_weight^T + student_bias`` and the teacher's
likewise; the loss is :func:`rosita_fast.ops.kd_logits_loss` of the two (same kinds, reductions,
mask, temperature and ``T^2`` option). The kernels walk the tokens in chunks: per chunk, the two
GEMMs, then the ``kd_logits_loss`` training kernel (the chunk's row losses and the gradient of
its student logits in one pass), then that gradient's products, ``d student_hidden`` for the
chunk's rows and ``d student_weight`` / ``d student_bias`` accumulated over the chunks. Peak extra
memory is a few ``[chunk, vocabulary]`` buffers plus the gradients themselves, whatever the
number of tokens.

With a reduction other than ``"none"`` the gradients are computed by the forward (the loss is a
scalar: the backward only scales them). With ``"none"`` the upstream gradient of every row is
known only in the backward, which then walks the chunks again (twice the GEMM work; documented).

Everything about the op lives here: the ground truth (the plain composition, un-chunked), the
input checks, the fakes, the backend tables and the autograd formula. The GEMMs are torch's
(oneDNN/MKL on CPUs, cuBLAS on GPUs); the per-chunk loss is the ``kd_logits_loss`` kernel of the
same backend (C++ on CPU, Triton on CUDA).
"""

from __future__ import annotations

import torch

from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._registry import REGISTRY, define_op
from rosita_fast.ops.kd_logits_loss import check_mask_values, check_options
from rosita_fast.ops.kd_logits_loss import reference_backward as kd_reference_backward
from rosita_fast.ops.kd_logits_loss import reference_forward as kd_reference_forward

__all__ = ["fused_linear_kd_loss", "reference_forward"]

#: The op whose kernels this one runs per chunk: its "cpp" and "triton" entries below are the
#: chunk loop around torch's GEMMs and that op's kernels of the same backend.
KERNELS_FROM = "kd_logits_loss"

#: Elements of one ``[chunk, vocabulary]`` logits buffer (fp32: 32 MiB).
CHUNK_ELEMENTS = 1 << 23
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---- ground truth -------------------------------------------------------------------------------


def _logits(hidden, weight, bias):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        out = out + bias.to(acc)
    return out


def reference_forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
                      student_bias=None, teacher_bias=None, temperature=1.0, kind="kl",
                      mask=None) -> torch.Tensor:
    """The per-token losses (``[tokens]``, fp32; fp64 for fp64) of the whole logits, in plain
    PyTorch: the ground truth (it holds both ``[tokens, vocabulary]`` logits)."""
    s = _logits(student_hidden, student_weight, student_bias)
    t = _logits(teacher_hidden, teacher_weight, teacher_bias)
    return kd_reference_forward(s, t, temperature, kind, mask)


# ---- the chunked kernels ------------------------------------------------------------------------


def chunk_rows(vocabulary: int) -> int:
    """Tokens per chunk for a vocabulary: ``CHUNK_ELEMENTS`` logits, at least 1 token."""
    return max(1, CHUNK_ELEMENTS // max(vocabulary, 1))


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CPUs have no fast fp16 GEMM: fp16 products run in fp32 there (as the C++ linear ops do).
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def _chunks(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
            teacher_bias, temperature, kind, mask, row_weight):
    """Walk the tokens in chunks: the per-token losses and, with ``row_weight`` (``[tokens]``:
    the derivative of the caller's total with respect to each token's loss), the gradients of
    that total for the student hidden states, weight and bias."""
    n, v = student_hidden.shape[0], student_weight.shape[0]
    dtype, device = student_hidden.dtype, student_hidden.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gd = _gemm_dtype(dtype, device)
    sw, tw = student_weight.to(gd), teacher_weight.to(gd)
    sb = student_bias.to(gd) if student_bias is not None else None
    tb = teacher_bias.to(gd) if teacher_bias is not None else None
    kd_train = REGISTRY["kd_logits_loss_train"]
    rows = torch.empty(n, dtype=acc, device=device)
    grads = row_weight is not None
    if grads:
        d_hidden = torch.empty_like(student_hidden)
        d_weight = torch.zeros(student_weight.shape, dtype=acc, device=device)
        d_bias = torch.zeros(v, dtype=acc, device=device) if student_bias is not None else None
    step = chunk_rows(v)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        sh = student_hidden[r0:r1].to(gd)
        s = torch.nn.functional.linear(sh, sw, sb)
        t = torch.nn.functional.linear(teacher_hidden[r0:r1].to(gd), tw, tb)
        m = mask[r0:r1] if mask is not None else None
        if not grads:
            rows[r0:r1] = REGISTRY["kd_logits_loss"].run(s, t, temperature, kind, m)
            continue
        chunk_rows_loss, g = kd_train.run(s, t, temperature, kind, m)
        rows[r0:r1] = chunk_rows_loss
        del s, t
        g.mul_(row_weight[r0:r1, None].to(g.dtype))
        d_hidden[r0:r1] = (g @ sw).to(dtype)
        d_weight.addmm_(g.t().to(acc), sh.to(acc))
        if d_bias is not None:
            d_bias += g.sum(0, dtype=acc)
    if not grads:
        return rows, None, None, None
    empty = student_hidden.new_empty(0)
    return (rows, d_hidden, d_weight.to(student_weight.dtype),
            d_bias.to(student_bias.dtype) if d_bias is not None else empty)


def _reference_grads(student_hidden, student_weight, teacher_hidden, teacher_weight,
                     student_bias, teacher_bias, temperature, kind, mask, row_weight):
    # The gradients of sum(row_weight * rows) through the plain composition, written out:
    # d logits = row_weight * kd_logits_loss's row gradient, then the linear layer's products.
    s = _logits(student_hidden, student_weight, student_bias)
    t = _logits(teacher_hidden, teacher_weight, teacher_bias)
    rows = kd_reference_forward(s, t, temperature, kind, mask)
    g = kd_reference_backward(s, t, temperature, kind, mask) * row_weight.to(s.dtype)[:, None]
    d_hidden = (g @ student_weight.to(s.dtype)).to(student_hidden.dtype)
    d_weight = (g.t() @ student_hidden.to(s.dtype)).to(student_weight.dtype)
    d_bias = (g.sum(0).to(student_bias.dtype) if student_bias is not None
              else student_hidden.new_empty(0))
    return rows, d_hidden, d_weight, d_bias


# ---- fakes --------------------------------------------------------------------------------------


def _fake_forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  student_bias=None, teacher_bias=None, temperature=1.0, kind="kl", mask=None):
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    return student_hidden.new_empty((student_hidden.shape[0],), dtype=acc)


def _fake_grads(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                teacher_bias, temperature, kind, mask, row_weight):
    db = (student_bias.new_empty(student_bias.shape) if student_bias is not None
          else student_hidden.new_empty(0))
    return (_fake_forward(student_hidden, student_weight, teacher_hidden, teacher_weight),
            student_hidden.new_empty(student_hidden.shape),
            student_weight.new_empty(student_weight.shape), db)


# ---- backends -----------------------------------------------------------------------------------

_ARGS = ("Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
         "Tensor teacher_weight, Tensor? student_bias=None, Tensor? teacher_bias=None, "
         "float temperature=1.0, str kind='kl', Tensor? mask=None")


def _chunked_forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
                     student_bias=None, teacher_bias=None, temperature=1.0, kind="kl",
                     mask=None):
    return _chunks(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                   teacher_bias, temperature, kind, mask, None)[0]


_FWD = define_op(
    "fused_linear_kd_loss",
    f"({_ARGS}) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": _chunked_forward,
        "triton": _chunked_forward,
    },
    _fake_forward,
)

# The per-token losses and the gradients of sum(row_weight * losses): one walk over the chunks.
_GRADS = define_op(
    "fused_linear_kd_loss_grads",
    "(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
    "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, float temperature, "
    "str kind, Tensor? mask, Tensor row_weight) -> (Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _reference_grads,
        "cpp": _chunks,
        "triton": _chunks,
    },
    _fake_grads,
    public=False,
)


def _setup_context(ctx, inputs, output):
    (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
     temperature, kind, mask) = inputs
    ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight,
                          student_bias, teacher_bias, mask)
    ctx.temperature, ctx.kind = temperature, kind
    ctx.has_bias = student_bias is not None
    ctx.backend = forced_backend()


def _backward(ctx, grad_rows):
    # reduction "none" (or a traced graph): walk the chunks again with the upstream gradients.
    sh, sw, th, tw, sb, tb, mask = ctx.saved_tensors
    args = (sh, sw, th, tw, sb if ctx.has_bias else None, tb, ctx.temperature, ctx.kind, mask,
            grad_rows.to(torch.float64 if sh.dtype == torch.float64 else torch.float32))
    if ctx.backend is not None and forced_backend() != ctx.backend:
        with use_backend(ctx.backend):
            _, dh, dw, db = _GRADS(*args)
    else:
        _, dh, dw, db = _GRADS(*args)
    return dh, dw, None, None, db if ctx.has_bias else None, None, None, None, None


_FWD.register_autograd(_backward, _setup_context)


class _ScalarLoss(torch.autograd.Function):
    """A reduced loss whose gradients the forward computed: the backward scales them by the
    (scalar) upstream gradient, in place where autograd frees the graph."""

    @staticmethod
    def forward(ctx, total, d_hidden, d_weight, d_bias, student_hidden, student_weight,
                student_bias):
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.has_bias = student_bias is not None
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.saved_tensors
        in_place = not torch._C._autograd._get_current_graph_task_keep_graph()
        out = [g.mul_(grad.to(g.dtype)) if in_place else g * grad.to(g.dtype) for g in grads]
        return (None, None, None, None, out[0], out[1], out[2] if ctx.has_bias else None)


# ---- public entry point -------------------------------------------------------------------------


def _check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
           teacher_bias, mask) -> None:
    named = (("student_hidden", student_hidden), ("student_weight", student_weight),
             ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
             ("student_bias", student_bias), ("teacher_bias", teacher_bias))
    for name, t in named:
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_linear_kd_loss: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"fused_linear_kd_loss: {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
        if t.dtype != student_hidden.dtype:
            raise TypeError(f"fused_linear_kd_loss: {name} has dtype {t.dtype} but "
                            f"student_hidden has {student_hidden.dtype}")
        if t.device != student_hidden.device:
            raise ValueError(f"fused_linear_kd_loss: {name} is on {t.device} but student_hidden "
                             f"is on {student_hidden.device}")
    for who, h, w, b in (("student", student_hidden, student_weight, student_bias),
                         ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        if h.dim() != 2 or w.dim() != 2:
            raise ValueError(f"fused_linear_kd_loss: {who}_hidden must be [N, H] and "
                             f"{who}_weight [V, H], got {tuple(h.shape)} and {tuple(w.shape)}")
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"fused_linear_kd_loss: {who}_hidden has {h.shape[1]} features but "
                             f"{who}_weight is {tuple(w.shape)} ([V, H])")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"fused_linear_kd_loss: {who}_bias must have shape "
                             f"({w.shape[0]},), got {tuple(b.shape)}")
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"fused_linear_kd_loss: {student_hidden.shape[0]} student tokens but "
                         f"{teacher_hidden.shape[0]} teacher tokens")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"fused_linear_kd_loss: student vocabulary {student_weight.shape[0]} "
                         f"!= teacher vocabulary {teacher_weight.shape[0]}")
    if student_weight.shape[0] == 0:
        raise ValueError("fused_linear_kd_loss: the vocabulary is empty")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != (student_hidden.shape[0],):
            raise ValueError(f"fused_linear_kd_loss: mask must be a [N] = "
                             f"[{student_hidden.shape[0]}] tensor")
        if mask.device != student_hidden.device:
            raise ValueError(f"fused_linear_kd_loss: mask is on {mask.device} but the hidden "
                             f"states are on {student_hidden.device}")
        check_mask_values(mask, "fused_linear_kd_loss")


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    *,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """:func:`rosita_fast.ops.kd_logits_loss` of ``student_hidden @ student_weight^T +
    student_bias`` against the teacher's logits, computed chunk by chunk over the tokens.

    Args:
        student_hidden, teacher_hidden: ``[N, H_s]`` and ``[N, H_t]`` (one row per token).
        student_weight, teacher_weight: ``[V, H_s]`` and ``[V, H_t]`` output layers (one
            vocabulary), with optional ``[V]`` biases. One dtype and device for all.
        temperature, kind, reduction, mask, scale_by_t2: as for ``kd_logits_loss`` (``mask``:
            ``[N]``, nonzero = the token counts).

    Returns the loss (``[N]`` for ``"none"``) in fp32 (fp64 for fp64). Differentiable in the
    student's hidden states, weight and bias (the teacher gets no gradient). Peak extra memory is
    bounded by the chunk (``CHUNK_ELEMENTS`` logits) and the gradients, not by ``N x V``.
    """
    _check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
           teacher_bias, mask)
    check_options(temperature, kind, reduction, "fused_linear_kd_loss")
    flat_mask = None
    if mask is not None:
        flat_mask = mask if mask.dtype == torch.bool else mask != 0
    t = float(temperature)
    teacher_args = (teacher_hidden.detach(), teacher_weight.detach())
    tb = teacher_bias.detach() if teacher_bias is not None else None
    n = student_hidden.shape[0]
    scale = t * t if scale_by_t2 else 1.0
    if reduction == "sum":
        factor = scale
    elif reduction == "batchmean":
        factor = scale / max(n, 1)
    elif reduction == "mean":
        kept = int(flat_mask.sum()) if flat_mask is not None else n
        factor = scale / max(kept, 1)
    leaves = [student_hidden, student_weight] + ([student_bias] if student_bias is not None
                                                 else [])
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in leaves)
    if reduction == "none" or not needs_grad or torch.compiler.is_compiling():
        args = (student_hidden, student_weight, *teacher_args, student_bias, tb, t, kind,
                flat_mask)
        rows = _FWD(*args) if needs_grad else _FWD.call(*args)
        if reduction == "none":
            return rows * scale if scale_by_t2 else rows
        return rows.sum() * factor
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    row_weight = torch.full((n,), factor, dtype=acc, device=student_hidden.device)
    rows, d_hidden, d_weight, d_bias = _GRADS(
        student_hidden.detach(), student_weight.detach(), *teacher_args,
        student_bias.detach() if student_bias is not None else None, tb, t, kind, flat_mask,
        row_weight)
    return _ScalarLoss.apply(rows.sum() * factor, d_hidden, d_weight, d_bias, student_hidden,
                             student_weight, student_bias)
