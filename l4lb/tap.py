"""``twistd l4lb``: command-line options and the service they make."""

from __future__ import annotations

import os
import sys
from typing import Any

import structlog
from twisted.application.service import MultiService
from twisted.python import usage

from l4lb import fastpoll, runloop
from l4lb.config import Config, ConfigError, Problem, load_config, parse_config
from l4lb.demo import DemoBackends
from l4lb.logs import TwistedBridge, configure_logging
from l4lb.service import L4LBService
from l4lb.tls.backend import check_backend_tls
from l4lb.tls.certificates import check_config as check_certificates


class Options(usage.Options):
    synopsis = "--config PATH [--check] | --demo [--demo-listen ADDRESS]"
    longdesc = (
        "Run the l4lb TCP load balancer. --check validates the config and exits "
        "0 if it is valid, 1 if not; --demo runs three echo backends behind a "
        "frontend so you can try l4lb with nc."
    )
    optFlags = [
        [
            "check",
            None,
            "Validate the config, print every problem found, start nothing.",
        ],
        ["demo", None, "Self-contained demo: three echo backends behind one frontend."],
    ]
    optParameters = [
        ["config", "c", None, "Path to the TOML config file (required unless --demo)."],
        ["demo-listen", None, "127.0.0.1:7000", "Where --demo listens."],
    ]

    config: Config | None = None
    tls_warnings: list[Problem] = []  # certificates expiring soon, logged at start

    def postOptions(self) -> None:
        if self["demo"]:
            return
        path = self["config"]
        if not path:
            raise usage.UsageError("--config PATH is required (or try --demo)")
        try:
            self.config = load_config(path)
            check_backend_tls(self.config)  # certificate files: present, matching
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            print(f"{path}: {len(e.problems)} problem(s) found", file=sys.stderr)
            raise SystemExit(1) from None
        errors, self.tls_warnings = check_certificates(self.config)
        for problem in errors:
            print(problem, file=sys.stderr)
        if self["check"]:  # at start they are logged instead (makeService)
            for problem in self.tls_warnings:
                print(f"warning: {problem}", file=sys.stderr)
        if errors:
            print(f"{path}: {len(errors)} problem(s) found", file=sys.stderr)
            raise SystemExit(1)
        if self["check"]:
            print(f"{path}: configuration is valid")
            raise SystemExit(0)


def _foreground(options: usage.Options) -> bool:
    parent = getattr(options, "parent", None)
    return parent is None or bool(parent.get("nodaemon"))


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build the service tree from parsed options (``reactor`` is injectable for tests)."""
    if reactor is None:
        from twisted.internet import reactor
    demo = None
    config = options.config
    if options["demo"]:
        demo = DemoBackends(reactor)
        config = parse_config(demo.config_text(options["demo-listen"]), "<demo>")
    assert config is not None
    foreground = _foreground(options)
    level = config.global_.log_level
    configure_logging(config.global_.log_format, level, to_twisted=not foreground)
    for problem in options.tls_warnings:
        structlog.get_logger("l4lb.tls").warning(
            "certificate expires soon", key=problem.key, error=problem.message
        )
    observer = TwistedBridge(level) if foreground else None
    if config.global_.workers > 1 and demo is None:
        from l4lb.supervisor import Supervisor

        path = os.path.abspath(options["config"])  # twistd -d may chdir to /
        supervisor = Supervisor(
            config, path, reactor, foreground=foreground, log_observer=observer
        )
        if getattr(options, "parent", None) is not None:
            supervisor.install_signals()
        return supervisor
    service = L4LBService(config, reactor, log_observer=observer)
    if getattr(options, "parent", None) is not None:  # under twistd, not in tests
        fastpoll.install(reactor)
        runloop.install(reactor)
        service.install_second_signal()
        service.install_reload_signal()
    if demo is not None:
        demo.setServiceParent(service)
        listen = options["demo-listen"]
        host, _, port = listen.rpartition(":")
        structlog.get_logger("l4lb.demo").info(
            f"demo ready: run `nc {host.strip('[]') or '127.0.0.1'} {port}` a few times"
            " and type a line: each backend greets you with its name",
            listen=listen,
            backends=[f"127.0.0.1:{p.getHost().port}" for p in demo.ports],
        )
    return service
