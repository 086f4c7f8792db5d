"""The ``[global] workers`` key and what it forbids."""

from __future__ import annotations

import os

import pytest

from l4lb.config import ConfigError, parse_config

BASE = """\
[global]
workers = {workers}
[frontend.f]
listen = {listen}
pool = "p"
[pool.p]
[[pool.p.server]]
address = "127.0.0.1:1"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "x.toml")
    return [str(p) for p in caught.value.problems]


def workers(value: str, listen: str = '"127.0.0.1:7000"') -> int:
    return parse_config(
        BASE.format(workers=value, listen=listen), "x.toml"
    ).global_.workers


class TestWorkers:
    def test_default_is_one(self) -> None:
        """Left out, ``workers`` is 1: the single-process code path."""
        text = BASE.format(workers=1, listen='"unix:/tmp/x.sock"').replace(
            "workers = 1\n", ""
        )
        assert parse_config(text, "x.toml").global_.workers == 1

    @pytest.mark.parametrize("value", [1, 2, 16])
    def test_integer(self, value: int) -> None:
        """An integer from 1 up is taken as written."""
        assert workers(str(value)) == value

    def test_auto_is_cpu_count(self) -> None:
        """ "auto" means one worker per CPU."""
        assert workers('"auto"') == (os.cpu_count() or 1)

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("0", "x.toml: global.workers: must be between 1 and 1024, got 0"),
            ("-2", "x.toml: global.workers: must be between 1 and 1024, got -2"),
            ("1.5", "x.toml: global.workers: expected an integer, got float 1.5"),
            ("true", "x.toml: global.workers: expected an integer, got boolean true"),
            (
                '"many"',
                'x.toml: global.workers: expected an integer >= 1 or "auto", got "many"',
            ),
            (
                '"2"',
                'x.toml: global.workers: expected an integer >= 1 or "auto", got "2"',
            ),
        ],
    )
    def test_bad_values(self, value: str, message: str) -> None:
        """Anything else is refused with the key path."""
        assert problems(BASE.format(workers=value, listen='"127.0.0.1:7000"')) == [
            message
        ]

    @pytest.mark.parametrize(
        "listen", ['"unix:/tmp/l4lb.sock"', '"systemd:domain=INET:index=0"']
    )
    def test_unshareable_listeners_refused(self, listen: str) -> None:
        """unix: and systemd: listeners cannot use SO_REUSEPORT, so workers > 1 refuses them."""
        assert problems(BASE.format(workers=2, listen=listen)) == [
            f"x.toml: frontend.f.listen: {listen} cannot be shared by 2 workers"
            " (only TCP listeners can use SO_REUSEPORT); use an ip:port address"
            " or set [global] workers = 1"
        ]

    @pytest.mark.parametrize(
        "listen", ['"unix:/tmp/l4lb.sock"', '"systemd:domain=INET:index=0"']
    )
    def test_one_worker_keeps_every_listener(self, listen: str) -> None:
        """With one worker every listen form stays allowed."""
        assert workers("1", listen) == 1

    @pytest.mark.parametrize(
        "listen", ['":7000"', '"[::1]:7000"', '"tcp:7000:interface=127.0.0.1"']
    )
    def test_tcp_listeners_allowed(self, listen: str) -> None:
        """Every TCP form is fine with several workers."""
        assert workers("2", listen) == 2
