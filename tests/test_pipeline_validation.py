"""The validation split that selects checkpoints: carved from the training data, stratified,
seeded, never trained on; dev is scored once per stage on the selected model."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from test_pipeline_support import tiny_recipe, tiny_setup  # noqa: F401  (fixture)

from rosita_fast.data import Example
from rosita_fast.pipeline import PipelineError, RecipeError, recipe_from_dict, run_pipeline
from rosita_fast.pipeline.inputs import validation_split


def _examples(n: int, share: float, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(guid=f"train-{i}", text_a=f"sentence {i}", text_b=None,
                    label=int(rng.random() < share)) for i in range(n)]


@pytest.mark.parametrize(("n", "size", "share"), [(1000, 100, 0.5), (2001, 333, 0.17),
                                                  (67, 30, 0.9), (10, 5, 0.3)])
def test_split_is_stratified_disjoint_and_seeded(n, size, share, seed):
    examples = _examples(n, share, seed)
    rest, val = validation_split(examples, size, seed)
    assert len(val) == size and len(rest) == n - size
    assert {e.guid for e in rest}.isdisjoint({e.guid for e in val})
    assert {e.guid for e in rest} | {e.guid for e in val} == {e.guid for e in examples}
    # Each label keeps its share of the rows, to within the rounding of one row.
    total, drawn = Counter(e.label for e in examples), Counter(e.label for e in val)
    for label, count in total.items():
        assert abs(drawn[label] - size * count / n) < 1.0
    # Original order on both sides; the same seed draws the same rows, another seed others.
    kept = {e.guid for e in rest}
    assert [e.guid for e in rest] == [e.guid for e in examples if e.guid in kept]
    assert validation_split(examples, size, seed)[1] == val
    if size < n // 2:
        assert validation_split(examples, size, seed + 1)[1] != val


def test_split_regression_and_zero(seed):
    examples = [Example(f"t{i}", f"s {i}", None, float(i) / 7) for i in range(50)]
    rest, val = validation_split(examples, 10, seed, is_regression=True)
    assert len(val) == 10 and len(rest) == 40
    assert validation_split(examples, 0, seed) == (examples, [])


def test_split_too_large_or_negative_is_an_error(tiny_setup):  # noqa: F811
    with pytest.raises(PipelineError, match="validation split of 6 rows"):
        validation_split(_examples(10, 0.5, 0), 6, 0)
    with pytest.raises(RecipeError, match="validation_size"):
        recipe_from_dict(tiny_recipe(tiny_setup["model"], data={"validation_size": -1}))


def test_stages_select_on_validation_and_report_dev(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"]))
    out = tiny_setup["root"] / "run"
    result = run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                          log=lambda _: None)
    assert all(s.selected_on == "validation" for s in result.stages)
    for stage in result.stages:
        assert stage.dev_metric is not None and stage.best_metric is not None
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [r["metric"] for r in data] == [s.dev_metric for s in result.stages]
    assert [r["validation_metric"] for r in data] == [s.best_metric for s in result.stages]
    table = (out / "report.md").read_text(encoding="utf-8")
    assert "| val acc | dev acc |" in table and "validation split of 32" in table


def test_no_split_selects_on_dev_and_says_so(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"], data={"max_length": 16,
                                                                      "validation_size": 0}))
    out = tiny_setup["root"] / "run"
    result = run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                          log=lambda _: None)
    assert all(s.selected_on == "dev" and s.dev_metric == s.best_metric for s in result.stages)
    assert "the dev figures are optimistic" in (out / "report.md").read_text(encoding="utf-8")
