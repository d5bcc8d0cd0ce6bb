"""``kd_logits_loss``: logit distillation, ``KL(p || q)`` or ``-sum p log q`` of softened
distributions, with its student gradient produced by the same pass over each row.

With ``p = softmax(teacher / T)`` and ``log q = log_softmax(student / T)`` the loss of row ``i`` is
``l_i = sum_c p_c (log p_c - log q_c)`` (``kind="kl"``) or ``-sum_c p_c log q_c`` (``"soft_ce"``);
both have the student gradient ``(softmax(student / T) - p) / T``. Terms with ``p_c = 0`` (a
teacher logit of ``-inf``: a masked vocabulary entry) contribute nothing, whatever the student's
logit; a row whose teacher logits are all ``-inf`` has no distribution and, like a row the token
mask drops, contributes nothing (loss and gradient 0, never NaN).

Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fakes,
the backend tables (reference, C++ ``csrc/cpu/kd_logits_loss.cpp``, Triton
``kernels/kd_logits_loss.py``, CUDA ``csrc/cuda/kd_logits_loss.cu``: the GPU default for fp64,
which the Triton kernel does not take) and the autograd formula.
The kernels return the per-row losses; the reduction is a sum over them here. The training
forward also writes the row gradients ``d l_i / d student`` (``[rows, classes]`` in the
student's dtype), so nothing of size ``rows x classes`` but that gradient is kept for the
backward, which scales it by the upstream gradient (in place where autograd frees the graph).
"""

from __future__ import annotations

import torch

from rosita_fast.backends import forced_backend
from rosita_fast.ops._registry import define_op, lazy, native

__all__ = ["KINDS", "REDUCTIONS", "kd_logits_loss", "reference_backward", "reference_forward"]

KINDS = ("kl", "soft_ce")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
_KIND_CODES = {"kl": 0, "soft_ce": 1}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SCALE_BLOCK_ELEMS = 1 << 20  # logits per block of the low-precision backward's in-place scaling

# ---- ground truth -------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(student, teacher, temperature, mask):
    acc = _acc_dtype(student.dtype)
    c = student.shape[-1]
    s = student.reshape(-1, c).to(acc) / temperature
    t = teacher.reshape(-1, c).to(acc) / temperature
    keep = ~(t == float("-inf")).all(-1)  # rows with a distribution (NaN rows stay: they show)
    if mask is not None:
        keep = keep & mask.reshape(-1).bool()
    return s, t, keep


def _undefined(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Rows with NaN or +inf logits have no softmax: their loss and gradient are NaN.
    def bad(x):
        return (~(x < float("inf")) & (x != float("-inf"))).any(-1)

    return bad(s) | bad(t)


def _student_log_softmax(s: torch.Tensor) -> torch.Tensor:
    # A student row of all -inf gives every class probability 0 (log -inf): where the teacher has
    # mass the loss is +inf, and the gradient is -p / T.
    none = (s == float("-inf")).all(-1, keepdim=True)
    return torch.where(none, torch.full_like(s, float("-inf")), torch.log_softmax(s, dim=-1))


def reference_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    kind: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-row losses ``l_i`` (``[rows]``, rows = every leading position flattened; fp32,
    fp64 for fp64 inputs), 0 for rows ``mask`` drops (``[rows]``-shaped, nonzero = kept) and
    rows whose teacher logits are all ``-inf``."""
    s, t, keep = _prepare(student, teacher, temperature, mask)
    t = torch.where(keep[:, None], t, torch.zeros_like(t))
    s = torch.where(keep[:, None], s, torch.zeros_like(s))
    log_p = torch.log_softmax(t, dim=-1)
    log_q = _student_log_softmax(s)
    p = log_p.exp()
    # 0 * log 0 = 0: a class the teacher rules out adds nothing, whatever the student says.
    pos = p > 0
    if kind == "kl":
        terms = torch.where(pos, p * (log_p - log_q), torch.zeros_like(p))
    else:
        terms = torch.where(pos, -p * log_q, torch.zeros_like(p))
    rows = terms.sum(-1)
    rows = torch.where(_undefined(s, t), torch.full_like(rows, float("nan")), rows)
    return torch.where(keep, rows, torch.zeros_like(rows))


def reference_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    kind: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``d l_i / d student`` for every row (``[rows, classes]`` in the student's dtype):
    ``(softmax(student / T) - p) / T``, 0 on dropped rows (the same for both kinds)."""
    s, t, keep = _prepare(student, teacher, temperature, mask)
    t = torch.where(keep[:, None], t, torch.zeros_like(t))
    s = torch.where(keep[:, None], s, torch.zeros_like(s))
    grad = (_student_log_softmax(s).exp() - torch.softmax(t, dim=-1)) / temperature
    grad = torch.where(_undefined(s, t)[:, None], torch.full_like(grad, float("nan")), grad)
    grad = torch.where(keep[:, None], grad, torch.zeros_like(grad))
    return grad.to(student.dtype)


def _reference_train(student, teacher, temperature, kind, mask=None):
    return (reference_forward(student, teacher, temperature, kind, mask),
            reference_backward(student, teacher, temperature, kind, mask))


# ---- fakes --------------------------------------------------------------------------------------


def _rows(student: torch.Tensor) -> int:
    n = 1
    for d in student.shape[:-1]:
        n *= d
    return n


def _fake_forward(student, teacher, temperature, kind, mask=None):
    return student.new_empty((_rows(student),), dtype=_acc_dtype(student.dtype))


def _fake_train(student, teacher, temperature, kind, mask=None):
    return (_fake_forward(student, teacher, temperature, kind, mask),
            student.new_empty((_rows(student), student.shape[-1])))


# ---- backends -----------------------------------------------------------------------------------


def _encode(student, teacher, temperature, kind, mask=None):
    return student, teacher, temperature, _KIND_CODES[kind], mask


_SCHEMA_ARGS = "Tensor student, Tensor teacher, float temperature, str kind, Tensor? mask=None"


def _route(backend: str, args: tuple) -> str:
    # Documented per-case default: the Triton kernel takes no fp64; such calls on a GPU go to the
    # CUDA C++ kernel.
    if backend != "triton" or forced_backend() is not None or args[0].dtype != torch.float64:
        return backend
    from rosita_fast._extension import HAS_CUDA_EXT

    if not HAS_CUDA_EXT:
        raise RuntimeError("kd_logits_loss: float64 logits on a GPU need the CUDA C++ kernel and "
                           "rosita_fast._C_cuda is not built; use "
                           "rosita_fast.use_backend('reference')")
    return "cuda"


_FWD = define_op(
    "kd_logits_loss",
    f"({_SCHEMA_ARGS}) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("kd_logits_loss_cpp", _encode),
        "triton": lazy("rosita_fast.kernels.kd_logits_loss", "kd_logits_loss_forward"),
        "cuda": native("kd_logits_loss_cuda", _encode),
    },
    _fake_forward,
    route=_route,
)

