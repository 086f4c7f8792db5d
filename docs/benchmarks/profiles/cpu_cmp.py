"""CPU time per new connection and per kept-alive GET, for several proxies.

Starts one proxy at a time (``l4lb``, ``portforward`` for Twisted's
``twistd portforward``, ``uvloop`` for ``bench/uvloop_proxy.py``,
``haproxy`` with one thread) in front of a throwaway redis-server, drives
``redis-benchmark -k 0 -c 32`` (N connections) and ``-k 1 -c 50`` GETs
(10 N requests) through it, and divides the proxy's user+system CPU
(``/proc/PID/stat``) by the work done. CPU per unit of work depends much less
on other load than throughput does. Usage, from the repository root:

    N=10000 python docs/benchmarks/profiles/cpu_cmp.py l4lb portforward uvloop haproxy

Set ``PYTHONPATH`` to another tree to measure its l4lb with the same venv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))
import conn_cost  # noqa: E402
from cpu_per_conn import cpu_seconds  # noqa: E402

BIN = Path(sys.executable).parent
N = int(os.environ.get("N", "20000"))


def start(kind: str, backend: int, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    if kind == "l4lb":
        config = workdir / "l4lb.toml"
        config.write_text(
            f'[global]\nlog_level = "warning"\n[frontend.f]\n'
            f'listen = "127.0.0.1:{port}"\npool = "p"\n[pool.p]\n'
            f'[[pool.p.server]]\naddress = "127.0.0.1:{backend}"\n'
        )
        argv = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "l4lb",
            "--config",
            str(config),
        ]
        return subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL)
    if kind == "portforward":
        argv = [str(BIN / "twistd"), "-n", "--pidfile=", "portforward"]
        argv += ["-p", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
        argv += ["-d", str(backend), "-h", "127.0.0.1"]
        return subprocess.Popen(
            argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    if kind == "uvloop":
        argv = [
            sys.executable,
            "-m",
            "bench.uvloop_proxy",
            f"{port}:127.0.0.1:{backend}",
        ]
        return subprocess.Popen(argv, cwd=ROOT)
    if kind == "haproxy":
        config = workdir / "haproxy.cfg"
        config.write_text(
            "global\n nbthread 1\n maxconn 9000\ndefaults\n mode tcp\n"
            " timeout connect 5s\n timeout client 60s\n timeout server 60s\n"
            f"frontend f\n bind 127.0.0.1:{port}\n default_backend b\n"
            f"backend b\n server s1 127.0.0.1:{backend}\n"
        )
        return subprocess.Popen(["haproxy", "-db", "-f", str(config)], cwd=workdir)
    raise SystemExit(f"unknown proxy {kind!r}")


def main() -> None:
    workloads = (
        ("connection", ["-k", "0", "-c", "32", "-t", "ping_inline"], N),
        ("GET", ["-k", "1", "-c", "50", "-t", "get"], 10 * N),
    )
    for kind in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            with conn_cost.redis(workdir) as backend:
                port = conn_cost.free_port()
                proc = start(kind, backend, port, workdir)
                try:
                    conn_cost.wait_port(port)
                    for label, flags, n in workloads:
                        cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
                        command = ["redis-benchmark", "-p", str(port), *flags]
                        subprocess.run(
                            [*command, "-n", str(n), "--csv"],
                            capture_output=True,
                            check=True,
                        )
                        wall = time.monotonic() - started
                        used = cpu_seconds(proc.pid) - cpu_before
                        print(
                            f"{kind:12} {used / n * 1e6:7.1f} us CPU per {label}"
                            f" ({n / wall:8.0f}/s, busy {used / wall:.0%})",
                            flush=True,
                        )
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)


if __name__ == "__main__":
    main()
