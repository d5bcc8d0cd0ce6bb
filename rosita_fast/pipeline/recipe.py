"""The recipe file: a multi-stage compression pipeline as plain YAML/JSON, and its loader.

A recipe names a task, a model and an ordered list of stages. Each stage starts its student from
the pretrained model or from an earlier stage, optionally distils from an earlier stage, and
trains with a :class:`~rosita_fast.train.TrainConfig` built from the method's per-task preset
for the stage's ``kind`` with the stage's own ``train`` options on top. Everything is checked
when the recipe is loaded (unknown keys, wrong types, dangling stage references, and the
resulting train configs), so a bad recipe fails before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data import GlueTask, UnknownTaskError, get_task
from ..train import TrainConfig, TrainConfigError
from ..train.typecheck import check_fields, reject_unknown
from .errors import RecipeError
from .presets import STAGE_KINDS, preset_for

__all__ = ["AugmentSpec", "DataSpec", "Recipe", "ReportSpec", "StageSpec", "builtin_recipes",
           "load_recipe", "recipe_from_dict"]

# Other names of shipped recipes: the method calls setting 4 ROSITA.
ALIASES = {"rosita": "setting4"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PRETRAINED = "pretrained"


def _checked(cls: type, values: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, turning type/unknown-key errors into RecipeError."""
    try:
        reject_unknown(values, cls, prefix)
        return cls(**dict(values))
    except TrainConfigError as exc:
        raise RecipeError(str(exc)) from exc
    except TypeError as exc:  # a required key is missing
        raise RecipeError(f"{prefix}: {exc}") from exc


@dataclass(frozen=True)
class AugmentSpec:
    """TinyBERT-style augmentation of the training set (method 5.3) for ``data: augmented`` stages.

    Attributes:
        source: where replacement candidates come from. ``mlm``: a masked LM (single-piece
            words) as in the method. ``embedding``: the nearest neighbours of each word among
            the whole-word rows of the recipe's model's input embedding (the offline stand-in
            for the method's GloVe step; needs no masked LM), limited to words of the training
            set so that variants bring no token the corpus vocabulary lacks.
        mlm: path or hub id of a masked-LM checkpoint that shares the model's tokenizer
            (``source: mlm`` only, and required there).
        variants: new sentences per example (``None`` = the method's per-task N).
        replace_prob: probability of replacing each candidate word.
        top_k: candidates per word (method: 15).
        seed: sampling seed.
    """

    mlm: str | None = None
    source: Literal["mlm", "embedding"] = "mlm"
    variants: int | None = None
    replace_prob: float = 0.4
    top_k: int = 15
    seed: int = 42

    def __post_init__(self) -> None:
        _typecheck(self, "data.augment")
        if self.source == "mlm" and not self.mlm:
            raise RecipeError("data.augment.mlm is required with source: mlm (or set "
                              "source: embedding to augment without a masked LM)")
        if self.source == "embedding" and self.mlm is not None:
            raise RecipeError("data.augment.mlm is only read with source: mlm; remove it or "
                              "set source: mlm")
        if self.variants is not None and self.variants < 1:
            raise RecipeError(f"data.augment.variants must be at least 1; got {self.variants}")
        if not 0 < self.replace_prob <= 1:
            raise RecipeError("data.augment.replace_prob must be in (0, 1]")
        if self.top_k < 1:
            raise RecipeError(f"data.augment.top_k must be at least 1; got {self.top_k}")


