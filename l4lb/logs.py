"""structlog output for l4lb, with Twisted's own log events fed through it.

Running in the foreground (``twistd -n``, systemd, containers) the log is one
line per event on stdout: JSON objects or console text. Twisted's events (its
start-up lines, tracebacks from its reactor) arrive through `TwistedBridge`, a
`twisted.logger` observer, so the output has one format. When twistd runs as a
daemon it owns the log file, so our lines are rendered and handed to it instead.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog
from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.logger import Logger as TwistedLogger
from zope.interface import implementer

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_TWISTED_LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}


_to_twisted = TwistedLogger(namespace="l4lb")  # module level: Logger is a descriptor


class _TwistedLogFile:
    """A structlog output that hands rendered lines to twisted.logger (daemon mode)."""

    def msg(self, message: str) -> None:
        _to_twisted.info("{line}", line=message)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def enabled(level: int = logging.INFO) -> bool:
    """Whether a line at ``level`` would be kept, so a caller can skip building it.

    The per-connection line costs about 9 µs to build and hand to structlog
    even when the level filter drops it (``log_level = "warning"``).
    """
    is_enabled_for = getattr(
        structlog.get_config()["wrapper_class"], "is_enabled_for", None
    )
    return True if is_enabled_for is None else bool(is_enabled_for(None, level))


def configure_logging(
    log_format: str = "json",
    level: str = "info",
    stream: IO[str] | None = None,
    to_twisted: bool = False,
) -> None:
    """Configure structlog once per process, before any service starts."""
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[Any] = [structlog.processors.add_log_level]
    if not to_twisted:  # twistd's log file stamps each line itself
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [structlog.processors.format_exc_info, renderer]
    if to_twisted:
        factory: Any = lambda *args: _TwistedLogFile()  # noqa: E731
    else:
        # Captured now: twistd later swaps sys.stdout for a logging file.
        factory = structlog.WriteLoggerFactory(file=stream or sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        # Not cached: tests swap the configuration (capture_logs), and we log
        # once per connection, not per byte.
        cache_logger_on_first_use=False,
    )


@implementer(ILogObserver)
class TwistedBridge:
    """A twisted.logger observer that re-emits Twisted's events through structlog."""

    def __init__(self, level: str = "info") -> None:
        self._threshold = LEVELS[level]
        self._log = structlog.get_logger("twisted")

    def __call__(self, event: dict[str, Any]) -> None:
        level = _TWISTED_LEVELS.get(event.get("log_level"), "info")
        if LEVELS[level] < self._threshold:
            return
        text = formatEvent(event)
        fields: dict[str, Any] = {"logger": event.get("log_namespace", "twisted")}
        failure = event.get("log_failure")
        if failure is not None:
            fields["exception"] = failure.getTraceback()
        getattr(self._log, level)(text, **fields)
