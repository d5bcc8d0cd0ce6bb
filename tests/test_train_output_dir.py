"""Nothing existing is overwritten unless asked, and bad options fail before anything is touched."""

from __future__ import annotations

import pytest
from test_train_support import quick_trainer, single_thread

from rosita_fast.train import OutputDirError, TrainConfigError, read_eval_log


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _finished_run(tmp_path):
    out = tmp_path / "run"
    quick_trainer(out, epochs=1).run()
    return out


def test_a_previous_run_is_not_overwritten_without_the_flag(tmp_path):
    out = _finished_run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(OutputDirError, match="overwrite"):
        quick_trainer(out, epochs=1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_foreign_files_are_not_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError):
        quick_trainer(out)
    with pytest.raises(OutputDirError, match="not the output directory"):
        quick_trainer(out, resume=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_only_the_trainers_files(tmp_path):
    out = _finished_run(tmp_path)
    (out / "notes.txt").write_text("keep me")
    assert len(read_eval_log(out / "eval_log.jsonl")) == 1
    quick_trainer(out, epochs=2, eval_every=2, overwrite=True).run()
    assert (out / "notes.txt").read_text() == "keep me"
    assert [r["step"] for r in read_eval_log(out / "eval_log.jsonl")] == [2, 4, 6, 8]


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="exclude"):
        quick_trainer(tmp_path / "x", overwrite=True, resume=True)


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(OutputDirError, match="not a directory"):
        quick_trainer(path)


def test_bad_options_fail_before_the_output_dir_is_touched(tmp_path):
    out = _finished_run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(TrainConfigError, match="metric"):
        quick_trainer(out, metric="mcc", overwrite=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
