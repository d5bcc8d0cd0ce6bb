"""Reference distillation losses in plain PyTorch (method section 4).

Every function is pure: tensors in, a scalar tensor out, differentiable with respect to the
student argument. Computation happens in float32 at least (inputs in bf16/fp16 are up-cast) so the
values are comparable across precisions. Fused kernels implement the same signatures.

The token-averaged terms (:func:`hidden_mse`, :func:`attention_mse`) have companions
(:func:`hidden_mse_count`, :func:`attention_mse_count`) that return how many positions they average
over; data-parallel training needs those counts to turn per-process means into a global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "attention_mse",
    "attention_mse_count",
    "gold_label_loss",
    "hidden_mse",
    "hidden_mse_count",
    "kl_divergence",
    "logits_mse",
    "soft_cross_entropy",
]


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive; got {temperature}")


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mean_over_classes: bool = False,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Cross-entropy of the student's softened distribution against the teacher's.

    ``mean over batch of -sum_c softmax(t/T)_c * log_softmax(s/T)_c``.

    Args:
        student_logits, teacher_logits: ``(batch, classes)``.
        temperature: softening temperature ``T`` (the method uses 1).
        mean_over_classes: the method's quirk (7.3): average instead of sum over classes, i.e.
            divide by the number of classes.
        scale_by_t2: multiply by ``T**2`` so gradient magnitudes do not shrink with ``T``
            (Hinton et al.); a no-op at ``T = 1``.
    """
    _check_same_shape(student_logits, teacher_logits, "soft cross-entropy")
    _check_temperature(temperature)
    s, t = _up(student_logits), _up(teacher_logits)
    per_class = -F.softmax(t / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)
    loss = per_class.mean(dim=-1) if mean_over_classes else per_class.sum(dim=-1)
    loss = loss.mean()
    return loss * temperature**2 if scale_by_t2 else loss


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """``KL(teacher || student)`` of the softened distributions, averaged over the batch.

    Equals :func:`soft_cross_entropy` minus the teacher's entropy, so both give the same student
    gradients; KL is 0 when the student matches the teacher.
    """
    _check_same_shape(student_logits, teacher_logits, "KL divergence")
    _check_temperature(temperature)
    s, t = _up(student_logits), _up(teacher_logits)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    return loss * temperature**2 if scale_by_t2 else loss


def logits_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between outputs; prediction distillation for regression (STS-B)."""
    _check_same_shape(student_logits, teacher_logits, "logits MSE")
    return F.mse_loss(_up(student_logits), _up(teacher_logits))


def _token_mask(mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != (batch, seq):
        raise ValueError(f"attention mask shape {tuple(mask.shape)} != (batch, seq) {(batch, seq)}")
    return mask.to(torch.float32)


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between hidden states ``(batch, seq, dim)``, averaged over tokens and features.

    With ``attention_mask`` (``(batch, seq)``, 1 = real token) padding positions are excluded, so
    the loss does not depend on how much padding a batch happens to have. Without it every position
    counts, as in the method (7.4, written for fixed-length padding).
    """
    _check_same_shape(student_hidden, teacher_hidden, "hidden-state MSE")
    s, t = _up(student_hidden), _up(teacher_hidden)
    mask = _token_mask(attention_mask, s.shape[0], s.shape[1])
    if mask is None:
        return F.mse_loss(s, t)
    sq = (s - t).pow(2).sum(dim=-1)
    count = mask.sum().clamp_min(1.0) * s.shape[-1]
    return (sq * mask).sum() / count


def attention_mse(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between attention maps ``(batch, heads, query, key)``.

    With ``attention_mask`` only entries whose query and key are both real tokens count.
    """
    _check_same_shape(student_attention, teacher_attention, "attention MSE")
    if student_attention.dim() != 4:
        raise ValueError("attention maps must be (batch, heads, query, key)")
    s, t = _up(student_attention), _up(teacher_attention)
    batch, heads, seq, _ = s.shape
    mask = _token_mask(attention_mask, batch, seq)
    if mask is None:
        return F.mse_loss(s, t)
    pair = mask[:, None, :, None] * mask[:, None, None, :]
    count = pair.sum().clamp_min(1.0) * heads
    return ((s - t).pow(2) * pair).sum() / count


def hidden_mse_count(
    student_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """How many token positions :func:`hidden_mse` averages over, as a float64 scalar.

    Takes the same arguments as :func:`hidden_mse` (the teacher's are not needed). The feature
    dimension is left out: it is the same in every process, so it cancels in ratios of counts,
    which is all data-parallel normalisation uses.
    """
    batch, seq = student_hidden.shape[0], student_hidden.shape[1]
    mask = _token_mask(attention_mask, batch, seq)
    if mask is None:
        return torch.tensor(float(batch * seq), dtype=torch.float64, device=student_hidden.device)
    return mask.to(torch.float64).sum()


def attention_mse_count(
    student_attention: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """How many (query, key) token pairs :func:`attention_mse` averages over, as a float64 scalar.

    Takes the same arguments as :func:`attention_mse`. The head count is left out: it may differ
    between layers (width pruning) but not between processes, so it cancels in ratios of counts.
    """
    if student_attention.dim() != 4:
        raise ValueError("attention maps must be (batch, heads, query, key)")
    batch, _, seq, keys = student_attention.shape
    mask = _token_mask(attention_mask, batch, seq)
    if mask is None:
        return torch.tensor(float(batch * seq * keys), dtype=torch.float64,
                            device=student_attention.device)
    # sum_b (sum_i m_bi)^2 == sum_b sum_ij m_bi m_bj: the pair mask's sum, without building it.
    return mask.to(torch.float64).sum(dim=1).square().sum()


def gold_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Supervised loss: cross-entropy for classes, MSE for a single regression output.

    Class labels equal to ``ignore_index`` (unlabelled rows) are skipped.
    """
    x = _up(logits)
    if x.shape[-1] == 1:
        return F.mse_loss(x.reshape(-1), labels.to(x.dtype).reshape(-1))
    return F.cross_entropy(x, labels.long(), ignore_index=ignore_index)
