"""Bad recipes and bad inputs fail with clear errors before anything is trained or written."""

from __future__ import annotations

import copy

import pytest
import yaml
from test_pipeline_support import (  # noqa: F401  (tiny_setup is a fixture)
    tiny_recipe,
    tiny_setup,
    write_glue_dir,
    write_tiny_model,
)

from rosita_fast.data import DataError, TokenizerMismatchError, UnknownTaskError
from rosita_fast.pipeline import (
    PipelineError,
    RecipeError,
    builtin_recipes,
    load_recipe,
    preset_for,
    recipe_from_dict,
    run_pipeline,
)
from rosita_fast.pipeline.inputs import load_model, prepare_models

BASE = tiny_recipe("unused-model-path")  # the model is only opened when a pipeline runs


def _broken(path: tuple, value) -> dict:
    recipe = copy.deepcopy(BASE)
    target = recipe
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return recipe


@pytest.mark.parametrize("path, value, message", [
    (("colour",), "red", "unknown recipe option.*colour"),
    (("stages", 0, "epochz"), 3, r"unknown stages\[0\] option.*epochz"),
    (("stages", 0, "train", "lr"), 1e-3, "unknown train option.*lr"),
    (("stages", 0, "train", "max_steps"), "12", "train.max_steps must be int"),
    (("stages", 2, "train", "pruning", "layers"), 1.5, "pruning.layers must be int"),
    (("stages", 1, "kind"), "distil", "kind must be one of"),
    (("stages", 1, "vocabulary"), "tiny",
     r"vocabulary must be 'full' or 'corpus' or 'corpus_ascii'"),
    (("stages", 1, "teacher"), "width", "teacher must name an earlier stage"),
    (("stages", 1, "init"), "nowhere", "init must be 'pretrained' or an earlier stage"),
    (("stages", 1, "name"), "teacher", "duplicate stage name"),
    (("data", "max_length"), "long", "data.max_length must be int or null"),
    (("data", "shuffle"), True, "unknown data option.*shuffle"),
    (("data", "augment"), {"variants": 3}, "data.augment.*mlm"),
    (("data", "augment"), {"source": "embedding", "mlm": "x"}, "mlm is only read"),
    (("data", "augment"), {"source": "glove"}, "data.augment.source"),
    (("data", "augment"), {"source": "embedding", "top_k": 0}, "top_k must be at least 1"),
    (("report", "teacher"), "ghost", "report.teacher names no stage"),
    (("task",), "sst-3", "task: unknown GLUE task"),
    (("stages",), [], "non-empty list 'stages'"),
    (("name",), KeyError, "recipe.*name"),
    (("presets",), "yes", "recipe.presets must be bool"),
])
def test_invalid_recipes_are_rejected_with_the_offending_key(path, value, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(_broken(path, value))


def test_recipe_files_report_their_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: sst-2\nmodel: m\nstages: [{name: a, kind: finetune, "
                   "train: {epochs: -1}}]\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"bad.yaml: .*train.epochs must be at least 1"):
        load_recipe(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="no built-in recipe.*setting4"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_shipped_recipes_are_valid_and_copyable(name, tmp_path):
    recipe = load_recipe(name)
    copy_path = tmp_path / "copy.yaml"
    copy_path.write_text(yaml.safe_dump(recipe.to_dict()), encoding="utf-8")
    assert load_recipe(copy_path) == recipe


def test_rosita_is_setting_four_with_the_method_presets():
    recipe = load_recipe("rosita")
    assert [s.kind for s in recipe.stages] == ["finetune", "student", "depth", "width"]
    width = recipe.train_config(recipe.stages[-1])
    # Method 5.2, Setting 4 on SST-2: lr 1e-5, constant, 10 epochs, p = 0.01, hidden + pred.
    assert (width.learning_rate, width.lr_schedule, width.epochs) == (1e-5, "none", 10)
    assert width.pruning.prune_fraction == 0.01 and width.kd.hidden_weight == 1.0
    assert preset_for("mnli", "width")["batch_size"] == 64


def test_bad_data_fails_before_the_output_directory_exists(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"]))
    out = tiny_setup["root"] / "run"
    with pytest.raises(DataError, match="no-such-dir"):
        run_pipeline(recipe, out, data_dir=tiny_setup["root"] / "no-such-dir", progress=False)
    malformed = write_glue_dir(tiny_setup["root"] / "malformed")
    (malformed / "train.tsv").write_text("text\tgold\nfine\t1\n", encoding="utf-8")
    with pytest.raises(DataError):
        run_pipeline(recipe, out, data_dir=malformed, progress=False)
    bad_labels = write_glue_dir(tiny_setup["root"] / "labels")
    (bad_labels / "dev.tsv").write_text("sentence\tlabel\na good film\t7\n", encoding="utf-8")
    with pytest.raises(DataError, match="7"):
        run_pipeline(recipe, out, data_dir=bad_labels, progress=False)
    assert not out.exists()


def test_unknown_task_and_stage_names(tiny_setup):  # noqa: F811
    with pytest.raises(UnknownTaskError):
        from rosita_fast.data import get_task

        get_task("sst-3")
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"]))
    with pytest.raises(PipelineError, match="--stop-after names no stage"):
        run_pipeline(recipe, tiny_setup["root"] / "run", data_dir=tiny_setup["data"],
                     stop_after="ghost", progress=False)


def test_refuses_a_directory_that_is_not_a_pipeline_run(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"]))
    out = tiny_setup["root"] / "theirs"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me", encoding="utf-8")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(PipelineError, match="not a pipeline's output"):
            run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False, **flags)
    with pytest.raises(PipelineError, match="cannot resume"):
        run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False, resume=True)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_teacher_with_another_tokenizer_is_refused(tiny_setup):  # noqa: F811
    student, student_tok = load_model(tiny_setup["model"], 2, seed=0)
    other = write_tiny_model(tiny_setup["root"] / "other", extra_tokens=("zebra",))
    teacher, teacher_tok = load_model(other, 2, seed=0)
    with pytest.raises(TokenizerMismatchError, match="different vocabularies"):
        prepare_models(student, student_tok, teacher, teacher_tok, keep_layers=None,
                       corpus=None)


def test_pruning_schedules_that_cannot_fit_fail_before_the_first_stage(tiny_setup):  # noqa: F811
    too_short = tiny_recipe(tiny_setup["model"])
    too_short["stages"][3]["train"]["max_steps"] = 2  # 2 width events need > 2 updates
    out = tiny_setup["root"] / "run"
    with pytest.raises(PipelineError, match="stage width: pruning: 2 events do not fit"):
        run_pipeline(recipe_from_dict(too_short), out, data_dir=tiny_setup["data"],
                     progress=False)
    too_deep = tiny_recipe(tiny_setup["model"])
    too_deep["stages"][2]["train"]["pruning"]["layers"] = 3
    with pytest.raises(PipelineError, match="stage depth: pruning: cannot go from 2 to 3"):
        run_pipeline(recipe_from_dict(too_deep), out, data_dir=tiny_setup["data"],
                     progress=False)
    assert not out.exists()
