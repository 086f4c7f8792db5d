"""Unit tests of the twistd options, the service they build, and the log output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python import usage

from l4lb.logs import TwistedBridge, configure_logging
from l4lb.service import L4LBService
from l4lb.tap import Options, makeService

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "l4lb.toml"

BAD = """\
[frontend.a]
listen = "127.0.0.1:6380"
pool = "p"
idle_timout = "1h"

[pool.p]
[[pool.p.server]]
address = "127.0.0.1:70000"
"""


@pytest.fixture(autouse=True)
def _restore_structlog() -> None:
    yield
    structlog.reset_defaults()


class TestOptions:
    def test_config_is_loaded(self) -> None:
        """--config parses and validates the file before anything starts."""
        options = Options()
        options.parseOptions(["--config", str(EXAMPLE)])
        assert options.config is not None
        assert options.config.frontends

    def test_config_required(self) -> None:
        """Without --config (or --demo) the command line is refused."""
        with pytest.raises(usage.UsageError, match="--config"):
            Options().parseOptions([])

    def test_check_valid_exits_zero(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--check on a valid file says so and exits 0."""
        with pytest.raises(SystemExit) as exit_:
            Options().parseOptions(["--config", str(EXAMPLE), "--check"])
        assert exit_.value.code == 0
        assert "configuration is valid" in capsys.readouterr().out

    @pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
    def test_invalid_exits_one_listing_every_problem(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], check: bool
    ) -> None:
        """A bad file exits 1 and prints one line per problem, with file and key path."""
        bad = tmp_path / "bad.toml"
        bad.write_text(BAD)
        with pytest.raises(SystemExit) as exit_:
            Options().parseOptions(
                ["--config", str(bad)] + (["--check"] if check else [])
            )
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert f"{bad}: frontend.a.idle_timout: unknown key" in err
        assert f"{bad}: pool.p.server[0].address: port 70000 is out of range" in err


class TestService:
    def test_service_tree_from_example(self) -> None:
        """makeService builds one frontend service per frontend, addressable by name."""
        options = Options()
        options.parseOptions(["--config", str(EXAMPLE)])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor=reactor)
        assert isinstance(service, L4LBService)
        assert set(service.frontends) == {f.name for f in options.config.frontends}
        assert set(service.pools) == {p.name for p in options.config.pools}
        service.privilegedStartService()
        service.startService()
        assert len(reactor.tcpServers) == len(options.config.frontends)
        d = service.stopService()
        assert d.called


class TestLogging:
    def test_json_lines(self) -> None:
        """log_format json writes one JSON object per line with level and time."""
        out = io.StringIO()
        configure_logging("json", "info", stream=out)
        structlog.get_logger("t").info(
            "connection closed", pool="p", bytes_from_client=3
        )
        structlog.get_logger("t").debug("dropped")
        (line,) = out.getvalue().splitlines()
        event = json.loads(line)
        assert event["event"] == "connection closed"
        assert event["pool"] == "p"
        assert event["level"] == "info"
        assert "timestamp" in event

    def test_console_format(self) -> None:
        """log_format console writes readable key=value text."""
        out = io.StringIO()
        configure_logging("console", "info", stream=out)
        structlog.get_logger("t").info("listening", frontend="redis")
        assert "listening" in out.getvalue() and "frontend=redis" in out.getvalue()

    def test_twisted_events_go_through_structlog(self) -> None:
        """Twisted's own log events reach the structlog output, failures included."""
        publisher = LogPublisher(TwistedBridge("info"))
        log = Logger(namespace="twisted.internet.base", observer=publisher)
        with capture_logs() as logs:
            log.info("Received {signal}, shutting down.", signal="SIGTERM")
            log.debug("not shown")
            try:
                raise ZeroDivisionError("boom")
            except ZeroDivisionError:
                log.failure("while calling from thread")
        assert [e["event"] for e in logs] == [
            "Received SIGTERM, shutting down.",
            "while calling from thread",
        ]
        assert logs[0]["logger"] == "twisted.internet.base"
        assert "ZeroDivisionError" in logs[1]["exception"]
        assert logs[1]["log_level"] == "critical"
        assert LogLevel.critical  # the level map covers Twisted's levels

    def test_daemon_mode_hands_lines_to_twistd(self) -> None:
        """Daemonized, rendered lines go to twisted.logger (twistd's log file), unstamped."""
        from twisted.logger import globalLogPublisher

        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        try:
            configure_logging("json", "info", to_twisted=True)
            structlog.get_logger("t").info("listening", frontend="redis")
        finally:
            globalLogPublisher.removeObserver(seen.append)
        (event,) = [e for e in seen if e.get("log_namespace") == "l4lb"]
        line = json.loads(event["line"])
        assert line["event"] == "listening" and "timestamp" not in line


class TestDescriptorLimit:
    @pytest.mark.parametrize(
        ("soft", "hard", "max_connections", "raised_to", "warned"),
        [
            (1024, 1048576, 100000, 200064, False),  # raised to what is needed
            (1024, 20000, 100000, 20000, True),  # raised to the hard cap, still short
            (300000, 1048576, 100000, None, False),  # already enough
            (1024, 1048576, 0, None, False),  # no cap: nothing to size
        ],
    )
    def test_soft_limit_fitted_to_max_connections(
        self,
        soft: int,
        hard: int,
        max_connections: int,
        raised_to: int | None,
        warned: bool,
    ) -> None:
        """The soft fd limit is raised for 2 per connection, with a warning if it cannot be."""
        from l4lb.service import fit_fd_limit

        calls: list[tuple[int, int]] = []
        with capture_logs() as logs:
            fit_fd_limit(
                max_connections,
                getrlimit=lambda _: (soft, hard),
                setrlimit=lambda _, limits: calls.append(limits),
            )
        assert calls == ([] if raised_to is None else [(raised_to, hard)])
        assert bool(logs) is warned
