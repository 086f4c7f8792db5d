"""The worker supervisor and the worker's health follower, on a fake clock with fake processes."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import pytest
from structlog.testing import capture_logs
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from l4lb.config import parse_config
from l4lb.service import L4LBService
from l4lb.supervisor import KILL_AFTER, Backoff, Supervisor, exit_status
from l4lb.tap import Options, makeService
from l4lb.worker import HealthFollower
from l4lb.workerlink import LineBuffer, StateTracker, apply_states

CONFIG = """\
[global]
workers = {workers}
shutdown_grace = 5
[frontend.f]
listen = "127.0.0.1:7000"
pool = "p"
[pool.p]
[[pool.p.server]]
name = "a"
address = "127.0.0.1:7001"
[[pool.p.server]]
name = "b"
address = "127.0.0.1:7002"
[pool.p.health]
on_down = "{on_down}"
observe = true
"""


def config(workers: int = 2, on_down: str = "keep") -> Any:
    return parse_config(CONFIG.format(workers=workers, on_down=on_down), "x.toml")


class FakeProcess:
    """What `spawnProcess` returns: records writes and signals."""

    def __init__(self, protocol: Any, args: list[str], pid: int, **kw: Any) -> None:
        self.protocol = protocol
        self.args = args
        self.pid: int | None = pid
        self.kw = kw
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.written]

    def end(self, code: int | None = 0, signum: int | None = None) -> None:
        """The process exits (``signum``: killed by that signal)."""
        self.pid = None  # as Twisted's process transport does
        if signum is None and code == 0:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code, signum))
        self.protocol.processEnded(reason)


class Lab:
    """A supervisor on a `MemoryReactorClock` whose processes are `FakeProcess`es."""

    def __init__(
        self, workers: int = 2, on_down: str = "keep", foreground: bool = True
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.processes: list[FakeProcess] = []
        self.supervisor = Supervisor(
            config(workers, on_down),
            "/etc/l4lb.toml",
            self.reactor,
            spawn=self.spawn,
            reserve=False,
            foreground=foreground,
        )
        self.supervisor.ports = {"f": 7000}

    def spawn(
        self, protocol: Any, executable: str, args: list[str], **kw: Any
    ) -> FakeProcess:
        process = FakeProcess(protocol, args, 1000 + len(self.processes), **kw)
        self.processes.append(process)
        return process

    def start(self) -> Lab:
        self.supervisor.startService()
        return self

    def current(self, index: int) -> FakeProcess:
        process = self.supervisor.workers[index].process
        assert isinstance(process, FakeProcess)
        return process


def server_rows(process: FakeProcess) -> list[list[Any]]:
    return [row for m in process.messages() for row in m["servers"]]


class TestBackoff:
    def test_first_restart_is_immediate(self) -> None:
        """A worker that ran long enough is restarted at once."""
        assert Backoff().delay(uptime=60) == 0

    def test_quick_deaths_double_up_to_the_cap(self) -> None:
        """Deaths in a row before ``stable`` wait 0, 0.5, 1, 2 ... up to ``cap``."""
        backoff = Backoff(first=0.5, cap=4, stable=10)
        delays = [backoff.delay(uptime=1) for _ in range(7)]
        assert delays == [0, 0.5, 1, 2, 4, 4, 4]

    def test_a_stable_run_resets(self) -> None:
        """After a run of ``stable`` seconds the next death starts over at 0."""
        backoff = Backoff(stable=10)
        for _ in range(4):
            backoff.delay(uptime=1)
        assert backoff.delay(uptime=10) == 0
        assert backoff.delay(uptime=1) == 0.5


class TestExitStatus:
    @pytest.mark.parametrize(
        ("failure", "expected"),
        [
            (ProcessDone(0), {"exit_code": 0, "signal": None}),
            (ProcessTerminated(1), {"exit_code": 1, "signal": None}),
            (
                ProcessTerminated(None, signal.SIGKILL),
                {"exit_code": None, "signal": "SIGKILL"},
            ),
        ],
    )
    def test_status(self, failure: Exception, expected: dict[str, Any]) -> None:
        """The log names the exit code, or the signal that ended the worker."""
        assert exit_status(Failure(failure)) == expected


class TestStart:
    def test_spawns_each_worker_with_its_index_and_ports(self) -> None:
        """Every worker runs ``python -m l4lb.worker`` with the config, its index and the bound ports."""
        with capture_logs() as logs:
            lab = Lab(workers=3).start()
        assert [p.args for p in lab.processes] == [
            [
                sys.executable,
                "-m",
                "l4lb.worker",
                "--config",
                "/etc/l4lb.toml",
                "--index",
                str(i),
                "--port",
                "f=7000",
            ]
            for i in range(3)
        ]
        started = [e for e in logs if e["event"] == "worker started"]
        assert [(e["index"], e["pid"]) for e in started] == [
            (0, 1000),
            (1, 1001),
            (2, 1002),
        ]

    def test_foreground_workers_inherit_stdout_and_stderr(self) -> None:
        """In the foreground a worker's lines go straight to the supervisor's output."""
        lab = Lab().start()
        assert lab.processes[0].kw["childFDs"] == {0: "w", 1: 1, 2: 2, 3: "r"}

    def test_daemon_workers_output_is_relayed(self) -> None:
        """As a daemon, worker output comes through pipes and goes to twistd's log."""
        from twisted.logger import globalLogPublisher

        lab = Lab(foreground=False).start()
        assert lab.processes[0].kw["childFDs"] == {0: "w", 1: "r", 2: "r", 3: "r"}
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        try:
            lab.processes[0].protocol.childDataReceived(1, b'{"event": "x"}\n{"ev')
        finally:
            globalLogPublisher.removeObserver(seen.append)
        assert [e["line"] for e in seen] == ['{"event": "x"}']

    def test_first_line_is_a_snapshot_of_every_server(self) -> None:
        """A worker's first line holds the state of every server."""
        lab = Lab().start()
        for process in lab.processes:
            assert process.messages() == [
                {"servers": [["p", "a", True, 1, 0], ["p", "b", True, 1, 0]]}
            ]

    def test_probes_run_in_the_supervisor(self) -> None:
        """The supervisor's pools are probed: each server has a probe timer."""
        lab = Lab().start()
        monitor = lab.supervisor.health.monitors["p"]
        assert monitor.running
        assert all(p.timer is not None for p in monitor.probes.values())


