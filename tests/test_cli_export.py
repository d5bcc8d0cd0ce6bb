"""ONNX export (``rosita_fast.export`` and ``rosita export``) and the CLI's model-directory errors.

ONNX Runtime must reproduce torch's logits (fp32, relative error ~1e-5) on real students (pruned
to non-uniform per-layer heads and FFN sizes, factorized word embedding, saved and reloaded with
the stock Auto class), on padded batches of other sizes than the export's. ``evaluate``,
``summary`` and ``export`` on a missing, empty or damaged model directory end with exactly one
``rosita: error:`` line naming the file and the problem.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from conftest_compress import random_batch, tiny_model
from test_pipeline_support import write_glue_dir, write_tiny_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rosita_fast.cli import main
from rosita_fast.compress import prune_
from rosita_fast.export import (
    OnnxExportError,
    export_onnx,
    onnx_input_names,
    onnx_session,
    run_onnx,
    verify_onnx,
)

# export_onnx traces at batch 2 x sequence 8; these differ in both axes and are padded.
SHAPES = [(1, 19), (5, 6)]


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_logits_match(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def _padded_batch(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    out = random_batch(model, batch, seq)  # last row padded
    if batch > 2:  # rows with different amounts of padding
        out["input_ids"][1, seq - 1:] = model.config.pad_token_id
        out["attention_mask"][1, seq - 1:] = 0
    return out


def _student(arch: str, tmp_path: Path):
    """A pruned student (per-layer heads and FFN, one layer dropped, factorized embedding) saved
    and loaded back with the stock Auto class, as a user would get it."""
    model = tiny_model(arch, "seq")
    heads = [[1, 3], [0, 1, 2]] if arch == "mpnet" else [[2], [0, 1, 3]]
    prune_(model, layers=[0, 2], heads=heads, ffn=[[1, 5, 9], list(range(20))], embedding_rank=7)
    model.save_pretrained(tmp_path / "student")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert loaded.config.num_attention_heads_per_layer == [len(h) for h in heads]
    assert loaded.config.embedding_rank == 7
    if arch == "mpnet":  # each layer keeps its own subset of the shared relative-bias heads
        assert loaded.config.relative_attention_heads_per_layer == heads
    return loaded


def _assert_graph_signature(path: Path, inputs: list[str]) -> None:
    assert not list(path.parent.glob("*.data"))  # one self-contained file
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == inputs
    for graph_input in graph.input:
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = [d.dim_param for d in graph_input.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
    assert [o.name for o in graph.output] == ["logits"]


# The BERT student (factorized embedding, non-uniform heads and FFN) is exported through the CLI
# in test_rosita_export_writes_a_student_that_matches_torch: each export costs seconds.
@pytest.mark.parametrize("arch", ["mpnet", "roberta"])
def test_onnx_runtime_matches_torch_on_a_pruned_student(arch, tmp_path, seed, one_thread):
    model = _student(arch, tmp_path)
    assert onnx_input_names(model) == ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if arch != "mpnet" else [])
    # RoBERTa: what its tokenizers make (model_input_names), not what the model could take.
    names = ["input_ids", "attention_mask"] if arch == "roberta" else None

    path = export_onnx(model, tmp_path / "out" / "student.onnx", input_names=names)
    assert path == tmp_path / "out" / "student.onnx" and not model.training
    _assert_graph_signature(path, ["input_ids", "attention_mask"])

    session = onnx_session(path, threads=2)
    assert session.get_session_options().intra_op_num_threads == 2
    for batch, seq in SHAPES:
        inputs = _padded_batch(model, batch, seq)
        with torch.no_grad():
            expected = model(**inputs).logits
        _assert_logits_match(run_onnx(session, inputs), expected)
    assert verify_onnx(model, path) < 1e-5

    if arch == "roberta":  # keys the graph lacks are ignored; a missing mask is all ones
        ids = inputs["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        got = run_onnx(session, {"input_ids": ids.numpy(), "labels": ids[:, 0]})
        _assert_logits_match(got, expected)
        with pytest.raises(KeyError, match="input_ids"):
            run_onnx(session, {"attention_mask": ids})


def test_export_and_session_reject_bad_arguments(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="input_names"):
        export_onnx(model, tmp_path / "x.onnx", input_names=["attention_mask"])
    with pytest.raises(OnnxExportError, match="returns no logits"):
        export_onnx(tiny_model("bert", "base"), tmp_path / "base.onnx")
    with pytest.raises(ValueError, match="threads"):
        onnx_session(tmp_path / "x.onnx", threads=0)
    assert not list(tmp_path.iterdir())


def test_rosita_export_writes_a_student_that_matches_torch(tmp_path, capsys, seed, one_thread):
    """The CLI on a saved BERT student (non-uniform heads and FFN, factorized embedding) with
    its tokenizer: inputs are what the tokenizer makes, token_type_ids included."""
    model_dir = write_tiny_model(tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():  # HF init (std 0.02, zero biases) gives near-constant logits
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    prune_(model, heads=[[0, 2], [1, 2, 3]], ffn=[list(range(10)), [4, 7]], embedding_rank=6)
    assert model.config.model_type == "rosita_bert"
    model.save_pretrained(tmp_path / "student")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(tmp_path / "student")

    out = tmp_path / "deploy" / "student.onnx"
    assert main(["export", str(tmp_path / "student"), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"onnx: {out}" in stdout and "checked: ONNX Runtime matches torch" in stdout

    _assert_graph_signature(out, ["input_ids", "attention_mask", "token_type_ids"])
    session = onnx_session(out, threads=1)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert student.config.embedding_rank == 6
    # Sentence pairs (segment ids 0 and 1), batches of 1 and 5 of other lengths than the
    # export's 2 x 8, the longer one padded.
    for sentences in (["good film"], ["the movie was very dull and the plot flat", "fun",
                                      "a lovely story", "boring", "great cast but bad ending"]):
        batch = tokenizer(sentences, ["and the music was great", *["is"] * (len(sentences) - 1)],
                          padding=True, return_tensors="pt")
        assert batch["input_ids"].shape[1] != 8
        with torch.no_grad():
            expected = student(**batch).logits
        _assert_logits_match(run_onnx(session, batch), expected)
    assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 1).any()


def test_export_help_says_what_and_how_long(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: rosita export" in text and "How long:" in text and "OUT.onnx" in text


# --- model-directory errors -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_errors")
    return {"model": write_tiny_model(root / "model"), "data": write_glue_dir(root / "SST-2")}


def _missing(src: Path, dst: Path) -> tuple[Path, str]:
    return dst, f"model directory {dst} does not exist"


def _empty(src: Path, dst: Path) -> tuple[Path, str]:
    dst.mkdir()
    (dst / "notes.txt").write_text("not a model\n")
    return dst, f"{dst} holds no model"


def _config_only(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    return dst, f"{dst} holds config.json but no weights"


def _truncated(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 2 // 3])
    return dst, f"{weights} is truncated"


def _corrupt(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))
    return dst, f"{weights} is corrupt"


def _truncated_header(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut inside the JSON header
    return dst, f"{weights} is truncated"


CASES = {"missing dir": _missing, "no model": _empty, "weights missing": _config_only,
         "truncated weights": _truncated, "truncated header": _truncated_header,
         "corrupt weights": _corrupt}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["evaluate", "summary", "export"])
def test_bad_model_dir_ends_with_one_error_line(command, case, saved_model, tmp_path, capsys):
    model_dir, message = CASES[case](saved_model["model"], tmp_path / "model")
    onnx_out = tmp_path / "out.onnx"
    extra = {"evaluate": ["--data-dir", str(saved_model["data"]), "--latency-sentences", "0"],
             "summary": [], "export": [str(onnx_out)]}[command]
    assert main([command, str(model_dir), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rosita: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not onnx_out.exists()


def test_model_without_tokenizer_is_one_line_for_evaluate(saved_model, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(saved_model["model"], model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (model_dir / name).unlink(missing_ok=True)
    assert main(["evaluate", str(model_dir), "--data-dir", str(saved_model["data"])]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and lines == [
        f"rosita: error: {model_dir} holds a model but no tokenizer (no "
                     "tokenizer.json or tokenizer_config.json); save it with "
                     "tokenizer.save_pretrained"]
