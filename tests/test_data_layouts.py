"""Every task's GLUE TSV layout (synthetic files in the real format) and the hub path agree."""

from __future__ import annotations

import dataclasses
import random
import zlib
from pathlib import Path

import datasets
import pytest

from rosita_fast.data import Example, get_task, load_examples, task_names

WORDS = "the cat sat on a mat while dogs ran far away and birds sang loud songs".split()

# Hub (nyu-mll/glue) class order, written out here independently of the registry.
HUB_CLASS_IDS = {
    "cola": {"0": 0, "1": 1}, "sst-2": {"0": 0, "1": 1}, "mrpc": {"0": 0, "1": 1},
    "qqp": {"0": 0, "1": 1},
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "mnli-mm": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "qnli": {"entailment": 0, "not_entailment": 1},
    "rte": {"entailment": 0, "not_entailment": 1},
}
HUB_COLUMNS = {
    "cola": ("sentence",), "sst-2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "sts-b": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"), "mnli-mm": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
}
HUB_CONFIG = {"sst-2": "sst2", "sts-b": "stsb", "mnli-mm": "mnli"}
HUB_SPLIT = {"mnli": {"dev": "validation_matched", "test": "test_matched"},
             "mnli-mm": {"dev": "validation_mismatched", "test": "test_mismatched"}}
FILE_STEM = {"mnli": {"dev": "dev_matched", "test": "test_matched"},
             "mnli-mm": {"dev": "dev_mismatched", "test": "test_mismatched"}}


def _sentence(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
    return text.capitalize() + rng.choice([".", " ?", " !", ""])


def _row_cells(
    task: str, split: str, i: int, a: str, b: str | None, label: str | None
) -> list[str]:
    """One row in the real GLUE layout of ``task`` (test rows have no label)."""
    test = label is None
    if task == "cola":
        return [str(i), a] if test else ["gj04", label, _cola_mark(i), a]
    if task == "sst-2":
        return [str(i), a] if test else [a, label]
    if task == "mrpc":
        return ([str(i)] if test else [label]) + [str(1000 + i), str(2000 + i), a, b]
    if task == "sts-b":
        cells = [str(i), "main-news", "2012", "dev", str(i), "none", "none", a, b]
        return cells if test else cells + [label]
    if task == "qqp":
        return [str(i), a, b] if test else [str(i), str(10 + i), str(20 + i), a, b, label]
    if task in ("mnli", "mnli-mm"):
        cells = [str(i), str(300 + i), f"{i}e", "fiction", f"( {a} )", f"( {b} )",
                 f"(ROOT {a})", f"(ROOT {b})", a, b]
        if test:
            return cells
        return cells + ([label] if split == "train" else [label] * 5) + [label]
    return [str(i), a, b] + ([] if test else [label])  # qnli, rte


def _cola_mark(i: int) -> str:
    return "*" if i % 3 == 0 else ""


def _header(task: str, split: str) -> list[str] | None:
    test = split == "test"
    if task == "cola":
        return ["index", "sentence"] if test else None
    if task == "sst-2":
        return ["index", "sentence"] if test else ["sentence", "label"]
    if task == "mrpc":
        return ["index" if test else "Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    if task == "sts-b":
        cols = ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                "sentence1", "sentence2"]
        return cols if test else cols + ["score"]
    if task == "qqp":
        return (["id", "question1", "question2"] if test
                else ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
    if task in ("mnli", "mnli-mm"):
        cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                "sentence2"]
        if test:
            return cols
        labels = ["label1"] if split == "train" else [f"label{k}" for k in range(1, 6)]
        return cols + labels + ["gold_label"]
    if task == "qnli":
        return ["index", "question", "sentence"] + ([] if test else ["label"])
    return ["index", "sentence1", "sentence2"] + ([] if test else ["label"])


def make_split(root: Path, task: str, split: str, n: int, seed: int):
    """Write ``split`` of ``task`` under ``root`` and return (expected examples, hub dataset)."""
    rng = random.Random(seed)
    pair = len(HUB_COLUMNS[task]) == 2
    expected, hub_rows = [], {c: [] for c in (*HUB_COLUMNS[task], "label", "idx")}
    lines = []
    for i in range(n):
        a = _sentence(rng)
        b = _sentence(rng) if pair else None
        if split == "test":
            raw, label = None, None
        elif task == "sts-b":
            label = round(rng.uniform(0, 5), 3)
            raw = f"{label:.3f}"
        else:
            raw = rng.choice(sorted(HUB_CLASS_IDS[task]))
            label = HUB_CLASS_IDS[task][raw]
        lines.append("\t".join(_row_cells(task, split, i, a, b, raw)))
        # CoLA's headerless train/dev files name each row's source (first column).
        source = "gj04" if task == "cola" and label is not None else None
        expected.append(Example(f"{split}-{i}", a, b, label, source))
        hub_rows[HUB_COLUMNS[task][0]].append(a)
        if pair:
            hub_rows[HUB_COLUMNS[task][1]].append(b)
        hub_rows["label"].append(-1 if label is None else label)
        hub_rows["idx"].append(i)
    header = _header(task, split)
    if header is not None:
        if task == "mrpc":  # the real MRPC files start with a byte-order mark
            header[0] = "\ufeff" + header[0]
        lines.insert(0, "\t".join(header))
    directory = root / get_task(task).dir_name
    directory.mkdir(parents=True, exist_ok=True)
    stem = FILE_STEM.get(task, {}).get(split, split)
    (directory / f"{stem}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    features = datasets.Features({
        **{c: datasets.Value("string") for c in HUB_COLUMNS[task]},
        "label": datasets.Value("float32" if task == "sts-b" else "int64"),
        "idx": datasets.Value("int32"),
    })
    return expected, datasets.Dataset.from_dict(hub_rows, features=features)