class TestTap:
    def test_workers_make_a_supervisor(self, tmp_path: Any) -> None:
        """``workers = 2`` makes twistd a supervisor given the config's absolute path."""
        path = tmp_path / "w.toml"
        path.write_text(CONFIG.format(workers=2, on_down="keep"))
        options = Options()
        options.parseOptions(["--config", str(path)])
        service = makeService(options, reactor=MemoryReactorClock())
        assert isinstance(service, Supervisor)
        assert service.config_path == str(path)
        assert len(service.workers) == 2

    def test_one_worker_is_the_single_process(self, tmp_path: Any) -> None:
        """``workers = 1`` keeps the single-process service."""
        path = tmp_path / "w.toml"
        path.write_text(CONFIG.format(workers=1, on_down="keep"))
        options = Options()
        options.parseOptions(["--config", str(path)])
        service = makeService(options, reactor=MemoryReactorClock())
        assert type(service) is L4LBService


class TestHealthMessages:
    def test_state_change_goes_to_every_worker(self) -> None:
        """A server going down is one line to each running worker, with only that server."""
        lab = Lab().start()
        pool = lab.supervisor.pools["p"]
        pool.server("b").usable = False
        pool.changed()
        for process in lab.processes:
            assert process.messages()[1:] == [{"servers": [["p", "b", False, 1, 0]]}]

    def test_nothing_sent_without_a_change(self) -> None:
        """A ``changed()`` that moved no state sends nothing."""
        lab = Lab().start()
        lab.supervisor.pools["p"].changed()
        assert all(len(p.written) == 1 for p in lab.processes)

    def test_slow_start_weights_are_sent(self) -> None:
        """Effective weight and max_connections (slow start) travel with the state."""
        lab = Lab().start()
        server = lab.supervisor.pools["p"].server("a")
        server.weight, server.max_connections = 3, 7
        lab.supervisor.pools["p"].changed()
        assert server_rows(lab.processes[0])[-1] == ["p", "a", True, 3, 7]

    def test_connect_failed_from_a_worker_counts_in_the_supervisor(self) -> None:
        """A worker's failed connect is a failed check: the server goes down for every worker."""
        lab = Lab().start()
        protocol = lab.processes[1].protocol
        with capture_logs() as logs:
            protocol.childDataReceived(
                3, b'{"connect_failed":["p","a","connection refused"]}\n'
            )
        server = lab.supervisor.pools["p"].server("a")
        assert server.failed_connects == 1
        assert not server.usable
        down = [e for e in logs if e["event"] == "server down"]
        assert down[0]["reason"] == "client connect failed: connection refused"
        for process in lab.processes:
            assert server_rows(process)[-1] == ["p", "a", False, 1, 0]

    def test_events_split_across_reads(self) -> None:
        """An event line arriving in pieces is handled once, when complete."""
        lab = Lab().start()
        protocol = lab.processes[0].protocol
        protocol.childDataReceived(3, b'{"connect_failed":["p","a",')
        assert lab.supervisor.pools["p"].server("a").failed_connects == 0
        protocol.childDataReceived(3, b'"refused"]}\n')
        assert lab.supervisor.pools["p"].server("a").failed_connects == 1

    @pytest.mark.parametrize(
        "line", [b"not json\n", b'{"other": 1}\n', b'{"connect_failed": [1]}\n']
    )
    def test_bad_line_is_logged(self, line: bytes) -> None:
        """A line the supervisor does not understand is logged, not fatal."""
        lab = Lab().start()
        with capture_logs() as logs:
            lab.processes[0].protocol.childDataReceived(3, line)
        assert [e["event"] for e in logs] == ["bad line from worker"]

    def test_unknown_server_is_ignored(self) -> None:
        """An event naming a server this config lacks changes nothing."""
        lab = Lab().start()
        lab.processes[0].protocol.childDataReceived(
            3, b'{"connect_failed":["p","zz","x"]}\n'
        )
        lab.processes[0].protocol.childDataReceived(
            3, b'{"connect_failed":["q","a","x"]}\n'
        )
        assert all(s.usable for s in lab.supervisor.pools["p"].servers)