@dataclass(frozen=True)
class DataSpec:
    """Which training data the stages see.

    Attributes:
        max_length: longest tokenised sequence (``None`` = the task's method value, 64 for SST-2).
        train_subset: use a random subset of this many training examples for every stage
            (``None`` = all of them).
        subset_seed: seed of that subset and of the per-stage ``train_examples`` draws.
        group_by_length: batch sentences of similar length together (each batch is drawn from a
            fixed, seeded set of length-sorted chunks). With dynamic padding this cuts the padded
            tokens on short-sentence tasks like SST-2 about threefold; the model and the loss
            are unchanged.
        augment: augmentation settings, or ``None``: then ``data: augmented`` stages train on
            the original data (a documented substitution).
        validation_size: rows carved from the training data (stratified by label, seeded by
            ``validation_seed``) that select every stage's checkpoint and stop it early; no
            stage trains on them, and dev is evaluated once per stage, on the selected model.
            ``None``: a tenth of the training data, at most 1,000 rows. ``0``: no split, the
            stages select on dev (an optimistic dev figure; the report says so).
        validation_seed: seed of the validation split.
        validation_unseen_sources: the share of the validation rows that are whole sources
            held out of training (:func:`~rosita_fast.pipeline.inputs.validation_split`), for
            tasks whose files name each sentence's source (CoLA). GLUE's CoLA dev set is half
            sentences from publications the training file never quotes; ``0.5`` gives the
            validation split the same mix. ``0``: rows are drawn from every source.
        validation_whole_sentences: draw the validation rows among the rows no other training
            row contains (SST-2's whole sentences, the kind of text its dev set holds, where
            the training file is mostly their phrases) and leave every phrase of them out of
            training too (:func:`~rosita_fast.pipeline.inputs.validation_split`).
            Single-sentence classification tasks only; not with ``validation_unseen_sources``.
    """

    max_length: int | None = None
    train_subset: int | None = None
    subset_seed: int = 42
    group_by_length: bool = True
    augment: AugmentSpec | None = None
    validation_size: int | None = None
    validation_seed: int = 42
    validation_unseen_sources: float = 0.0
    validation_whole_sentences: bool = False

    def __post_init__(self) -> None:
        _typecheck(self, "data")
        if self.validation_whole_sentences and self.validation_unseen_sources > 0:
            raise RecipeError("data.validation_whole_sentences and "
                              "data.validation_unseen_sources cannot both be set")
        if not 0.0 <= self.validation_unseen_sources < 1.0:
            raise RecipeError("data.validation_unseen_sources must be in [0, 1); got "
                              f"{self.validation_unseen_sources}")
        if self.validation_size is not None and self.validation_size < 0:
            raise RecipeError(f"data.validation_size must be >= 0; got {self.validation_size}")
        for name in ("max_length", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < (3 if name == "max_length" else 1):
                raise RecipeError(f"data.{name} is too small: {value}")


@dataclass(frozen=True)
class ReportSpec:
    """How the end report measures CPU latency.

    Attributes:
        teacher: the stage whose model is marked as the teacher (``None`` = the first stage).
        latency_sentences: dev sentences timed one at a time (batch 1).
        latency_threads: torch CPU threads while timing.
        external: a labelled set from outside the task's files
            (:data:`~rosita_fast.data.external.EXTERNAL_SETS`, e.g. ``rotten-tomatoes`` for SST-2)
            on which every stage's selected model is also scored, beside dev.
    """

    teacher: str | None = None
    latency_sentences: int = 100
    latency_threads: int = 1
    external: str | None = None

    def __post_init__(self) -> None:
        _typecheck(self, "report")
        if self.latency_sentences < 1 or self.latency_threads < 1:
            raise RecipeError("report.latency_sentences and latency_threads must be at least 1")
        from ..data.external import EXTERNAL_SETS

        if self.external is not None and self.external not in EXTERNAL_SETS:
            raise RecipeError(f"report.external: unknown set {self.external!r}; known: "
                              f"{', '.join(sorted(EXTERNAL_SETS))}")


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline.

    Attributes:
        name: unique stage name; also its output sub-directory.
        kind: which preset of the method applies: ``finetune`` (gold labels), ``student``
            (prediction KD from a fine-tuned teacher), ``depth`` (iterative depth pruning,
            prediction KD), ``width`` (ROSITA's iterative width pruning, hidden + prediction
            KD), ``width_two_stage`` (Setting 3's), ``one_step`` (Settings 1-2).
        init: ``pretrained`` or the name of an earlier stage whose selected model starts this one.
        teacher: an earlier stage whose model is the (frozen) teacher, or ``None``.
        data: ``original`` or ``augmented`` training data.
        train_examples: draw this many training examples (seeded) instead of using all.
        keep_layers: cut the initial model to its bottom ``n`` layers before training
            (Setting 3's student initialisation).
        vocabulary: ``corpus`` shrinks the student's vocabulary (and the teacher copy's) to the
            tokens of the stage's training data before training; ``corpus_ascii`` does the same
            but also keeps every printable ASCII character as a word start and a ``##``
            continuation, so unseen words are spelled in pieces instead of becoming ``[UNK]``
            (:func:`~rosita_fast.compress.prune_vocabulary_`'s ``spell_ascii``); ``full``
            keeps it.
        max_positions: cut the student's position-embedding table to this many positions
            before training (:func:`~rosita_fast.compress.prune_positions_`); at least the
            recipe's ``data.max_length``, which is then the longest input the saved model and
            its tokenizer accept. ``None`` keeps the table.
        train: :class:`~rosita_fast.train.TrainConfig` options over the preset.
    """

    name: str
    kind: Literal["finetune", "student", "depth", "width", "width_two_stage", "one_step"]
    init: str = PRETRAINED
    teacher: str | None = None
    data: Literal["original", "augmented"] = "original"
    train_examples: int | None = None
    keep_layers: int | None = None
    vocabulary: Literal["full", "corpus", "corpus_ascii"] = "full"
    max_positions: int | None = None
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        prefix = f"stages[{self.name!r}]" if isinstance(self.name, str) else "stages[?]"
        _typecheck(self, prefix)
        if not _NAME.match(self.name):
            raise RecipeError(f"{prefix}: a stage name may hold letters, digits, '_', '-', '.'")
        for key in ("train_examples", "keep_layers", "max_positions"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise RecipeError(f"{prefix}.{key} must be at least 1; got {value}")


@dataclass(frozen=True)
class Recipe:
    """A whole pipeline; see the module docstring and ``docs/main_job.md`` for the format.

    Attributes:
        name: recipe name (shown in the report).
        task: GLUE task name (``sst-2``, ``cola``, ...).
        model: ``minilm`` (the bundled all-MiniLM-L6-v2), a local path, or a hub id.
        stages: the stages, in order.
        description: free text.
        presets: apply the method's per-task hyper-parameters under each stage's ``train``.
        data: training-data options.
        report: end-report options.
    """

    name: str
    task: str
    model: str
    stages: list[StageSpec]
    description: str = ""
    presets: bool = True
    data: DataSpec = field(default_factory=DataSpec)
    report: ReportSpec = field(default_factory=ReportSpec)

    def __post_init__(self) -> None:
        _typecheck(self, "recipe")

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name``."""
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def train_config(self, stage: StageSpec) -> TrainConfig:
        """The stage's full :class:`TrainConfig`: preset (if enabled) overlaid by ``train``."""
        base = preset_for(self.task, stage.kind) if self.presets else {}
        merged = _merge(base, stage.train)
        try:
            return TrainConfig.from_dict(merged)
        except TrainConfigError as exc:
            raise RecipeError(f"stages[{stage.name!r}].{exc}") from exc

    def teacher_stage(self) -> str:
        """The stage marked as teacher in the report."""
        return self.report.teacher or self.stages[0].name

    def max_length(self, task: GlueTask) -> int:
        """The longest input in tokens: ``data.max_length``, else ``task``'s method value."""
        return self.data.max_length or task.max_seq_length

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what a recipe file holds)."""
        return dataclasses.asdict(self)


def _typecheck(instance: Any, prefix: str) -> None:
    try:
        check_fields(instance, prefix)
    except TrainConfigError as exc:
        raise RecipeError(str(exc)) from exc


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    # One level deep is enough: kd and pruning are the only nested sections of a TrainConfig.
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def recipe_from_dict(values: Mapping[str, Any]) -> Recipe:
    """Validate a parsed recipe and build a :class:`Recipe`.

    Raises:
        RecipeError: unknown or ill-typed keys, an unknown task or stage kind, a stage that
            refers to a later or missing stage, duplicate names, or a train section that
            :class:`~rosita_fast.train.TrainConfig` rejects.
    """
    if not isinstance(values, Mapping):
        raise RecipeError("a recipe must be a mapping at the top level; got "
                          f"{type(values).__name__}")
    values = dict(values)
    data = values.get("data") or {}
    if isinstance(data, Mapping):
        data = dict(data)
        if isinstance(data.get("augment"), Mapping):
            data["augment"] = _checked(AugmentSpec, data["augment"], "data.augment")
        values["data"] = _checked(DataSpec, data, "data")
    if isinstance(values.get("report"), Mapping):
        values["report"] = _checked(ReportSpec, values["report"], "report")
    stages = values.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("a recipe needs a non-empty list 'stages'")
    built = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping):
            raise RecipeError(f"stages[{i}] must be a mapping; got {stage!r}")
        if stage.get("kind") not in STAGE_KINDS:
            raise RecipeError(f"stages[{i}].kind must be one of {', '.join(STAGE_KINDS)}; got "
                              f"{stage.get('kind')!r}")
        built.append(_checked(StageSpec, stage, f"stages[{i}]"))
    values["stages"] = built
    recipe = _checked(Recipe, values, "recipe")
    try:
        get_task(recipe.task)
    except UnknownTaskError as exc:
        raise RecipeError(f"task: {exc}") from exc
    _check_references(recipe)
    for stage in recipe.stages:
        recipe.train_config(stage)  # validates the merged train options now
    return recipe


def _check_references(recipe: Recipe) -> None:
    seen: set[str] = set()
    for stage in recipe.stages:
        where = f"stages[{stage.name!r}]"
        if stage.name in seen:
            raise RecipeError(f"{where}: duplicate stage name")
        if stage.init != PRETRAINED and stage.init not in seen:
            raise RecipeError(f"{where}.init must be 'pretrained' or an earlier stage; got "
                              f"{stage.init!r}")
        if stage.teacher is not None and stage.teacher not in seen:
            raise RecipeError(f"{where}.teacher must name an earlier stage; got "
                              f"{stage.teacher!r}")
        seen.add(stage.name)
    if recipe.report.teacher is not None and recipe.report.teacher not in seen:
        raise RecipeError(f"report.teacher names no stage: {recipe.report.teacher!r}")


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped with the package, by name (file stem; aliases included)."""
    folder = resources.files("rosita_fast") / "recipes"
    found = {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir()
             if str(p).endswith((".yaml", ".yml", ".json"))}
    found.update({alias: found[target] for alias, target in ALIASES.items() if target in found})
    return found


def load_recipe(source: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load a recipe from a file (YAML or JSON) or by built-in name (see :func:`builtin_recipes`).

    Args:
        source: a path, or the name of a shipped recipe (``rosita``, ``setting1`` ...).
        overrides: top-level keys replaced before validation (e.g. ``{"task": "cola"}``).

    Raises:
        RecipeError: the file is missing or unparsable, or its content is invalid.
    """
    path = Path(source)
    if not path.exists():
        shipped = builtin_recipes()
        if str(source) not in shipped:
            raise RecipeError(f"no recipe file {str(source)!r} and no built-in recipe of that "
                              f"name (built-in: {', '.join(sorted(shipped))})")
        path = shipped[str(source)]
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    if overrides and isinstance(values, dict):
        values = {**values, **overrides}
    try:
        return recipe_from_dict(values)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
