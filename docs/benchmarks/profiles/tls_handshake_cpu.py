"""CPU per TLS handshake (``openssl s_time -new``): l4lb trees beside HAProxy.

Throughput on this shared 2-core machine is noise, so this reports the
proxy's own CPU time per handshake (utime + stime from /proc/PID/stat) over
each ``s_time`` run, with every contender started once and run in turn
(A B C A B C ...) in the same minutes, plus how many backend connections each
opened per handshake. Both terminate TLS with the same throwaway ECDSA P-256
certificate in front of a throwaway redis-server; HAProxy has the bench's
config (``bind ... ssl crt``, one thread).

Usage (from anywhere; ``l4lb:PATH`` runs twistd with PYTHONPATH=PATH, so a
``git archive`` of an older commit can be compared with the worktree):

    python docs/benchmarks/profiles/tls_handshake_cpu.py -r 6 -t 4 \\
        haproxy=haproxy before=l4lb:/tmp/before after=l4lb:$PWD
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import conn_cost  # noqa: E402
from cpu_per_conn import cpu_seconds  # noqa: E402

BIN = Path(sys.executable).parent
REQ = ("openssl", "req", "-new", "-x509", "-days", "2", "-subj", "/CN=localhost")


def certificate(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key],
        check=True,
    )
    subprocess.run(
        [*REQ, "-key", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    return cert, key


def start(
    kind: str, arg: str, backend: int, port: int, wd: Path, cert: Path, key: Path
) -> subprocess.Popen[bytes]:
    if kind == "l4lb":
        config = wd / f"l4lb-{port}.toml"
        config.write_text(
            '[global]\nlog_level = "warning"\nmax_connections = 100000\n'
            f'[frontend.f]\nlisten = "127.0.0.1:{port}"\npool = "p"\n'
            f'[frontend.f.tls]\ncertificates = [{{cert = "{cert}", key = "{key}"}}]\n'
            '[pool.p]\nbalance = "least-connections"\n'
            f'[[pool.p.server]]\naddress = "127.0.0.1:{backend}"\nname = "redis"\n'
        )
        env = dict(os.environ, PYTHONPATH=arg)
        argv = [str(BIN / "twistd"), "-n", "--pidfile=", "l4lb", "--config"]
        return subprocess.Popen(
            [*argv, str(config)], cwd=wd, env=env, stdout=subprocess.DEVNULL
        )
    if kind == "haproxy":
        combined = wd / "haproxy-cert.pem"
        combined.write_text(cert.read_text() + key.read_text())
        config = wd / f"haproxy-{port}.cfg"
        config.write_text(
            "global\n    maxconn 4000\n    nbthread 1\n"
            "defaults\n    mode tcp\n    balance leastconn\n    maxconn 4000\n"
            "    timeout connect 3s\n    timeout client 1h\n    timeout server 1h\n"
            f"listen redis\n    bind 127.0.0.1:{port} ssl crt {combined}\n"
            f"    server redis 127.0.0.1:{backend}\n"
        )
        return subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)], cwd=wd, stderr=subprocess.DEVNULL
        )
    raise SystemExit(f"unknown kind {kind!r}")


def backend_connections(port: int) -> int:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "stats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":")[1])
    raise KeyError("total_connections_received")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--rounds", type=int, default=6)
    parser.add_argument("-t", "--time", type=int, default=4, help="s_time seconds")
    parser.add_argument("contenders", nargs="+", help="NAME=haproxy | NAME=l4lb:PATH")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        cert, key = certificate(wd)
        with conn_cost.redis(wd) as backend:
            procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
            try:
                for spec in args.contenders:
                    name, _, rest = spec.partition("=")
                    kind, _, arg = rest.partition(":")
                    port = conn_cost.free_port()
                    procs[name] = (
                        start(kind, arg, backend, port, wd, cert, key),
                        port,
                    )
                for _, port in procs.values():
                    conn_cost.wait_port(port)
                rows: dict[str, list[tuple[float, float, float]]] = {
                    n: [] for n in procs
                }
                s_time = ["openssl", "s_time", "-new", "-time", str(args.time)]
                s_time.append("-connect")
                for r in range(args.rounds):
                    for name, (proc, port) in procs.items():
                        b0 = backend_connections(backend)
                        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                        out = subprocess.run(
                            [*s_time, f"127.0.0.1:{port}"],
                            capture_output=True,
                            text=True,
                            check=False,
                        ).stdout
                        wall = time.monotonic() - t0
                        used = cpu_seconds(proc.pid) - c0
                        time.sleep(0.2)  # let the last closes reach the backend
                        opened = backend_connections(backend) - b0 - 1
                        n = max(
                            (
                                int(line.split()[0])
                                for line in out.splitlines()
                                if "connections in" in line and "real" in line
                            ),
                            default=0,
                        )
                        n = max(n, 1)
                        row = (used / n * 1e6, n / wall, opened / n)
                        rows[name].append(row)
                        print(
                            f"round {r} {name:10} {row[0]:6.0f} us/handshake"
                            f" {row[1]:6.0f} handshakes/s"
                            f" {row[2]:5.2f} server connections/handshake",
                            flush=True,
                        )
                print("medians:")
                for name, got in rows.items():
                    cpu = [g[0] for g in got]
                    print(
                        f"  {name:10} {statistics.median(cpu):6.0f} us/handshake"
                        f" (min {min(cpu):.0f}, max {max(cpu):.0f})"
                        f" {statistics.median(g[1] for g in got):6.0f} handshakes/s"
                        f" {statistics.median(g[2] for g in got):5.2f}"
                        " server connections/handshake"
                    )
            finally:
                for proc, _ in procs.values():
                    proc.send_signal(signal.SIGTERM)
                for proc, _ in procs.values():
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()


if __name__ == "__main__":
    main()
