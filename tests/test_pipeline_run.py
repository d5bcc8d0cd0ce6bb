"""A tiny ROSITA pipeline end to end: every stage, the report table and plot, stop and resume."""

from __future__ import annotations

import json

import pytest
import torch
from test_pipeline_support import tiny_recipe, tiny_setup  # noqa: F401  (fixture)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import rosita_fast  # noqa: F401  (registers the student models with the Auto classes)
from rosita_fast.compress import count_parameters
from rosita_fast.models import model_layout
from rosita_fast.pipeline import PipelineError, RecipeError, recipe_from_dict, run_pipeline


def test_tiny_rosita_pipeline_writes_models_table_and_plot(tiny_setup):  # noqa: F811
    spec = tiny_recipe(tiny_setup["model"])
    spec["stages"][-1]["train"]["weight_average_decay"] = 0.9
    recipe = recipe_from_dict(spec)
    out = tiny_setup["root"] / "run"
    result = run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                          log=lambda _: None)
    assert result.complete and [s.name for s in result.stages] == [
        "teacher", "student", "depth", "width"]

    final = AutoModelForSequenceClassification.from_pretrained(str(result.stages[-1].model_dir))
    layout = model_layout(final)
    assert layout.heads == [2] and layout.intermediate_sizes == [16]
    assert layout.embedding_rank == 8
    tokenizer = AutoTokenizer.from_pretrained(str(result.stages[-1].model_dir))
    # The vocabulary shrank to the corpus: the unused tokens of the tiny vocabulary are gone.
    assert "spare" not in tokenizer.get_vocab() and len(tokenizer) == layout.vocab_size < 41
    assert count_parameters(final) == result.stages[-1].num_parameters
    # The saved student names its classes, so a stock pipeline prints them.
    assert final.config.id2label == {0: "negative", 1: "positive"}
    classify = pipeline("text-classification", model=final, tokenizer=tokenizer)
    assert classify("a good movie")[0]["label"] in {"negative", "positive"}

    table = (out / "report.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 5  # header + 4 stages
    assert rows[1].startswith("| teacher |") and "L1 H2 F16 Er8" in rows[4]
    assert "(teacher: `teacher`)" in table
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [r["parameters"] for r in data] == [s.num_parameters for s in result.stages]
    assert all(r["latency_ms"] > 0 and r["latency_fast_ms"] > 0 for r in data)
    # Stages whose losses read only logits run the last layer for the first token; the width
    # stage distils hidden states too.
    assert [r["trained_on"] for r in data] == [
        "fast, fused AdamW, first-token last layer",  # fine-tuning: no KD, no teacher
        "fast, fused KD, fused AdamW, cache, first-token last layer",
        "fast, fused KD, fused AdamW, cache, first-token last layer",
        "fast, fused KD, fused AdamW, cache, weight average 0.9",
    ]
    log = [json.loads(line) for line in (out / "stages" / "width" / "eval_log.jsonl")
           .read_text(encoding="utf-8").splitlines()]
    assert {r["weights"] for r in log} == {"average"}
    assert "latency ms (fast)" in table and "trained on" in table
    assert data[-1]["ratio"] > 1.5
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(0.0 <= r["metric"] <= 1.0 for r in data)
    # What ran: the recipe, every seed and the library versions, in run.json and the report.
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["recipe"] == json.loads(json.dumps(recipe.to_dict()))
    assert run["seeds"] == {**{s.name: recipe.train_config(s).seed for s in recipe.stages},
                            "data subset": recipe.data.subset_seed}
    assert run["versions"]["torch"] == torch.__version__ and "transformers" in run["versions"]
    assert "## What ran" in table and f"torch {torch.__version__}" in table


def test_stop_between_stages_then_resume(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"]))
    out = tiny_setup["root"] / "run"
    first = run_pipeline(recipe, out, data_dir=tiny_setup["data"], stop_after="student",
                         progress=False, log=lambda _: None)
    assert not first.complete and [s.name for s in first.stages] == ["teacher", "student"]
    assert not (out / "stages" / "depth").exists() and not (out / "report.md").exists()

    with pytest.raises(PipelineError, match="--overwrite .* or --resume"):
        run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                     log=lambda _: None)

    lines: list[str] = []
    second = run_pipeline(recipe, out, data_dir=tiny_setup["data"], resume=True,
                          progress=False, log=lines.append)
    assert second.complete and (out / "report.md").exists()
    assert any(line.startswith("[teacher] already finished") for line in lines)
    assert any(line.startswith("[student] already finished") for line in lines)
    assert second.stages[1].best_metric == first.stages[1].best_metric

    changed = recipe_from_dict(tiny_recipe(tiny_setup["model"], name="other"))
    with pytest.raises(PipelineError, match="different recipe"):
        run_pipeline(changed, out, data_dir=tiny_setup["data"], resume=True, progress=False,
                     log=lambda _: None)


def test_overwrite_replaces_only_pipeline_files(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"], stages=tiny_recipe(
        tiny_setup["model"])["stages"][:1]))
    out = tiny_setup["root"] / "run"
    run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False, log=lambda _: None)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    run_pipeline(recipe, out, data_dir=tiny_setup["data"], overwrite=True, progress=False,
                 log=lambda _: None)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "report.md").exists()


