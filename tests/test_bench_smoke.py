"""The benchmark keeps working: its parsers, its generated configs, its report.

Benchmarks are never pass/fail on speed.  These tests check the parsers on
captured real output, that each generated config is accepted by the program
it is for, that the report renders from a ``results.json``, and (smoke) that
``python -m bench --quick`` runs end to end on two cheap scenarios.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bench import cli, parsers, report
from bench.contenders import (
    L4LB,
    Contender,
    Direct,
    HAProxy,
    Nginx,
    Settings,
    deep_merge,
    toml_dumps,
)
from bench.env import find_tool, nginx_stream_module
from bench.procs import Process, free_port
from l4lb.config import parse_config

DATA = Path(__file__).parent / "data" / "bench"
ROOT = Path(__file__).parent.parent


class TestParsers:
    def test_redis_benchmark_csv_get(self) -> None:
        """The GET row of redis-benchmark 7's --csv gives rps and latency percentiles."""
        rows = parsers.redis_benchmark_csv(
            (DATA / "redis-benchmark-get.csv").read_text()
        )
        assert rows["GET"]["rps"] == 19627.08
        assert rows["GET"]["p50_latency_ms"] == 2.471
        assert rows["GET"]["p99_latency_ms"] == 11.039

    def test_redis_benchmark_csv_ping_inline(self) -> None:
        """The -k 0 run's row is keyed PING_INLINE."""
        text = (DATA / "redis-benchmark-k0.csv").read_text()
        assert parsers.redis_benchmark_csv(text)["PING_INLINE"]["rps"] == 4098.36

    def test_redis_benchmark_ignores_other_lines(self) -> None:
        """Warnings printed around the CSV do not disturb it."""
        text = (
            "WARNING: Keepalive disabled.\n"
            + (DATA / "redis-benchmark-k0.csv").read_text()
        )
        assert "PING_INLINE" in parsers.redis_benchmark_csv(text)

    @pytest.mark.parametrize(
        "text", ["", "Error: Connection refused\n", '"test","rps"\n']
    )
    def test_redis_benchmark_without_result(self, text: str) -> None:
        """Output without a result row is an error, not a zero."""
        with pytest.raises(parsers.ParseError):
            parsers.redis_benchmark_csv(text)

    def test_iperf3_json(self) -> None:
        """iperf3 -J: the receiver's sum is the figure (bits/s and bytes)."""
        result = parsers.iperf3_json((DATA / "iperf3.json").read_text())
        assert result["bits_per_second"] == pytest.approx(40862568434.22993)
        assert result["bytes"] == 5124784128

    @pytest.mark.parametrize(
        "text",
        [
            '{"start": {}, "error": "unable to connect to server: Connection refused"}',
            '{"start": {}, "end": {}}',
            "iperf3: error",
        ],
    )
    def test_iperf3_failures(self, text: str) -> None:
        """An iperf3 error, a missing sum or non-JSON output raises ParseError."""
        with pytest.raises(parsers.ParseError):
            parsers.iperf3_json(text)

    @pytest.mark.parametrize(
        ("name", "tps"),
        [("pgbench-S.txt", 14374.314538), ("pgbench-S-C.txt", 126.591417)],
    )
    def test_pgbench(self, name: str, tps: float) -> None:
        """pgbench 15's tps line, with and without -C."""
        assert parsers.pgbench((DATA / name).read_text())["tps"] == tps

    def test_pgbench_failed_transactions(self) -> None:
        """A run with failed transactions is not a result."""
        text = (
            (DATA / "pgbench-S.txt")
            .read_text()
            .replace("failed transactions: 0", "failed transactions: 3")
        )
        with pytest.raises(parsers.ParseError):
            parsers.pgbench(text)

    def test_s_time(self) -> None:
        """openssl s_time: the count of connections made (the rate is timed by us)."""
        assert parsers.s_time_connections((DATA / "s_time.txt").read_text()) == 216

    def test_s_time_without_connections(self) -> None:
        """s_time output without its summary line raises ParseError."""
        with pytest.raises(parsers.ParseError):
            parsers.s_time_connections("ERROR\nconnect:errno=111\n")


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        workdir=tmp_path,
        backends={
            "iperf": ("127.0.0.1", 5201),
            "redis": ("127.0.0.1", 6379),
            "pg": ("127.0.0.1", 5432),
        },
    )


