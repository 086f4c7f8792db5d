"""Deterministic per-connection cost and idle memory of l4lb (not a benchmark).

Wall-clock figures are noise on a shared machine, so this counts instead:

* ``calls``: run ``twistd -n l4lb`` under cProfile in front of a throwaway
  redis-server, drive a fixed number of connections through it with
  ``redis-benchmark`` (``-k 0``: one new connection per PING, or ``-k 1``
  GETs), and report Python function calls, ``callLater``s, Deferreds and
  epoll registrations per connection (or per request), plus the top functions
  by call count. Saves the ``.prof`` file for snakeviz/gprof2dot.
* ``idle``: hold N proxied connections open (each has done one PING round
  trip) and report l4lb's RSS growth per connection, in KiB.

Usage (from the repository root, with l4lb installed in this interpreter):

    python docs/benchmarks/profiles/conn_cost.py calls --splice true -n 4000
    python docs/benchmarks/profiles/conn_cost.py idle --splice true -n 2000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOLL_CTL = "of 'select.epoll' objects"  # register/modify/unregister (and poll)
TWISTD = Path(sys.executable).parent / "twistd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


@contextlib.contextmanager
def redis(workdir: Path) -> Iterator[int]:
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--save", "", "--appendonly", "no", "--maxclients", "20000"]
    proc = subprocess.Popen(
        args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def l4lb(
    workdir: Path,
    backend: int,
    splice: str,
    profile: Path | None = None,
    flame: Path | None = None,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    config = workdir / "l4lb.toml"
    splice_line = "" if splice == "omit" else f"splice = {splice}\n"
    config.write_text(
        f'[global]\n{splice_line}log_level = "warning"\n'
        f'[frontend.f]\nlisten = "127.0.0.1:{port}"\npool = "p"\n'
        f'[pool.p]\n[[pool.p.server]]\naddress = "127.0.0.1:{backend}"\n'
    )
    args = [str(TWISTD), "-n", "--pidfile="]
    if profile is not None:
        args += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
    args += ["l4lb", "--config", str(config)]
    if flame is not None:  # sample with py-spy: a flame graph (timings, not counts)
        spy = ["py-spy", "record", "--format", "speedscope", "-o", str(flame)]
        args = [str(Path(sys.executable).parent / spy[0]), *spy[1:], "--", *args]
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, proc
    finally:
        target = proc.pid
        if flame is not None:  # stop twistd itself; py-spy then writes its file
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            target = int(children.read_text().split()[0])
        os.kill(target, signal.SIGTERM)
        proc.wait(60)


def calls(args: argparse.Namespace) -> None:
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prof = HERE / f"{args.name}.prof"
        flame = HERE / f"{args.name}.speedscope.json" if args.flame else None
        with (
            redis(workdir) as backend,
            l4lb(workdir, backend, args.splice, None if flame else prof, flame) as (
                port,
                _,
            ),
        ):
            bench = ["redis-benchmark", "-p", str(port), "-n", str(n), "-q"]
            if args.keepalive:
                bench += ["-k", "1", "-c", "50", "-t", "get"]
            else:
                bench += ["-k", "0", "-c", "32", "-t", "ping_inline"]
            subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        if flame is not None:
            print(f"flame graph: {flame} (open at https://www.speedscope.app/)")
            return
        stats = pstats.Stats(str(prof))
    per = "request" if args.keepalive else "connection"
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(v[1] for v in rows.values())

    def count(name: str, file_part: str = "") -> int:
        return sum(v[1] for k, v in rows.items() if name in k[2] and file_part in k[0])

    out = [
        f"workload: {'GET -k 1 -c 50' if args.keepalive else 'PING -k 0 -c 32'},"
        f" n={n}, splice={args.splice}",
        f"python function calls per {per}: {total / n:.1f}",
        f"callLater per {per}: {count('callLater', 'base.py') / n:.2f}",
        f"Deferred.__init__ per {per}: {count('__init__', 'defer.py') / n:.2f}",
        f"epoll_ctl per {per}: {count(EPOLL_CTL) / n:.2f}",
        "top functions by calls per " + per + ":",
    ]
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:25]
    for (file, line, name), v in top:
        short = "/".join(file.split("/")[-2:])
        out.append(f"  {v[1] / n:7.2f}  {short}:{line}({name})")
    text = "\n".join(out)
    print(text)
    (HERE / f"{args.name}.txt").write_text(text + "\n")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise KeyError("VmRSS")


def idle(args: argparse.Namespace) -> None:
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with (
            redis(workdir) as backend,
            l4lb(workdir, backend, args.splice) as (
                port,
                proc,
            ),
        ):
            # Warm up: one connection through, so imports and pools exist.
            warm = socket.create_connection(("127.0.0.1", port))
            warm.sendall(b"PING\r\n")
            warm.recv(64)
            warm.close()
            time.sleep(0.5)
            before = rss_kib(proc.pid)
            sel = selectors.DefaultSelector()
            held = []
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"PING\r\n")
                held.append(s)
            for s in held:
                s.settimeout(30)
                assert s.recv(64) == b"+PONG\r\n"
            time.sleep(1.0)  # let l4lb settle (nothing moves)
            after = rss_kib(proc.pid)
            for s in held:
                s.close()
            sel.close()
    text = (
        f"idle: {n} connections held, splice={args.splice}:"
        f" RSS {before} KiB -> {after} KiB,"
        f" {(after - before) / n:.2f} KiB per connection"
    )
    print(text)
    with open(HERE / f"{args.name}.txt", "a") as f:
        f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["calls", "idle"])
    parser.add_argument(
        "--splice",
        choices=["true", "false", "omit"],
        default="true",
        help="omit: no splice key (for versions before it existed)",
    )
    parser.add_argument("-n", type=int, default=4000)
    parser.add_argument("--keepalive", action="store_true")
    parser.add_argument("--name", default="profile")
    parser.add_argument(
        "--flame", action="store_true", help="py-spy speedscope file, not cProfile"
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    (calls if args.mode == "calls" else idle)(args)


if __name__ == "__main__":
    main()
