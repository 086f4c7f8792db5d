"""Parsers for the output of the real clients the benchmark runs.

Pure functions of text, so they are unit-tested on captured samples
(``tests/test_bench_smoke.py``).  Each raises ``ParseError`` naming what it
could not find rather than returning a made-up zero.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any


class ParseError(ValueError):
    """The client's output did not have the figure we expected."""


def redis_benchmark_csv(text: str) -> dict[str, dict[str, float]]:
    """Rows of ``redis-benchmark --csv`` keyed by test name (``"GET"``, ...).

    redis-benchmark 7 prints one header line then one row per test:
    ``"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...``.
    Values are returned as floats keyed by the header names.
    """
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines or not lines[0].startswith('"test"'):
        raise ParseError("redis-benchmark --csv: no header line in output")
    rows: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row.pop("test")
        try:
            rows[name] = {key: float(value) for key, value in row.items()}
        except (TypeError, ValueError) as e:
            raise ParseError(f"redis-benchmark --csv: bad row for {name}: {e}") from e
    if not rows:
        raise ParseError("redis-benchmark --csv: header but no result row")
    return rows


def iperf3_json(text: str) -> dict[str, float]:
    """Receiver-side throughput of an ``iperf3 -J`` run.

    The receiver's figure (``end.sum_received``) counts only bytes that made it
    through, so it is the honest one for a proxy; with ``-P`` it is already
    summed over the streams.
    """
    try:
        data: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParseError(f"iperf3 -J: not JSON ({e})") from e
    if "error" in data:
        raise ParseError(f"iperf3 reported: {data['error']}")
    try:
        received = data["end"]["sum_received"]
        return {
            "bits_per_second": float(received["bits_per_second"]),
            "bytes": float(received["bytes"]),
            "seconds": float(received["seconds"]),
        }
    except (KeyError, TypeError) as e:
        raise ParseError(f"iperf3 -J: no end.sum_received ({e})") from e


_TPS = re.compile(
    r"^tps = ([0-9.]+) \((without initial connection time|including)", re.M
)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def pgbench(text: str) -> dict[str, float]:
    """Transactions per second (and mean latency) of a pgbench run.

    pgbench 15 prints ``tps = N (without initial connection time)``, or with
    ``-C`` ``tps = N (including reconnection times)``; either is the figure.
    """
    match = _TPS.search(text)
    if not match:
        raise ParseError("pgbench: no 'tps = ...' line in output")
    result = {"tps": float(match.group(1))}
    latency = _LATENCY.search(text)
    if latency:
        result["latency_ms"] = float(latency.group(1))
    failed = _FAILED.search(text)
    if failed and int(failed.group(1)):
        raise ParseError(f"pgbench: {failed.group(1)} failed transactions")
    return result


_S_TIME = re.compile(
    r"^(\d+) connections in ([0-9.]+)s; ([0-9.]+) connections/user sec", re.M
)


def s_time_connections(text: str) -> int:
    """How many TLS connections an ``openssl s_time`` run completed.

    s_time's own rates are per *user* CPU second of the client (the first
    line) or per whole real second (the second line, rounded to seconds), so
    the benchmark divides this count by its own wall-clock measurement.
    """
    match = _S_TIME.search(text)
    if not match:
        raise ParseError("openssl s_time: no 'N connections in Xs' line in output")
    return int(match.group(1))