@pytest.mark.parametrize("task", task_names())
@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_tsv_and_hub_give_the_same_examples(tmp_path, monkeypatch, task, split):
    seed = zlib.crc32(f"{task}/{split}".encode())
    expected, hub_dataset = make_split(tmp_path, task, split, n=25, seed=seed)
    from_dir = load_examples(task, split, tmp_path / get_task(task).dir_name)
    assert from_dir == expected
    # A GLUE root (holding <TASK>/) works as well as the task directory.
    assert load_examples(task, split, tmp_path) == expected

    calls = []

    def fake_load_dataset(name, config, split=None, **kwargs):
        calls.append((name, config, split))
        return hub_dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_examples(task, split)
    hub_split = HUB_SPLIT.get(task, {}).get(split, "validation" if split == "dev" else split)
    assert calls == [("nyu-mll/glue", HUB_CONFIG.get(task, task), hub_split)]
    # The hub's copy has no source column: everything else is the same.
    assert all(e.source is None for e in from_hub)
    assert from_hub == [dataclasses.replace(e, source=None) for e in from_dir]


def test_mnli_matched_and_mismatched_read_their_own_dev_files(tmp_path):
    matched, _ = make_split(tmp_path, "mnli", "dev", n=7, seed=1)
    mismatched, _ = make_split(tmp_path, "mnli-mm", "dev", n=9, seed=2)
    assert load_examples("mnli", "dev", tmp_path) == matched
    assert load_examples("MNLI-MM", "dev", tmp_path) == mismatched
    by_file = load_examples("mnli", "dev_mismatched", tmp_path)
    assert [(e.text_a, e.text_b, e.label) for e in by_file] == [
        (e.text_a, e.text_b, e.label) for e in mismatched
    ]


@pytest.mark.parametrize(("task", "names"), [("sst-2", ("negative", "positive")),
                                             ("cola", ("unacceptable", "acceptable")),
                                             ("mnli", ("entailment", "neutral", "contradiction"))])
def test_a_model_config_gets_the_task_label_names(task, names):
    from transformers import BertConfig

    spec = get_task(task)
    config = BertConfig(num_labels=len(names))
    assert spec.name_labels(config)
    assert [config.id2label[i] for i in range(len(names))] == list(names)
    assert config.label2id == {n: i for i, n in enumerate(names)}
    # Names the user set are theirs; a config with another number of labels is left alone.
    custom = BertConfig(num_labels=len(names), id2label={i: f"c{i}" for i in range(len(names))})
    assert not spec.name_labels(custom) and custom.id2label[0] == "c0"
    other = BertConfig(num_labels=len(names) + 1)
    assert not spec.name_labels(other) and other.id2label[0] == "LABEL_0"


def test_regression_has_no_label_names():
    from transformers import BertConfig

    config = BertConfig(num_labels=1)
    assert get_task("sts-b").label_maps() == {}
    assert not get_task("sts-b").name_labels(config) and config.id2label == {0: "LABEL_0"}
