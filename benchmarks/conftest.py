"""After a benchmark run: per benchmark file ``bench_<op>.py``, a table of median times, speed-ups
of the fused op over eager and torch.compile and peak memory, printed and written to
``results/<op>.md`` and ``results/<op>.json``, headed with the machine and the command.

A run that measured fewer rows than the file defines for this machine (a ``-k`` subset, a failed
row) writes ``results/<op>.partial.md`` / ``.json`` instead, says "partial run: N of M rows" in
their header and leaves the full results alone; ``results/.gitignore`` keeps partial files out of
git. How each number is measured: ``_harness.py``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import _harness
import pytest

RESULTS = Path(__file__).with_name("results")

# Per benchmark file (nodeid prefix): the op, its OpSpec, the rows this machine should measure
# ({row key: order}) and which row each test belongs to ({nodeid: row key}).
_FILES: dict[str, dict] = {}
_LOAD_BEFORE: list[float | None] = []


def pytest_configure(config):
    # Benchmarks need the interpreter off: they time real kernels.
    os.environ.pop("TRITON_INTERPRET", None)
    _LOAD_BEFORE.append(_harness.load_average())  # evidence of whether the machine was quiet


def _register(items) -> None:
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        callspec = getattr(item, "callspec", None)
        if not Path(path).name.startswith("bench_") or callspec is None:
            continue
        if "impl" not in callspec.params:
            continue
        if any(m.args and m.args[0] is True for m in item.iter_markers("skipif")):
            continue  # e.g. CUDA rows on a machine without a GPU: not part of this machine's table
        entry = _FILES.setdefault(path, {
            "op": Path(path).stem.removeprefix("bench_"),
            "spec": getattr(item.module, "SPEC", None),
            "rows": {},
            "nodeids": {},
            "case_params": {},
        })
        key = _harness.row_key(callspec.params)
        order = min(callspec.indices.values()) if callspec.indices else 0
        entry["rows"][key] = min(order, entry["rows"].get(key, order))
        entry["nodeids"][item.nodeid] = key
        entry["case_params"][key] = dict(getattr(callspec.params["case"], "params", {}))


def pytest_deselected(items):
    _register(items)  # deselected rows still belong to the full table: they make a run partial


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    _register(items)


# ---- tables -------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _mib(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _collect(entry: dict, benchmarks) -> list[dict]:
    """One dict per expected row (in parametrization order), with what was measured of it."""
    rows = {
        key: {"device": key[0], "dtype": key[1], "case": key[2], "mode": key[3],
              "case_params": entry["case_params"][key], "impls": {}}
        for key in sorted(entry["rows"], key=entry["rows"].get)
    }
    for bench in benchmarks:
        key = entry["nodeids"].get(bench.fullname)
        if key is None or not bench.stats or bench.has_error:
            continue
        info = bench.extra_info
        row = rows[key]
        row["impls"][info["impl"]] = {
            "median_s": bench.stats.median,
            "min_s": bench.stats.min,
            "mean_s": bench.stats.mean,
            "stddev_s": bench.stats.stddev,
            "iqr_s": bench.stats.iqr,
            "rounds": bench.stats.rounds,
            "iterations": bench.iterations,
            "peak_mib": info.get("peak_mib"),
            "backend": info.get("backend") if info["impl"] == "fused" else None,
        }
    for row in rows.values():
        med = {impl: row["impls"].get(impl, {}).get("median_s") for impl in _harness.IMPLS}
        row["eager_over_fused"] = _ratio(med["eager"], med["fused"])
        row["compile_over_fused"] = _ratio(med["compile"], med["fused"])
        row["complete"] = all(impl in row["impls"] for impl in _harness.IMPLS)
    return list(rows.values())


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["complete"]:
            groups.setdefault((row["device"], row["dtype"], row["mode"]), []).append(row)
    return [
        {
            "device": device, "dtype": dtype, "mode": mode, "rows": len(group),
            "geomean_eager_over_fused": _geomean([r["eager_over_fused"] for r in group]),
            "geomean_compile_over_fused": _geomean([r["compile_over_fused"] for r in group]),
        }
        for (device, dtype, mode), group in sorted(
            groups.items(),
            key=lambda kv: (kv[0][0], list(_harness.DTYPES).index(kv[0][1]),
                            _harness.MODES.index(kv[0][2])),
        )
    ]


def _markdown(op: str, spec, machine: dict, rows: list[dict], summary: list[dict],
              measured: int, expected: int) -> list[str]:
    m = machine
    lines = [f"# `{op}` benchmark", ""]
    if measured < expected:
        lines += [f"**Partial run: {measured} of {expected} rows.** The full table is "
                  f"`{op}.md`, left as it was.", ""]
    lines += [
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} torch "
        f"threads; GPU: {m['gpu'] or 'none'}",
        f"- software: torch {m['torch']}, triton {m['triton'] or 'not installed'}, "
        f"pytest-benchmark {m['pytest_benchmark']}, Python {m['python']}, {m['platform']}",
        f"- run: {m['date']}, `{m['command']}`, commit {m['git_commit'] or 'unknown'}"
        + (" (with uncommitted changes)" if m["git_uncommitted_changes"] else ""),
        f"- 1-minute load average: {m['load_average_before_run']} when the run started, "
        f"{m['load_average_after_run']} at its end (the run itself keeps "
        f"~{m['torch_threads']} cores busy); other work on the machine distorts the times",
        f"- rows: {measured} of {expected}" + (" (complete)" if measured == expected else ""),
    ]
    if spec is not None:
        lines.append(f"- op: {spec.description}")
    lines += [f"- {k}: {v}" for k, v in _harness.METHOD.items()]
    lines += [
        "- eager/fused, compile/fused: median time ratios; above 1 the fused op is faster",
        "",
        "## Summary: geometric mean of the speed-ups over the rows",
        "",
        "| device | dtype | mode | rows | eager/fused | compile/fused |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {s['device']} | {s['dtype']} | {s['mode']} | {s['rows']} | "
        f"{_x(s['geomean_eager_over_fused'])} | {_x(s['geomean_compile_over_fused'])} |"
        for s in summary
    ]
    for device in dict.fromkeys(r["device"] for r in rows):
        shown = [r for r in rows if r["device"] == device and r["impls"]]
        if not shown:
            continue
        lines += [
            "",
            f"## {device}: median ms, speed-up of the fused op, peak MiB",
            "",
            "| case | mode | dtype | fused ms | eager ms | compile ms | eager/fused | "
            "compile/fused | peak MiB fused | peak MiB eager | peak MiB compile |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in shown:
            impl = {i: r["impls"].get(i, {}) for i in _harness.IMPLS}
            lines.append(
                f"| {r['case']} | {r['mode']} | {r['dtype']} | "
                + " | ".join(_ms(impl[i].get("median_s")) for i in _harness.IMPLS)
                + f" | {_x(r['eager_over_fused'])} | {_x(r['compile_over_fused'])} | "
                + " | ".join(_mib(impl[i].get("peak_mib")) for i in _harness.IMPLS)
                + " |"
            )
    return lines


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = session.benchmarks if session is not None else []
    command = "python -m pytest " + shlex.join(config.invocation_params.args)
    for entry in _FILES.values():
        rows = _collect(entry, benchmarks)
        measured = sum(r["complete"] for r in rows)
        if not any(r["impls"] for r in rows):
            continue
        op, expected = entry["op"], len(rows)
        machine = _harness.machine_info(command, _LOAD_BEFORE[0] if _LOAD_BEFORE else None)
        summary = _summary(rows)
        lines = _markdown(op, entry["spec"], machine, rows, summary, measured, expected)
        stem = op if measured == expected else f"{op}.partial"
        RESULTS.mkdir(exist_ok=True)
        md, js = RESULTS / f"{stem}.md", RESULTS / f"{stem}.json"
        md.write_text("\n".join(lines) + "\n")
        js.write_text(json.dumps({
            "op": op,
            "complete": measured == expected,
            "rows_measured": measured,
            "rows_expected": expected,
            "machine": machine,
            "op_description": entry["spec"].description if entry["spec"] else None,
            "method": _harness.METHOD,
            "benchmark_options": _harness.BENCH_OPTIONS,
            "summary": summary,
            "rows": rows,
        }, indent=1) + "\n")
        terminalreporter.write_sep("=", f"{op}: fused vs eager vs torch.compile")
        for line in lines:
            terminalreporter.write_line(line)
        note = "" if measured == expected else (
            f" (partial run: {measured} of {expected} rows; results/{op}.md left as it was)")
        terminalreporter.write_line(f"written to {md} and {js.name}{note}")
