"""Starting and stopping the processes a run needs, and knowing when they listen.

Readiness is read from ``/proc/net/tcp`` (a socket in LISTEN state on the
port) rather than by connecting: a probe connection would reach the backend
through the proxy, and ``iperf3 -s`` takes any connection for a test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

# The checkout holding ``bench/``, so helper processes (``python -m bench.sink``)
# import it whatever their working directory.
REPO = Path(__file__).resolve().parent.parent


class StartError(RuntimeError):
    """A process exited or never listened; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports() -> set[int]:
    """Local ports with a TCP socket in LISTEN state (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Process:
    """One child process with its output in files under ``workdir``."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**child_env(), **(env or {})},
                start_new_session=True,  # our own group: signals reach only it
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 8) -> str:
        """The last lines of the process's output, for an error message."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def wait_listening(self, ports: Sequence[int], timeout: float = 20.0) -> None:
        """Block until every port listens; raise StartError if the process dies."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StartError(
                    f"{self.name} exited with {self.proc.returncode}: {self.tail()}"
                )
            missing = set(ports) - listening_ports()
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise StartError(
                    f"{self.name} not listening on {sorted(missing)} after {timeout:g}s:"
                    f" {self.tail()}"
                )
            time.sleep(0.05)

    def terminate(self) -> None:
        """SIGTERM the process group (``wait_stopped`` finishes the job)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Wait for the process to exit; SIGKILL its group after ``timeout``."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it if still there after ``timeout``."""
        self.terminate()
        self.wait_stopped(timeout)


def stop_all(processes: Sequence[Process]) -> None:
    """Stop ``processes`` together: signal them all, then wait for each."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait_stopped()


def child_env() -> dict[str, str]:
    """The environment of every helper and contender process."""
    return {**os.environ, "PYTHONPATH": _pythonpath()}


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    # The caller's PYTHONPATH first: it may point at another l4lb checkout.
    return f"{existing}{os.pathsep}{REPO}" if existing else str(REPO)


def run(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a client to completion; its stdout, or RuntimeError with its stderr."""
    try:
        out = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{argv[0]} timed out after {timeout:g}s") from e
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{argv[0]} exited {out.returncode}: {' | '.join(detail)}")
    return out.stdout
