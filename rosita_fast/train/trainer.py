"""The stage trainer: one student, an optional teacher, distillation losses, iterative pruning.

A stage is what one run of the method's ``train.py`` does (method sections 3.4-3.6, 5.1)::

    result = train_stage(
        TrainConfig(epochs=10, learning_rate=1e-5, lr_schedule="none", optimizer="bert_adam",
                    eval_every=500, kd=KDConfig(hidden_weight=1.0),
                    pruning=PruningConfig(mode="width", heads=2, ffn=512, embedding_rank=128,
                                          prune_fraction=0.01)),
        model=student, teacher=teacher, tokenizer=tokenizer, task="sst-2",
        train_data=train_features, eval_data=dev_features, output_dir="runs/rosita",
    )
    result.model_dir        # the selected model: AutoModelForSequenceClassification-loadable

Constructing a :class:`Trainer` performs every check (options, data, teacher, pruning targets,
output directory) and loads the checkpoint when resuming; :meth:`Trainer.run` trains. Under
``torchrun`` the same code runs in every process: each takes its share of every global batch,
DDP averages the gradients, and only rank 0 evaluates and writes files. The token-averaged
distillation terms are rescaled by each rank's share of the global batch's tokens (one small
all-reduce per update), so the averaged gradient is the one a single process would compute on
the whole global batch, whatever the sequence lengths.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..compress import count_parameters, group_names
from ..data import DynamicPaddingCollator, GlueTask, get_task
from ..distill import (
    FUSED_FUNCTIONS,
    REFERENCE_FUNCTIONS,
    KDLoss,
    LayerMapError,
    apply_relu_before_classifier,
    teacher_forward,
)
from ..distill.teacher_cache import TeacherCache, fingerprint
from .atomic import write_json_atomic
from .averaging import WeightAverage
from .bert_adam import BertAdam
from .checkpoint import (
    BEST_MODEL_DIR,
    CONFIG_FILE,
    EVAL_LOG_FILE,
    RESULT_FILE,
    load_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    save_model,
)
from .config import TrainConfig
from .distributed import DistContext, init_distributed
from .errors import CheckpointError, TrainConfigError
from .eval_log import append_eval_record, truncate_eval_log
from .evaluation import evaluate
from .lr_schedule import LRSchedule
from .optim import build_optimizer
from .progress import LossMeter, StageProgress, describe_shape
from .pruning import build_schedule, restore_schedule
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .sampler import ResumableSampler
from .selection import ModelSelection

__all__ = ["TrainResult", "Trainer", "train_stage"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_INDEX_KEY = "example_index"  # the batch entry that names its examples (teacher cache)


class _Indexed(Dataset):
    """``(example indices, item)`` of a map-style dataset: ``[i]`` for item ``i``, or what the
    dataset's ``example_indices(i)`` says (an item that is a chunk of examples, one per row)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self._ids = getattr(data, "example_indices", None)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[list[int], Any]:
        return (list(self._ids(i)) if self._ids is not None else [i]), self.data[i]


class _IndexedCollate:
    """A collate function that also returns the batch rows' example indices (``_INDEX_KEY``)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[list[int], Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.collate([item for _, item in items]))
        batch[_INDEX_KEY] = torch.tensor([i for ids, _ in items for i in ids], dtype=torch.long)
        return batch
# Options that do not change what is computed; a resumed run may change them.
# Options that do not change what a run computes (fast modules compute the same function).
_RESUME_FREE = {"progress", "num_workers", "device", "fast_modules", "fused_losses",
                "fused_optimizer", "teacher_cache", "teacher_cache_hidden_mb"}
# 2: importance lives in the pruning schedule's state (one copy, the same on every rank), and
# is gathered from the DDP-averaged gradient; format-1 checkpoints held per-rank hook sums.
_STATE_FORMAT = 2
_REFRESH_EVERY = 10  # updates between progress-bar refreshes (each one reads the loss back)


@dataclass
class TrainResult:
    """What a finished stage produced.

    Attributes:
        model_dir: the selected model (``save_pretrained`` format, plus the tokenizer if one was
            given): the best post-pruning evaluation, or the final model without dev data.
        metric: name of the selection metric (``None`` without dev data).
        best_metric: its best value after pruning ended (``None`` without dev data).
        best_step: the update count at which ``best_metric`` was reached.
        best_metrics: every metric of that evaluation.
        num_parameters: parameters of the selected model (all of them, embeddings included).
        steps: updates done.
        stopped_early: patience ran out before the nominal end.
        fast_modules: what student and teacher ran on (``"fast"`` or ``"stock"``, per role).
    """

    model_dir: Path
    metric: str | None
    best_metric: float | None
    best_step: int | None
    best_metrics: dict[str, float] | None
    num_parameters: int
    steps: int
    stopped_early: bool
    fast_modules: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the content of ``result.json``)."""
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        return out


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


