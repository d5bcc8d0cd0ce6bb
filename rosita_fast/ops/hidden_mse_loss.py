"""``hidden_mse_loss``: hidden-state distillation over many layer pairs in one call.

For student states ``s_i`` and the teacher states they are mapped to ``t_i`` (``[B, T, H]`` each),
pair ``i`` contributes the mean squared error over the kept positions and all features,
``sum_{b,t kept} sum_h (s_i - t_i)^2 / (kept positions * H)`` (every position without a mask; 0
when the mask keeps none); the loss is the sum over the pairs. The kernels compute every pair's
term in one launch (one parallel region over all pairs' row blocks) and the gradients of all
student states in one more.

Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fakes,
the backend tables (reference, C++ ``csrc/cpu/hidden_mse_loss.cpp``, Triton
``kernels/hidden_mse_loss.py``) and the autograd formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._registry import define_op, lazy, native
from rosita_fast.ops.kd_logits_loss import check_mask_values

__all__ = ["hidden_mse_loss", "reference_backward", "reference_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---- ground truth -------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _count(mask: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    # kept positions x features, at least 1 (a mask that keeps nothing gives a 0 term)
    positions = s[..., 0].numel() if mask is None else mask.sum()
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    return torch.as_tensor(positions, dtype=acc).clamp_min(1) * s.shape[-1]


def reference_forward(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every pair's term (``[pairs]``, fp32; fp64 for fp64 states); ``student[i]`` is compared
    with ``teacher[i]`` (the caller has applied the layer mapping). ``mask``: ``[B, T]``, nonzero =
    kept."""
    out = []
    for s, t in zip(student, teacher, strict=True):
        d = _acc(s) - _acc(t)
        sq = (d * d).sum(-1)
        if mask is not None:
            sq = torch.where(mask.bool(), sq, torch.zeros_like(sq))
        out.append(sq.sum() / _count(mask, s).to(sq.dtype))
    if not out:
        return torch.zeros(0)
    return torch.stack(out)


def reference_backward(
    grad: torch.Tensor,
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The gradients of ``sum_i grad[i] * term_i`` with respect to every student state:
    ``2 (s_i - t_i) grad[i] / (kept positions * H)`` on kept positions, 0 elsewhere, in the
    student's dtype."""
    out = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        d = _acc(s) - _acc(t)
        g = d * (2 * grad[i].to(d.dtype) / _count(mask, s).to(d.dtype))
        if mask is not None:
            g = torch.where(mask.bool()[..., None], g, torch.zeros_like(g))
        out.append(g.to(s.dtype))
    return out


# ---- fakes --------------------------------------------------------------------------------------


def _fake_forward(student, teacher, mask=None):
    dtype = torch.float64 if student and student[0].dtype == torch.float64 else torch.float32
    device = student[0].device if student else torch.device("cpu")
    return torch.empty((len(student),), dtype=dtype, device=device)


def _fake_backward(grad, student, teacher, mask=None):
    return [s.new_empty(s.shape) for s in student]


# ---- backends -----------------------------------------------------------------------------------

_FWD = define_op(
    "hidden_mse_loss",
    "(Tensor[] student, Tensor[] teacher, Tensor? mask=None) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("hidden_mse_loss_cpp"),
        "triton": lazy("rosita_fast.kernels.hidden_mse_loss", "hidden_mse_loss_forward"),
    },
    _fake_forward,
)

_BWD = define_op(
    "hidden_mse_loss_backward",
    "(Tensor grad, Tensor[] student, Tensor[] teacher, Tensor? mask=None) -> Tensor[]",
    {
        "reference": reference_backward,
        "cpp": native("hidden_mse_loss_backward_cpp"),
        "triton": lazy("rosita_fast.kernels.hidden_mse_loss", "hidden_mse_loss_backward"),
    },
    _fake_backward,
    public=False,
)


def _setup_context(ctx, inputs, output):
    student, teacher, mask = inputs
    ctx.n = len(student)
    ctx.save_for_backward(*student, *teacher, mask)
    # The backward may run on another thread, where a backend forced around the forward with
    # use_backend is not in effect: carry it over.
    ctx.backend = forced_backend()


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    student, teacher, mask = list(saved[:ctx.n]), list(saved[ctx.n:2 * ctx.n]), saved[-1]
    if ctx.backend is not None and forced_backend() != ctx.backend:
        with use_backend(ctx.backend):
            grads = _BWD(grad, student, teacher, mask)
    else:
        grads = _BWD(grad, student, teacher, mask)
    return list(grads), [None] * ctx.n, None


