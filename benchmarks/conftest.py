"""Prints, after a benchmark run, each fused row's speed-up over eager and torch.compile (medians
from the same run), and writes the same table to benchmarks/results/<file>.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def pytest_configure(config):
    # Benchmarks need the interpreter off: they time real kernels.
    import os

    os.environ.pop("TRITON_INTERPRET", None)


def _ratio_table(benchmarks) -> list[str]:
    groups: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        impl = bench.extra_info.get("impl")
        if impl is None or not bench.stats:
            continue
        groups.setdefault(bench.group, {})[impl] = bench.stats.median
    rows = [
        "| case | fused ms | eager ms | compile ms | eager/fused | compile/fused |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group, t in groups.items():
        if "fused" not in t:
            continue
        f = t["fused"]
        e, c = t.get("eager"), t.get("compile")
        rows.append(
            f"| {group} | {f * 1e3:.3f} | {e * 1e3 if e else float('nan'):.3f} | "
            f"{c * 1e3 if c else float('nan'):.3f} | {e / f if e else float('nan'):.2f}x | "
            f"{c / f if c else float('nan'):.2f}x |"
        )
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = _ratio_table(session.benchmarks)
    if len(rows) <= 2:
        return
    terminalreporter.write_sep("=", "speed-up of the fused kernel (median times, same run)")
    for row in rows:
        terminalreporter.write_line(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "lowrank_linear.md"
    out.write_text("\n".join(rows) + "\n")
    terminalreporter.write_line(f"written to {out}")
