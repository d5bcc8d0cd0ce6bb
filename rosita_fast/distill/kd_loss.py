"""The combined distillation objective, computed from Hugging Face model outputs.

Under data parallelism each process sees a share of the global batch and DDP averages the
gradients. For terms that are a mean over examples (prediction, gold labels) that average is the
global batch's mean, because every process holds the same number of examples. The hidden-state,
embedding and attention terms are means over *tokens*, whose number differs between processes
with dynamic padding; :class:`KDLoss` therefore accepts an ``average_counts`` collective and
rescales those terms so that the averaged gradient is that of the global token mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import losses
from .kd_config import KDConfig
from .layer_map import resolve_layer_map


@dataclass(frozen=True)
class LossFunctions:
    """The per-term functions :class:`KDLoss` calls.

    Each has the signature of its namesake in :mod:`rosita_fast.distill.losses`.
    ``hidden_mse_pairs(student_states, teacher_states, mask)``, if set, computes every mapped
    pair's hidden-state term at once (a ``[pairs]`` tensor) and is used instead of one
    ``hidden_mse`` call per pair.
    """

    soft_cross_entropy: Callable[..., torch.Tensor] = losses.soft_cross_entropy
    kl_divergence: Callable[..., torch.Tensor] = losses.kl_divergence
    logits_mse: Callable[..., torch.Tensor] = losses.logits_mse
    hidden_mse: Callable[..., torch.Tensor] = losses.hidden_mse
    attention_mse: Callable[..., torch.Tensor] = losses.attention_mse
    gold_label_loss: Callable[..., torch.Tensor] = losses.gold_label_loss
    hidden_mse_pairs: Callable[..., torch.Tensor] | None = None


#: The plain-PyTorch losses of :mod:`rosita_fast.distill.losses`, one call per term and pair.
REFERENCE_FUNCTIONS = LossFunctions()


def _fused_soft_cross_entropy(student_logits, teacher_logits, temperature=1.0, *,
                              mean_over_classes=False, scale_by_t2=False):
    from rosita_fast.ops import kd_logits_loss

    loss = kd_logits_loss(student_logits, teacher_logits, temperature, "soft_ce", "mean",
                          scale_by_t2=scale_by_t2)
    return loss / student_logits.shape[-1] if mean_over_classes else loss


def _fused_kl_divergence(student_logits, teacher_logits, temperature=1.0, *, scale_by_t2=False):
    from rosita_fast.ops import kd_logits_loss

    return kd_logits_loss(student_logits, teacher_logits, temperature, "kl", "mean",
                          scale_by_t2=scale_by_t2)


def _fused_hidden_mse(student_hidden, teacher_hidden, attention_mask=None):
    from rosita_fast.ops import hidden_mse_loss

    return hidden_mse_loss([student_hidden], [teacher_hidden], mask=attention_mask)


def _fused_hidden_mse_pairs(student_states, teacher_states, attention_mask=None):
    from rosita_fast.ops import hidden_mse_loss

    return hidden_mse_loss(student_states, teacher_states, mask=attention_mask, per_pair=True)


#: The fused ops (``rosita_fast.ops.kd_logits_loss``, ``hidden_mse_loss``: one pass per row of
#: logits, one launch for all hidden-state pairs) with the same values as the reference losses;
#: the default of :class:`KDLoss`. ``rosita_fast.use_backend("reference")`` runs the ops' own
#: plain-PyTorch ground truth.
FUSED_FUNCTIONS = LossFunctions(
    soft_cross_entropy=_fused_soft_cross_entropy,
    kl_divergence=_fused_kl_divergence,
    hidden_mse=_fused_hidden_mse,
    hidden_mse_pairs=_fused_hidden_mse_pairs,
)


@dataclass
class KDLossOutput:
    """Result of :class:`KDLoss`.

    Attributes:
        loss: the weighted total, to call ``backward()`` on. With ``average_counts`` (data
            parallel) its token-averaged terms are rescaled, so it is this process's share of the
            global loss: its mean over processes is the global batch's loss.
        terms: each active term *before* weighting and rescaling, detached (``pred``,
            ``embedding``, ``hidden``, ``attention``, ``gold``): means over this process's
            batch; ``hidden``/``attention`` are summed over mapped layers.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def _get(outputs: Any, name: str) -> Any:
    if outputs is None:
        return None
    if isinstance(outputs, Mapping):  # ModelOutput is a Mapping; unset fields are simply absent
        return outputs.get(name)
    return getattr(outputs, name, None)


