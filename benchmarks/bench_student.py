"""Whole students on the CPU: rosita_fast's fast modules against the engines a user would pick.

Inference (``infer``): logits of a batch of token ids (every sequence but the first padded to
three quarters of its length, so masking is exercised), fp32, ``torch.inference_mode`` for torch.
Engines:

- ``fast``: the model after ``rosita_fast.swap_(model, FastModulesConfig())``;
- ``eager``: stock Hugging Face;
- ``compile``: stock Hugging Face through ``torch.compile(dynamic=False)``, compiled for each shape;
- ``onnxruntime``: the same model exported with :func:`rosita_fast.export.export_onnx` and run by
  ONNX Runtime with the same thread count;
- ``teacher``: the BERT-base-shaped teacher (12 layers, 12 heads, FFN 3072) in HF eager.

Training (``train``): one step (forward with the task loss, backward, AdamW) of the student,
``fast`` against ``eager``, dropout as configured (HF default 0.1; see ``fused_paths``).

Blocks (``block``): one layer's attention block (``PrunedSelfAttention`` vs HF's ``BertAttention``),
its FFN (``FusedFFN`` vs HF's ``BertIntermediate`` + ``BertOutput``) and the embeddings
(``FusedEmbedding`` vs HF's ``BertEmbeddings`` with the factorized table) of the ``rosita``
student: forward (no grad), backward only (gradients of the input and every parameter, graph
built outside the timed region) and forward + backward, time and peak memory (as in
``_harness.peak_memory_mib``), dropout off.

Models: ``rosita`` (the paper's final shape: 8 layers, 2 heads of 64, FFN 512, embedding rank
128, hidden 768) at 64 and 128 tokens, and ``mainjob`` (the shape of the main job's student,
``minilm-sst2``: all-MiniLM-L6-v2's 6 layers at 2 heads of 32, FFN 192, embedding rank 112,
hidden 384, its 11,618-token corpus vocabulary and 64-position table; 3.0M parameters) at 25
tokens (the median SST-2 dev sentence, as the pipeline report's latency column times them one by
one) and 64 (its maximum), random weights. Every engine runs a block of calls
(pytest-benchmark rounds) and the rows are ordered by engine, so no engine's timings are
interleaved with another's: right after an ONNX Runtime call torch's next one was measured 2x
slower here (the two thread pools trade cores).
Results: ``results/student.md`` and ``.json``.

    python -m pytest benchmarks/bench_student.py -q
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import _harness
import pytest
import torch

from rosita_fast import FastModulesConfig, swap_
from rosita_fast.models.bert import RositaBertConfig, RositaBertForSequenceClassification

RESULTS = Path(__file__).with_name("results")
BATCHES = (1, 8, 32)
SEQS = {"rosita": (64, 128), "mainjob": (25, 64)}
THREADS = (1, 2)
MODELS = {
    "rosita": dict(hidden_size=768, num_hidden_layers=8, heads=2, ffn=512, rank=128,
                   vocab_size=30522, num_attention_heads=12, intermediate_size=3072),
    "mainjob": dict(hidden_size=384, num_hidden_layers=6, heads=2, ffn=192, rank=112,
                    vocab_size=11618, num_attention_heads=12, intermediate_size=1536,
                    max_position_embeddings=64),
}
INFER_ENGINES = ("fast", "eager", "compile", "onnxruntime", "teacher")
TRAIN_ENGINES = ("fast", "eager")
TRAIN_SHAPES = {"rosita": ((8, 64), (32, 64), (8, 128)), "mainjob": ((8, 64), (32, 64))}
BLOCKS = ("attention", "ffn", "embedding")
BLOCK_MODES = ("fwd", "bwd", "fwdbwd")
BLOCK_SHAPES = ((1, 64), (8, 128))
_RESULTS: dict[str, dict] = {}


@functools.cache
def student(name: str) -> torch.nn.Module:
    spec = MODELS[name]
    layers = spec["num_hidden_layers"]
    config = RositaBertConfig(
        hidden_size=spec["hidden_size"], num_hidden_layers=layers,
        num_attention_heads=spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"], vocab_size=spec["vocab_size"],
        num_attention_heads_per_layer=[spec["heads"]] * layers,
        intermediate_size_per_layer=[spec["ffn"]] * layers, embedding_rank=spec["rank"],
        max_position_embeddings=spec.get("max_position_embeddings", 512), num_labels=2)
    torch.manual_seed(0)
    return RositaBertForSequenceClassification(config).eval()


@functools.cache
def teacher() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2)).eval()


def batch_for(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, (3 * seq) // 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@functools.cache
def _onnx_path(name: str) -> str:
    from rosita_fast.export import export_onnx

    path = Path(tempfile.mkdtemp(prefix="bench_student_")) / f"{name}.onnx"
    export_onnx(copy.deepcopy(student(name)), path)
    return str(path)


def _infer_fn(engine: str, name: str, inputs: dict, threads: int):
    if engine == "onnxruntime":
        from rosita_fast.export import onnx_session, run_onnx

        session = onnx_session(_onnx_path(name), threads=threads)
        return lambda: run_onnx(session, inputs)
    if engine == "teacher":
        model = teacher()
    elif engine == "fast":
        model = copy.deepcopy(student(name))
        swap_(model, FastModulesConfig())
    else:
        model = student(name)
    if engine == "compile":
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False)

    def run():
        with torch.inference_mode():
            return model(**inputs).logits

    return run


def _infer_cases():
    for threads in THREADS:
        for engine in INFER_ENGINES:
            for name in MODELS:
                if engine == "teacher" and name != "rosita":
                    continue
                # The teacher runs at every length either table lists (its column in both).
                seqs = sorted(set().union(*SEQS.values())) if engine == "teacher" else SEQS[name]
                for b in BATCHES:
                    for s in seqs:
                        yield pytest.param(engine, name, b, s, threads,
                                           id=f"infer-{engine}-{name}-b{b}-s{s}-t{threads}")


def _train_cases():
    for threads in THREADS:
        for engine in TRAIN_ENGINES:
            for name in MODELS:
                for b, s in TRAIN_SHAPES[name]:
                    yield pytest.param(engine, name, b, s, threads,
                                       id=f"train-{engine}-{name}-b{b}-s{s}-t{threads}")


def _block_cases():
    for threads in THREADS:
        for engine in TRAIN_ENGINES:
            for block in BLOCKS:
                for mode in BLOCK_MODES:
                    for b, s in BLOCK_SHAPES:
                        yield pytest.param(engine, block, mode, b, s, threads,
                                           id=f"block-{engine}-{block}-{mode}-b{b}-s{s}-t{threads}")


@pytest.fixture(autouse=True, scope="module")
def _write_results():
    yield
    if _RESULTS:
        _write_tables()


def _record(kind: str, engine: str, name: str, b: int, s: int, threads: int, benchmark) -> None:
    stats = benchmark.stats.stats
    _RESULTS[f"{kind}|{engine}|{name}|{b}|{s}|{threads}"] = {
        "kind": kind, "engine": engine, "model": name, "batch": b, "seq": s,
        "threads": threads, "median_s": stats.median, "rounds": stats.rounds}


@pytest.mark.parametrize(("engine", "name", "b", "s", "threads"), list(_infer_cases()))
def test_infer(benchmark, engine, name, b, s, threads):
    torch.set_num_threads(threads)
    vocab = 30522 if engine == "teacher" else MODELS[name]["vocab_size"]
    inputs = batch_for(vocab, b, s)
    fn = _infer_fn(engine, name, inputs, threads)
    out = fn()  # warm-up (compiles, packs weights)
    if engine in ("fast", "compile", "onnxruntime"):
        with torch.inference_mode():
            ref = student(name)(**inputs).logits
        out = torch.as_tensor(out)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4, engine
    for _ in range(2):
        fn()
    benchmark.pedantic(fn, rounds=max(5, min(50, 200 // b)), warmup_rounds=1)
    _record("infer", engine, name, b, s, threads, benchmark)


@pytest.mark.parametrize(("engine", "name", "b", "s", "threads"), list(_train_cases()))
def test_train_step(benchmark, engine, name, b, s, threads):
    torch.set_num_threads(threads)
    model = copy.deepcopy(student(name)).train()
    if engine == "fast":
        swap_(model, FastModulesConfig())
    inputs = batch_for(MODELS[name]["vocab_size"], b, s)
    inputs["labels"] = torch.arange(b) % 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    benchmark.pedantic(step, rounds=max(5, min(20, 80 // b)), warmup_rounds=1)
    _record("train", engine, name, b, s, threads, benchmark)


def _block_fn(engine: str, block: str, mode: str, b: int, s: int):
    model = copy.deepcopy(student("rosita"))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    if engine == "fast":
        swap_(model, FastModulesConfig())
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for m in model.modules():
        for name in ("hidden_dropout", "attention_dropout"):
            if hasattr(m, name):
                setattr(m, name, 0.0)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, s, 768, generator=generator, requires_grad=mode != "fwd")
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1:, (3 * s) // 4:] = False
    layer = model.bert.encoder.layer[0]
    if block == "embedding":
        inputs = batch_for(MODELS["rosita"]["vocab_size"], b, s)
        module = model.bert.embeddings

        def forward():
            return module(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])

        leaves = list(module.parameters())
    elif block == "attention":
        if engine == "fast":
            def forward():
                return layer.attention(hidden, mask)
        else:
            additive = torch.zeros(b, 1, 1, s).masked_fill(~mask[:, None, None, :], -1e30)

            def forward():
                return layer.attention(hidden, additive)[0]
        leaves = [hidden, *layer.attention.parameters()]
    else:
        if engine == "fast":
            def forward():
                return layer.ffn.run(hidden, True)
        else:
            def forward():
                return layer.output(layer.intermediate(hidden), hidden)
        leaves = [hidden, *layer.intermediate.parameters(), *layer.output.parameters()]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if mode == "bwd":
        out = forward()
        grad = torch.randn(out.shape, generator=generator)
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    grad = torch.randn(forward().shape, generator=generator)
    return lambda: torch.autograd.grad(forward(), leaves, grad)


@pytest.mark.parametrize(("engine", "block", "mode", "b", "s", "threads"),
                         list(_block_cases()))
def test_block(benchmark, engine, block, mode, b, s, threads):
    torch.set_num_threads(threads)
    fn = _block_fn(engine, block, mode, b, s)
    for _ in range(3):
        fn()
    peak = _harness.peak_memory_mib(fn, "cpu")
    benchmark.pedantic(fn, rounds=max(7, min(40, 160 // b)), warmup_rounds=1)
    _record("block", engine, f"{block}-{mode}", b, s, threads, benchmark)
    _RESULTS["|".join(map(str, ("block", engine, f"{block}-{mode}", b, s, threads)))][
        "peak_mib"] = peak


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def _x(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def _write_tables() -> None:
    rows = _RESULTS
    get = lambda *k: rows.get("|".join(map(str, k)), {}).get("median_s")  # noqa: E731
    machine = _harness.machine_info("python -m pytest benchmarks/bench_student.py -q", None)
    machine["onnxruntime"] = _harness._version("onnxruntime")
    header = ", ".join(f"{k}: {machine[k]}" for k in (
        "cpu", "logical_cores", "torch", "onnxruntime", "date", "git_commit",
        "git_uncommitted_changes", "load_average_after_run"))
    lines = ["# Student benchmarks (CPU)", "", header, "",
             "Command: `python -m pytest benchmarks/bench_student.py -q`. Median ms per call; "
             "ratios > 1 mean the fast modules are faster. Method: the module docstring of "
             "`benchmarks/bench_student.py`.", ""]
    for name in MODELS:
        lines += [f"## Inference: `{name}` student, fp32", "",
                  "| threads | batch | seq | fast | HF eager | torch.compile | ONNX Runtime | "
                  "fast vs eager | fast vs compile | fast vs ORT | teacher (HF eager) | "
                  "teacher / fast |", "|" + "---:|" * 12]
        for t in THREADS:
            for b in BATCHES:
                for s in SEQS[name]:
                    f, e, c, o = (get("infer", eng, name, b, s, t)
                                  for eng in ("fast", "eager", "compile", "onnxruntime"))
                    tt = get("infer", "teacher", "rosita", b, s, t)
                    if f is None:
                        continue
                    lines.append(f"| {t} | {b} | {s} | {_ms(f)} | {_ms(e)} | {_ms(c)} | "
                                 f"{_ms(o)} | {_x(e, f)} | {_x(c, f)} | {_x(o, f)} | {_ms(tt)} | "
                                 f"{_x(tt, f)} |")
        lines.append("")
    for name in MODELS:
        lines += [f"## Training step (forward, backward, AdamW): `{name}` student, fp32", "",
                  "| threads | batch | seq | fast | HF eager | fast vs eager |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for t in THREADS:
            for b, s in TRAIN_SHAPES[name]:
                f, e = get("train", "fast", name, b, s, t), get("train", "eager", name, b, s, t)
                if f is None:
                    continue
                lines.append(f"| {t} | {b} | {s} | {_ms(f)} | {_ms(e)} | {_x(e, f)} |")
        lines.append("")
    peak = lambda *k: rows.get("|".join(map(str, k)), {}).get("peak_mib")  # noqa: E731
    lines += ["## Blocks of the `rosita` student (one layer; embeddings factorized), fp32", "",
              "| threads | block | mode | batch | seq | fast ms | HF ms | fast vs HF | "
              "fast peak MiB | HF peak MiB |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in THREADS:
        for block in BLOCKS:
            for mode in BLOCK_MODES:
                for b, s in BLOCK_SHAPES:
                    key = f"{block}-{mode}"
                    f, e = get("block", "fast", key, b, s, t), get("block", "eager", key, b, s, t)
                    if f is None:
                        continue
                    pf, pe = peak("block", "fast", key, b, s, t), peak("block", "eager", key, b,
                                                                         s, t)
                    lines.append(f"| {t} | {block} | {mode} | {b} | {s} | {_ms(f)} | {_ms(e)} | "
                                 f"{_x(e, f)} | {pf:.1f} | {pe:.1f} |")
    lines.append("")
    expected = (len(list(_infer_cases())) + len(list(_train_cases()))
                + len(list(_block_cases())))
    stem = "student" if len(rows) == expected else "student.partial"
    if stem != "student":
        lines.insert(2, f"partial run: {len(rows)} of {expected} rows")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.json").write_text(json.dumps(list(rows.values()), indent=1),
                                          encoding="utf-8")
    print("\n".join(lines))
