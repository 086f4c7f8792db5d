"""End-to-end test helpers: free ports, real servers, a `twistd -n l4lb` runner.

Everything here waits by polling a condition against a deadline (a port accepts,
a log line appears, a process exits), never by sleeping a guessed amount, and
everything it starts is stopped by the caller's teardown (`L4LB.kill`,
`start_redis` as a context manager).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

# The twistd of the interpreter running the tests, so the l4lb under test is the
# one installed in this environment.
TWISTD = Path(sys.executable).parent / "twistd"

T = TypeVar("T")

POLL_INTERVAL = 0.02

# L4LB_TEST_SPLICE=0 (or 1) runs every l4lb these tests start with
# [global] splice = false (or true) unless a test sets it; unset: l4lb's default.
_SPLICE_ENV = os.environ.get("L4LB_TEST_SPLICE")
SPLICE = None if _SPLICE_ENV in (None, "") else _SPLICE_ENV not in ("0", "false")


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int) -> bool:
    """True when a TCP connect to ``host:port`` succeeds (the probe closes at once)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def port_refuses(host: str, port: int) -> bool:
    """True when a TCP connect to ``host:port`` is refused (nothing listens there)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until ``host:port`` accepts a TCP connection."""
    wait_until(lambda: port_accepts(host, port), timeout, f"{host}:{port} to accept")


def stop_process(process: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


@contextlib.contextmanager
def start_redis(
    port: int, workdir: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A throwaway redis-server on 127.0.0.1:``port``, stopped when the block ends."""
    args = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    if workdir is not None:
        args += ["--dir", str(workdir)]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir
    )
    try:
        wait_until(
            lambda: process.poll() is not None or port_accepts("127.0.0.1", port),
            10,
            f"redis-server on port {port}",
        )
        if process.poll() is not None:
            raise AssertionError(
                f"redis-server on port {port} exited: {process.returncode}"
            )
        yield process
    finally:
        stop_process(process)


# --------------------------------------------------------------------------
# Config text
# --------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the text used here
    raise TypeError(f"no TOML rendering for {value!r}")


def _toml_table(header: str, values: dict[str, object]) -> str:
    body = "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())
    return f"{header}\n{body}\n"


def l4lb_config(
    frontends: dict[str, dict[str, object]],
    pools: dict[str, dict[str, Any]],
    **global_: object,
) -> str:
    """An l4lb TOML config with JSON logs.

    ``frontends`` maps a name to its keys (``listen``, ``pool``, ...); ``pools``
    maps a name to its keys plus ``servers``, a list of server tables.
    """
    if SPLICE is not None:
        global_.setdefault("splice", SPLICE)
    text = _toml_table("[global]", {"log_format": "json", **global_})
    for name, keys in frontends.items():
        text += _toml_table(f"[frontend.{name}]", keys)
    for name, keys in pools.items():
        keys = dict(keys)
        servers = keys.pop("servers")
        text += _toml_table(f"[pool.{name}]", keys)
        for server in servers:
            text += _toml_table(f"[[pool.{name}.server]]", server)
    return text


# --------------------------------------------------------------------------
# The l4lb process
# --------------------------------------------------------------------------


def _read_proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class L4LB:
    """One ``twistd -n l4lb`` process: its config, its output files and its log lines.

    ``start`` writes the config, starts twistd with stdout and stderr captured to
    files in ``workdir`` and waits until every frontend has logged ``listening``
    (or until ``ready`` says so, for runs without a JSON config). The caller's
    teardown must call `kill`, which is a no-op once the process has exited.
    """

    def __init__(self, workdir: Path, name: str = "l4lb") -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.toml"
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self, args: Sequence[str]) -> list[str]:
        # --pidfile= : no twistd.pid, so aborted or parallel runs never collide.
        return [str(TWISTD), "-n", "--pidfile=", "l4lb", *args]

    def start(
        self,
        config: str | None = None,
        *,
        args: Sequence[str] | None = None,
        ready: Callable[[L4LB], bool] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        timeout: float = 20.0,
    ) -> L4LB:
        """Start twistd and wait until it is ready; fail with its output if it exits."""
        if config is not None:
            self.config_path.write_text(config)
        if args is None:
            args = ["--config", str(self.config_path)]
        if ready is None:
            expected = config.count("[frontend.") if config is not None else 1
            ready = lambda runner: len(runner.events("listening")) >= expected  # noqa: E731
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.command(args),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=preexec_fn,
            )
        wait_until(
            lambda: self.process.poll() is not None or ready(self),
            timeout,
            "l4lb to start listening",
        )
        if self.process.poll() is not None:
            raise AssertionError(
                f"l4lb exited with {self.process.returncode} at start:\n{self.output()}"
            )
        return self

    # -- output --------------------------------------------------------------

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """Both captured streams, for failure messages."""
        return f"--- stdout ---\n{self.stdout()}--- stderr ---\n{self.stderr()}"

    def lines(self) -> list[dict[str, Any]]:
        """The complete JSON log lines written so far (other lines are skipped)."""
        parsed = []
        for line in self.stdout_path.read_bytes().split(b"\n")[:-1]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                parsed.append(event)
        return parsed

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log lines whose ``event`` is ``name``."""
        return [line for line in self.lines() if line.get("event") == name]

    def closed_lines(self) -> list[dict[str, Any]]:
        """One line per finished client connection."""
        return self.events("connection closed")

    def wait_for_closed(
        self, count: int, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until exactly ``count`` connections have been logged as closed."""
        wait_until(
            lambda: len(self.closed_lines()) >= count,
            timeout,
            f"{count} 'connection closed' lines",
        )
        lines = self.closed_lines()
        assert len(lines) == count, lines
        return lines

    def address(self, frontend: str | None = None) -> tuple[str, int]:
        """Where ``frontend`` (or the only frontend) listens, from its log line."""
        listening = [
            line
            for line in self.events("listening")
            if frontend is None or line["frontend"] == frontend
        ]
        assert len(listening) == 1, listening
        host, _, port = listening[0]["address"].rpartition(":")
        return host.strip("[]"), int(port)

    # -- the process -----------------------------------------------------------

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_kib(self) -> int:
        """Resident set size now (VmRSS), in KiB."""
        return _read_proc_status(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        """Highest resident set size so far (VmHWM), in KiB."""
        return _read_proc_status(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            # Fields after the parenthesised command name; utime, stime are 14, 15.
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its status (-N for signal N)."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"l4lb still running {timeout:g}s later:\n{self.output()}"
            ) from None

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit; its status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """Teardown: make sure the process is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


CLEAN_EXIT = (0, -signal.SIGTERM)
"""Exit statuses of a clean stop: stock twistd re-raises the stop signal after a
clean shutdown, so ``-SIGTERM`` is as clean as 0."""