def test_augmented_stages_use_the_cached_augmented_set(tiny_setup):  # noqa: F811
    from transformers import BertConfig, BertForMaskedLM

    mlm_dir = tiny_setup["root"] / "mlm"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_setup["model"]))
    tokenizer.save_pretrained(str(mlm_dir))
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64)).save_pretrained(str(mlm_dir))
    spec = tiny_recipe(tiny_setup["model"])
    spec["stages"] = spec["stages"][:2]
    spec["data"]["augment"] = {"mlm": str(mlm_dir), "variants": 2}
    out = tiny_setup["root"] / "run"
    lines: list[str] = []
    run_pipeline(recipe_from_dict(spec), out, data_dir=tiny_setup["data"], progress=False,
                 log=lines.append)
    cached = (out / "data" / "train_aug.jsonl").read_text(encoding="utf-8").splitlines()
    # 160 rows less the 32 of the validation split, which are never augmented or trained on.
    assert 128 < len(cached) <= 3 * 128  # the originals plus up to 2 variants each
    assert any(line.startswith(f"[student] {len(cached)} training examples") for line in lines)
    assert any(line.startswith("[teacher] 128 training examples") for line in lines)


def test_embedding_augmentation_needs_no_mlm_and_keeps_the_corpus_vocabulary(tiny_setup):  # noqa: F811
    spec = tiny_recipe(tiny_setup["model"])
    spec["stages"] = spec["stages"][:2]
    spec["data"]["augment"] = {"source": "embedding", "variants": 3, "top_k": 4}
    out = tiny_setup["root"] / "run"
    lines: list[str] = []
    result = run_pipeline(recipe_from_dict(spec), out, data_dir=tiny_setup["data"],
                          progress=False, log=lines.append)
    rows = [json.loads(line) for line in
            (out / "data" / "train_aug.jsonl").read_text(encoding="utf-8").splitlines()]
    originals = [r for r in rows if "-aug" not in r["guid"]]
    variants = [r for r in rows if "-aug" in r["guid"]]
    assert len(originals) == 128 and len(variants) > 128  # most examples got variants
    train_words = {w for r in originals for w in r["text_a"].split()}
    # Neighbours come from the training set's words only: the tiny vocabulary's unused whole
    # words ("spare", "extra", "unused") are never proposed, so the corpus cut still drops them.
    assert {w for r in variants for w in r["text_a"].split()} <= train_words
    assert any(r["text_a"] != o["text_a"] for r, o in zip(variants, originals, strict=False))
    tokenizer = AutoTokenizer.from_pretrained(str(result.stages[-1].model_dir))
    assert not {"spare", "extra", "unused"} & set(tokenizer.get_vocab())
    assert any(line.startswith(f"[student] {len(rows)} training examples") for line in lines)