class TestRestart:
    def test_dead_worker_is_restarted_with_a_snapshot(self) -> None:
        """A killed worker is logged with its signal and restarted at once, with the current states."""
        lab = Lab().start()
        lab.reactor.advance(30)
        pool = lab.supervisor.pools["p"]
        pool.server("a").usable = False
        pool.changed()
        with capture_logs() as logs:
            lab.current(0).end(None, signal.SIGKILL)
            lab.reactor.advance(0)
        assert [(e["event"], e.get("signal"), e.get("delay")) for e in logs] == [
            ("worker exited", "SIGKILL", None),
            ("restarting", None, 0.0),
            ("worker started", None, None),
        ]
        assert logs[0]["pid"] == 1000
        replacement = lab.current(0)
        assert replacement is lab.processes[2]
        assert replacement.messages() == [
            {"servers": [["p", "a", False, 1, 0], ["p", "b", True, 1, 0]]}
        ]

    def test_worker_that_keeps_dying_backs_off(self) -> None:
        """Quick deaths in a row wait 0, 0.5, 1 s before the next start."""
        lab = Lab().start()
        delays = []
        for _ in range(3):
            with capture_logs() as logs:
                lab.current(1).end(1)
            (restarting,) = [e for e in logs if e["event"] == "restarting"]
            delays.append(restarting["delay"])
            spawned = len(lab.processes)
            if restarting["delay"]:
                lab.reactor.advance(restarting["delay"] * 0.99)
                assert len(lab.processes) == spawned, "restarted too early"
            lab.reactor.advance(restarting["delay"])
            assert len(lab.processes) == spawned + 1
        assert delays == [0.0, 0.5, 1.0]

    def test_other_workers_are_untouched(self) -> None:
        """One worker's death neither signals nor restarts the others."""
        lab = Lab().start()
        lab.current(0).end(1)
        lab.reactor.advance(0)
        assert lab.current(1) is lab.processes[1]
        assert lab.processes[1].signals == []


class TestSignals:
    def test_sighup_reaches_every_worker(self) -> None:
        """SIGHUP is passed to each running worker."""
        lab = Lab().start()
        with capture_logs() as logs:
            lab.supervisor._pass_on("HUP")
        assert [p.signals for p in lab.processes] == [["HUP"], ["HUP"]]
        assert logs[0]["event"] == "passing signal to workers"


