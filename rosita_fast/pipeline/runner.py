"""Running a recipe: stage after stage, each checkpointed, resumable between and within stages.

Output layout::

    <output_dir>/
        pipeline.json            the recipe, the data source, and the state of every stage
        stages/<name>/           one stage trainer's output (best_model/, eval_log.jsonl, ...)
        data/train_aug.jsonl     the augmented training set, when a stage uses one
        report.md, report.png    the end report (rosita_fast.pipeline.report)

A killed pipeline resumes with ``resume=True``: finished stages are skipped, the stage that was
running continues from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from ..data import DynamicPaddingCollator, GlueTask, encode_examples, get_task
from ..data.external import external_examples
from ..distill.teacher_cache import TeacherCache
from ..fast_modules import can_output_first_token
from ..train import Trainer, TrainResult
from ..train.atomic import write_json_atomic
from ..train.evaluation import evaluate
from .batching import LengthGroupedChunks, flatten_collator, length_sorted
from .errors import PipelineError
from .inputs import (
    augmented_examples,
    held_out_sources,
    load_model,
    load_split,
    prepare_models,
    resolve_model,
    sample_examples,
    validation_split,
)
from .preflight import check_positions, check_schedules
from .recipe import PRETRAINED, Recipe, StageSpec

__all__ = ["PipelineResult", "StageOutcome", "run_pipeline"]

STATE_FILE = "pipeline.json"
STAGES_DIR = "stages"


@dataclass
class StageOutcome:
    """One finished stage: where its model is and what it scored."""

    name: str
    model_dir: Path
    metric: str | None
    best_metric: float | None
    num_parameters: int
    steps: int
    wall_seconds: float
    fast_modules: dict[str, str] = field(default_factory=dict)
    """What the stage trained on (``{"student": "fast", "teacher": "fast"}``)."""
    paths: dict[str, bool] | None = None
    """The fast paths the stage ran with (the ``fast_modules`` and ``fused_losses`` settings,
    whether AdamW ran fused and the teacher cache was used, and whether the stage ``distils``);
    ``None`` for runs older than the record."""
    dev_metric: float | None = None
    """The selected model's dev score (``metric``), evaluated once after the stage; with a
    validation split ``best_metric`` is the validation score it was selected by, without one
    both are the dev score."""
    selected_on: str = "dev"
    """Where the checkpoint was selected: ``"validation"`` or ``"dev"``."""
    validation_rows: int = 0
    """Rows of the validation split (0 without one)."""


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did: the finished stages (in order) and whether all ran."""

    output_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)
    complete: bool = False
    report: Path | None = None
    validation_sources: dict[str, int] = field(default_factory=dict)
    """Sources held out of training whole for the validation split, with their row counts."""
    validation_phrases_out: int | None = None
    """With a validation split of whole sentences: the training rows inside them, left out of
    training (``None`` otherwise)."""


