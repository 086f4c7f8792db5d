"""Signal handlers that only schedule work on the reactor thread.

Twisted installs its own SIGTERM/SIGINT handlers while starting up; the first
stop signal must still reach them (they stop the reactor, which starts the
graceful stop). A second one, while stopping, is ours.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


def on_second_stop_signal(
    reactor: Any, stopping: Callable[[], bool], again: Callable[[int], None]
) -> None:
    """While ``stopping()``, a SIGTERM/SIGINT calls ``again(signum)`` on the reactor.

    Call before the reactor runs: the handlers wrap Twisted's after start-up.
    """

    def wrap() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            first = signal.getsignal(signum)
            if not callable(first):
                continue

            def handler(number: int, frame: Any, first: Any = first) -> None:
                if stopping():
                    reactor.callFromThread(again, number)
                else:
                    first(number, frame)

            signal.signal(signum, handler)

    reactor.addSystemEventTrigger("after", "startup", wrap)
