"""Instructions l4lb executes per request, under callgrind (not a benchmark).

CPU time per request moves by 2x with the other load on a shared 2-core
machine; instruction counts do not. This runs ``twistd -n l4lb`` under
``valgrind --tool=callgrind`` with instrumentation off, warms it up, turns
instrumentation on only while a fixed workload runs, and prints l4lb's
instructions (callgrind ``Ir``, user space only) per unit of work, and the
reactor passes (``epoll_wait`` calls, counted with ``perf stat`` on the
syscall tracepoint when perf can) per unit.

One client (``-c 1``) makes the figures deterministic: every pass handles
exactly one event, so per-pass and per-event costs do not depend on how
events happened to batch. The workloads:

* ``pg1``: ``pgbench -S -c 1`` transactions (PostgreSQL at 127.0.0.1:5432,
  trust auth, ``--database`` initialised with ``pgbench -i``);
* ``pgC1``: the same with ``-C``, a new connection per transaction;
* ``pg``: ``pgbench -S -c 8 -j 2``, as the benchmark (batching varies);
* ``get1`` / ``p32``: redis-benchmark GET ``-c 1`` / ``-c 50 -P 32`` against a
  throwaway redis-server.

Usage, from the repository root (valgrind, and l4lb in this interpreter):

    python docs/benchmarks/profiles/insn_cost.py pg1 --database bench -n 2000
    PYTHONPATH=/path/to/other/checkout python ... # the same for another tree
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conn_cost


def workload(name: str, port: int, n: int, database: str) -> int:
    """Run ``n`` units of ``name`` through l4lb at ``port``; the number of units."""
    if name.startswith("pg"):
        clients = ["-c", "8", "-j", "2"] if name == "pg" else ["-c", "1", "-j", "1"]
        extra = ["-C"] if name == "pgC1" else []
        pgbench = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        pgbench += ["-n", "-S", *clients, *extra, "-t", str(n), database]
        subprocess.run(pgbench, check=True, capture_output=True)
        return n * (8 if name == "pg" else 1)
    flags = {"get1": ["-c", "1"], "p32": ["-c", "50", "-P", "32"]}[name]
    bench = ["redis-benchmark", "-p", str(port), *flags, "-t", "get", "-n", str(n)]
    subprocess.run([*bench, "-q"], check=True, capture_output=True)
    return n


def count_polls(pid: int) -> subprocess.Popen[str] | None:
    """``perf stat`` on l4lb's epoll_wait calls, or None without perf."""
    if shutil.which("perf") is None:
        return None
    event = "syscalls:sys_enter_epoll_wait"
    args = ["perf", "stat", "-x,", "-e", event, "-p", str(pid)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    return proc


def polls(proc: subprocess.Popen[str] | None) -> int | None:
    if proc is None:
        return None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    counts = [line.split(",")[0] for line in err.splitlines()]
    return next((int(c) for c in counts if c.isdigit()), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["pg1", "pgC1", "pg", "get1", "p32"])
    parser.add_argument("-n", type=int, default=2000, help="units (per client for pg)")
    parser.add_argument("--database", default="postgres")
    parser.add_argument("--splice", choices=["true", "false"], default="true")
    args = parser.parse_args()
    python = Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with conn_cost.redis(workdir) as redis_port:
            port = conn_cost.free_port()
            backend = 5432 if args.workload.startswith("pg") else redis_port
            config = workdir / "l4lb.toml"
            config.write_text(
                f'[global]\nsplice = {args.splice}\nlog_level = "warning"\n'
                f'[frontend.f]\nlisten = "127.0.0.1:{port}"\npool = "p"\n'
                f'[pool.p]\n[[pool.p.server]]\naddress = "127.0.0.1:{backend}"\n'
            )
            out = workdir / "callgrind.out"
            valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            valgrind.append(f"--callgrind-out-file={out}")
            twistd = [str(python), str(python.parent / "twistd"), "-n", "--pidfile="]
            twistd += ["l4lb", "--config", str(config)]
            proc = subprocess.Popen(
                [*valgrind, *twistd],
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                conn_cost.wait_port(port, timeout=120)
                workload(args.workload, port, max(1, args.n // 10), args.database)
                control = ["callgrind_control", "-i"]
                subprocess.run(
                    [*control, "on", str(proc.pid)], check=True, capture_output=True
                )
                counter = count_polls(proc.pid)
                units = workload(args.workload, port, args.n, args.database)
                passes = polls(counter)
                subprocess.run(
                    [*control, "off", str(proc.pid)], check=True, capture_output=True
                )
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
        text = subprocess.run(
            ["callgrind_annotate", str(out)], check=True, capture_output=True, text=True
        ).stdout
    found = re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", text)
    assert found, "no instructions recorded"
    total = int(found.group(1).replace(",", ""))
    line = f"{args.workload} n={units}: {total / units:,.0f} instructions per unit"
    if passes is not None:
        line += f", {passes / units:.3f} reactor passes per unit"
    print(line)


if __name__ == "__main__":
    main()
