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
from rosita_fast.pipeline.inputs import held_out_sources, validation_split


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


def _sourced(seed: int) -> list[Example]:
    # Sources of uneven sizes (as CoLA's publications are), rows of a source not contiguous.
    rng = random.Random(seed)
    sizes = [rng.randint(3, 60) for _ in range(rng.randint(8, 20))]
    rows = [f"src{k}" for k, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(rows)
    return [Example(f"train-{i}", f"sentence {i}", None, int(rng.random() < 0.7), source)
            for i, source in enumerate(rows)]


@pytest.mark.parametrize("share", [0.3, 0.5, 0.9])
def test_unseen_sources_are_held_out_whole(share, seed):
    examples = _sourced(seed)
    size = len(examples) // 3
    rest, val = validation_split(examples, size, seed, unseen_sources=share)
    assert len(val) == size and len(rest) == len(examples) - size
    assert {e.guid for e in rest}.isdisjoint({e.guid for e in val})
    assert {e.guid for e in rest} | {e.guid for e in val} == {e.guid for e in examples}
    unseen = held_out_sources(rest, val)
    training_sources = {e.source for e in rest}
    # Every row of a held-out source is in validation; none of the others' rows are missing.
    per_source = Counter(e.source for e in examples)
    assert unseen and all(per_source[s] == n for s, n in unseen.items())
    assert training_sources.isdisjoint(unseen)
    # The held-out sources fill at most the share, and no source left in training would still
    # have fitted in what remained of it (the greedy pass skipped only sources too large).
    target = round(size * share)
    held = sum(unseen.values())
    assert held <= target
    assert all(per_source[s] > target - held for s in training_sources)
    assert validation_split(examples, size, seed, unseen_sources=share) == (rest, val)
    # The rest of the validation rows come from sources that also train, stratified by label.
    seen_rows = [e for e in val if e.source not in unseen]
    assert len(seen_rows) == size - held
    assert all(e.source in training_sources for e in seen_rows)
    pool = [e for e in examples if e.source not in unseen]
    total, drawn = Counter(e.label for e in pool), Counter(e.label for e in seen_rows)
    for label, count in total.items():
        assert abs(drawn[label] - len(seen_rows) * count / len(pool)) < 1.0


def test_unseen_sources_fit_greedily_in_seeded_order():
    # Sources of 40, 30, 20 and 10 rows (plus a large one that never fits): a target of 50
    # rows takes, in the seeded order, each source that still fits.
    sizes = {"a": 40, "b": 30, "c": 20, "d": 10, "big": 200}
    examples = [Example(f"t{i}", "s", None, i % 2, name)
                for i, name in enumerate(n for n, k in sizes.items() for _ in range(k))]
    for seed in range(20):
        rest, val = validation_split(examples, 100, seed, unseen_sources=0.5)
        unseen = held_out_sources(rest, val)
        assert "big" not in unseen and sum(unseen.values()) <= 50
        # The room left only shrinks, so a source skipped at its turn does not fit at the end.
        left = 50 - sum(unseen.values())
        assert all(sizes[s] > left for s in sizes if s not in unseen)
    # Different seeds take different sets.
    assert len({frozenset(held_out_sources(*validation_split(examples, 100, seed,
                                                            unseen_sources=0.5)))
                for seed in range(20)}) > 1


def test_held_out_sources_ignore_rows_without_a_source():
    rest = [Example("a", "x", None, 0, "p"), Example("b", "y", None, 1, None)]
    val = [Example("c", "z", None, 0, "p"), Example("d", "w", None, 1, "q"),
           Example("e", "v", None, 1, "q"), Example("f", "u", None, 0, None)]
    assert held_out_sources(rest, val) == {"q": 2}


def test_unseen_sources_errors():
    examples = _sourced(0)
    with pytest.raises(PipelineError, match="every row's source"):
        validation_split([*examples, Example("x", "s", None, 0)], 20, 0, unseen_sources=0.5)
    with pytest.raises(PipelineError, match="unseen_sources must be in"):
        validation_split(examples, 20, 0, unseen_sources=1.0)
    big = [Example(f"t{i}", "s", None, i % 2, f"s{i % 3}") for i in range(300)]
    with pytest.raises(PipelineError, match="no source fits in 20 validation rows"):
        validation_split(big, 40, 0, unseen_sources=0.5)
    # A share of zero draws exactly what the plain split draws.
    assert validation_split(examples, 20, 3, unseen_sources=0.0) == validation_split(
        examples, 20, 3)
    for bad in (1.0, -0.5, "half", True):
        with pytest.raises(RecipeError, match="validation_unseen_sources"):
            recipe_from_dict(tiny_recipe("model", data={"validation_unseen_sources": bad}))


def _write_cola(path, seed: int):
    # A CoLA-layout directory (headerless: source, label, mark, sentence) of the tiny
    # sentiment sentences, ten sources of eight rows.
    from test_pipeline_support import _sentence

    rng = random.Random(seed)
    path.mkdir(parents=True)
    for name, n in (("train.tsv", 160), ("dev.tsv", 40)):
        lines = []
        for i in range(n):
            label = i % 2
            lines.append(f"src{i // 8}\t{label}\t{'' if label else '*'}\t{_sentence(rng, label)}")
        (path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_pipeline_holds_sources_out_and_reports_them(tiny_setup, seed):  # noqa: F811
    data = _write_cola(tiny_setup["root"] / "CoLA", seed)
    recipe = tiny_recipe(tiny_setup["model"], task="cola",
                         data={"max_length": 16, "validation_size": 32,
                               "validation_unseen_sources": 0.5})
    recipe["stages"] = recipe["stages"][:1]
    messages: list[str] = []
    out = tiny_setup["root"] / "run"
    run_pipeline(recipe_from_dict(recipe), out, data_dir=data, progress=False,
                 log=messages.append)
    # Two of the ten 8-row sources make up the 16 unseen rows.
    line = next(m for m in messages if m.startswith("validation:"))
    assert "32 rows, 16 of them from sources no stage trains on" in line
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "validation split of 32 training rows that no stage trains on, 16 of them the " \
           "whole of 2 source(s)" in report


def test_unseen_sources_on_files_without_sources_fail_before_training(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"], data={
        "max_length": 16, "validation_size": 32, "validation_unseen_sources": 0.5}))
    out = tiny_setup["root"] / "run"
    with pytest.raises(PipelineError, match="160 training rows have none"):
        run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                     log=lambda _: None)
    assert not out.exists()
