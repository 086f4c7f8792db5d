"""Turn ``results.json`` into ``results.md`` and ``chart.png``.

Pure functions of the JSON (plus matplotlib for the chart), so
``python -m bench --render DIR`` redraws a report without rerunning anything.

Figures are medians over the repeats; spread is (max - min) / median.  Each
contender's median is divided by HAProxy 1 thread's (the reference) and by
the direct connection's (the limit) for the same metric in the same run.
Ratios are plain quotients whatever the metric's direction, so for "lower is
better" metrics (latency, CPU per GiB, KiB per connection) a ratio below 1
is the good side; the targets table states the direction of each check.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE = "haproxy-1t"
DIRECT = "direct"


@dataclass(frozen=True)
class Target:
    """A goal from issue 5: ``contender``'s median over ``vs``'s, compared to ``bound``."""

    scenario: str
    metric: str
    op: str  # ">=" or "<="
    bound: float
    vs: str = REFERENCE
    contender: str = "l4lb"
    note: str = ""


TARGETS: tuple[Target, ...] = (
    *(
        t
        for s in ("bulk", "bulk-reverse", "bulk-8")
        for t in (
            Target(s, "gbps", ">=", 1.5),
            Target(s, "gbps", ">=", 0.9, vs="haproxy-splice"),
            Target(s, "cpu_s_per_gib", "<=", 0.5),
        )
    ),
    Target("connect-rate", "rps", ">=", 0.5),
    Target("get", "rps", ">=", 0.7),
    Target("get", "p99_ms", "<=", 1.5),
    Target("pipelined", "rps", ">=", 0.9),
    Target("idle-memory", "kib_per_conn", "<=", 1.0),
    Target("tls-handshakes", "handshakes_per_s", ">=", 0.9),
    Target("tls-bulk", "gbps", ">=", 0.8),
    Target("pgbench", "tps", ">=", 0.9),
    Target("pgbench-connect", "tps", ">=", 0.95),
    Target(
        "connect-rate",
        "rps",
        ">=",
        1.0,
        vs="haproxy-2t",
        contender="l4lb-w2",
        note="workers = 2 vs HAProxy 2 threads",
    ),
    Target(
        "get",
        "rps",
        ">=",
        1.0,
        vs="haproxy-2t",
        contender="l4lb-w2",
        note="workers = 2 vs HAProxy 2 threads",
    ),
)

AHEAD_OF = ("portforward", "uvloop")


def medians(data: dict[str, Any]) -> dict[tuple[str, str, str], list[float]]:
    """(scenario, metric, contender) -> every value measured, in repeat order."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for sample in data["samples"]:
        for metric, value in (sample.get("metrics") or {}).items():
            key = (sample["scenario"], metric, sample["contender"])
            values.setdefault(key, []).append(float(value))
    return values


def summary(values: list[float]) -> tuple[float, float]:
    """Median and spread ((max - min) / median) of repeated measurements."""
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else 0.0
    return median, spread


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(
    values: dict[tuple[str, str, str], list[float]],
    scenario: str,
    metric: str,
    contender: str,
    vs: str,
) -> float | None:
    """Median of ``contender`` over median of ``vs``, None when either is missing."""
    mine = values.get((scenario, metric, contender))
    theirs = values.get((scenario, metric, vs))
    if not mine or not theirs:
        return None
    base = statistics.median(theirs)
    return statistics.median(mine) / base if base else None


