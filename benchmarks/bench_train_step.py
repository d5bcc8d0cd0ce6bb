"""The main job's training steps on the CPU: rosita_fast's fast paths on vs off.

One benchmark round is one pass over twelve batches of 32 sentences whose widths follow the
length mix of SST-2's length-grouped training batches (5, 6, 7, 8, 8, 10, 12, 13, 16, 20, 26 and
40 tokens: mean 14.3, five of twelve 8 or fewer; the main job's batches: mean 13.3, 41 % 8 or
fewer), each a full training step:
forward with the loss, backward, gradient clipping where the stage clips, optimizer step.

Workloads (random weights, dropout 0.1 as in MiniLM's config):

- ``finetune``: the ``teacher`` stage. MiniLM's shape (6 layers, hidden 384, 12 heads, FFN 1536,
  vocabulary 30522), cross-entropy on gold labels, AdamW with gradient clipping at 1.0.
- ``width``: the ``width`` stage after pruning. The main job's final student (4 layers, 2 heads,
  FFN 256, embedding rank 112, vocabulary 11564), hidden-state + prediction KD against fixed
  teacher outputs (the teacher's forward is not timed), BertAdam.

Engines:

- ``fast``: ``swap_(model, FastModulesConfig())``, the fused KD losses, the fused optimizer
  steps, and (``finetune``: its loss reads only logits) ``first_token_output``;
- ``stock``: stock Hugging Face modules, the plain-PyTorch KD losses, torch's default AdamW and
  the plain-PyTorch BertAdam loop (what ``--no-fast-paths`` runs).

Results: ``results/train_step.md`` and ``.json``.

    python -m pytest benchmarks/bench_train_step.py -q
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import _harness
import pytest
import torch

from rosita_fast import FastModulesConfig, first_token_output, swap_
from rosita_fast.distill import KDConfig, KDLoss
from rosita_fast.distill.kd_loss import FUSED_FUNCTIONS, REFERENCE_FUNCTIONS
from rosita_fast.models.bert import RositaBertConfig, RositaBertForSequenceClassification
from rosita_fast.train.bert_adam import BertAdam

RESULTS = Path(__file__).with_name("results")
WIDTHS = (5, 6, 7, 8, 8, 10, 12, 13, 16, 20, 26, 40)
BATCH = 32
THREADS = (1, 2)
WORKLOADS = ("finetune", "width")
ENGINES = ("fast", "stock")
_RESULTS: dict[str, dict] = {}


def _model(workload: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if workload == "finetune":
        config = RositaBertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, vocab_size=30522, num_labels=2)
    else:
        config = RositaBertConfig(
            hidden_size=384, num_hidden_layers=4, num_attention_heads=12,
            intermediate_size=1536, vocab_size=11564, num_labels=2,
            num_attention_heads_per_layer=[2] * 4, intermediate_size_per_layer=[256] * 4,
            embedding_rank=112)
    return RositaBertForSequenceClassification(config).train()


def _batches(vocab: int, hidden: int, layers: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for width in WIDTHS:
        ids = torch.randint(1000, vocab, (BATCH, width), generator=g)
        mask = torch.ones(BATCH, width, dtype=torch.long)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, 2, (BATCH,), generator=g),
                    "teacher": {"logits": torch.randn(BATCH, 2, generator=g),
                                "hidden_states": tuple(torch.randn(BATCH, width, hidden,
                                                                   generator=g)
                                                       for _ in range(layers + 1))}})
    return out


def _step_fn(workload: str, engine: str):
    model = copy.deepcopy(_model(workload))
    fast = engine == "fast"
    if fast:
        swap_(model, FastModulesConfig())
    config = model.config
    batches = _batches(config.vocab_size, config.hidden_size, config.num_hidden_layers)
    if workload == "finetune":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if fast else None)
        context = (lambda: first_token_output(model)) if fast else nullcontext

        def step(batch):
            with context():
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if fast:  # as the trainer does: the fused kernel does not bump version counters
                torch.autograd.graph.increment_version(list(model.parameters()))
            optimizer.zero_grad(set_to_none=True)
    else:
        kd = KDLoss(KDConfig(hidden_weight=1.0, prediction_weight=1.0, gold_weight=0.0,
                             prediction_loss="soft_ce", layer_map="rosita"),
                    functions=FUSED_FUNCTIONS if fast else REFERENCE_FUNCTIONS)
        optimizer = BertAdam([{"params": list(model.parameters()), "weight_decay": 0.01}],
                             lr=1e-4, max_grad_norm=1.0, fused=fast)

        def step(batch):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
            kd(out, batch["teacher"], attention_mask=batch["attention_mask"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def run():
        for batch in batches:
            step(batch)

    return run


@pytest.fixture(autouse=True, scope="module")
def _write_results():
    yield
    if _RESULTS:
        _write_tables()


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_train_step(benchmark, workload, engine, threads):
    torch.set_num_threads(threads)
    run = _step_fn(workload, engine)
    run()  # warm-up: first-call allocations, the GEMM calibration
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    _RESULTS[f"{workload}|{engine}|{threads}"] = {
        "workload": workload, "engine": engine, "threads": threads,
        "median_s_per_step": benchmark.stats.stats.median / len(WIDTHS),
        "rounds": benchmark.stats.stats.rounds}


def _write_tables() -> None:
    from rosita_fast.ops import gemm_route

    command = "python -m pytest benchmarks/bench_train_step.py -q"
    machine = _harness.machine_info(command, None)
    header = ", ".join(f"{k}: {machine[k]}" for k in (
        "cpu", "logical_cores", "torch", "date", "git_commit", "git_uncommitted_changes",
        "load_average_after_run"))
    route = gemm_route()
    lines = ["# Training steps of the main job (CPU)", "", header, "",
             f"Command: `{command}`. Median ms per training step over SST-2's length mix (batch "
             f"32, widths {', '.join(map(str, WIDTHS))}); > 1 means the fast paths are faster. "
             "Method: the module docstring of `benchmarks/bench_train_step.py`. fp32 GEMM route: "
             + (f"forward {route['forward']}, backward {route['backward']}." if route
                else "no C++ extension."), "",
             "| workload | threads | fast paths on, ms | off, ms | speed-up |",
             "|---|---:|---:|---:|---:|"]
    for workload in WORKLOADS:
        for t in THREADS:
            on = _RESULTS.get(f"{workload}|fast|{t}", {}).get("median_s_per_step")
            off = _RESULTS.get(f"{workload}|stock|{t}", {}).get("median_s_per_step")
            if on is None or off is None:
                continue
            lines.append(f"| {workload} | {t} | {on * 1e3:.1f} | {off * 1e3:.1f} | "
                         f"{off / on:.2f}× |")
    lines.append("")
    stem = ("train_step" if len(_RESULTS) == len(WORKLOADS) * len(ENGINES) * len(THREADS)
            else "train_step.partial")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.json").write_text(json.dumps(list(_RESULTS.values()), indent=1),
                                          encoding="utf-8")
    print("\n".join(lines))