class TestConfigs:
    def test_toml_round_trip(self) -> None:
        """The TOML writer's output reads back to the same data."""
        data = {
            "global": {"log_level": "warning", "n": 3, "x": 0.5, "on": True},
            "pool": {"p": {"server": [{"address": "a:1"}, {"address": "b:2"}]}},
            "frontend": {"f": {"tls": {"certificates": [{"cert": 'c"1', "key": "k"}]}}},
            "list": ["a", "b"],
        }
        assert tomllib.loads(toml_dumps(data)) == data

    def test_deep_merge(self) -> None:
        """Extra config lays its keys over the generated tables without dropping others."""
        merged = deep_merge(
            {"global": {"log_level": "warning"}, "pool": {}},
            {"global": {"splice": False}},
        )
        assert merged == {
            "global": {"log_level": "warning", "splice": False},
            "pool": {},
        }

    def test_l4lb_config_is_valid(self, tmp_path: Path) -> None:
        """The generated l4lb config passes l4lb's own parser."""
        ports = {"iperf": 7001, "redis": 7002, "pg": 7003}
        text = toml_dumps(L4LB().config(_settings(tmp_path), ports, tls=False))
        config = parse_config(text, "<bench>")
        assert {f.name for f in config.frontends} == {"iperf", "redis", "pg"}
        assert config.global_.log_level == "warning"

    def test_l4lb_config_extra(self, tmp_path: Path) -> None:
        """--l4lb-config-extra is merged into [global]."""
        settings = _settings(tmp_path)
        settings.l4lb_extra = '[global]\nlog_format = "console"\n'
        text = toml_dumps(L4LB().config(settings, {"redis": 7002}, tls=False))
        config = parse_config(text, "<bench>")
        assert config.global_.log_format == "console"
        assert config.global_.log_level == "warning"

    def test_l4lb_tls_config(self, tmp_path: Path) -> None:
        """TLS mode follows the issue 4 contract: [frontend.X.tls] certificates = [{cert, key}]."""
        settings = _settings(tmp_path)
        settings.cert, settings.key = tmp_path / "c.pem", tmp_path / "k.pem"
        config = L4LB().config(settings, {"redis": 7002}, tls=True)
        assert config["frontend"]["redis"]["tls"] == {
            "certificates": [{"cert": str(settings.cert), "key": str(settings.key)}]
        }
        assert tomllib.loads(toml_dumps(config)) == config

    @pytest.mark.skipif(not nginx_stream_module(), reason="no nginx stream module")
    @pytest.mark.parametrize("tls", [False, True])
    def test_nginx_config_is_valid(self, tmp_path: Path, tls: bool) -> None:
        """nginx -t accepts the generated stream config."""
        settings = _settings(tmp_path)
        if tls:
            from bench.backends import certificate

            settings.cert, settings.key = certificate(tmp_path)
        path = tmp_path / "nginx.conf"
        path.write_text(Nginx().config(settings, tmp_path, {"redis": 7002}, tls))
        out = subprocess.run(
            [
                find_tool("nginx"),
                "-t",
                "-p",
                str(tmp_path),
                "-e",
                str(tmp_path / "e.log"),
                "-c",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    @pytest.mark.skipif(not find_tool("haproxy"), reason="haproxy not installed")
    @pytest.mark.parametrize("splice", [False, True])
    def test_haproxy_config_is_valid(self, tmp_path: Path, splice: bool) -> None:
        """haproxy -c accepts the generated config."""
        path = tmp_path / "haproxy.cfg"
        contender = HAProxy("h", threads=2, splice=splice)
        path.write_text(
            contender.config(_settings(tmp_path), {"redis": 7002}, tls=False)
        )
        out = subprocess.run(
            [find_tool("haproxy"), "-c", "-f", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr


def _results(values: dict[str, list[float]]) -> dict:
    samples = [
        {"scenario": "get", "contender": name, "repeat": i, "metrics": {"rps": v}}
        for name, vs in values.items()
        for i, v in enumerate(vs)
    ]
    return {
        "meta": {
            "date": "2026-01-01 00:00 UTC",
            "machine": {"nproc": "2", "cpu": "cpu", "kernel": "6"},
            "versions": {"l4lb": "x"},
            "repeats": 3,
            "duration": 2.0,
            "idle_connections": 5000,
            "command": "python -m bench",
        },
        "scenarios": [
            {
                "name": "get",
                "title": "small requests",
                "metrics": [
                    {
                        "key": "rps",
                        "label": "requests/s",
                        "unit": "req/s",
                        "higher_is_better": True,
                    }
                ],
            }
        ],
        "contenders": [
            {"name": n, "label": n, "status": "ok"}
            for n in ("direct", "haproxy-1t", "l4lb", "uvloop")
        ]
        + [{"name": "nginx", "label": "nginx", "status": "nginx not found"}],
        "samples": samples,
        "problems": ["scenario pgbench skipped: pgbench not found"],
    }


class TestReport:
    def test_summary(self) -> None:
        """Median and (max - min) / median spread."""
        assert report.summary([8.0, 10.0, 12.0]) == (10.0, 0.4)

    def test_targets(self) -> None:
        """Ratios of medians decide met/missed; absent contenders are 'not measured'."""
        data = _results(
            {
                "direct": [40.0, 44.0, 42.0],
                "haproxy-1t": [20.0, 21.0, 19.0],
                "l4lb": [15.0, 14.0, 13.0],
                "uvloop": [16.0, 17.0, 18.0],
            }
        )
        rows = {
            (r["metric"], r["contender"], r["vs"]): r for r in report.evaluate(data)
        }
        assert rows[("rps", "l4lb", "haproxy-1t")]["ratio"] == pytest.approx(0.7)
        assert rows[("rps", "l4lb", "haproxy-1t")]["verdict"] == "met"
        assert rows[("p99_ms", "l4lb", "haproxy-1t")]["verdict"] == "not measured"
        assert rows[("rps", "l4lb", "uvloop")]["verdict"] == "missed"
        assert rows[("rps", "l4lb", "portforward")]["verdict"] == "not measured"
        assert rows[("rps", "l4lb-w2", "haproxy-2t")]["verdict"] == "not measured"
        # Targets of scenarios not in the run are left out.
        assert {r["scenario"] for r in report.evaluate(data)} == {"get"}

    def test_render(self, tmp_path: Path) -> None:
        """--render writes results.md (figures, ratios, targets, skips) and chart.png."""
        data = _results(
            {"direct": [40.0], "haproxy-1t": [20.0], "l4lb": [10.0], "uvloop": [30.0]}
        )
        (tmp_path / "results.json").write_text(json.dumps(data))
        written = report.render(tmp_path)
        text = (tmp_path / "results.md").read_text()
        assert (
            "| small requests | requests/s (req/s) ↑ | 40.0 | 20.0 | 10.0 | 30.0 |"
            in text
        )
        assert (
            "| get | rps ↑ | 2.00 / 1.00 | 1.00 / 0.50 | 0.50 / 0.25 | 1.50 / 0.75 |"
            in text
        )
        assert "contender **nginx**: nginx not found" in text
        assert "pgbench not found" in text
        pytest.importorskip("matplotlib")
        assert tmp_path / "chart.png" in written
        assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.e2e
class TestUvloopProxy:
    def test_forwards_and_half_closes(self, tmp_path: Path) -> None:
        """The uvloop anchor carries bytes both ways and passes the client's FIN on."""
        pytest.importorskip("uvloop")
        with socket.create_server(("127.0.0.1", 0)) as backend:
            port = free_port()
            proxy = Process(
                "uvloop",
                [
                    sys.executable,
                    "-m",
                    "bench.uvloop_proxy",
                    f"{port}:127.0.0.1:{backend.getsockname()[1]}",
                ],
                tmp_path,
            )
            proxy.start()
            try:
                proxy.wait_listening([port])
                with socket.create_connection(
                    ("127.0.0.1", port), timeout=10
                ) as client:
                    client.sendall(b"x" * 100_000)
                    client.shutdown(socket.SHUT_WR)
                    backend.settimeout(10)
                    server, _ = backend.accept()
                    with server:
                        server.settimeout(10)
                        received = b""
                        while chunk := server.recv(65536):  # ends at the client's FIN
                            received += chunk
                        assert received == b"x" * 100_000
                        server.sendall(b"reply")
                        server.shutdown(socket.SHUT_WR)
                        reply = b""
                        while chunk := client.recv(65536):
                            reply += chunk
                        assert reply == b"reply"
            finally:
                proxy.stop()
            assert proxy.proc is not None and proxy.proc.returncode is not None


class Missing(Contender):
    """A contender whose program is not installed."""

    name = label = "missing"

    def unavailable(self) -> str | None:
        return "missing-proxy not found (Debian package: missing-proxy)"


class Broken(Contender):
    """A contender that exits at once instead of listening."""

    name = label = "broken"

    def processes(self, settings, directory, ports, tls):  # type: ignore[no-untyped-def]
        argv = [sys.executable, "-c", "import sys; sys.exit('bad config line 3')"]
        return [Process("broken", argv, directory)]


@pytest.mark.e2e
class TestSkips:
    def test_missing_and_broken_contenders(self, tmp_path: Path) -> None:
        """A missing or failing contender is reported and skipped; the others run."""
        if not find_tool("redis-server") or not find_tool("redis-benchmark"):
            pytest.skip("redis not installed")
        args = cli.parse_args(["--quick", "--duration", "0.2", "--only", "get"])
        args.contender_list = [Direct(), Missing(), Broken()]
        data = cli.Run(args, tmp_path).execute()
        status = {c["name"]: c["status"] for c in data["contenders"]}
        assert status["direct"] == "ok"
        assert (
            status["missing"]
            == "missing-proxy not found (Debian package: missing-proxy)"
        )
        assert "bad config line 3" in status["broken"]
        assert [(s["contender"], "rps" in s["metrics"]) for s in data["samples"]] == [
            ("direct", True)
        ]
        assert "contender **broken**" in report.markdown(data)


@pytest.mark.e2e
class TestSmoke:
    def test_quick_run(self, tmp_path: Path) -> None:
        """python -m bench --quick on two cheap scenarios writes a report that parses."""
        for tool in ("redis-server", "redis-benchmark", "iperf3"):
            if not find_tool(tool):
                pytest.skip(f"{tool} not installed")
        contenders = ["direct", "l4lb"] + (
            ["haproxy-1t"] if find_tool("haproxy") else []
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "--quick",
                "--duration",
                "0.3",
                "--only",
                "bulk,get",
                "--contenders",
                ",".join(contenders),
                "--out",
                str(tmp_path),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        data = json.loads((tmp_path / "results.json").read_text())
        assert data["problems"] == []
        measured = {
            (s["scenario"], s["contender"]) for s in data["samples"] if "metrics" in s
        }
        assert measured == {(s, c) for s in ("bulk", "get") for c in contenders}
        by_key = {
            (s["scenario"], s["contender"]): s["metrics"] for s in data["samples"]
        }
        assert by_key[("bulk", "l4lb")]["gbps"] > 0
        assert by_key[("bulk", "l4lb")]["cpu_s_per_gib"] > 0
        assert by_key[("get", "l4lb")]["rps"] > 0
        assert "## Targets (issue 5)" in (tmp_path / "results.md").read_text()
        if "matplotlib" in sys.modules or _has("matplotlib"):
            assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