class Trainer:
    """Runs one training stage; see the module docstring.

    Args:
        config: a :class:`TrainConfig` (or a mapping for :meth:`TrainConfig.from_dict`).
        model: the student, a sequence classifier (dense Hugging Face model or a
            rosita_fast student). It is trained, and pruned, in place unless the run resumes,
            in which case the checkpoint's model replaces it (see :attr:`model`).
        train_data: a map-style dataset of items for ``collate_fn`` (e.g.
            :class:`~rosita_fast.data.EncodedDataset`).
        output_dir: where checkpoints, the evaluation log and the selected model go.
        eval_data: labelled dev items; ``None`` = no evaluation (the final model is kept).
        task: the GLUE task (name or :class:`~rosita_fast.data.GlueTask`) whose metrics select
            checkpoints; required with ``eval_data``.
        teacher: the teacher model, required when ``config.kd`` distils. Never trained.
        tokenizer: saved next to the selected model; also provides the default collator.
        collate_fn: batch builder; default: dynamic padding with the tokenizer's pad id.
        overwrite: replace a previous run's output in ``output_dir``.
        resume: continue the run whose checkpoints are in ``output_dir``.

    Raises:
        TrainConfigError: bad options, or options that do not fit the data/model/teacher.
        OutputDirError: ``output_dir`` holds files and neither flag allows touching them.
        CheckpointError: the checkpoint to resume from is unusable or from another config.
    """

    def __init__(
        self,
        config: TrainConfig | Mapping[str, Any],
        *,
        model: nn.Module,
        train_data: Dataset,
        output_dir: str | Path,
        eval_data: Dataset | None = None,
        task: str | GlueTask | None = None,
        teacher: nn.Module | None = None,
        tokenizer: Any = None,
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        if isinstance(config, Mapping):
            config = TrainConfig.from_dict(config)
        if not isinstance(config, TrainConfig):
            raise TrainConfigError(f"config must be a TrainConfig or a mapping; got "
                                   f"{type(config).__name__}")
        self.config = config
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.dist: DistContext = init_distributed(config.device)
        self.device = self.dist.device
        teacher = self._check_inputs(model, train_data, eval_data, task, teacher, tokenizer,
                                     collate_fn)
        self.train_data, self.eval_data = train_data, eval_data
        self.collate_fn = collate_fn or DynamicPaddingCollator.for_tokenizer(tokenizer)
        self._plan_steps(len(train_data))
        if config.pruning is not None:  # dry run: a bad target fails before any file is touched
            probe = build_schedule(model, config.pruning, self.total_steps)
            if probe.tracker is not None:
                probe.tracker.detach()

        checkpoint = self._prepare_output(overwrite=overwrite, resume=resume)
        state: dict[str, Any] | None = None
        if checkpoint is not None:
            model, state = load_checkpoint(checkpoint, self.device)
            self._check_resumable(state, checkpoint)
        self.model = model.to(self.device)
        self.teacher = teacher.to(self.device) if teacher is not None else None
        self.fast_modules = self._swap_fast_modules()
        self.teacher_cache = self._bind_teacher_cache(teacher_cache)
        self._quirk_handles = []
        if config.kd.relu_before_classifier:
            for net in (self.model, self.teacher):
                if net is not None:
                    self._quirk_handles.append(apply_relu_before_classifier(net))
        self._setup_training_state(state)
        self._ddp: nn.Module | None = None
        self._wrap_model()

    def _swap_fast_modules(self) -> dict[str, str]:
        """Swap student and teacher onto the fast modules; returns what each one runs on."""
        from ..fast_modules import FastModulesConfig, is_fast
        from ..swap import swap_

        used = {}
        for role, net in (("student", self.model), ("teacher", self.teacher)):
            if net is None:
                continue
            reason = None
            if not self.config.fast_modules:
                reason = "train.fast_modules is off"
            elif self.config.kd.attention_weight:
                reason = "attention-map distillation needs the stock attention"
            else:
                try:
                    swap_(net, FastModulesConfig())
                except (ValueError, TypeError) as exc:
                    reason = str(exc)
            if reason is not None and not is_fast(net):
                if self.config.fast_modules:
                    warnings.warn(f"{role} trains on the stock modules: {reason}",
                                  RuntimeWarning, stacklevel=3)
                used[role] = "stock"
            else:
                used[role] = "fast"
        return used

    def _bind_teacher_cache(self, cache: TeacherCache | None) -> TeacherCache | None:
        """The cache of teacher outputs this stage uses (``cache`` if given, shared across
        stages), bound to this teacher and data; None where outputs are not deterministic."""
        kd = self.kd.config
        if (self.teacher is None or not self.kd.needs_teacher or not self.config.teacher_cache
                or kd.teacher_dropout or kd.attention_weight
                or (self.kd.needs_hidden_states and kd.hidden_include_padding)):
            return None
        budget = self.config.teacher_cache_hidden_mb * 2**20
        if cache is None:
            cache = TeacherCache(budget)
        cache.hidden_budget_bytes = budget
        needs = f"hidden={self.kd.needs_hidden_states}"
        cache.bind(fingerprint(self.teacher, self.train_data, extra=needs))
        return cache

    # ---- checks --------------------------------------------------------------------------

    def _check_inputs(self, model, train_data, eval_data, task, teacher, tokenizer,
                      collate_fn) -> nn.Module | None:
        """Validate everything that does not need the output directory; return the teacher
        actually used."""
        config = self.config
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TrainConfigError("model must be a Hugging Face sequence classifier")
        # Distributed, the hidden/attention terms must average over the global batch's tokens,
        # not each rank's (ranks hold different token counts); see KDLoss's average_counts.
        self.kd = KDLoss(config.kd, average_counts=self.dist.mean_over_ranks
                         if self.dist.distributed else None,
                         functions=FUSED_FUNCTIONS if config.fused_losses
                         else REFERENCE_FUNCTIONS)
        if self.kd.needs_teacher and teacher is None:
            raise TrainConfigError("the distillation config needs a teacher (prediction, hidden "
                                   "or attention weights are set); pass teacher=... or use "
                                   "kd={'prediction_weight': 0, 'gold_weight': 1} to fine-tune")
        if teacher is not None and not self.kd.needs_teacher:
            warnings.warn("a teacher was given but the loss uses gold labels only; it is not "
                          "used", stacklevel=3)
            teacher = None
        if teacher is not None:
            self._check_teacher(model, teacher)
        if collate_fn is None and tokenizer is None:
            raise TrainConfigError("pass a tokenizer (for dynamic padding) or a collate_fn")
        self.task = get_task(task) if task is not None else None
        if eval_data is not None and self.task is None:
            raise TrainConfigError("evaluation needs the task (for its metrics); pass task=...")
        if self.task is not None:
            self.metric = config.metric or self.task.main_metric
            if self.metric not in self.task.metrics:
                raise TrainConfigError(f"metric {self.metric!r} is not reported for task "
                                       f"{self.task.name}; choose from {self.task.metrics}")
            if not self.task.is_regression and model.config.num_labels != self.task.num_labels:
                raise TrainConfigError(f"the model has {model.config.num_labels} labels, task "
                                       f"{self.task.name} {self.task.num_labels}")
            # The saved model names its classes (negative/positive, not LABEL_0/LABEL_1).
            self.task.name_labels(model.config)
        else:
            self.metric = None
        if eval_data is not None and len(eval_data) == 0:
            raise TrainConfigError("eval_data is empty")
        if config.batch_size % self.dist.world_size:
            raise TrainConfigError(f"batch_size {config.batch_size} is not divisible by the "
                                   f"{self.dist.world_size} processes")
        if len(train_data) < config.batch_size:
            raise TrainConfigError(f"{len(train_data)} training examples are fewer than one "
                                   f"batch of {config.batch_size}")
        return teacher

    def _check_teacher(self, model: nn.Module, teacher: nn.Module) -> None:
        # Pruning the student in place would prune a teacher that shares its tensors (Setting 4
        # starts the student from the teacher's checkpoint: it must be a separate copy).
        if {id(p) for p in model.parameters()} & {id(p) for p in teacher.parameters()}:
            raise TrainConfigError("the teacher shares parameters with the student; pass a "
                                   "separate copy (e.g. load the checkpoint twice)")
        # The loss would find these only at the first step, after the output dir is set up.
        s, t = model.config, teacher.config
        if s.num_labels != t.num_labels:
            raise TrainConfigError(f"student has {s.num_labels} labels, teacher {t.num_labels}")
        if self.kd.needs_hidden_states:
            if s.hidden_size != t.hidden_size:
                raise TrainConfigError(f"hidden-state distillation needs equal widths; student "
                                       f"hidden size {s.hidden_size}, teacher {t.hidden_size}")
            try:
                self.kd.layer_pairs(t.num_hidden_layers, s.num_hidden_layers)
            except LayerMapError as exc:
                raise TrainConfigError(f"kd.layer_map: {exc}") from exc

    def _plan_steps(self, n_train: int) -> None:
        config = self.config
        self.local_batch_size = config.batch_size // self.dist.world_size
        self.steps_per_epoch = n_train // config.batch_size
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.checkpoint_every = config.checkpoint_every or self.eval_every
        self.warmup_steps = int(config.warmup_proportion * self.total_steps)

    def _prepare_output(self, *, overwrite: bool, resume: bool) -> Path | None:
        # Rank 0 alone touches the directory; every rank then raises the same error, if any.
        outcome: tuple[str, Any]
        if self.dist.is_main:
            try:
                outcome = ("ok", prepare_output_dir(self.output_dir, overwrite=overwrite,
                                                    resume=resume))
            except Exception as exc:  # re-raised below on every rank
                outcome = ("error", exc)
        else:
            outcome = ("ok", None)
        outcome = self.dist.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        checkpoint = outcome[1]
        if checkpoint is None and self.dist.is_main:
            write_json_atomic(self.output_dir / CONFIG_FILE, self.config.to_dict())
        return checkpoint

    def _check_resumable(self, state: dict[str, Any], checkpoint: Path) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{checkpoint} has an unknown trainer state format")
        saved = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
        current = {k: v for k, v in _json_roundtrip(self.config.to_dict()).items()
                   if k not in _RESUME_FREE}
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise CheckpointError(f"cannot resume from {checkpoint}: options {changed} differ "
                                  "from the run that wrote it")
        if state["total_steps"] != self.total_steps:
            raise CheckpointError(f"cannot resume from {checkpoint}: it plans "
                                  f"{state['total_steps']} steps, this data gives "
                                  f"{self.total_steps} (different training data?)")

    # ---- state -----------------------------------------------------------------------------

    def _setup_training_state(self, state: dict[str, Any] | None) -> None:
        config = self.config
        names = state["optimizer_groups"] if state else None
        self.optimizer = build_optimizer(self.model, config, names)
        self.lr_schedule = LRSchedule(config.lr_schedule, self.total_steps, self.warmup_steps)
        self.selection = ModelSelection(patience_steps=config.patience_steps)
        self.average = (WeightAverage(self.model, config.weight_average_decay)
                        if config.weight_average_decay is not None else None)
        self.schedule = None
        if config.pruning is not None:
            if state is None:
                self.schedule = build_schedule(self.model, config.pruning, self.total_steps)
            else:
                self.schedule = restore_schedule(self.model, config.pruning, state["pruning"])
        self.sampler = ResumableSampler(self.train_data, local_batch_size=self.local_batch_size,
                                        rank=self.dist.rank, world_size=self.dist.world_size,
                                        seed=config.seed)
        if state is None:
            self.steps_done = self.epoch = self.batch_in_epoch = 0
            self.pruning_end_step = 0 if self.schedule is None else None
            self.stopped_early = False
            self.saved_parameters = None
            self._loss_window = [0.0, 0]
            seed_everything(config.seed + self.dist.rank)
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(self.optimizer, BertAdam):
            # A saved group carries the fused flag of its run; fused_optimizer is resume-free.
            for group in self.optimizer.param_groups:
                group["fused"] = self.optimizer.defaults["fused"]
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.selection.load_state_dict(state["selection"])
        self.steps_done, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.pruning_end_step = state["pruning_end_step"]
        if self.average is not None:
            try:
                self.average.load_state_dict(state["weight_average"], self.model)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"the checkpoint's weight average cannot be restored: "
                                      f"{exc}") from exc
        self.stopped_early = state["stopped_early"]
        self.saved_parameters = state["saved_parameters"]
        per_rank = state["per_rank"]
        if len(per_rank) != self.dist.world_size:
            raise CheckpointError(f"the checkpoint was written by {len(per_rank)} processes; "
                                  f"resume with the same number (now {self.dist.world_size})")
        mine = per_rank[self.dist.rank]
        restore_rng_state(mine["rng"])
        self._loss_window = mine["loss_window"]
        if self.dist.is_main:
            truncate_eval_log(self.output_dir / EVAL_LOG_FILE, self.steps_done)

    def _trainer_state(self) -> dict[str, Any] | None:
        # The schedule's state holds the importance: gathered from averaged gradients, it is
        # the same on every rank, so rank 0's copy is the only one saved.
        per_rank = self.dist.gather({"rng": capture_rng_state(),
                                     "loss_window": self._loss_window})
        if not self.dist.is_main:
            return None
        return {
            "format": _STATE_FORMAT,
            "config": _json_roundtrip(self.config.to_dict()),
            "total_steps": self.total_steps,
            "step": self.steps_done,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_groups": group_names(self.optimizer, self.model),
            "lr_schedule": self.lr_schedule.state_dict(),
            "pruning": self.schedule.state_dict() if self.schedule else None,
            "pruning_end_step": self.pruning_end_step,
            "weight_average": self.average.state_dict() if self.average else None,
            "selection": self.selection.state_dict(),
            "stopped_early": self.stopped_early,
            "saved_parameters": self.saved_parameters,
            "per_rank": per_rank,
        }

    def _wrap_model(self) -> None:
        # DDP keeps references to the parameters it reduces, so a pruned model needs a new
        # wrapper; the old one is released first so that its gradient hooks go with it.
        self._ddp = None
        if not self.dist.distributed:
            self._ddp = self.model
            return
        uses_logits = bool(self.config.kd.prediction_weight or self.config.kd.gold_weight)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(self.model, device_ids=device_ids,
                                            find_unused_parameters=not uses_logits)

    # ---- training --------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the stage reached its last step or stopped early."""
        return self.stopped_early or self.steps_done >= self.total_steps

    def _loader(self) -> DataLoader:
        # A private generator: iterating a DataLoader draws a seed from its generator, and the
        # global one would then advance differently in resumed and uninterrupted runs.
        generator = torch.Generator().manual_seed(self.config.seed)
        data, collate = self.train_data, self.collate_fn
        if self.teacher_cache is not None:  # batches carry their examples' indices
            data, collate = _Indexed(data), _IndexedCollate(collate)
        return DataLoader(data, batch_size=self.local_batch_size,
                          sampler=self.sampler, collate_fn=collate, drop_last=True,
                          num_workers=self.config.num_workers, generator=generator)

    def _prune_if_due(self, progress: StageProgress) -> None:
        schedule = self.schedule
        if schedule is None or schedule.done:
            return
        if schedule.step(self.model, self.optimizer):
            self.lr_schedule.reanchor(self.steps_done)
            if self.average is not None:
                self.average.reset(self.model)
            self._wrap_model()
            progress.set_model(self.model)
            progress.write(f"step {self.steps_done}: pruned to {describe_shape(self.model)}, "
                           f"{count_parameters(self.model):,} parameters")
        if schedule.done:
            self.pruning_end_step = self.steps_done

    def _train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        indices = batch.pop(_INDEX_KEY, None)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels", None)
        inputs = {k: batch[k] for k in _INPUTS if k in batch}
        self.model.train()
        teacher_out = self._teacher_outputs(inputs, indices) if self.teacher else None
        # Logits-only losses: a fast first-token classifier's last layer computes one position.
        with self.kd.forward_context(self.model):
            student_out = self._ddp(**inputs, **self.kd.model_kwargs())
        result = self.kd(student_out, teacher_out, attention_mask=inputs.get("attention_mask"),
                         labels=labels)
        result.loss.backward()
        if self.schedule is not None:
            # Here .grad holds the gradient DDP averaged over ranks (the global batch's), before
            # clipping and the update change it: importance every process count agrees on.
            self.schedule.accumulate_from_grads()
        if self.config.optimizer == "adamw" and self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        if isinstance(self.optimizer, torch.optim.AdamW) and self.optimizer.defaults.get("fused"):
            # torch's fused kernel writes the parameters without bumping their version counters,
            # which the fast modules' caches of derived weights check.
            torch.autograd.graph.increment_version(
                [p for g in self.optimizer.param_groups for p in g["params"]])
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update(self.model)
        return result.loss.detach()

    def _teacher_outputs(self, inputs: dict[str, torch.Tensor],
                         indices: torch.Tensor | None) -> Any:
        cache, mask = self.teacher_cache, inputs.get("attention_mask")
        if cache is None or indices is None or mask is None:
            return teacher_forward(self.teacher, inputs, self.kd)
        ids = indices.tolist()
        if len(ids) != mask.shape[0]:
            raise RuntimeError(f"teacher cache: {len(ids)} example indices for a batch of "
                               f"{mask.shape[0]} rows (a chunked dataset needs example_indices)")
        out = cache.get(ids, mask, need_hidden=self.kd.needs_hidden_states)
        if out is None:
            out = teacher_forward(self.teacher, inputs, self.kd)
            cache.put(ids, out, mask)
        return out

    def _after_step(self) -> None:
        """Hook run after every update (tests subclass it to simulate a crash)."""

    def run(self) -> TrainResult:
        """Train to the end of the stage (or early stop); return what it produced.

        A resumed stage continues from its checkpoint and ends in the same model as an
        uninterrupted run; a stage that had already finished just reports its result.
        """
        progress = StageProgress(self.total_steps, self.steps_done,
                                 enabled=self.config.progress and self.dist.is_main)
        progress.set_model(self.model)
        meter = LossMeter(*self._loss_window, self.device)
        try:
            loader = self._loader()
            while not self.finished:
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                for batch in loader:
                    self._prune_if_due(progress)
                    factor = self.lr_schedule.apply(self.optimizer, self.steps_done)
                    meter.add(self._train_step(batch))
                    self._count_update()
                    if self.steps_done % _REFRESH_EVERY == 0 or self.finished:
                        progress.show(self.steps_done, meter.recent(),
                                      factor * self.config.learning_rate)
                    if self._evaluation_due():
                        train_loss = self._mean_loss(meter)
                        meter.reset()
                        self._evaluate_and_select(progress, train_loss)
                    if self._checkpoint_due():
                        self._loss_window = meter.state()
                        self._checkpoint()
                    self._after_step()
                    if self.finished:
                        break
        finally:
            progress.close()
        return self._finish()

    def _count_update(self) -> None:
        self.steps_done += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _evaluation_due(self) -> bool:
        return self.eval_data is not None and (
            self.steps_done % self.eval_every == 0 or self.steps_done >= self.total_steps)

    def _checkpoint_due(self) -> bool:
        return self.steps_done % self.checkpoint_every == 0 or self.finished

    def _mean_loss(self, meter: LossMeter) -> float | None:
        # The mean over all ranks' updates since the last evaluation. Each rank's loss is its
        # share of the global loss (token terms rescaled), so this is the global batches' mean.
        if meter.count == 0:
            return None
        return float(self.dist.mean_over_ranks(meter.sum / meter.count).item())

    def _evaluate_and_select(self, progress: StageProgress, train_loss: float | None) -> None:
        decision = None
        if self.dist.is_main:
            with self._selected_weights():
                metrics = evaluate(self.model, self._eval_loader(), self.task, self.device)
                pruning_done = self.schedule is None or self.schedule.done
                decision = self.selection.observe(
                    self.steps_done, metrics, self.metric, pruning_done=pruning_done,
                    pruning_end_step=self.pruning_end_step or 0)
                if decision.save:
                    save_model(self.model, self.output_dir / BEST_MODEL_DIR, self.tokenizer)
                    self.saved_parameters = count_parameters(self.model)
            record = {
                "step": self.steps_done,
                "epoch": round(self.steps_done / self.steps_per_epoch, 4),
                "metrics": metrics,
                self.metric: metrics[self.metric],
                "train_loss": train_loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "shape": describe_shape(self.model),
                "parameters": count_parameters(self.model),
                "pruning_done": pruning_done,
                "weights": "average" if self.average is not None else "raw",
                "saved": decision.save,
                "best_metric": self.selection.best_metric,
                "best_step": self.selection.best_step,
            }
            append_eval_record(self.output_dir / EVAL_LOG_FILE, record)
            progress.write(f"step {self.steps_done}: {self.metric} "
                           f"{metrics[self.metric]:.4f} (best {self.selection.best_metric})")
        # Every rank must agree on stopping and on the selection state that checkpoints hold.
        stop, selection = self.dist.broadcast(
            (decision.stop if decision else False, self.selection.state_dict()))
        self.selection.load_state_dict(selection)
        if stop:
            self.stopped_early = True

    def _selected_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights that are evaluated and saved: the running average where one is kept."""
        if self.average is None:
            return contextlib.nullcontext()
        return self.average.applied(self.model)

    def _eval_loader(self) -> DataLoader:
        return DataLoader(self.eval_data, batch_size=self.config.eval_batch_size, shuffle=False,
                          collate_fn=self.collate_fn)

    def _checkpoint(self) -> None:
        state = self._trainer_state()
        if self.dist.is_main:
            save_checkpoint(self.output_dir, self.steps_done, self.model, state,
                            keep=self.config.keep_checkpoints)

    def _finish(self) -> TrainResult:
        model_dir = self.output_dir / BEST_MODEL_DIR
        if self.dist.is_main:
            if self.eval_data is None or not model_dir.exists():
                with self._selected_weights():
                    save_model(self.model, model_dir, self.tokenizer)
                self.saved_parameters = count_parameters(self.model)
        for handle in self._quirk_handles:
            handle.remove()
        self._quirk_handles = []
        sel = self.selection
        result = TrainResult(
            model_dir=model_dir, metric=self.metric, best_metric=sel.best_metric,
            best_step=sel.best_step, best_metrics=sel.best_metrics,
            num_parameters=self.dist.broadcast(self.saved_parameters), steps=self.steps_done,
            stopped_early=self.stopped_early, fast_modules=dict(self.fast_modules))
        if self.dist.is_main:
            write_json_atomic(self.output_dir / RESULT_FILE, result.to_dict())
        self.dist.barrier()
        return result


def train_stage(config: TrainConfig | Mapping[str, Any], **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` with ``kwargs`` and run it; see :class:`Trainer` for arguments."""
    return Trainer(config, **kwargs).run()
