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


def _treebank(seed: int, sentences: int = 120) -> list[Example]:
    # SST-2's layout: whole sentences and phrases of them (contiguous runs of words, some
    # shared between sentences, some repeated), labelled independently.
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    rows: list[str] = []
    for _ in range(sentences):
        sentence = [rng.choice(words) for _ in range(rng.randint(3, 14))]
        rows.append(" ".join(sentence))
        for _ in range(rng.randint(0, 6)):
            a = rng.randrange(len(sentence))
            rows.append(" ".join(sentence[a:rng.randint(a + 1, len(sentence))]))
    rows.append(rows[0])  # a repeated row, whole or not
    return [Example(f"t{i}", text if i % 3 else f" {text}  ", None, int(rng.random() < 0.6))
            for i, text in enumerate(rows)]


def _inside(small: str, big: str) -> bool:
    return f" {' '.join(small.split())} " in f" {' '.join(big.split())} "


@pytest.mark.parametrize("size", [1, 7, 20])
def test_whole_sentence_split_holds_out_sentences_and_their_phrases(size, seed):
    examples = _treebank(seed)
    rest, val = validation_split(examples, size, seed, whole_sentences=True)
    assert len(val) == size
    val_ids = {e.guid for e in val}
    for v in val:  # whole: no other row, repeats of it aside, contains it
        assert not any(_inside(v.text_a, e.text_a) and v.text_a.split() != e.text_a.split()
                       for e in examples)
    assert len({" ".join(v.text_a.split()) for v in val}) == size
    # Exactly the rows inside no validation sentence stay in training, in their order.
    expected = [e for e in examples
                if e.guid not in val_ids and not any(_inside(e.text_a, v.text_a) for v in val)]
    assert rest == expected
    assert [e.guid for e in val] == [e.guid for e in examples if e.guid in val_ids]
    total, drawn = Counter(e.label for e in examples), Counter(e.label for e in val)
    for label, count in total.items():
        assert abs(drawn[label] - size * count / len(examples)) < 1.0
    assert validation_split(examples, size, seed, whole_sentences=True) == (rest, val)


def test_whole_sentences_are_matched_by_whole_words():
    # "w1 w2" sits inside "ww1 w2 w3" as characters but not as words: it is whole.
    examples = [Example("a", "w1 w2", None, 0), Example("b", "ww1 w2 w3", None, 0),
                Example("c", "w2 w3", None, 0), Example("d", "w2", None, 1),
                Example("e", "w4 w2 w5", None, 1), Example("f", "w9", None, 1)]
    rest, val = validation_split(examples, 1, 0, whole_sentences=True)
    held = val[0].guid
    assert held in {"a", "b", "e", "f"}  # "c" and "d" are phrases of other rows
    inside = {"a": {"d"}, "b": {"c", "d"}, "e": {"d"}, "f": set()}[held]
    assert {e.guid for e in rest} == set("abcdef") - {held} - inside


def test_whole_sentence_split_errors():
    examples = _treebank(0)
    with pytest.raises(PipelineError, match="cannot also hold out whole sources"):
        validation_split(examples, 5, 0, unseen_sources=0.5, whole_sentences=True)
    with pytest.raises(PipelineError, match="single-sentence task"):
        validation_split([Example(f"p{i}", f"a{i}", f"b{i}", i % 2) for i in range(20)], 5, 0,
                         whole_sentences=True)
    with pytest.raises(PipelineError, match="classification task"):
        validation_split([Example(f"r{i}", f"a{i}", None, i / 3) for i in range(20)], 5, 0,
                         is_regression=True, whole_sentences=True)
    nested = [Example(f"n{i}", " ".join(["w"] * (i + 1)), None, i % 2) for i in range(20)]
    with pytest.raises(PipelineError, match="whole sentences of label"):
        validation_split(nested, 4, 0, whole_sentences=True)
    # Two sentences and all their phrases: holding one out takes most of the file along.
    tree = [" ".join(f"{w}{k}" for k in range(a, b)) for w in "ab" for a in range(6)
            for b in range(a + 1, 7)]
    with pytest.raises(PipelineError, match="takes their phrases along and leaves"):
        validation_split([Example(f"x{i}", t, None, int(t[0] == "a"))
                          for i, t in enumerate(tree)], 2, 0, whole_sentences=True)
    with pytest.raises(RecipeError, match="cannot both be set"):
        recipe_from_dict(tiny_recipe("model", data={"validation_whole_sentences": True,
                                                    "validation_unseen_sources": 0.5}))
    with pytest.raises(RecipeError, match="validation_whole_sentences"):
        recipe_from_dict(tiny_recipe("model", data={"validation_whole_sentences": "yes"}))


def test_pipeline_validates_on_whole_sentences_and_reports_them(tiny_setup, seed):  # noqa: F811
    from test_pipeline_support import _sentence

    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(60):
        words = _sentence(rng, i % 2).split()
        lines.append(f"{' '.join(words)}\t{i % 2}")
        lines.append(f"{' '.join(words[1:])}\t{i % 2}")  # a phrase of it
    data = tiny_setup["data"]
    (data / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = tiny_recipe(tiny_setup["model"], data={"max_length": 16, "validation_size": 20,
                                                    "validation_whole_sentences": True})
    recipe["stages"] = recipe["stages"][:1]
    messages: list[str] = []
    out = tiny_setup["root"] / "run"
    result = run_pipeline(recipe_from_dict(recipe), out, data_dir=data, progress=False,
                          log=messages.append)
    line = next(m for m in messages if m.startswith("validation:"))
    phrases = result.validation_phrases_out
    # Each held-out sentence takes its own phrase along (and any equal row elsewhere).
    assert phrases is not None and phrases >= 20
    assert line == (f"validation: 20 whole sentences; {phrases} training rows inside them "
                    "(their phrases) left out of training")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert (f"whole sentences (rows no other training row contains), with the {phrases} "
            "training rows inside them") in report
