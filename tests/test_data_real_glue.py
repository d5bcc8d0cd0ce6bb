"""The shared SST-2 and CoLA directories load correctly (skipped where they are absent)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from rosita_fast.data import load_examples

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
pytestmark = pytest.mark.skipif(not (GLUE / "SST-2").is_dir() or not (GLUE / "CoLA").is_dir(),
                                reason=f"GLUE data not found at {GLUE}")


def _raw_rows(path: Path) -> list[list[str]]:
    # Independent parse: whole file, split on newlines and tabs.
    text = path.read_text(encoding="utf-8")
    return [line.split("\t") for line in text.split("\n") if line]


def test_sst2_splits_match_an_independent_parse():
    for split in ("train", "dev"):
        rows = _raw_rows(GLUE / "SST-2" / f"{split}.tsv")
        assert rows[0] == ["sentence", "label"]
        examples = load_examples("sst-2", split, GLUE / "SST-2")
        assert [(e.text_a, e.label) for e in examples] == [(r[0], int(r[1])) for r in rows[1:]]
        assert {e.label for e in examples} == {0, 1}
        assert all(e.source is None for e in examples)
    test_rows = _raw_rows(GLUE / "SST-2" / "test.tsv")
    test = load_examples("sst-2", "test", GLUE)
    assert [e.text_a for e in test] == [r[1] for r in test_rows[1:]]
    assert all(e.label is None for e in test)


def test_cola_headerless_files_match_an_independent_parse():
    for split in ("train", "dev"):
        rows = _raw_rows(GLUE / "CoLA" / f"{split}.tsv")
        examples = load_examples("cola", split, GLUE)
        assert [(e.text_a, e.label) for e in examples] == [(r[3], int(r[1])) for r in rows]
        # The first column names the publication each sentence comes from.
        assert [e.source for e in examples] == [r[0] for r in rows]
    test = load_examples("cola", "test", GLUE)
    assert len(test) == len(_raw_rows(GLUE / "CoLA" / "test.tsv")) - 1


def test_sst2_dev_from_the_hub_equals_the_tsv(monkeypatch):
    rows = _raw_rows(GLUE / "SST-2" / "dev.tsv")[1:]
    hub = datasets.Dataset.from_dict({
        "sentence": [r[0] for r in rows],
        "label": [int(r[1]) for r in rows],
        "idx": list(range(len(rows))),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub)
    assert load_examples("sst-2", "dev") == load_examples("sst-2", "dev", GLUE)