class KDLoss:
    """Distillation loss of a student against a teacher (method 4.1), set up by :class:`KDConfig`.

    Usage in a training step::

        kd = KDLoss(KDConfig(hidden_weight=1.0))
        s_out = student(**inputs, **kd.model_kwargs())
        t_out = teacher_forward(teacher, inputs, kd)        # eval mode + no_grad by default
        result = kd(s_out, t_out, attention_mask=inputs["attention_mask"], labels=labels)
        result.loss.backward()

    Args:
        config: the terms and options; default: prediction distillation only.
        functions: per-term implementations (default: :data:`FUSED_FUNCTIONS`, the fused ops;
            :data:`REFERENCE_FUNCTIONS` for the plain-PyTorch losses).
        average_counts: for data-parallel training, a collective that maps this process's token
            counts (a 1-D float64 tensor) to their element-wise mean over the processes whose
            gradients are averaged, e.g. an ``all_reduce`` divided by the world size. Each
            token-averaged term (embedding, hidden, attention) is then multiplied by
            ``local count / mean count``, i.e. it becomes ``local sum * R / global count``, and
            averaging the gradients over the ``R`` processes gives exactly the gradient of the
            mean over the global batch's tokens. It is called once per loss evaluation, on every
            process alike, and only when such a term is active. ``None`` (default): plain
            per-process means, right for a single process.
    """

    def __init__(
        self,
        config: KDConfig | None = None,
        *,
        functions: LossFunctions | None = None,
        average_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.config = config or KDConfig()
        self.fn = functions or FUSED_FUNCTIONS
        self.average_counts = average_counts
        # Resolved per (teacher, student) depth: the student's depth changes during depth pruning.
        self._maps: dict[tuple[int, int], list[tuple[int, int]]] = {}

    @property
    def needs_teacher(self) -> bool:
        """False only when the gold-label term is the sole active term."""
        c = self.config
        return bool(c.prediction_weight or c.hidden_weight or c.effective_embedding_weight
                    or c.attention_weight)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether models must run with ``output_hidden_states=True``."""
        return bool(self.config.hidden_weight or self.config.effective_embedding_weight)

    @property
    def needs_attentions(self) -> bool:
        """Whether models must run with ``output_attentions=True`` (and eager attention)."""
        return bool(self.config.attention_weight)

    @property
    def logits_only(self) -> bool:
        """Whether every active term reads only the models' logits (no hidden states or
        attention maps): a first-token classifier's last layer then needs only its first
        position (:func:`rosita_fast.first_token_output`)."""
        return not (self.needs_hidden_states or self.needs_attentions)

    def forward_context(self, model: nn.Module) -> AbstractContextManager:
        """The context for a forward pass of ``model`` whose outputs this loss reads: where only
        logits are read, :func:`rosita_fast.fast_modules.logits_context` (a fast first-token
        classifier's last layer computes one position); else one that changes nothing."""
        from ..fast_modules import logits_context

        return logits_context(model) if self.logits_only else nullcontext()

    def model_kwargs(self) -> dict[str, bool]:
        """Keyword arguments for the student's and teacher's forward calls."""
        return {"output_hidden_states": self.needs_hidden_states,
                "output_attentions": self.needs_attentions}

    def layer_pairs(self, n_teacher_layers: int, n_student_layers: int) -> list[tuple[int, int]]:
        """``(student, teacher)`` hidden-state index pairs for these depths (cached)."""
        key = (n_teacher_layers, n_student_layers)
        if key not in self._maps:
            self._maps[key] = resolve_layer_map(self.config.layer_map, *key)
        return self._maps[key]

    def __call__(
        self,
        student_outputs: Any,
        teacher_outputs: Any = None,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> KDLossOutput:
        """Compute the weighted loss.

        Args:
            student_outputs, teacher_outputs: model outputs (``ModelOutput`` or dict) with
                ``logits`` and, as needed, ``hidden_states`` / ``attentions``.
            attention_mask: ``(batch, seq)``; excludes padding from hidden/attention terms.
            labels: gold labels, needed when ``gold_weight > 0``.

        Raises:
            ValueError: a needed output is missing, or teacher and student do not fit together.
        """
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None

        def add(name: str, weight: float, value: torch.Tensor,
                scale: torch.Tensor | None = None) -> None:
            nonlocal total
            terms[name] = value.detach()
            if scale is not None:
                value = value * scale.to(value.dtype)  # float64 counts must not up-cast the loss
            total = weight * value if total is None else total + weight * value

        if self.needs_teacher and teacher_outputs is None:
            raise ValueError("this distillation config needs teacher outputs")
        # Every term is computed (and validated) before the count collective runs, so a bad
        # input raises its own error rather than one from the collective.
        pred = embedding = hidden = attention = None
        if c.prediction_weight:
            pred = self._prediction(student_outputs, teacher_outputs)
        if self.needs_hidden_states:
            embedding, hidden = self._hidden(student_outputs, teacher_outputs, attention_mask)
        if c.attention_weight:
            attention = self._attention(student_outputs, teacher_outputs, attention_mask)
        hidden_scale, attention_scale = self._data_parallel_scales(student_outputs,
                                                                   attention_mask)
        if pred is not None:
            add("pred", c.prediction_weight, pred)
        if c.effective_embedding_weight and embedding is not None:
            add("embedding", c.effective_embedding_weight, embedding, hidden_scale)
        if c.hidden_weight and hidden is not None:
            add("hidden", c.hidden_weight, hidden, hidden_scale)
        if attention is not None:
            add("attention", c.attention_weight, attention, attention_scale)
        if c.gold_weight:
            if labels is None:
                raise ValueError("gold_weight > 0 needs labels")
            add("gold", c.gold_weight, self.fn.gold_label_loss(_get(student_outputs, "logits"),
                                                               labels))
        if total is None:
            raise ValueError("the layer mapping selects no hidden-state pair; nothing to compute")
        return KDLossOutput(total, terms)

    def _data_parallel_scales(
        self, student: Any, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``local count / mean count over processes`` for the hidden-state terms (embedding
        included) and the attention term; ``None`` where not rescaled.

        One collective carries both counts. Its use depends only on the config, never on the
        data, so every process calls it at the same steps.
        """
        if self.average_counts is None:
            return None, None
        counts: list[torch.Tensor] = []
        if self.needs_hidden_states:
            token_mask = None if self.config.hidden_include_padding else mask
            counts.append(losses.hidden_mse_count(_get(student, "hidden_states")[0], token_mask))
        if self.needs_attentions:
            counts.append(losses.attention_mse_count(_get(student, "attentions")[0], mask))
        if not counts:
            return None, None
        local = torch.stack(counts)
        mean = self.average_counts(local)
        # A count is 0 on every process only if no process has a real token; the term is then 0
        # everywhere (its mean divides a zero sum), and a scale of 0 keeps it so instead of NaN.
        scales = local / mean.clamp_min(torch.finfo(torch.float64).tiny)
        hidden_scale = scales[0] if self.needs_hidden_states else None
        attention_scale = scales[-1] if self.needs_attentions else None
        return hidden_scale, attention_scale

    def _prediction(self, student: Any, teacher: Any) -> torch.Tensor:
        s, t = _get(student, "logits"), _get(teacher, "logits")
        if s is None or t is None:
            raise ValueError("prediction distillation needs 'logits' from both models")
        if s.shape != t.shape:
            raise ValueError(f"student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ; both models need the same label set")
        c = self.config
        if s.shape[-1] == 1:
            return self.fn.logits_mse(s, t)
        if c.prediction_loss == "kl":
            return self.fn.kl_divergence(s, t, c.temperature, scale_by_t2=c.scale_by_t2)
        return self.fn.soft_cross_entropy(s, t, c.temperature, scale_by_t2=c.scale_by_t2,
                                          mean_over_classes=c.soft_ce_mean_over_classes)

    def _hidden(
        self, student: Any, teacher: Any, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        hs, ht = _get(student, "hidden_states"), _get(teacher, "hidden_states")
        if not hs or not ht:
            raise ValueError("hidden-state distillation needs 'hidden_states' from both models; "
                             "call them with output_hidden_states=True (see KDLoss.model_kwargs)")
        if hs[0].shape[-1] != ht[0].shape[-1]:
            raise ValueError(f"student hidden size {hs[0].shape[-1]} != teacher hidden size "
                             f"{ht[0].shape[-1]}; hidden-state distillation needs equal widths")
        token_mask = None if self.config.hidden_include_padding else mask
        pairs = self.layer_pairs(len(ht) - 1, len(hs) - 1)
        if not pairs:
            return None, None
        if self.fn.hidden_mse_pairs is not None:  # every pair in one call
            values = self.fn.hidden_mse_pairs([hs[i] for i, _ in pairs],
                                              [ht[j] for _, j in pairs], token_mask)
        else:
            values = [self.fn.hidden_mse(hs[i], ht[j], token_mask) for i, j in pairs]
        embedding = hidden = None
        for k, (s_idx, _) in enumerate(pairs):
            if s_idx == 0:
                embedding = values[k]
            else:
                hidden = values[k] if hidden is None else hidden + values[k]
        return embedding, hidden

    def _attention(self, student: Any, teacher: Any, mask: torch.Tensor | None) -> torch.Tensor:
        a_s, a_t = _get(student, "attentions"), _get(teacher, "attentions")
        if not a_s or not a_t:
            raise ValueError(
                "attention distillation needs 'attentions' from both models; call them with "
                "output_attentions=True and load them with attn_implementation='eager' "
                "(SDPA/flash attention do not return attention maps)"
            )
        total: torch.Tensor | None = None
        for s_idx, t_idx in self.layer_pairs(len(a_t), len(a_s)):
            if s_idx == 0 or t_idx == 0:
                continue  # index 0 is the embedding output, which has no attention map
            s_map, t_map = a_s[s_idx - 1], a_t[t_idx - 1]
            if s_map.shape[1] != t_map.shape[1]:
                if not self.config.attention_average_heads:
                    raise ValueError(
                        f"student layer {s_idx} has {s_map.shape[1]} heads, teacher layer {t_idx} "
                        f"{t_map.shape[1]}; set attention_average_heads=True to compare "
                        "head-averaged maps"
                    )
            if self.config.attention_average_heads:
                s_map, t_map = s_map.mean(1, keepdim=True), t_map.mean(1, keepdim=True)
            value = self.fn.attention_mse(s_map, t_map, mask)
            total = value if total is None else total + value
        if total is None:
            raise ValueError("the layer mapping pairs no transformer layers for attention")
        return total
