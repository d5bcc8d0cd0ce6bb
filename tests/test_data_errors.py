"""Bad data input fails early with a message that names the problem (issue 4, section 6)."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest

from rosita_fast.data import (
    DataError,
    Example,
    UnknownTaskError,
    compute_metrics,
    examples_from_hf_dataset,
    get_task,
    load_examples,
    read_glue_tsv,
    task_names,
    write_glue_tsv,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        get_task("sst-5")
    for name in ("cola", "sst-2", "mrpc", "sts-b", "qqp", "mnli", "mnli-mm", "qnli", "rte"):
        assert name in str(err.value)
    assert get_task("SST2") is get_task("sst_2") is get_task("sst-2")
    assert len({get_task(name) for name in task_names()}) == len(task_names())  # hashable


def test_missing_directory_and_missing_split_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples("sst-2", "train", tmp_path / "nowhere")
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError) as err:
        load_examples("sst-2", "dev", tmp_path)
    assert "dev.tsv" in str(err.value) and "train.tsv" in str(err.value)


def test_short_row_is_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path / "train.tsv", "sentence\tlabel\ngood one\t1\nno label here\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected at least 2 .* found 1"):
        load_examples("sst-2", "train", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        rows = load_examples("sst-2", "train", tmp_path, skip_malformed_rows=True)
    assert [e.text_a for e in rows] == ["good one"]


@pytest.mark.parametrize(
    ("task", "content", "needle"),
    [
        ("sst-2", "sentence\tlabel\nfine\t1\nodd\t2\n", ":3: label '2' is not a label of task"),
        ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", ":2: label 'maybe'"),
        ("sts-b", "sentence1\tsentence2\tscore\na\tb\thigh\n", ":2: label 'high' .* not a number"),
        ("sts-b", "sentence1\tsentence2\tscore\na\tb\t7.5\n", ":2: score 7.5 .* outside"),
    ],
)
def test_labels_outside_the_task_set(tmp_path, task, content, needle):
    path = _write(tmp_path / "train.tsv", content)
    with pytest.raises(DataError, match=needle):
        read_glue_tsv(path, task)


def test_wrong_layout_is_detected(tmp_path):
    # An SST-2 file where QNLI is expected: the header lacks QNLI's columns.
    _write(tmp_path / "QNLI" / "train.tsv", "sentence\tlabel\nhi\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:1: header must name .*question, sentence"):
        load_examples("qnli", "train", tmp_path)
    # CoLA rows need exactly four columns.
    cola = _write(tmp_path / "CoLA" / "train.tsv", "src\t1\t\tFine.\nsrc\t1\tBroken.\n")
    with pytest.raises(DataError, match=r"train.tsv:2: expected 4 tab-separated columns, found 3"):
        read_glue_tsv(cola, "cola")
    with pytest.raises(DataError, match="file is empty"):
        read_glue_tsv(_write(tmp_path / "empty.tsv", ""), "sst-2")
    with pytest.raises(DataError, match="no data rows"):
        read_glue_tsv(_write(tmp_path / "header_only.tsv", "sentence\tlabel\n"), "sst-2")


def test_dev_split_without_labels_is_an_error_but_test_is_fine(tmp_path):
    _write(tmp_path / "dev.tsv", "index\tsentence\n0\thello\n")
    with pytest.raises(DataError, match="no 'label' column"):
        load_examples("sst-2", "dev", tmp_path)
    _write(tmp_path / "test.tsv", "index\tsentence\n0\thello\n")
    assert load_examples("sst-2", "test", tmp_path)[0].label is None


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_glue_tsv(path, "sst-2")


def test_hub_dataset_with_missing_column_or_bad_label():
    ds = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(DataError, match="missing column.*sentence"):
        examples_from_hf_dataset("sst-2", ds)
    ds = datasets.Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"], "label": [3]})
    with pytest.raises(DataError, match="label 3 is outside the label ids 0..2"):
        examples_from_hf_dataset("mnli", ds)


def test_metrics_reject_labels_outside_the_set():
    with pytest.raises(DataError, match="outside the label ids"):
        compute_metrics("sst-2", np.array([0, 1]), np.array([0, 2]))


@pytest.mark.parametrize("task", ["cola", "sst-2", "mrpc", "sts-b", "mnli", "qnli"])
def test_write_then_read_round_trip_and_no_silent_overwrite(tmp_path, task):
    t = get_task(task)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(12):
        if t.is_regression:
            label = round(float(rng.uniform(0, 5)), 4)
        else:
            label = int(rng.integers(t.num_labels))
        b = f"second\ttext {i}" if t.is_pair else None
        examples.append(Example(f"train_aug-{i}", f"text with tab\there {i}", b, label))
    path = write_glue_tsv(tmp_path / "train_aug.tsv", task, examples)
    back = load_examples(task, "train_aug", tmp_path)
    clean = [Example(e.guid, e.text_a.replace("\t", " "),
                     None if e.text_b is None else e.text_b.replace("\t", " "), e.label)
             for e in examples]
    assert back == clean
    # Sources travel in a "source" column; rows without one read back as None.
    sourced = [Example(e.guid, e.text_a, e.text_b, e.label, None if i % 3 else f"src\t{i}")
               for i, e in enumerate(examples)]
    write_glue_tsv(tmp_path / "sourced" / "train_aug.tsv", task, sourced)
    assert load_examples(task, "train_aug", tmp_path / "sourced") == [
        Example(c.guid, c.text_a, c.text_b, c.label, None if i % 3 else f"src {i}")
        for i, c in enumerate(clean)]
    with pytest.raises(FileExistsError):
        write_glue_tsv(path, task, examples)
    write_glue_tsv(path, task, examples[:3], overwrite=True)
    assert len(load_examples(task, "train_aug", tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sourced", "train_aug.tsv"]  # no tmp


def test_write_rejects_mixed_or_invalid_labels(tmp_path):
    mixed = [Example("a", "x", None, 1), Example("b", "y", None, None)]
    with pytest.raises(DataError, match="mix labelled and unlabelled"):
        write_glue_tsv(tmp_path / "x.tsv", "sst-2", mixed)
    with pytest.raises(DataError, match="label 5"):
        write_glue_tsv(tmp_path / "x.tsv", "sst-2", [Example("a", "x", None, 5)])
    assert not (tmp_path / "x.tsv").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_glue_tsv(tmp_path / "ok.tsv", "sst-2", [Example("a", "x", None, None)])