class _State:
    """``pipeline.json``: the run's identity (recipe + data source) and per-stage records."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = path
        self.identity = identity
        self.stages: dict[str, dict[str, Any]] = {}

    def load_matching(self) -> None:
        saved = json.loads(self.path.read_text(encoding="utf-8"))
        if saved.get("identity") != json.loads(json.dumps(self.identity)):
            raise PipelineError(f"cannot resume {self.path.parent}: it was started with a "
                                "different recipe or data source (see its pipeline.json)")
        self.stages = saved.get("stages", {})

    def save(self) -> None:
        write_json_atomic(self.path, {"identity": self.identity, "stages": self.stages})


def _prepare_output(output_dir: Path, state: _State, *, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise PipelineError("--overwrite and --resume exclude each other")
    if output_dir.exists() and not output_dir.is_dir():
        raise PipelineError(f"{output_dir} exists and is not a directory")
    empty = not output_dir.exists() or not any(output_dir.iterdir())
    ours = (output_dir / STATE_FILE).exists()
    if resume:
        if not ours:
            raise PipelineError(f"cannot resume in {output_dir}: no {STATE_FILE} there")
        state.load_matching()
        return
    if not empty:
        if not ours:
            raise PipelineError(f"{output_dir} holds files that are not a pipeline's output; "
                                "choose another --output-dir (nothing was touched)")
        if not overwrite:
            raise PipelineError(f"{output_dir} already holds a pipeline run; pass --overwrite to "
                                "replace it or --resume to continue it")
        # Only what a pipeline writes is removed; anything else the user put there stays.
        for name in (STAGES_DIR, "data", "report.md", "report.png", "report.json", "run.json",
                     STATE_FILE):
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    state.save()


def _describe_source(data_dir: Path | None, task: GlueTask) -> str:
    return str(data_dir) if data_dir is not None else f"hub:glue/{task.hub_config}"


def run_pipeline(
    recipe: Recipe,
    output_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    make_report: bool = True,
    fast_modules: bool | None = None,
    fast_paths: bool | None = None,
    compare_to: str | Path | None = None,
) -> PipelineResult:
    """Run ``recipe``'s stages in order and write the end report.

    Args:
        recipe: a validated :class:`~rosita_fast.pipeline.recipe.Recipe`.
        output_dir: where everything goes (see the module docstring).
        data_dir: a GLUE-format directory of the task; ``None`` = the ``datasets`` hub.
        overwrite: replace an earlier pipeline run in ``output_dir``.
        resume: continue the run in ``output_dir`` (same recipe and data source).
        stop_after: stop (cleanly, resumable) once this stage has finished.
        progress: tqdm progress bars during training.
        log: where progress lines go.
        make_report: write ``report.md``/``report.png`` once every stage has finished.
        fast_modules: ``False`` trains every stage on the stock Hugging Face modules (the CLI's
            ``--no-fast-modules``); ``None`` keeps each stage's ``train.fast_modules`` (default on).
        fast_paths: ``False`` turns off everything rosita_fast adds to training (the CLI's
            ``--no-fast-paths``): stock modules, the plain-PyTorch losses, torch's default
            (unfused) AdamW, no teacher cache; the
            baseline that the fast run's wall times are measured against. ``None`` keeps each
            stage's settings.
        compare_to: the output directory of another run of the same recipe (typically the one
            with ``fast_paths=False``); the report then shows its wall time per stage beside
            this run's.

    Raises:
        RecipeError, PipelineError, DataError, TokenizerMismatchError, TrainConfigError: bad
            input, all detected before the first training step.
    """
    output_dir = Path(output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would write pipeline.json and the report; single stages do support torchrun
        # (rosita_fast.train.train_stage).
        raise PipelineError("pipelines run in one process; launch single stages with torchrun")
    task = get_task(recipe.task)
    if stop_after is not None and stop_after not in {s.name for s in recipe.stages}:
        raise PipelineError(f"--stop-after names no stage of recipe {recipe.name}: {stop_after!r}")
    data_path = Path(data_dir) if data_dir is not None else None
    model_source = resolve_model(recipe.model)
    configs = {s.name: recipe.train_config(s) for s in recipe.stages}
    if fast_modules is not None:
        configs = {name: _with(c, fast_modules=fast_modules) for name, c in configs.items()}
    if fast_paths is not None:
        configs = {name: _with(c, fast_modules=fast_paths, fused_losses=fast_paths,
                               fused_optimizer=fast_paths, teacher_cache=fast_paths)
                   for name, c in configs.items()}
    baseline = None if compare_to is None else read_stage_walls(Path(compare_to), recipe)
    # Read the data before creating anything, so a bad directory leaves no trace.
    train_all = load_split(task, "train", data_path)
    dev = load_split(task, "dev", data_path)
    # The validation rows come out before any sampling: no stage ever trains on them.
    size = recipe.data.validation_size
    if size is None:
        size = min(1000, len(train_all) // 10)
    external = None
    if recipe.report.external is not None:
        # Loaded now so a missing package fails before training; filtered against every text
        # of the task's own files.
        external = external_examples(recipe.report.external, task.name, [
            t for ex in (*train_all, *dev) for t in (ex.text_a, ex.text_b) if t])
    before = len(train_all)
    train_all, validation = validation_split(train_all, size, recipe.data.validation_seed,
                                             task.is_regression,
                                             recipe.data.validation_unseen_sources,
                                             recipe.data.validation_whole_sentences)
    phrases_out = (before - len(train_all) - len(validation)
                   if recipe.data.validation_whole_sentences else None)
    if phrases_out is not None:
        log(f"validation: {len(validation)} whole sentences; {phrases_out} training rows "
            "inside them (their phrases) left out of training")
    unseen = held_out_sources(train_all, validation)
    if unseen:
        log(f"validation: {len(validation)} rows, {sum(unseen.values())} of them from sources "
            f"no stage trains on ({', '.join(f'{k} {v}' for k, v in sorted(unseen.items()))})")
    train = sample_examples(train_all, recipe.data.train_subset, recipe.data.subset_seed)
    model_config = _model_config(model_source)
    check_schedules(recipe, configs, model_config, len(train))
    check_positions(recipe, recipe.max_length(task), model_config)
    identity = {"recipe": recipe.to_dict(), "data": _describe_source(data_path, task),
                "model": model_source}
    state = _State(output_dir / STATE_FILE, identity)
    _prepare_output(output_dir, state, overwrite=overwrite, resume=resume)
    result = PipelineResult(output_dir, validation_sources=unseen,
                            validation_phrases_out=phrases_out)
    # One cache of teacher outputs for the run: a stage with the same teacher and data as an
    # earlier one reuses its entries (the cache empties itself for a new teacher or data).
    teacher_cache = TeacherCache()
    for spec in recipe.stages:
        record = state.stages.get(spec.name, {})
        if record.get("done"):
            outcome = _outcome_from_record(spec.name, record)
            log(f"[{spec.name}] already finished: {outcome.metric} {outcome.best_metric}")
        else:
            outcome = _run_stage(recipe, spec, configs[spec.name], task, train, dev,
                                 validation, output_dir, model_source, state, resume=resume,
                                 progress=progress, log=log, teacher_cache=teacher_cache)
        result.stages.append(outcome)
        if spec.name == stop_after and spec is not recipe.stages[-1]:
            log(f"stopped after stage {spec.name}; continue with --resume")
            return result
    result.complete = True
    if make_report:
        from .report import write_report

        result.report = write_report(recipe, result, task, dev, log=log, baseline=baseline,
                                     external=external)
    return result


def _model_config(source: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load the model config of {source}: {exc}") from exc


def _outcome_from_record(name: str, record: dict[str, Any]) -> StageOutcome:
    r = record["result"]
    # Records written before the validation split selected and scored on dev.
    return StageOutcome(name, Path(r["model_dir"]), r["metric"], r["best_metric"],
                        r["num_parameters"], r["steps"], record.get("wall_seconds", 0.0),
                        r.get("fast_modules", {}), record.get("paths"),
                        record.get("dev_metric", r["best_metric"]),
                        record.get("selected_on", "dev"), record.get("validation_rows", 0))


def _stage_model_dir(output_dir: Path, name: str) -> Path:
    return output_dir / STAGES_DIR / name / "best_model"


def _training_examples(recipe: Recipe, spec: StageSpec, task: GlueTask, train: list,
                       output_dir: Path, log: Callable[[str], None],
                       model_source: str | None = None) -> list:
    examples = train
    if spec.data == "augmented":
        if recipe.data.augment is None:
            log(f"[{spec.name}] data: augmented requested but data.augment is not configured; "
                "training on the original data")
        else:
            examples = augmented_examples(task, train, recipe.data.augment,
                                          output_dir / "data" / "train_aug.jsonl", model_source)
    return sample_examples(examples, spec.train_examples, recipe.data.subset_seed)


def _run_stage(recipe: Recipe, spec: StageSpec, config, task: GlueTask, train: list, dev: list,
               validation: list, output_dir: Path, model_source: str, state: _State, *,
               resume: bool, progress: bool, log: Callable[[str], None],
               teacher_cache: TeacherCache | None = None) -> StageOutcome:
    start = time.time()
    stage_dir = output_dir / STAGES_DIR / spec.name
    init = model_source if spec.init == PRETRAINED else _stage_model_dir(output_dir, spec.init)
    student, tokenizer = load_model(init, task.num_labels, config.seed)
    teacher = teacher_tok = None
    if spec.teacher is not None:
        teacher, teacher_tok = load_model(_stage_model_dir(output_dir, spec.teacher),
                                          task.num_labels, config.seed)
    examples = _training_examples(recipe, spec, task, train, output_dir, log, model_source)
    corpus = None
    if spec.vocabulary in ("corpus", "corpus_ascii"):
        corpus = [t for ex in examples for t in (ex.text_a, ex.text_b) if t is not None]
    tokenizer = prepare_models(student, tokenizer, teacher, teacher_tok,
                               keep_layers=spec.keep_layers, corpus=corpus,
                               spell_ascii=spec.vocabulary == "corpus_ascii",
                               max_positions=spec.max_positions)
    max_length = recipe.data.max_length
    train_data = encode_examples(examples, tokenizer, task, max_length=max_length)
    dev_data = length_sorted(encode_examples(dev, tokenizer, task, max_length=max_length))
    # Selection (and early stopping) on the validation split; dev only scores the selected model.
    select_data = dev_data if not validation else length_sorted(
        encode_examples(validation, tokenizer, task, max_length=max_length))
    collate = DynamicPaddingCollator.for_tokenizer(tokenizer)
    if recipe.data.group_by_length:
        # One chunk per step: the trainer's batch then counts chunks, not sentences.
        chunked = LengthGroupedChunks(train_data, config.batch_size, config.seed)
        train_data, collate_fn = chunked, flatten_collator(collate)
        config = _with(config, batch_size=1)
    else:
        collate_fn = collate
    config = _with(config, progress=progress)
    log(f"[{spec.name}] {len(examples)} training examples, init {spec.init}, teacher "
        f"{spec.teacher}, {config.max_steps or 'epochs=' + str(config.epochs)} steps")
    trainer = Trainer(config, model=student, teacher=teacher, tokenizer=tokenizer,
                      task=task, train_data=train_data, eval_data=select_data,
                      output_dir=stage_dir, collate_fn=collate_fn,
                      resume=resume and stage_dir.exists(), overwrite=False,
                      teacher_cache=teacher_cache)
    stage_result: TrainResult = trainer.run()
    selected_on = "validation" if validation else "dev"
    dev_score = stage_result.best_metric
    if validation:
        dev_score = _score(stage_result.model_dir, dev_data, collate, task, config,
                           trainer.device)
    wall = time.time() - start + state.stages.get(spec.name, {}).get("wall_seconds", 0.0)
    state.stages[spec.name] = {"done": True, "result": stage_result.to_dict(),
                               "wall_seconds": round(wall, 1), "paths": _paths(config, trainer),
                               "dev_metric": dev_score, "selected_on": selected_on,
                               "validation_rows": len(validation)}
    state.save()
    log(f"[{spec.name}] done in {wall / 60:.1f} min: {stage_result.metric} "
        f"{stage_result.best_metric} ({selected_on}), dev {dev_score}, "
        f"{stage_result.num_parameters:,} parameters")
    return _outcome_from_record(spec.name, state.stages[spec.name])


def _score(model_dir: Path, data, collate, task: GlueTask, config, device) -> float:
    # The selected model's main metric on ``data`` (dev), evaluated once, in eval mode.
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(device)
    batches = DataLoader(data, batch_size=config.eval_batch_size, shuffle=False,
                         collate_fn=collate)
    metrics = evaluate(model, batches, task, device)
    return float(metrics[config.metric or task.main_metric])


def _paths(config, trainer: Trainer) -> dict[str, bool]:
    # The settings, except the cache: what the trainer actually used (none without a teacher).
    fused_adamw = bool(getattr(trainer.optimizer, "defaults", {}).get("fused"))
    return {"fast_modules": config.fast_modules, "fused_losses": config.fused_losses,
            "fused_optimizer": fused_adamw, "teacher_cache": trainer.teacher_cache is not None,
            "distils": trainer.kd.needs_teacher,
            "first_token": bool(trainer.kd.logits_only and can_output_first_token(trainer.model))}


def read_stage_walls(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """The wall seconds and fast-path settings of every stage of a finished run of ``recipe``
    in ``run_dir`` (for :func:`run_pipeline`'s ``compare_to``).

    Raises:
        PipelineError: no finished run of the same recipe there.
    """
    path = Path(run_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"--compare-to: cannot read {path}: {exc}") from exc
    if data.get("identity", {}).get("recipe") != json.loads(json.dumps(recipe.to_dict())):
        raise PipelineError(f"--compare-to: {run_dir} ran a different recipe than "
                            f"{recipe.name}; wall times are comparable only for the same one")
    stages = data.get("stages", {})
    missing = [s.name for s in recipe.stages if not stages.get(s.name, {}).get("done")]
    if missing:
        raise PipelineError(f"--compare-to: {run_dir} has unfinished stages: {missing}")
    return {"run_dir": str(run_dir),
            "stages": {s.name: {"wall_seconds": stages[s.name]["wall_seconds"],
                                "paths": stages[s.name].get("paths")} for s in recipe.stages}}


def _with(config, **changes):
    from ..train import TrainConfig

    values = config.to_dict()
    values.update(changes)
    return TrainConfig.from_dict(values)
