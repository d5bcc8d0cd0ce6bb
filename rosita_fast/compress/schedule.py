"""Pruning schedules that a training loop drives one step at a time (ROSITA method, section 3).

A :class:`PruningSchedule` holds a list of :class:`PruningEvent` (when, and to which sizes) and,
when any event needs importance, an :class:`~.importance.ImportanceTracker` whose hooks gather
gradients during the loop's own backward passes. The loop calls :meth:`PruningSchedule.step`
once per optimizer step, *before* the forward pass::

    schedule = PruningSchedule.width(model, heads=2, ffn=512, embedding_rank=128,
                                     total_steps=N, prune_fraction=0.1)
    for batch in loader:
        schedule.step(model, optimizer)     # prunes when an event is due
        loss = kd_loss(model(**batch), teacher_out)
        loss.backward()                     # importance accumulates here
        optimizer.step(); optimizer.zero_grad()

At an event the schedule reads the scores gathered since the previous event, prunes with
:func:`prune_`, re-points the optimizer at the new parameters and resets its state, and restarts
importance accumulation.

Under ``DistributedDataParallel`` the hooks see each rank's local gradient; pass
``importance_source="grads"`` and call :meth:`PruningSchedule.accumulate_from_grads` after
``backward()`` (and before ``optimizer.step()``) instead, so that importance comes from the
gradient DDP averaged and every process count prunes the same units (see
:mod:`.importance`).

To resume, save :meth:`PruningSchedule.state_dict` (events, progress, options and the importance
gathered since the last event) next to the pruned model and rebuild with
:meth:`PruningSchedule.from_state_dict`.

Timing (decided here, documented against ROSITA): with ``T`` events spread over a fraction ``p``
of ``N`` training steps, the interval is ``P = floor(p * N / T)`` and event ``k`` fires after
exactly ``k * P`` optimizer updates. ROSITA fires after ``k * P - 1`` (method section 7, item 13);
the off-by-one is not reproduced. Amounts are linear in the event index,
``size_k = size_0 - round((size_0 - target) * k / T)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..models.student import ModelLayout, model_layout
from .importance import ImportanceMethod, ImportanceSource, ImportanceTracker
from .optimizer import OptimizerStatePolicy, group_names, rebuild_optimizer_
from .prune import prune_
from .selection import global_targets

__all__ = ["PruningEvent", "PruningSchedule", "Selection", "linear_sizes"]

Selection = Literal["layer", "global"]

# Constructor options that state_dict() records, so that from_state_dict() can rebuild alone.
_OPTIONS = ("method", "selection", "normalize", "optimizer_state", "importance_source")


def linear_sizes(start: int, target: int, num_events: int) -> list[int]:
    """Sizes after events ``1..num_events`` when shrinking linearly from ``start`` to ``target``.

    ``linear_sizes(3072, 512, 10) == [2816, 2560, ..., 512]``. Removed amounts round half up.
    """
    if num_events < 1:
        raise ValueError(f"num_events must be at least 1, got {num_events}")
    drop = start - target
    # Exact integer round-half-up of drop * k / T.
    return [
        start - (2 * drop * k + num_events) // (2 * num_events) for k in range(1, num_events + 1)
    ]


@dataclass(frozen=True)
class PruningEvent:
    """One pruning event: fires before training step ``step`` (after ``step`` updates).

    Sizes are targets for the whole model after the event; ``None`` leaves a dimension alone.
    ``heads`` and ``ffn`` hold one count per layer *after* the event's layer drop.
    """

    step: int
    layers: int | None = None
    heads: list[int] | None = None
    ffn: list[int] | None = None
    embedding_rank: int | None = None

    @property
    def needs_scores(self) -> bool:
        """Whether the event selects heads or neurons (depth-only events do not)."""
        return self.heads is not None or self.ffn is not None


def _per_layer(target: int | Sequence[int], num_layers: int, what: str) -> list[int]:
    values = [int(target)] * num_layers if isinstance(target, int) else [int(v) for v in target]
    if len(values) != num_layers:
        raise ValueError(f"{what}: {len(values)} per-layer targets for {num_layers} layers")
    return values


def _check_events(events: list[PruningEvent], layout: ModelLayout) -> None:
    # Dry-run the size trajectory so an impossible schedule fails at construction, not mid-run.
    layers, heads, ffn = layout.num_layers, list(layout.heads), list(layout.intermediate_sizes)
    rank = layout.embedding_rank
    last_step = -1
    for i, e in enumerate(events):
        where = f"event {i} (step {e.step})"
        if e.step <= last_step or e.step < 0:
            raise ValueError(f"{where}: event steps must be non-negative and increasing")
        if e.needs_scores and e.step == 0:
            raise ValueError(f"{where}: selecting heads/FFN needs gradients from earlier steps")
        last_step = e.step
        if e.layers is not None:
            if not 1 <= e.layers <= layers:
                raise ValueError(f"{where}: cannot keep {e.layers} of {layers} layers")
            layers, heads, ffn = e.layers, heads[: e.layers], ffn[: e.layers]
        for name, new, old in (("heads", e.heads, heads), ("ffn", e.ffn, ffn)):
            if new is None:
                continue
            if len(new) != layers or any(not 1 <= n <= o for n, o in zip(new, old, strict=True)):
                raise ValueError(f"{where}: {name} {new} do not fit current sizes {old}")
        heads, ffn = e.heads or heads, e.ffn or ffn
        if e.embedding_rank is not None:
            limit = rank if rank is not None else min(layout.hidden_size, layout.vocab_size)
            if not 1 <= e.embedding_rank <= limit:
                raise ValueError(f"{where}: embedding rank {e.embedding_rank} not in 1..{limit}")
            rank = e.embedding_rank


def _interval(
    num_events: int, total_steps: int | None, prune_fraction: float | None, interval: int | None
) -> int:
    if interval is None:
        if total_steps is None or prune_fraction is None:
            raise ValueError("give total_steps and prune_fraction, or an explicit interval")
        if not 0 < prune_fraction <= 1:
            raise ValueError(f"prune_fraction must be in (0, 1], got {prune_fraction}")
        interval = int(prune_fraction * total_steps) // num_events
    if interval < 1:
        raise ValueError(
            f"{num_events} events in {prune_fraction} of {total_steps} steps leave less than one "
            "step between events"
        )
    return interval


@dataclass
class PruningSchedule:
    """Fires :class:`PruningEvent` s from inside a training loop; see the module docstring.

    Args:
        model: the student being trained (pruned in place).
        events: events in increasing step order.
        method: importance estimator (``"taylor"``, ROSITA; or ``"mask"``).
        selection: ``"layer"`` keeps the top-k per layer (ROSITA); ``"global"`` spends the same
            total number of heads / neurons across layers by score.
        normalize: per-layer score normalization for global selection.
        optimizer_state: ``"reset"`` (ROSITA) or ``"keep_unpruned"``; see
            :func:`~.optimizer.rebuild_optimizer_`.
        importance_source: ``"hooks"`` (importance gathers by itself during ``backward()``) or
            ``"grads"`` (the loop calls :meth:`accumulate_from_grads`; exact under DDP).
    """

    model: nn.Module = field(repr=False)
    events: list[PruningEvent]
    method: ImportanceMethod = "taylor"
    selection: Selection = "layer"
    normalize: bool = True
    optimizer_state: OptimizerStatePolicy = "reset"
    steps_done: int = 0
    next_event: int = 0
    tracker: ImportanceTracker | None = field(default=None, repr=False)
    importance_source: ImportanceSource = "hooks"

    def __post_init__(self) -> None:
        if self.selection not in ("layer", "global"):
            raise ValueError(f"selection must be 'layer' or 'global', got {self.selection!r}")
        if self.importance_source not in ("hooks", "grads"):
            raise ValueError("importance_source must be 'hooks' or 'grads', got "
                             f"{self.importance_source!r}")
        self.events = list(self.events)
        _check_events(self.events[self.next_event :], model_layout(self.model))
        self.tracker = self._tracker_for(self.events[self.next_event :])

    def _tracker_for(self, remaining: list[PruningEvent]) -> ImportanceTracker | None:
        if not any(e.needs_scores for e in remaining):
            return None
        return ImportanceTracker(self.model, method=self.method, source=self.importance_source)

    # ---- constructors ----------------------------------------------------------------------

    @classmethod
    def width(
        cls,
        model: nn.Module,
        *,
        heads: int | Sequence[int] | None = None,
        ffn: int | Sequence[int] | None = None,
        embedding_rank: int | None = None,
        total_steps: int | None = None,
        prune_fraction: float | None = None,
        num_events: int | None = None,
        interval: int | None = None,
        **options,
    ) -> PruningSchedule:
        """Iterative width pruning: heads, FFN and embedding rank shrink together, linearly.

        ``num_events`` defaults to the largest per-layer head reduction (ROSITA: one head per
        layer per event, 12 -> 2 in 10 events). The embedding starts from its current rank, or
        from the hidden size if dense (first event factorizes by SVD, later ones truncate).
        ``options`` go to the class (``method``, ``selection``, ...).
        """
        layout = model_layout(model)
        n = layout.num_layers
        head_targets = None if heads is None else _per_layer(heads, n, "heads")
        ffn_targets = None if ffn is None else _per_layer(ffn, n, "ffn")
        if num_events is None:
            drops = [h - t for h, t in zip(layout.heads, head_targets or [], strict=False)]
            if head_targets is None or max(drops) < 1:
                raise ValueError("num_events is required when the head count does not shrink")
            num_events = max(drops)
        step = _interval(num_events, total_steps, prune_fraction, interval)

        def trajectory(starts: list[int], targets: list[int] | None) -> list[list[int]] | None:
            if targets is None:
                return None
            per_layer = [
                linear_sizes(s, t, num_events) for s, t in zip(starts, targets, strict=True)
            ]
            return [list(sizes) for sizes in zip(*per_layer, strict=True)]

        head_sizes = trajectory(layout.heads, head_targets)
        ffn_sizes = trajectory(layout.intermediate_sizes, ffn_targets)
        rank_sizes = None
        if embedding_rank is not None:
            start = layout.embedding_rank or layout.hidden_size
            rank_sizes = linear_sizes(start, int(embedding_rank), num_events)
        events = []
        for k in range(num_events):
            rank = rank_sizes[k] if rank_sizes else None
            if rank is not None and layout.embedding_rank is None and rank >= layout.hidden_size:
                rank = None  # a full-rank factorization would add parameters; wait for a real cut
            events.append(
                PruningEvent(
                    step=(k + 1) * step,
                    heads=head_sizes[k] if head_sizes else None,
                    ffn=ffn_sizes[k] if ffn_sizes else None,
                    embedding_rank=rank,
                )
            )
        return cls(model, events, **options)

    @classmethod
    def depth(
        cls,
        model: nn.Module,
        *,
        layers: int,
        total_steps: int | None = None,
        prune_fraction: float | None = None,
        interval: int | None = None,
        **options,
    ) -> PruningSchedule:
        """Iterative depth pruning: one top layer removed per event down to ``layers``."""
        current = model_layout(model).num_layers
        if not 1 <= layers < current:
            raise ValueError(f"layers must be in 1..{current - 1} for a {current}-layer model")
        num_events = current - layers
        step = _interval(num_events, total_steps, prune_fraction, interval)
        events = [
            PruningEvent(step=(k + 1) * step, layers=current - k - 1) for k in range(num_events)
        ]
        return cls(model, events, **options)

    @classmethod
    def one_step(
        cls,
        model: nn.Module,
        *,
        at_step: int,
        layers: int | None = None,
        heads: int | Sequence[int] | None = None,
        ffn: int | Sequence[int] | None = None,
        embedding_rank: int | None = None,
        **options,
    ) -> PruningSchedule:
        """A single event at ``at_step``, scored on the gradients of the steps before it.

        For one-step pruning before any training, use :func:`~.one_step.compress` instead.
        """
        n = layers if layers is not None else model_layout(model).num_layers
        event = PruningEvent(
            step=at_step,
            layers=layers,
            heads=None if heads is None else _per_layer(heads, n, "heads"),
            ffn=None if ffn is None else _per_layer(ffn, n, "ffn"),
            embedding_rank=embedding_rank,
        )
        return cls(model, [event], **options)

    # ---- driving ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once every event has fired."""
        return self.next_event >= len(self.events)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Advance one training step; prune first if an event is due. Returns whether it pruned.

        Call once per optimizer step, before the forward pass. ``optimizer`` (if given) keeps its
        identity and hyperparameters; its param groups are re-pointed and its state handled per
        ``optimizer_state``.
        """
        if model is not self.model:
            raise ValueError("step() got a different model from the one the schedule tracks")
        fired = False
        while not self.done and self.events[self.next_event].step <= self.steps_done:
            self._fire(self.events[self.next_event], optimizer)
            self.next_event += 1
            fired = True
        self.steps_done += 1
        if self.done and self.tracker is not None:
            self.tracker.detach()
            self.tracker = None
        return fired

    def accumulate_from_grads(self) -> None:
        """With ``importance_source="grads"``: add the current ``.grad`` to the importance.

        Call once per optimizer step, after ``backward()`` and before ``optimizer.step()``; see
        :meth:`.ImportanceTracker.accumulate_from_grads`. A no-op when no remaining event needs
        importance.

        Raises:
            RuntimeError: the schedule gathers importance through hooks.
        """
        if self.importance_source != "grads":
            raise RuntimeError("accumulate_from_grads() needs importance_source='grads'; this "
                               "schedule's hooks already accumulate")
        if self.tracker is not None:
            self.tracker.accumulate_from_grads()

    def _fire(self, event: PruningEvent, optimizer: torch.optim.Optimizer | None) -> None:
        scores = self.tracker.scores() if event.needs_scores and self.tracker else None
        heads, ffn = event.heads, event.ffn
        if self.selection == "global" and scores is not None:
            kept = list(range(event.layers or scores.num_layers))
            targets = global_targets(scores, kept, heads=heads, ffn=ffn, normalize=self.normalize)
            heads, ffn = targets["heads"], targets["ffn"]
        names = group_names(optimizer, self.model) if optimizer is not None else None
        prune_(
            self.model,
            layers=event.layers,
            heads=heads,
            ffn=ffn,
            embedding_rank=event.embedding_rank,
            scores=scores,
        )
        if optimizer is not None:
            rebuild_optimizer_(optimizer, self.model, names, state=self.optimizer_state)
        if self.tracker is not None:
            self.tracker.reset()

    def state_dict(self) -> dict[str, Any]:
        """Events, progress, options and the importance gathered since the last event.

        Save it next to a checkpoint of the (pruned) model; :meth:`from_state_dict` rebuilds an
        equal schedule on that model, which then prunes on the same scores as an uninterrupted
        run. ``importance`` is the tracker's :meth:`~.ImportanceTracker.state_dict` (``None``
        when no remaining event needs it); with ``importance_source="hooks"`` under DDP that is
        the saving rank's local share only.
        """
        state: dict[str, Any] = {
            "events": [asdict(e) for e in self.events],
            "steps_done": self.steps_done,
            "next_event": self.next_event,
        }
        state.update({name: getattr(self, name) for name in _OPTIONS})
        state["importance"] = self.tracker.state_dict() if self.tracker is not None else None
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output into this schedule, on the checkpoint's model.

        Events, progress and importance come from ``state``; the options stay this schedule's
        own (:meth:`from_state_dict` takes them from ``state``). States without ``importance``
        (older ones) restart accumulation from zero. Nothing changes when it raises.

        Raises:
            ValueError: the remaining events do not fit the model, or the saved importance does
                not fit the tracker (another method or model shape).
        """
        events = [PruningEvent(**e) for e in state["events"]]
        steps_done, next_event = int(state["steps_done"]), int(state["next_event"])
        if not 0 <= next_event <= len(events) or steps_done < 0:
            raise ValueError(f"inconsistent schedule progress: next event {next_event} of "
                             f"{len(events)}, {steps_done} steps done")
        remaining = events[next_event:]
        _check_events(remaining, model_layout(self.model))
        tracker = self._tracker_for(remaining)
        importance = state.get("importance")
        try:
            if importance is not None:
                if tracker is None:
                    raise ValueError("the state holds importance but no remaining event needs it")
                tracker.load_state_dict(importance)
        except ValueError:
            if tracker is not None:
                tracker.detach()  # its mask hooks must not stay on the model
            raise
        if self.tracker is not None:
            self.tracker.detach()
        self.events, self.steps_done, self.next_event = events, steps_done, next_event
        self.tracker = tracker

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, state: Mapping[str, Any], **options: Any
    ) -> PruningSchedule:
        """The schedule that :meth:`state_dict` describes, attached to ``model``.

        ``model`` must have the shape the schedule had reached (e.g. the model of the same
        checkpoint). Options (``method``, ``selection``, ``normalize``, ``optimizer_state``,
        ``importance_source``) default to the saved ones; ``options`` override them (e.g. a
        different ``importance_source``: the saved importance means the same for both).

        Raises:
            ValueError: as :meth:`load_state_dict`, or unknown options.
        """
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"unknown schedule options {sorted(unknown)}; expected some of "
                             f"{list(_OPTIONS)}")
        merged = {name: state[name] for name in _OPTIONS if name in state}
        merged.update(options)
        schedule = cls(model, [], **merged)
        schedule.load_state_dict(state)
        return schedule
