"""l4lb's CPU time per new connection and per kept-alive request.

Runs ``twistd -n l4lb`` (log level warning) in front of a throwaway
redis-server, drives 20,000 ``redis-benchmark -k 0`` connections and then
200,000 ``-k 1 -c 50`` GETs through it, and divides l4lb's user+system CPU
(``/proc/PID/stat``) by their number. CPU per unit of work depends much less
on other load than throughput does. Usage, from the repository root:

    python docs/benchmarks/profiles/cpu_per_conn.py --splice true
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conn_cost

WORKLOADS = (
    ("connection", ["-k", "0", "-c", "32", "-t", "ping_inline"], 20_000),
    ("request", ["-k", "1", "-c", "50", "-t", "get"], 200_000),
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splice", choices=["true", "false", "omit"], default="true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with (
            conn_cost.redis(workdir) as backend,
            conn_cost.l4lb(workdir, backend, args.splice) as (port, proc),
        ):
            for label, flags, n in WORKLOADS:
                cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
                command = ["redis-benchmark", "-p", str(port), *flags, "-n", str(n)]
                subprocess.run([*command, "--csv"], capture_output=True, check=True)
                wall = time.monotonic() - started
                used = cpu_seconds(proc.pid) - cpu_before
                print(
                    f"{used / n * 1e6:.1f} us of l4lb CPU per {label}"
                    f" ({n / wall:.0f}/s, l4lb busy {used / wall:.0%})"
                )


if __name__ == "__main__":
    main()