class TestStop:
    def test_stop_waits_for_every_worker(self) -> None:
        """Stop sends SIGTERM to each worker and finishes once all have exited."""
        lab = Lab().start()
        done = lab.supervisor.stopService()
        assert [p.signals for p in lab.processes] == [["TERM"], ["TERM"]]
        assert not done.called
        lab.processes[0].end(0)
        assert not done.called
        with capture_logs() as logs:
            lab.processes[1].end(0)
        results: list[object] = []
        done.addBoth(results.append)
        assert results == [None]
        assert [e["event"] for e in logs if "index" in e] == ["worker exited"]
        assert not lab.supervisor.health.monitors["p"].running

    def test_no_restart_while_stopping(self) -> None:
        """A worker exiting during the stop is not restarted, and a pending restart is cancelled."""
        lab = Lab().start()
        lab.current(0).end(1)  # restart at once (delay 0), still pending
        lab.supervisor.stopService()
        lab.processes[1].end(0)
        lab.reactor.advance(60)
        assert len(lab.processes) == 2
        assert lab.reactor.getDelayedCalls() == []

    def test_stuck_worker_is_killed_after_the_grace(self) -> None:
        """A worker still running ``KILL_AFTER`` seconds past the grace gets SIGKILL."""
        lab = Lab().start()
        done = lab.supervisor.stopService()
        lab.processes[0].end(0)
        lab.reactor.advance(5 + KILL_AFTER - 0.1)
        assert lab.processes[1].signals == ["TERM"]
        lab.reactor.advance(0.1)
        assert lab.processes[1].signals == ["TERM", "KILL"]
        lab.processes[1].end(None, signal.SIGKILL)
        results: list[object] = []
        done.addBoth(results.append)
        assert results == [None]


class FakeSession:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.closed: list[str] = []
        server.sessions.add(self)

    def close(self, reason: str, abort: bool = False) -> None:
        self.closed.append(reason)
        self.server.sessions.discard(self)


class FakeService:
    def __init__(self, on_down: str = "keep") -> None:
        from l4lb.pool import Pool

        cfg = config(2, on_down)
        self.pools = {p.name: Pool(p, MemoryReactorClock()) for p in cfg.pools}


class TestFollower:
    def follower(self, on_down: str = "keep") -> tuple[HealthFollower, Any]:
        service = FakeService(on_down)
        follower = HealthFollower(service)  # type: ignore[arg-type]
        transport = StringTransport()
        follower.makeConnection(transport)
        return follower, transport

    def test_states_are_applied(self) -> None:
        """A line from the supervisor sets usable, weight and max_connections."""
        follower, _ = self.follower()
        follower.dataReceived(b'{"servers":[["p","a",false,7,3]]}\n')
        a = follower.pools["p"].server("a")
        assert (a.usable, a.weight, a.max_connections) == (False, 7, 3)

    @pytest.mark.parametrize(("on_down", "closed"), [("close", 1), ("keep", 0)])
    def test_on_down_close_closes_live_sessions(
        self, on_down: str, closed: int
    ) -> None:
        """``on_down = "close"`` closes the worker's sessions on the server that went down."""
        follower, _ = self.follower(on_down)
        a = follower.pools["p"].server("a")
        session = FakeSession(a)
        follower.dataReceived(b'{"servers":[["p","a",false,1,0]]}\n')
        assert session.closed == ["server down"] * closed
        # Going down again (already down) closes nothing more.
        follower.dataReceived(b'{"servers":[["p","a",false,1,0]]}\n')
        assert len(session.closed) == closed

    def test_failed_connect_is_reported(self) -> None:
        """A client's failed connect in the worker becomes one line to the supervisor."""
        follower, transport = self.follower()
        pool = follower.pools["p"]
        pool.connect_failed(pool.server("b"), "connection refused")
        assert transport.value() == (
            b'{"connect_failed":["p","b","connection refused"]}\n'
        )

    def test_lost_supervisor_calls_back(self) -> None:
        """stdin closing (the supervisor is gone) is reported once."""
        lost: list[bool] = []
        follower = HealthFollower(FakeService(), on_lost=lambda: lost.append(True))  # type: ignore[arg-type]
        follower.makeConnection(StringTransport())
        follower.connectionLost(None)
        assert lost == [True]


class TestLink:
    def test_tracker_sends_only_changes(self) -> None:
        """After a snapshot only moved servers are sent, each move once."""
        pools = FakeService().pools
        tracker = StateTracker(pools)
        tracker.snapshot()
        pools["p"].server("b").weight = 5
        assert tracker.changes(pools["p"]) == b'{"servers":[["p","b",true,5,0]]}\n'
        assert tracker.changes(pools["p"]) is None

    def test_apply_reports_servers_that_went_down(self) -> None:
        """Only a usable → unusable move counts as going down."""
        pools = FakeService().pools
        touched, down = apply_states(
            pools,
            {"servers": [["p", "a", False, 1, 0], ["p", "b", True, 2, 0]]},
        )
        assert [p.name for p in touched] == ["p"]
        assert [s.name for s in down] == ["a"]

    def test_line_buffer_keeps_partial_lines(self) -> None:
        """Lines split anywhere come out whole."""
        buffer = LineBuffer()
        assert buffer.feed(b"ab") == []
        assert buffer.feed(b"c\nde\n\nf") == [b"abc", b"de"]
        assert buffer.feed(b"\n") == [b"f"]
