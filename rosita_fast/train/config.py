"""Options of one training stage: :class:`TrainConfig` and its iterative-pruning part
:class:`PruningConfig`. Both validate themselves on construction, so a bad recipe fails before
any model or data is touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..distill import KDConfig
from .errors import TrainConfigError
from .typecheck import check_fields, reject_unknown

__all__ = ["PruningConfig", "TrainConfig"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TrainConfigError(message)


@dataclass(frozen=True)
class PruningConfig:
    """How the student is pruned while it trains (method section 3).

    Attributes:
        mode: ``"width"`` (heads, FFN and embedding rank shrink together, linearly),
            ``"depth"`` (one top layer removed per event) or ``"one_step"`` (a single event at
            ``at_step``, scored on the gradients of the steps before it).
        prune_fraction: fraction ``p`` of the stage's total steps over which the events of a
            width/depth schedule are spread (method: 0.01-0.5). Give this or ``interval``.
        interval: explicit number of steps between events (instead of ``prune_fraction``).
        num_events: width mode only; default is the largest per-layer head reduction.
        at_step: one_step mode only: the number of updates before the event.
        layers: target depth (depth and one_step modes).
        heads, ffn: target heads / FFN neurons, one count for every layer or one per layer.
        embedding_rank: target rank of the factorized word embedding.
        method: importance estimator, ``"taylor"`` (method) or ``"mask"``.
        selection: ``"layer"`` keeps the top-k of each layer (method); ``"global"`` spends the
            same total across layers by normalised score.
        optimizer_state: ``"reset"`` clears Adam moments at every event (method) or
            ``"keep_unpruned"`` keeps them for parameters that pruning did not replace.
    """

    mode: Literal["width", "depth", "one_step"]
    prune_fraction: float | None = None
    interval: int | None = None
    num_events: int | None = None
    at_step: int | None = None
    layers: int | None = None
    heads: int | list[int] | None = None
    ffn: int | list[int] | None = None
    embedding_rank: int | None = None
    method: Literal["taylor", "mask"] = "taylor"
    selection: Literal["layer", "global"] = "layer"
    optimizer_state: Literal["reset", "keep_unpruned"] = "reset"

    def __post_init__(self) -> None:
        check_fields(self, "pruning")
        p = "pruning"
        if self.prune_fraction is not None:
            _require(0 < self.prune_fraction <= 1,
                     f"{p}.prune_fraction must be in (0, 1]; got {self.prune_fraction}")
        for name in ("interval", "num_events", "at_step", "layers", "embedding_rank"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{p}.{name} must be at least 1; got {value}")
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            counts = value if isinstance(value, list) else [value]
            _require(value is None or (len(counts) > 0 and min(counts) >= 1),
                     f"{p}.{name} must hold counts of at least 1; got {value}")
        width_targets = [n for n in ("heads", "ffn", "embedding_rank") if getattr(self, n)]
        if self.mode in ("width", "depth"):
            _require((self.prune_fraction is None) != (self.interval is None),
                     f"{p}: a {self.mode} schedule needs exactly one of prune_fraction or "
                     "interval")
            _require(self.at_step is None, f"{p}.at_step belongs to mode 'one_step'")
        if self.mode == "width":
            _require(bool(width_targets),
                     f"{p}: width pruning needs at least one of heads, ffn, embedding_rank")
            _require(self.layers is None,
                     f"{p}.layers is not pruned in width mode; use a depth stage")
        elif self.mode == "depth":
            _require(self.layers is not None, f"{p}: depth pruning needs a target 'layers'")
            _require(not width_targets and self.num_events is None,
                     f"{p}: depth pruning only removes layers; remove "
                     f"{width_targets or 'num_events'}")
        else:
            _require(self.at_step is not None, f"{p}: one_step pruning needs 'at_step'")
            _require(self.layers is not None or bool(width_targets),
                     f"{p}: one_step pruning needs at least one target size")
            _require(self.prune_fraction is None and self.interval is None
                     and self.num_events is None,
                     f"{p}: prune_fraction, interval and num_events belong to width/depth modes")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PruningConfig:
        """Build from a plain mapping; unknown keys and ill-typed values raise
        :class:`TrainConfigError`."""
        reject_unknown(values, cls, "pruning")
        if "mode" not in values:
            raise TrainConfigError("pruning.mode is required ('width', 'depth' or 'one_step')")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what one training stage computes.

    Where-to-write options (output directory, overwrite, resume) are arguments of
    :class:`~rosita_fast.train.trainer.Trainer`, not part of the config: a resumed run must
    have the same config as the run it continues, and the trainer checks that it does.

    Attributes:
        epochs: passes over the training data; the nominal step count is
            ``floor(n_train / batch_size) * epochs`` (the incomplete last batch is skipped, as in
            the method).
        max_steps: if set, the stage's total steps instead of ``epochs``' count.
        batch_size: the *global* batch; under ``torchrun`` each of ``W`` processes gets
            ``batch_size / W`` examples per step.
        eval_batch_size: batch size of the dev-set evaluation.
        learning_rate: base learning rate.
        lr_schedule: ``"none"`` (constant) or ``"linear"`` (warm-up, then linear decay to 0 at
            the nominal end). Either way the schedule is re-anchored at every pruning event
            (method 3.4): ``none`` returns to the base LR, ``linear`` decays from the current
            value to 0 at the nominal end with no new warm-up.
        warmup_proportion: fraction of the total steps spent warming up (``linear`` only).
        optimizer: ``"adamw"`` (torch AdamW, bias-corrected, global gradient clipping) or
            ``"bert_adam"`` (method 5.1: no bias correction, per-tensor clipping).
        weight_decay: decoupled weight decay on every parameter except biases and norms.
        adam_beta1, adam_beta2: Adam moment decay rates.
        adam_epsilon: ``None`` = 1e-8 for AdamW, 1e-6 for BertAdam.
        max_grad_norm: gradient clipping norm (``None`` = no clipping).
        eval_every: evaluate on the dev set every this many updates; ``None`` = once per epoch.
            The final step is always evaluated.
        metric: the dev metric that selects checkpoints; ``None`` = the task's main metric.
        patience_steps: stop when the selection metric has not improved for this many updates
            after pruning ended (``None`` = never stop early).
        checkpoint_every: write a resumable checkpoint every this many updates; ``None`` = after
            every evaluation.
        keep_checkpoints: how many resumable checkpoints to keep (the newest).
        weight_average_decay: evaluate, select and save an exponential moving average of the
            weights with this decay (in (0, 1); spans about ``1 / (1 - decay)`` updates,
            restarted at every pruning event) instead of the raw weights; ``None`` = off. See
            :class:`~.averaging.WeightAverage`.
        seed: seeds Python, NumPy and torch (plus the rank) and the data order.
        kd: the loss (:class:`~rosita_fast.distill.KDConfig`); plain fine-tuning is
            ``KDConfig(prediction_weight=0, gold_weight=1)``.
        pruning: iterative pruning during the stage (``None`` = no pruning).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        num_workers: DataLoader worker processes.
        progress: show tqdm progress bars (rank 0 only).
        fast_modules: train the model, and run the teacher (inference mode), through rosita_fast's
            fused modules (:class:`~rosita_fast.FastModulesConfig`); same function, faster. A
            model the fast modules cannot run (see :attr:`Trainer.fast_modules`), and a KD loss
            that needs attention maps, train on the stock modules with a warning.
        fused_losses: compute the distillation terms with rosita_fast's fused ops
            (:data:`~rosita_fast.distill.FUSED_FUNCTIONS`: ``kd_logits_loss``, ``hidden_mse_loss``);
            off, the plain-PyTorch losses (:data:`~rosita_fast.distill.REFERENCE_FUNCTIONS`).
            Same values either way.
        fused_optimizer: run the optimizer's update as torch's fused AdamW kernel (one pass over
            each parameter's values, moments and gradient; for ``bert_adam`` see
            :class:`~.bert_adam.BertAdam`'s ``fused``) where every parameter allows it (floating
            point, on a device torch has the kernel for); off, the per-tensor loops (torch's
            default AdamW, BertAdam's plain-PyTorch step). The same update up to float rounding.
        teacher_cache: keep the teacher's logits per training example and skip the teacher's
            forward for a batch whose examples all have them (later epochs; later stages with
            the same teacher and data). Used only while the teacher runs without dropout; the
            cache is keyed by the teacher's parameters and the training data.
        teacher_cache_hidden_mb: also keep the teacher's hidden states (real tokens only) up to
            this many MiB, for hidden-state distillation that excludes padding (0: logits only).
    """

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 32
    learning_rate: float = 2e-5
    lr_schedule: Literal["none", "linear"] = "linear"
    warmup_proportion: float = 0.0
    optimizer: Literal["adamw", "bert_adam"] = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float | None = None
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    metric: str | None = None
    patience_steps: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 1
    weight_average_decay: float | None = None
    seed: int = 42
    kd: KDConfig = field(default_factory=KDConfig)
    pruning: PruningConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0
    progress: bool = True
    fast_modules: bool = True
    fused_losses: bool = True
    fused_optimizer: bool = True
    teacher_cache: bool = True
    teacher_cache_hidden_mb: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "train")
        positive = ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints", "max_steps",
                    "eval_every", "patience_steps", "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            _require(value is None or value >= 1, f"train.{name} must be at least 1; got {value}")
        _require(self.teacher_cache_hidden_mb >= 0, "train.teacher_cache_hidden_mb must be >= 0; "
                 f"got {self.teacher_cache_hidden_mb}")
        _require(self.learning_rate > 0, f"train.learning_rate must be > 0; got "
                 f"{self.learning_rate}")
        _require(0 <= self.warmup_proportion < 1,
                 f"train.warmup_proportion must be in [0, 1); got {self.warmup_proportion}")
        _require(self.lr_schedule == "linear" or self.warmup_proportion == 0,
                 "train.warmup_proportion needs lr_schedule 'linear' ('none' is constant)")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0; got "
                 f"{self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, name) < 1,
                     f"train.{name} must be in [0, 1); got {getattr(self, name)}")
        for name in ("adam_epsilon", "max_grad_norm"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"train.{name} must be > 0 or null; got {value}")
        _require(self.weight_average_decay is None or 0 < self.weight_average_decay < 1,
                 f"train.weight_average_decay must be in (0, 1) or null; got "
                 f"{self.weight_average_decay}")
        _require(self.num_workers >= 0, f"train.num_workers must be >= 0; got "
                 f"{self.num_workers}")

    @property
    def epsilon(self) -> float:
        """The Adam epsilon actually used (resolving ``None`` per optimizer)."""
        if self.adam_epsilon is not None:
            return self.adam_epsilon
        return 1e-6 if self.optimizer == "bert_adam" else 1e-8

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a plain mapping (a recipe's stage section).

        ``kd`` and ``pruning`` may be nested mappings. Unknown keys and ill-typed values raise
        :class:`TrainConfigError` naming the option.
        """
        reject_unknown(values, cls, "train")
        values = dict(values)
        if isinstance(values.get("kd"), Mapping):
            try:
                values["kd"] = KDConfig.from_dict(values["kd"])
            except (TypeError, ValueError) as exc:
                raise TrainConfigError(f"train.kd: {exc}") from exc
        if isinstance(values.get("pruning"), Mapping):
            values["pruning"] = PruningConfig.from_dict(values["pruning"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable; inverse of :meth:`from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["kd"] = self.kd.to_dict()
        out["pruning"] = self.pruning.to_dict() if self.pruning else None
        return out
