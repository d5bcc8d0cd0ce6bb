"""The ``rosita`` command: help texts, the four commands on a tiny model, and error exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from test_pipeline_support import tiny_recipe, tiny_setup  # noqa: F401  (fixture)

from rosita_fast.cli import build_parser, main


@pytest.mark.parametrize("command", ["finetune", "compress", "evaluate", "summary"])
def test_every_command_says_what_it_does_and_how_long(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: rosita {command}" in text and "How long:" in text


def test_top_level_help_lists_the_commands_and_the_main_job():
    text = build_parser().format_help()
    for command in ("finetune", "compress", "evaluate", "summary"):
        assert command in text
    assert "main job" in text


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "rosita_fast", "compress", "--list"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "minilm-sst2" in out and "setting4" in out and "| width | sst-2 | 1e-05" in out


def test_compress_finetune_evaluate_summary_on_a_tiny_model(tiny_setup, capsys):  # noqa: F811
    recipe = tiny_recipe(tiny_setup["model"])
    recipe["stages"] = recipe["stages"][:2]
    path = tiny_setup["root"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tiny_setup["root"] / "run"
    args = ["compress", str(path), "--data-dir", str(tiny_setup["data"]), "--output-dir",
            str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out and (out / "report.png").exists()

    assert main(args) == 2  # a second run without --overwrite/--resume is refused
    assert "already holds a pipeline run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()

    model_dir = out / "stages" / "student" / "best_model"
    assert main(["evaluate", str(model_dir), "--data-dir", str(tiny_setup["data"]),
                 "--latency-sentences", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["metrics"]["acc"] <= 1.0 and report["latency_ms_batch1_1thread"] > 0
    assert report["latency_fast_ms_batch1_1thread"] > 0

    assert main(["summary", str(model_dir)]) == 0
    assert "total" in capsys.readouterr().out

    ft_out = tiny_setup["root"] / "ft"
    assert main(["finetune", "--model", str(tiny_setup["model"]), "--data-dir",
                 str(tiny_setup["data"]), "--output-dir", str(ft_out), "--max-steps", "4",
                 "--eval-every", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert (ft_out / "stages" / "finetune" / "best_model" / "config.json").exists()


def test_errors_exit_with_status_2_and_one_line(tiny_setup, capsys):  # noqa: F811
    assert main(["compress", "no-such-recipe", "--output-dir", "x"]) == 2
    assert "rosita: error: no recipe file" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_setup["model"]), "--task", "sst-3", "--data-dir",
                 str(tiny_setup["data"])]) == 2
    assert "unknown GLUE task 'sst-3'" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tiny_setup["model"]), "--data-dir",
                 str(tiny_setup["root"] / "missing"), "--output-dir",
                 str(tiny_setup["root"] / "o")]) == 2
    assert "rosita: error:" in capsys.readouterr().err
    assert not (tiny_setup["root"] / "o").exists()
