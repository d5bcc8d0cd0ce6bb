"""What a user sees: the progress bar's fields and the JSON-lines evaluation log."""

from __future__ import annotations

import json

import pytest
from test_train_support import quick_trainer, single_thread

from rosita_fast.train import PruningConfig


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_progress_bar_and_evaluation_log(tmp_path, capsys):
    out = tmp_path / "run"
    pruning = PruningConfig(mode="width", heads=2, ffn=24, embedding_rank=16, interval=2)
    quick_trainer(out, epochs=5, eval_every=5, progress=True, pruning=pruning).run()
    err = capsys.readouterr().err
    # The bar (refreshed every 10 updates) shows loss, LR, the current shape and size.
    assert "20/20" in err
    for field in ("loss=", "lr=", "shape=L2 H2 F24 E16", "params=11.3k"):
        assert field in err, field
    assert "step 2: pruned to L2 H3 F36 E24" in err

    lines = (out / "eval_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    first = records[0]
    assert set(first) >= {"step", "epoch", "metrics", "acc", "train_loss", "lr", "shape",
                          "parameters", "pruning_done", "saved", "best_metric", "best_step"}
    assert first["shape"] == "L2 H2 F24 E16" and first["parameters"] == 11282
    assert all(r["train_loss"] > 0 for r in records)