_FWD.register_autograd(_backward, _setup_context)

# ---- public entry point -------------------------------------------------------------------------


def _check(student, teacher, mapping, mask) -> list[int]:
    for name, states in (("student_states", student), ("teacher_states", teacher)):
        if isinstance(states, torch.Tensor) or not isinstance(states, Sequence):
            raise TypeError(f"hidden_mse_loss: {name} must be a sequence of tensors (e.g. a "
                            f"model's hidden_states tuple), got {type(states).__name__}")
        for i, t in enumerate(states):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"hidden_mse_loss: {name}[{i}] is a {type(t).__name__}, not a "
                                "tensor")
    if not student:
        raise ValueError("hidden_mse_loss: no student states")
    if mapping is None:
        if len(teacher) < len(student):
            raise ValueError(f"hidden_mse_loss: {len(student)} student states but only "
                             f"{len(teacher)} teacher states; pass a mapping")
        mapping = list(range(len(student)))
    else:
        mapping = list(mapping)
        if len(mapping) != len(student):
            raise ValueError(f"hidden_mse_loss: mapping has {len(mapping)} entries for "
                             f"{len(student)} student states")
        for i, j in enumerate(mapping):
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(teacher):
                raise ValueError(f"hidden_mse_loss: mapping[{i}] = {j!r} is not a teacher "
                                 f"state index in [0, {len(teacher)})")
    ref = student[0]
    if ref.dim() != 3:
        raise ValueError("hidden_mse_loss: states must be [batch, seq, hidden], got shape "
                         f"{tuple(ref.shape)}")
    if ref.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"hidden_mse_loss: states have dtype {ref.dtype}; supported: "
                        f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
    for name, states in (("student_states", student),
                         ("teacher_states", [teacher[j] for j in mapping])):
        for t in states:
            if t.shape != ref.shape:
                raise ValueError(f"hidden_mse_loss: a {name} entry has shape {tuple(t.shape)}, "
                                 f"the first student state {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise TypeError(f"hidden_mse_loss: a {name} entry has dtype {t.dtype}, the "
                                f"first student state {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"hidden_mse_loss: a {name} entry is on {t.device}, the first "
                                 f"student state on {ref.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"hidden_mse_loss: mask must be a tensor or None, got "
                            f"{type(mask).__name__}")
        if mask.shape != ref.shape[:2]:
            raise ValueError(f"hidden_mse_loss: mask shape {tuple(mask.shape)} != (batch, seq) "
                             f"{tuple(ref.shape[:2])}")
        if mask.device != ref.device:
            raise ValueError(f"hidden_mse_loss: mask is on {mask.device}, the states on "
                             f"{ref.device}")
        check_mask_values(mask, "hidden_mse_loss")
    return mapping


def hidden_mse_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mapping: Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
    *,
    per_pair: bool = False,
) -> torch.Tensor:
    """Hidden-state distillation: ``sum_i MSE(student_states[i], teacher_states[mapping[i]])``.

    Args:
        student_states: ``[B, T, H]`` tensors (e.g. the student's ``hidden_states`` tuple, or the
            ones to distil), one dtype (fp32, fp16, bf16, fp64) and device.
        teacher_states: the teacher's ``[B, T, H]`` states (no gradient flows to them).
        mapping: ``mapping[i]`` is the teacher state student state ``i`` is compared with;
            None: ``i`` itself.
        mask: optional ``[B, T]`` padding mask (bool or 0/1; nonzero = a real token): each MSE
            averages over the kept positions and all features (a pair with none kept gives 0).
        per_pair: return every pair's term (``[pairs]``) instead of their sum.

    Returns a 0-dim tensor (``[pairs]`` with ``per_pair``) in fp32 (fp64 for fp64 states;
    fp16/bf16 accumulate in fp32), differentiable in the student states. Every pair is computed by
    one kernel launch, and their gradients by one more.
    """
    mapping = _check(student_states, teacher_states, mapping, mask)
    student = list(student_states)
    teacher = [teacher_states[j].detach() for j in mapping]
    if mask is None:
        # (an explicit all-True mask: torch's autograd wrapper for Tensor[] ops mismatches the
        # gradient structure when the optional tensor after the lists is None)
        mask = torch.ones(student[0].shape[:2], dtype=torch.bool, device=student[0].device)
    elif mask.dtype != torch.bool:
        mask = mask != 0
    needs_grad = torch.is_grad_enabled() and any(s.requires_grad for s in student)
    terms = _FWD(student, teacher, mask) if needs_grad else _FWD.call(student, teacher, mask)
    return terms if per_pair else terms.sum()