def evaluate(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured ratio and ``met``/``missed``/``not measured``."""
    values = medians(data)
    ran = {s["name"] for s in data["scenarios"]}
    rows = []
    for t in TARGETS:
        if t.scenario not in ran:
            continue
        r = ratio(values, t.scenario, t.metric, t.contender, t.vs)
        if r is None:
            verdict = "not measured"
        else:
            verdict = (
                "met" if (r >= t.bound if t.op == ">=" else r <= t.bound) else "missed"
            )
        rows.append({**t.__dict__, "ratio": r, "verdict": verdict})
    metric_dirs = {
        (s["name"], m["key"]): m["higher_is_better"]
        for s in data["scenarios"]
        for m in s["metrics"]
    }
    for scenario in data["scenarios"]:
        primary = scenario["metrics"][0]
        for other in AHEAD_OF:
            r = ratio(values, scenario["name"], primary["key"], "l4lb", other)
            higher = metric_dirs[(scenario["name"], primary["key"])]
            if r is None:
                verdict = "not measured"
            else:
                verdict = "met" if (r > 1.0 if higher else r < 1.0) else "missed"
            rows.append(
                {
                    "scenario": scenario["name"],
                    "metric": primary["key"],
                    "op": ">" if higher else "<",
                    "bound": 1.0,
                    "vs": other,
                    "contender": "l4lb",
                    "note": "ahead of every other Python option",
                    "ratio": r,
                    "verdict": verdict,
                }
            )
    return rows


def contenders_in(data: dict[str, Any]) -> list[str]:
    """Contenders that produced at least one figure, in report order."""
    measured = {s["contender"] for s in data["samples"] if s.get("metrics")}
    return [c["name"] for c in data["contenders"] if c["name"] in measured]


Row = dict[str, Any]


def _table(
    data: dict[str, Any],
    columns: list[str],
    heading: Callable[[Row, Row], tuple[str, str]],
    cells: Callable[[Row, Row], list[str]],
) -> list[str]:
    """A scenario x metric Markdown table, one column per contender.

    The figures and the ratios tables differ only in their row headings and
    cells; the arrow says which way is better.
    """
    lines = [
        "| scenario | metric | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for scenario in data["scenarios"]:
        for metric in scenario["metrics"]:
            where, what = heading(scenario, metric)
            arrow = "↑" if metric["higher_is_better"] else "↓"
            row = " | ".join(cells(scenario, metric))
            lines.append(f"| {where} | {what} {arrow} | {row} |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    meta = data["meta"]
    values = medians(data)
    names = contenders_in(data)
    labels = {c["name"]: c["label"] for c in data["contenders"]}
    out = [
        "# l4lb benchmark results",
        "",
        f"- **Date:** {meta['date']}",
        f"- **Machine:** {meta['machine']['nproc']} CPUs, {meta['machine']['cpu']},"
        f" Linux {meta['machine']['kernel']} (client, proxy and backends share it)",
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- **Run:** {meta['repeats']} interleaved repeat(s), {meta['duration']:g} s per"
        f" measurement, {meta['idle_connections']} idle connections held;"
        f" command `{meta['command']}`",
    ]
    if meta.get("l4lb_config_extra"):
        out.append(f"- **l4lb config extra:** `{meta['l4lb_config_extra']!s}`")
    out += [
        "",
        "![Each contender's median as a ratio to HAProxy with 1 thread](chart.png)",
        "",
        "Medians of the repeats, with the spread ((max - min) / median) in",
        "parentheses. Only ratios inside one run mean anything on a shared machine.",
        "",
        "## Figures",
        "",
    ]

    def figure(scenario: dict[str, Any], metric: dict[str, Any], name: str) -> str:
        vals = values.get((scenario["name"], metric["key"], name))
        if not vals:
            return "n/a"
        median, spread = summary(vals)
        return _fmt(median) + (f" ({spread:.0%})" if len(vals) > 1 else "")

    def ratios(scenario: dict[str, Any], metric: dict[str, Any], name: str) -> str:
        parts = []
        for vs in (REFERENCE, DIRECT):
            r = ratio(values, scenario["name"], metric["key"], name, vs)
            parts.append(f"{r:.2f}" if r is not None else "n/a")
        return " / ".join(parts) if any(p != "n/a" for p in parts) else "n/a"

    out += _table(
        data,
        [labels[n] for n in names],
        lambda s, m: (s["title"], f"{m['label']} ({m['unit']})"),
        lambda s, m: [figure(s, m, n) for n in names],
    )
    out += [
        "",
        "## Ratios",
        "",
        f"Each cell: median / {labels.get(REFERENCE, REFERENCE)}'s median,"
        f" then median / {DIRECT}'s median. ↑ metrics: higher is better;"
        " ↓ metrics (latency, CPU, memory): lower is better.",
        "",
    ]
    out += _table(
        data,
        [labels[n] for n in names],
        lambda s, m: (s["name"], m["key"]),
        lambda s, m: [ratios(s, m, n) for n in names],
    )
    out += [
        "",
        "## Targets (issue 5)",
        "",
        "| scenario | metric | contender | vs | target | measured | verdict |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for row in evaluate(data):
        measured = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        target = f"{row['op']} {row['bound']:g}"
        note = f" ({row['note']})" if row["note"] else ""
        out.append(
            f"| {row['scenario']} | {row['metric']} | {row['contender']} | {row['vs']} |"
            f" {target} | {measured} | {row['verdict']}{note} |"
        )
    skipped = [c for c in data["contenders"] if c.get("status") != "ok"]
    problems = data.get("problems", [])
    if skipped or problems:
        out += ["", "## Skipped and failed", ""]
        for c in skipped:
            out.append(f"- contender **{c['name']}**: {c['status']}")
        for p in problems:
            out.append(f"- {p}")
    out += [
        "",
        "## How each figure is measured",
        "",
        "- Bulk: `iperf3 -J`, receiver-side Gbit/s; proxy CPU s/GiB is utime+stime of",
        "  every process of the contender (from `/proc/PID/stat`) over the bytes received.",
        "- New connections/s: `redis-benchmark -k 0 -c 32 -t ping_inline` (a new",
        "  connection per request). Small requests: `redis-benchmark -k 1 -c 50 -t get`",
        "  (rps, p50/p99 from `--csv`). Pipelined: same with `-P 32`.",
        "- Idle memory: a fresh contender instance, 20 warm-up connections, then N",
        "  connections that each made one PING/PONG round trip are held open; RSS of",
        "  all the contender's processes after minus before, divided by N.",
        "- TLS handshakes/s: `openssl s_time -new` (full handshake each time, ECDSA",
        "  P-256 certificate generated for the run), connections over wall-clock time.",
        "- TLS bulk: a Python `ssl` client (OpenSSL underneath) sending 256 KiB",
        "  writes to a discard server behind the TLS listener; bytes sent / time.",
        "- pgbench: `pgbench -S -c 8 -j 2` on a scratch database (scale 1), with and",
        "  without `-C` (new connection per transaction).",
        "",
    ]
    return "\n".join(out)


def chart(data: dict[str, Any], path: Path) -> bool:
    """Bars of each contender's ratio to HAProxy (1 thread), one panel per metric.

    Returns False (and draws nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    values = medians(data)
    names = [n for n in contenders_in(data) if n != DIRECT] + (
        [DIRECT] if DIRECT in contenders_in(data) else []
    )
    panels = [
        (s, m)
        for s in data["scenarios"]
        for m in s["metrics"]
        if any((s["name"], m["key"], n) in values for n in names)
    ]
    if not panels:
        return False
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(
        rows, columns, figsize=(5.2 * columns, 2.9 * rows), squeeze=False
    )
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    for ax, (scenario, metric) in zip(axes.flat, panels, strict=False):
        shown, heights, lows, highs = [], [], [], []
        ref = values.get((scenario["name"], metric["key"], REFERENCE))
        base = statistics.median(ref) if ref else None
        for name in names:
            vals = values.get((scenario["name"], metric["key"], name))
            if not vals:
                continue
            median = statistics.median(vals)
            scale = base if base else 1.0
            shown.append(name)
            heights.append(median / scale)
            lows.append((median - min(vals)) / scale)
            highs.append((max(vals) - median) / scale)
        bars = ax.barh(
            range(len(shown)),
            heights,
            xerr=[lows, highs],
            color=[colors[n] for n in shown],
            capsize=2,
        )
        ax.bar_label(bars, fmt="%.2f" if base else "%.3g", fontsize=6, padding=2)
        ax.margins(x=0.12)
        ax.set_yticks(range(len(shown)), shown, fontsize=7)
        ax.invert_yaxis()
        if base:
            ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        arrow = "higher is better" if metric["higher_is_better"] else "lower is better"
        unit = "x HAProxy 1t" if base else metric["unit"]
        ax.set_title(
            f"{scenario['name']}: {metric['label']}\n({unit}, {arrow})", fontsize=8
        )
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"l4lb benchmark, {data['meta']['date']} (medians, bars = min..max)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(directory: Path) -> list[Path]:
    """Write ``results.md`` and ``chart.png`` from ``results.json`` in ``directory``."""
    data = json.loads((directory / "results.json").read_text())
    written = [directory / "results.md"]
    written[0].write_text(markdown(data))
    if chart(data, directory / "chart.png"):
        written.append(directory / "chart.png")
    return written
