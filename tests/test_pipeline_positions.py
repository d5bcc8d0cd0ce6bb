"""A stage's ``max_positions``: the student's position table is cut before training, the saved
model and tokenizer stop at it, and recipes that cannot fit fail before any training."""

from __future__ import annotations

import pytest
from test_pipeline_support import tiny_recipe, tiny_setup  # noqa: F401  (fixture)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import rosita_fast  # noqa: F401  (registers the student models with the Auto classes)
from rosita_fast.compress import count_parameters, position_count
from rosita_fast.data import Example, get_task
from rosita_fast.pipeline import PipelineError, RecipeError, recipe_from_dict, run_pipeline
from rosita_fast.pipeline.report import score


def _with_positions(model, student: int | None, width: int | None = None) -> dict:
    recipe = tiny_recipe(model)
    recipe["stages"] = [s for s in recipe["stages"] if s["name"] != "depth"]
    recipe["stages"][-1]["init"] = recipe["stages"][-1]["teacher"] = "student"
    recipe["stages"][1]["max_positions"] = student
    recipe["stages"][2]["max_positions"] = width
    return recipe


def test_student_stage_cuts_the_position_table(tiny_setup):  # noqa: F811
    source = AutoModelForSequenceClassification.from_pretrained(str(tiny_setup["model"]))
    table = position_count(source)
    recipe = recipe_from_dict(_with_positions(tiny_setup["model"], 16))
    result = run_pipeline(recipe, tiny_setup["root"] / "run", data_dir=tiny_setup["data"],
                          progress=False, log=lambda _: None)
    teacher, student, width = (s.model_dir for s in result.stages)
    hidden = source.config.hidden_size
    models = [AutoModelForSequenceClassification.from_pretrained(str(d)) for d in
              (teacher, student, width)]
    assert [position_count(m) for m in models] == [table, 16, 16]
    assert table > 16
    # The student stage's saving is exactly the cut rows (the vocabulary cut aside).
    vocab_rows = models[0].config.vocab_size - models[1].config.vocab_size
    assert count_parameters(models[0]) - count_parameters(models[1]) == (
        (table - 16) * hidden + vocab_rows * hidden)
    tokenizer = AutoTokenizer.from_pretrained(str(width))
    assert tokenizer.model_max_length == 16
    # A stock pipeline truncates a long input to the table instead of failing.
    classify = pipeline("text-classification", model=models[2], tokenizer=tokenizer,
                        truncation=True)
    assert classify("a good movie " * 40)[0]["label"] in {"negative", "positive"}
    # Scoring defaults to what the table holds (the task's 64 would not fit) and refuses more.
    long = [Example(str(i), "a good movie " * (5 + i), None, i % 2) for i in range(6)]
    assert 0.0 <= score(models[2], tokenizer, get_task("sst-2"), long)["acc"] <= 1.0
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        score(models[2], tokenizer, get_task("sst-2"), long, max_length=17)
    report = (tiny_setup["root"] / "run" / "report.md").read_text(encoding="utf-8")
    assert f" P{table} |" in report and " P16 |" in report


@pytest.mark.parametrize("positions, match", [
    (15, "shorter than data.max_length 16"),
    (10_000, "exceeds the model's"),
])
def test_positions_that_cannot_fit_fail_before_training(tiny_setup, positions, match):  # noqa: F811
    recipe = recipe_from_dict(_with_positions(tiny_setup["model"], None, positions))
    out = tiny_setup["root"] / "run"
    with pytest.raises(PipelineError, match=match):
        run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                     log=lambda _: None)
    assert not out.exists()


@pytest.mark.parametrize("value", [0, -3, "64", 2.5, True])
def test_max_positions_must_be_a_positive_integer(tiny_setup, value):  # noqa: F811
    with pytest.raises(RecipeError, match="max_positions"):
        recipe_from_dict(_with_positions(tiny_setup["model"], value))