# The training forward: the per-row losses and their student gradients ([rows, classes], the
# student's dtype), written by the same pass. Used while autograd records.
_TRAIN = define_op(
    "kd_logits_loss_train",
    f"({_SCHEMA_ARGS}) -> (Tensor, Tensor)",
    {
        "reference": _reference_train,
        "cpp": native("kd_logits_loss_train_cpp", _encode),
        "triton": lazy("rosita_fast.kernels.kd_logits_loss", "kd_logits_loss_train"),
        "cuda": native("kd_logits_loss_train_cuda", _encode),
    },
    _fake_train,
    route=_route,
    public=False,
)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    # The extra outputs are non-differentiable and never get a gradient: without this autograd
    # would materialize a zero tensor the size of each one before calling the backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.student_shape = inputs[0].shape


def _backward(ctx, grad_rows, _unused):
    if grad_rows is None:  # (grads are not materialized: see _setup_context)
        return None, None, None, None, None
    (grad,) = ctx.saved_tensors
    scale = grad_rows.reshape(-1, 1)
    # A backward that frees the graph (no retain_graph / create_graph: autograd's own flag, which
    # AOTAutograd reads too) is the saved gradient's last use: scaling it in place keeps the
    # backward's extra memory at zero. Otherwise, and while tracing (fake or functional tensors),
    # the product is a new tensor.
    eager = type(grad) is torch.Tensor and not torch.compiler.is_compiling()
    if not eager:
        return (grad * scale).to(grad.dtype).view(ctx.student_shape), None, None, None, None
    in_place = grad.is_contiguous() and not torch._C._autograd._get_current_graph_task_keep_graph()
    out = grad if in_place else torch.empty_like(grad)
    if scale.dtype == grad.dtype:
        torch.mul(grad, scale, out=out)
    else:
        # fp16/bf16 rows times fp32 scales: a product of mixed dtypes makes fp32 copies of its
        # whole operands (2 x 4 bytes per logit at 16384 x 30522). A block of rows at a time
        # bounds them by the block; each element is still rounded once, from fp32.
        step = max(1, _SCALE_BLOCK_ELEMS // max(1, grad.shape[-1]))
        for begin in range(0, grad.shape[0], step):
            rows = slice(begin, begin + step)
            torch.mul(grad[rows], scale[rows], out=out[rows])
    return out.view(ctx.student_shape), None, None, None, None


_TRAIN.register_autograd(_backward, _setup_context)


# The plain op (what a traced graph or a direct torch.ops call may differentiate) keeps its inputs
# and gets the row gradients from the training forward in its backward.
def _setup_context_plain(ctx, inputs, output):
    student, teacher, temperature, kind, mask = inputs
    ctx.save_for_backward(student, teacher, mask)
    ctx.temperature, ctx.kind = temperature, kind


def _backward_plain(ctx, grad_rows):
    student, teacher, mask = ctx.saved_tensors
    grad = _TRAIN.run(student, teacher, ctx.temperature, ctx.kind, mask)[1]
    return (grad * grad_rows.reshape(-1, 1)).to(grad.dtype).view(student.shape), None, None, \
        None, None


_FWD.register_autograd(_backward_plain, _setup_context_plain)

# ---- public entry point -------------------------------------------------------------------------


def check_options(temperature, kind: str, reduction: str, op: str) -> None:
    """Raise for a temperature, kind or reduction the KD loss ops do not take."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0 < temperature < float("inf")):
        raise ValueError(f"{op}: temperature must be a positive finite number, got "
                         f"{temperature!r}")
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_mask_values(mask: torch.Tensor, op: str) -> None:
    """Raise if a floating (or complex) mask holds anything but 0 and 1 (shared by the KD ops)."""
    if (mask.is_floating_point() or mask.is_complex()) and bool(
            (~((mask == 0) | (mask == 1))).any()):
        raise ValueError(f"{op}: a floating mask must hold only 0 and 1")


def _check(student, teacher, temperature, kind, reduction, mask) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kd_logits_loss: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"kd_logits_loss: {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
    if student.dim() not in (2, 3):
        raise ValueError("kd_logits_loss: logits must be [N, C] or [B, T, C], got shape "
                         f"{tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"kd_logits_loss: teacher_logits shape {tuple(teacher.shape)} != "
                         f"student_logits shape {tuple(student.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"kd_logits_loss: teacher_logits has dtype {teacher.dtype} but "
                        f"student_logits has {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"kd_logits_loss: teacher_logits is on {teacher.device} but "
                         f"student_logits is on {student.device}")
    if student.shape[-1] == 0:
        raise ValueError("kd_logits_loss: logits have no classes (last dimension 0)")
    check_options(temperature, kind, reduction, "kd_logits_loss")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"kd_logits_loss: mask must be a torch.Tensor or None, got "
                            f"{type(mask).__name__}")
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"kd_logits_loss: mask shape {tuple(mask.shape)} != the logits' "
                             f"leading shape {tuple(student.shape[:-1])}")
        if mask.device != student.device:
            raise ValueError(f"kd_logits_loss: mask is on {mask.device} but the logits are on "
                             f"{student.device}")
        check_mask_values(mask, "kd_logits_loss")


def kd_logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    *,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Logit distillation loss between student and teacher logits.

    Args:
        student_logits, teacher_logits: ``[N, C]`` (one row per example) or ``[B, T, C]`` (token
            level), same shape, dtype (fp32, fp16, bf16, fp64) and device. Any strides.
        temperature: ``T > 0``; both distributions are ``softmax(logits / T)``.
        kind: ``"kl"`` (``sum_c p (log p - log q)``) or ``"soft_ce"`` (``-sum_c p log q``),
            with ``p`` the teacher's and ``q`` the student's distribution.
        reduction: ``"none"`` (the per-row losses, shaped like the logits' leading dims),
            ``"sum"``, ``"mean"`` (over the kept rows; 0 if none is kept) or ``"batchmean"``
            (the sum over the size of the first dimension, as ``torch.nn.functional.kl_div``).
        mask: optional ``[N]`` / ``[B, T]`` row mask (bool, or 0/1 integers or floats); dropped
            rows count zero and are never read.
        scale_by_t2: multiply by ``T**2`` (Hinton et al.), so gradient sizes do not shrink with
            ``T``.

    Returns a 0-dim tensor (or ``[N]`` / ``[B, T]`` for ``"none"``) in fp32 (fp64 for fp64
    inputs; fp16/bf16 accumulate in fp32). Differentiable in ``student_logits`` only (the teacher
    gets no gradient). While autograd records, the per-row student gradient is written by the
    forward's pass and kept (``[rows, C]`` in the student's dtype); a backward that frees the
    graph scales it in place (one that retains it makes a scaled copy).
    """
    _check(student_logits, teacher_logits, temperature, kind, reduction, mask)
    flat_mask = None
    if mask is not None:
        flat_mask = mask.reshape(-1)
        if flat_mask.dtype != torch.bool:
            flat_mask = flat_mask != 0
    t = float(temperature)
    teacher = teacher_logits.detach()
    if torch.is_grad_enabled() and student_logits.requires_grad:
        rows = _TRAIN(student_logits, teacher, t, kind, flat_mask)[0]
    else:
        rows = _FWD.call(student_logits, teacher, t, kind, flat_mask)
    if scale_by_t2:
        rows = rows * (t * t)
    if reduction == "none":
        return rows.view(student_logits.shape[:-1])
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(student_logits.shape[0], 1)
    count = flat_mask.sum() if flat_mask is not None else rows.new_tensor(rows.shape[0])
    return total / count.clamp_min(1).to(total.dtype)