def test_external_set_scores_every_stage_on_rows_outside_the_task_files(tiny_setup,  # noqa: F811
                                                                          monkeypatch):
    from rosita_fast.data import Example, get_task, load_examples
    from rosita_fast.data import external as ext
    from rosita_fast.pipeline.report import score

    train = load_examples("sst-2", "train", tiny_setup["data"])
    rows = [Example("x0", train[0].text_a, None, train[0].label),  # in the task's files: dropped
            *(Example(f"x{i}", f"the film was {w}", None, label)
              for i, (w, label) in enumerate([("good", 1), ("awful", 0), ("great", 1),
                                              ("boring", 0), ("lovely", 1)], start=1))]
    monkeypatch.setitem(ext.EXTERNAL_SETS, "toy", ext.ExternalSet("sst-2", "a toy set",
                                                                 lambda: rows))
    spec = tiny_recipe(tiny_setup["model"])
    spec["stages"] = spec["stages"][:2]
    spec["report"]["external"] = "toy"
    out = tiny_setup["root"] / "run"
    result = run_pipeline(recipe_from_dict(spec), out, data_dir=tiny_setup["data"],
                          progress=False, log=lambda _: None)
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for stage, row in zip(result.stages, data, strict=True):
        model = AutoModelForSequenceClassification.from_pretrained(str(stage.model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(stage.model_dir))
        expected = score(model, tokenizer, get_task("sst-2"), rows[1:], max_length=16)
        assert row["external_metric"] == expected["acc"]
    assert data[0]["external_retained"] == 1.0
    table = (out / "report.md").read_text(encoding="utf-8")
    assert "| toy acc | % ext |" in table and "5 rows of a toy set" in table
    spec["report"]["external"] = "imdb-full"
    with pytest.raises(RecipeError, match="report.external: unknown set"):
        recipe_from_dict(spec)


def test_stock_modules_when_asked(tiny_setup):  # noqa: F811
    recipe = recipe_from_dict(tiny_recipe(tiny_setup["model"]))
    out = tiny_setup["root"] / "stock"
    result = run_pipeline(recipe, out, data_dir=tiny_setup["data"], progress=False,
                          log=lambda _: None, fast_modules=False, stop_after="student")
    assert [s.fast_modules for s in result.stages] == [
        {"student": "stock"}, {"student": "stock", "teacher": "stock"}]


def test_fast_paths_off_is_the_baseline_the_report_compares_with(tiny_setup):  # noqa: F811
    spec = tiny_recipe(tiny_setup["model"])
    spec["stages"] = spec["stages"][:2]
    recipe = recipe_from_dict(spec)
    base, fast = tiny_setup["root"] / "base", tiny_setup["root"] / "fast"
    with pytest.raises(PipelineError, match="cannot read"):
        run_pipeline(recipe, fast, data_dir=tiny_setup["data"], progress=False,
                     log=lambda _: None, compare_to=base)
    assert not fast.exists()  # a bad --compare-to fails before anything is written
    stock = run_pipeline(recipe, base, data_dir=tiny_setup["data"], progress=False,
                         log=lambda _: None, fast_paths=False)
    off = {"fast_modules": False, "fused_losses": False, "fused_optimizer": False,
           "teacher_cache": False, "first_token": False}
    assert [s.paths for s in stock.stages] == [{**off, "distils": False},
                                               {**off, "distils": True}]
    assert stock.stages[1].fast_modules == {"student": "stock", "teacher": "stock"}

    result = run_pipeline(recipe, fast, data_dir=tiny_setup["data"], progress=False,
                          log=lambda _: None, compare_to=base)
    rows = json.loads((fast / "report.json").read_text(encoding="utf-8"))
    for row, mine, theirs in zip(rows, result.stages, stock.stages, strict=True):
        assert row["baseline_wall_minutes"] == pytest.approx(theirs.wall_seconds / 60)
        assert row["wall_minutes"] == pytest.approx(mine.wall_seconds / 60)
    table = (fast / "report.md").read_text(encoding="utf-8")
    assert "| baseline wall min | speed-up |" in table and f"`{base}`" in table
    assert "| fast, fused KD, fused AdamW, cache, first-token last layer |" in table
    assert "Total training wall time" in table
    assert "baseline" in table.split("Total training wall time")[1]
    base_table = (base / "report.md").read_text(encoding="utf-8")
    assert "| stock, reference KD |" in base_table and "baseline wall min" not in base_table

    other = recipe_from_dict(tiny_recipe(tiny_setup["model"], name="other"))
    with pytest.raises(PipelineError, match="different recipe"):
        run_pipeline(other, tiny_setup["root"] / "x", data_dir=tiny_setup["data"],
                     progress=False, log=lambda _: None, compare_to=base)
    partial = tiny_setup["root"] / "partial"
    run_pipeline(recipe, partial, data_dir=tiny_setup["data"], progress=False,
                 log=lambda _: None, stop_after="teacher", fast_paths=False)
    with pytest.raises(PipelineError, match="unfinished stages"):
        run_pipeline(recipe, tiny_setup["root"] / "y", data_dir=tiny_setup["data"],
                     progress=False, log=lambda _: None, compare_to=partial)
