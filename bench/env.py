"""What the machine has: tools, versions, and per-process CPU and memory.

The benchmark installs nothing.  ``find_tool`` names the Debian package that
provides a missing program so the report can say what to install; process
figures come straight from ``/proc`` (Linux only, like the anchors).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

# program -> Debian package that ships it
PACKAGES = {
    "haproxy": "haproxy",
    "iperf3": "iperf3",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "redis-cli": "redis-tools",
    "pgbench": "postgresql-contrib (postgresql-15)",
    "psql": "postgresql-client",
    "openssl": "openssl",
    "nginx": "nginx-light or nginx + libnginx-mod-stream",
    "pen": "pen",
    "stunnel4": "stunnel4",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def find_tool(name: str) -> str | None:
    """Absolute path of ``name`` on PATH (or in /usr/sbin), else None."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_message(name: str) -> str:
    """The line the report prints for a program that is not installed."""
    return f"{name} not found (Debian package: {PACKAGES.get(name, name)})"


def python_module_missing(module: str) -> str | None:
    """None when ``module`` imports, else how to get it (the ``bench`` extra)."""
    try:
        __import__(module)
    except ImportError:
        return f"Python module {module} missing (pip install -e '.[bench]')"
    return None


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def nginx_stream_module() -> str | None:
    """Path of nginx's stream module (or "static"), None when nginx has none.

    Debian builds the stream module as a dynamic module
    (``--with-stream=dynamic``) shipped in libnginx-mod-stream; nginx-light
    has it built in on some releases.
    """
    nginx = find_tool("nginx")
    if not nginx:
        return None
    out = subprocess.run(
        [nginx, "-V"], capture_output=True, text=True, timeout=10, check=False
    ).stderr
    if re.search(r"--with-stream(\s|$)", out):
        return "static"
    for directory in ("/usr/lib/nginx/modules", "/usr/share/nginx/modules"):
        candidate = Path(directory) / "ngx_stream_module.so"
        if candidate.exists():
            return str(candidate)
    return None


def git_describe(repo: Path) -> str:
    """``git describe --always --dirty`` of the l4lb checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or f"unknown (not a git checkout: {repo})"


def machine() -> dict[str, str]:
    """CPU count, CPU model and kernel, for the report header."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "hostname": platform.node(),
    }


def l4lb_checkout() -> Path | None:
    """The checkout whose ``l4lb`` package the contenders' ``twistd`` imports.

    Asked of a child interpreter with the contenders' ``PYTHONPATH`` and a
    neutral working directory, as ``twistd`` runs, so that with
    ``PYTHONPATH=/other/checkout`` the report names the l4lb measured.
    """
    from bench.procs import child_env

    code = "import l4lb, os; print(os.path.dirname(os.path.abspath(l4lb.__file__)))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd="/",
            env=child_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    return Path(path).parent if out.returncode == 0 and path else None


def versions() -> dict[str, str]:
    """Versions of everything in the comparison, as each tool reports it."""
    import twisted

    checkout = l4lb_checkout()
    result = {
        "l4lb": git_describe(checkout) if checkout else "not importable",
        "python": sys.version.split()[0],
        "twisted": twisted.__version__,
    }
    probes = {
        "haproxy": ["haproxy", "-v"],
        "nginx": ["nginx", "-v"],
        "redis": ["redis-server", "--version"],
        "openssl": ["openssl", "version"],
        "iperf3": ["iperf3", "--version"],
        "pgbench": ["pgbench", "--version"],
        "pen": ["pen", "-h"],
    }
    for name, argv in probes.items():
        path = find_tool(argv[0])
        result[name] = (
            _version_in(_first_line([path, *argv[1:]])) if path else "not installed"
        )
    if result["pen"] != "not installed":
        # pen has no --version; its package version is the useful figure.
        result["pen"] = _dpkg_version("pen")
    for module in ("uvloop", "matplotlib"):
        try:
            result[module] = __import__(module).__version__
        except ImportError:
            result[module] = "not installed"
    return result


_VERSION = re.compile(r"(?:v=)?(\d+\.\d+(?:\.\d+)?[\w.+~-]*)")


def _version_in(line: str) -> str:
    """The first version-looking word of a ``--version`` line, else the line."""
    match = _VERSION.search(line)
    return match.group(1) if match else line


def _dpkg_version(package: str) -> str:
    out = _first_line(["dpkg-query", "-W", "-f", "${Version}", package])
    return out if out and "no packages" not in out else "unknown"


# --------------------------------------------------------------------------
# /proc figures for a contender's processes


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids for every process on the machine."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (nginx workers, l4lb workers, ...)."""
    kids = children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(kids.get(pid, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of ``pids`` in seconds (from ``/proc/PID/stat``)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kib(pids: Iterable[int]) -> int:
    """Resident set size of ``pids`` summed, in KiB (``/proc/PID/statm``)."""
    total = 0
    for pid in pids:
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * PAGE_KIB
    return total
