"""Tests for l4lb.config: parsing, defaults, and every kind of problem report."""

from __future__ import annotations

import json
import math
import pickle
import re
import tomllib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from l4lb import config
from l4lb.balance import POLICY_NAMES
from l4lb.config import (
    Config,
    ConfigError,
    FrontendConfig,
    GlobalConfig,
    PoolConfig,
    Problem,
    ServerAddress,
    ServerConfig,
    load_config,
    parse_config,
    parse_duration,
)

MINIMAL = """\
[frontend.f]
listen = ":1"
pool = "p"
[pool.p]
[[pool.p.server]]
address = "db:1"
"""
EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "l4lb.toml"
SOURCE = "etc/l4lb.toml"
EXAMPLES = sorted(EXAMPLE.parent.glob("*.toml"))


def make(
    *,
    head: str = "",
    glob: str = "",
    frontend: str = "",
    pool: str = "",
    server: str = "",
    listen: str = '"127.0.0.1:6380"',
    uses: str = '"redis"',
    address: str = '"127.0.0.1:6379"',
    extra: str = "",
) -> str:
    """A small valid config with extra lines spliced into each table."""
    return f"""
{head}
[global]
{glob}

[frontend.redis]
listen = {listen}
pool = {uses}
{frontend}

[pool.redis]
{pool}

[[pool.redis.server]]
address = {address}
{server}

{extra}
"""


def problems(text: str) -> tuple[Problem, ...]:
    """The problems parse_config reports for ``text`` (which must be invalid)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    return caught.value.problems


def only_problem(text: str) -> Problem:
    """The single problem reported for ``text``."""
    found = problems(text)
    assert len(found) == 1, [str(problem) for problem in found]
    return found[0]


def frontend_for(listen: str, lines: str = "") -> FrontendConfig:
    """The frontend built from a listen value given as a TOML literal string."""
    return parse_config(make(listen=f"'{listen}'", frontend=lines), SOURCE).frontend(
        "redis"
    )


def schema_paths(section: Any = config._ROOT, prefix: str = "") -> Iterator[str]:
    """Every key the schema knows, as ``pool.*.server[].address`` patterns."""
    for key, spec in section.keys.items():
        path = f"{prefix}.{key}" if prefix else key
        reader = spec.reader
        if isinstance(reader, config._Named):
            yield from schema_paths(reader.section, f"{path}.*")
        elif isinstance(reader, config._Array):
            yield from schema_paths(reader.section, f"{path}[]")
        elif isinstance(reader, config._Table):
            yield from schema_paths(reader.section, path)
        else:
            yield path


def present(document: Any, parts: list[str]) -> bool:
    """Whether some instance of a schema path pattern is set in ``document``."""
    if not parts:
        return True
    part, rest = parts[0], parts[1:]
    if not isinstance(document, dict):
        return False
    if part == "*":
        return any(present(item, rest) for item in document.values())
    if part.endswith("[]"):
        items = document.get(part[:-2])
        return isinstance(items, list) and any(present(item, rest) for item in items)
    return part in document and present(document[part], rest)


def dump(value: Any) -> str:
    """A TOML rendering of ``value`` using inline tables (tests only)."""
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(k)} = {dump(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(dump(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def dump_document(document: dict[str, Any]) -> str:
    """A whole TOML document, one top-level key per line."""
    return "".join(
        f"{json.dumps(key)} = {dump(value)}\n" for key, value in document.items()
    )


class TestExampleFile:
    def test_loads_without_problems(self) -> None:
        """The shipped example configuration is valid."""
        cfg = load_config(str(EXAMPLE))
        assert [f.name for f in cfg.frontends] == ["redis", "postgres"]
        assert [p.name for p in cfg.pools] == ["redis", "postgres"]
        assert cfg.frontend("redis").listen == "127.0.0.1:6380"
        assert cfg.frontend("postgres").listen == "127.0.0.1:6433"
        assert str(cfg.pool("redis").servers[0].address) == "127.0.0.1:6379"
        assert str(cfg.pool("postgres").servers[0].address) == "127.0.0.1:5432"

    @pytest.mark.parametrize("path", sorted(schema_paths()))
    def test_every_schema_key_is_shown(self, path: str) -> None:
        """Each key the schema accepts is set in one of the etc/ examples."""
        documents = [tomllib.loads(p.read_text()) for p in EXAMPLES]
        assert any(present(d, path.split(".")) for d in documents), (
            f"{path} missing from every etc/*.toml"
        )

    @pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
    def test_every_example_is_valid(self, example: Path) -> None:
        """Each shipped example parses without problems."""
        load_config(str(example))

    def test_documented_defaults_match_the_code(self) -> None:
        """Every "Default: X" comment in the example equals the attrs default."""
        sections = {
            "global": config._GLOBAL,
            "frontend": config._FRONTEND,
            "pool": config._POOL,
            "pool.server": config._SERVER,
            "pool.health": config._HEALTH,
            "pool.health.step": config._STEP,
        }
        section = None
        comment: list[str] = []
        checked = 0
        for line in EXAMPLE.read_text().splitlines():
            header = re.fullmatch(r"\[+([^\]]+)\]+", line.strip())
            if header:
                parts = header[1].split(".")
                section = sections[".".join(parts[:1] + parts[2:])]
                comment = []
            elif line.startswith("#"):
                comment.append(line.lstrip("# "))
            elif "=" in line and section is not None:
                key = line.split("=")[0].strip()
                found = re.search(r"Default: (.+?)\.?$", " ".join(comment))
                comment = []
                if found is None:
                    continue
                spec = section.keys[key]
                try:
                    value = tomllib.loads(f"v = {found[1]}")["v"]
                except tomllib.TOMLDecodeError:  # prose, e.g. "the address"
                    continue
                default = config._default(section.cls, spec.attr or key)
                assert spec.reader.convert(value) == default, key
                checked += 1
        assert checked == 31


class TestDefaults:
    def test_minimal_config_gets_defaults(self) -> None:
        """Keys left out take the defaults of the attrs classes."""
        cfg = parse_config(MINIMAL, "x.toml")
        assert cfg == Config(
            source="x.toml",
            global_=GlobalConfig(),
            frontends=(
                FrontendConfig(
                    name="f", listen=":1", endpoint="tcp:port=1:backlog=1024", pool="p"
                ),
            ),
            pools=(
                PoolConfig(
                    name="p",
                    servers=(
                        ServerConfig(
                            name="db:1", address=ServerAddress(host="db", port=1)
                        ),
                    ),
                ),
            ),
        )

    def test_file_order_is_kept(self) -> None:
        """Frontends, pools and servers come out in the order written."""
        text = make(
            extra="""
[[pool.redis.server]]
address = "127.0.0.3:1"
[[pool.redis.server]]
address = "127.0.0.2:1"
[frontend.a]
listen = ":7000"
pool = "a"
[pool.a]
[[pool.a.server]]
address = "unix:/a"
"""
        )
        cfg = parse_config(text, SOURCE)
        assert [f.name for f in cfg.frontends] == ["redis", "a"]
        assert [p.name for p in cfg.pools] == ["redis", "a"]
        assert [s.name for s in cfg.pool("redis").servers] == [
            "127.0.0.1:6379",
            "127.0.0.3:1",
            "127.0.0.2:1",
        ]

    def test_explicit_values_are_used(self) -> None:
        """Set keys override defaults, with durations in seconds."""
        cfg = parse_config(
            make(
                glob='max_connections = 5\nshutdown_grace = "1m"'
                '\nlog_format = "console"\nlog_level = "debug"',
                frontend="max_connections = 0\nidle_timeout = 0"
                "\nhalf_closed_timeout = 2.5\nbacklog = 7",
                pool='balance = "first"\nconnect_timeout = "250ms"\nretries = 0'
                "\nqueue_timeout = 0\nmax_queue = 0",
                server='name = "a"\nweight = 0\nmax_connections = 9\nbackup = true',
            ),
            SOURCE,
        )
        assert cfg.global_ == GlobalConfig(5, 60.0, "console", "debug")
        frontend = cfg.frontend("redis")
        assert (frontend.max_connections, frontend.idle_timeout) == (0, 0.0)
        assert (frontend.half_closed_timeout, frontend.backlog) == (2.5, 7)
        assert frontend.endpoint.endswith(":backlog=7")
        pool = cfg.pool("redis")
        assert (pool.balance, pool.connect_timeout, pool.retries) == ("first", 0.25, 0)
        assert (pool.queue_timeout, pool.max_queue) == (0.0, 0)
        assert pool.servers[0] == ServerConfig(
            "a", ServerAddress("127.0.0.1", 6379), 0, 9, True
        )

    @pytest.mark.parametrize("policy", POLICY_NAMES)
    def test_every_policy_is_accepted(self, policy: str) -> None:
        """Every name l4lb.balance exports is a valid balance value."""
        cfg = parse_config(make(pool=f'balance = "{policy}"'), SOURCE)
        assert cfg.pool("redis").balance == policy

    def test_lookup_of_missing_names_raises_key_error(self) -> None:
        """Config.pool and Config.frontend raise KeyError for unknown names."""
        cfg = parse_config(make(), SOURCE)
        with pytest.raises(KeyError):
            cfg.pool("nope")
        with pytest.raises(KeyError):
            cfg.frontend("nope")

    def test_classes_are_frozen(self) -> None:
        """Parsed configuration cannot be modified by accident."""
        cfg = parse_config(make(), SOURCE)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            cfg.frontend("redis").pool = "x"  # type: ignore[misc]


class TestParseDuration:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (0, 0.0),
            (30, 30.0),
            (0.5, 0.5),
            ("250ms", 0.25),
            ("2s", 2.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("1.5s", 1.5),
            ("0.1s", 0.1),
            ("0ms", 0.0),
            (-0.0, 0.0),
        ],
    )
    def test_accepted(self, value: object, seconds: float) -> None:
        """Numbers are seconds; strings carry a unit."""
        assert parse_duration(value) == seconds
        assert isinstance(parse_duration(value), float)

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("10", 'duration "10" has no unit'),
            ("1.5", "add a unit: ms, s, m or h"),
            ("-5s", 'must not be negative, got "-5s"'),
            ("-5", "must not be negative"),
            (-1, "must not be negative, got integer -1"),
            (-0.5, "must not be negative, got float -0.5"),
            ("5 s", 'invalid duration "5 s"'),
            ("5S", 'invalid duration "5S"'),
            ("1d", 'invalid duration "1d"'),
            (".5s", "invalid duration"),
            ("1m30s", "invalid duration"),
            ("", "invalid duration"),
            (True, "expected a duration"),
            (None, "expected a duration"),
            ([1], "got an array"),
            (math.nan, "got float nan"),
            (math.inf, "too large"),
            (10**400, "too large"),
            ("9" * 400 + "h", "too large"),
        ],
    )
    def test_refused(self, value: object, fragment: str) -> None:
        """Bad durations raise ValueError with a message for the operator."""
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_duration(value)

    @given(
        st.integers(min_value=0, max_value=10**12),
        st.sampled_from([("ms", 1000), ("s", 1), ("m", 60), ("h", 3600)]),
    )
    def test_whole_numbers_round_trip(self, count: int, unit: tuple[str, int]) -> None:
        """``f"{n}{unit}"`` is exactly n times the unit, in seconds."""
        name, factor = unit
        expected = count / 1000 if name == "ms" else float(count * factor)
        assert parse_duration(f"{count}{name}") == expected

    @given(
        st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
        st.sampled_from([("ms", Decimal("0.001")), ("s", 1), ("m", 60), ("h", 3600)]),
    )
    def test_decimals_round_trip(self, amount: Decimal, unit: tuple[str, Any]) -> None:
        """Decimal amounts with any unit parse to the nearest float of their value."""
        name, factor = unit
        text = f"{amount:f}"
        assert parse_duration(f"{text}{name}") == float(Decimal(text) * factor)

    @given(
        st.one_of(
            st.floats(min_value=0, allow_nan=False, allow_infinity=False),
            st.integers(min_value=0, max_value=10**300),
        )
    )
    def test_numbers_are_seconds(self, value: float) -> None:
        """A non-negative finite number is that many seconds."""
        assert parse_duration(value) == float(value)

    @given(
        st.one_of(
            st.floats(max_value=-1e-300),
            st.integers(max_value=-1),
            st.builds(lambda n, u: f"-{n}{u}", st.integers(0), st.sampled_from("smh")),
        )
    )
    def test_negatives_are_refused(self, value: object) -> None:
        """Nothing negative is a duration."""
        with pytest.raises(ValueError):
            parse_duration(value)


class TestServerAddress:
    @pytest.mark.parametrize(
        ("text", "address", "shown"),
        [
            ("127.0.0.1:6379", ServerAddress("127.0.0.1", 6379), "127.0.0.1:6379"),
            ("[::1]:6379", ServerAddress("::1", 6379), "[::1]:6379"),
            ("[0:0:0:0:0:0:0:1]:6379", ServerAddress("::1", 6379), "[::1]:6379"),
            ("db.example.com:5432", ServerAddress("db.example.com", 5432), None),
            ("redis_1:6379", ServerAddress("redis_1", 6379), None),
            ("unix:/run/redis.sock", ServerAddress(unix_path="/run/redis.sock"), None),
            ("db:65535", ServerAddress("db", 65535), None),
        ],
    )
    def test_parsed(self, text: str, address: ServerAddress, shown: str | None) -> None:
        """Addresses parse into host/port or a unix path and print back."""
        server = (
            parse_config(make(address=f'"{text}"'), SOURCE).pool("redis").servers[0]
        )
        assert server.address == address
        assert str(server.address) == (shown or text)
        assert server.name == (shown or text)
        assert server.address.is_unix == text.startswith("unix:")

    @given(st.ip_addresses(), st.integers(1, 65535))
    def test_ip_literals_round_trip(self, ip: Any, port: int) -> None:
        """Any IP literal and port parse and print back in canonical form."""
        text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        pool = parse_config(make(address=f'"{text}"'), SOURCE).pool("redis")
        assert pool.servers[0].address == ServerAddress(str(ip), port)
        assert str(pool.servers[0].address) == text


class TestListen:
    @pytest.mark.parametrize(
        ("listen", "endpoint"),
        [
            ("127.0.0.1:6380", "tcp:port=6380:interface=127.0.0.1:backlog=1024"),
            ("[::1]:6380", r"tcp6:port=6380:interface=\:\:1:backlog=1024"),
            ("[0:0:0:0:0:0:0:1]:6380", r"tcp6:port=6380:interface=\:\:1:backlog=1024"),
            (":6380", "tcp:port=6380:backlog=1024"),
            ("0.0.0.0:0", "tcp:port=0:interface=0.0.0.0:backlog=1024"),
            ("tcp:6380", "tcp:6380:backlog=1024"),
            (
                r"tcp6:port=6380:interface=\:\:1",
                r"tcp6:port=6380:interface=\:\:1:backlog=1024",
            ),
            ("unix:/tmp/l4lb.sock", "unix:/tmp/l4lb.sock:backlog=1024"),
            (
                "unix:/tmp/l4lb.sock:mode=600",
                "unix:/tmp/l4lb.sock:mode=600:backlog=1024",
            ),
            ("tcp:6380:backlog=5", "tcp:6380:backlog=5"),
            ("tcp:6380:127.0.0.1:5", "tcp:6380:127.0.0.1:5"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
            ("systemd:domain=UNIX:name=l4lb", "systemd:domain=UNIX:name=l4lb"),
        ],
    )
    def test_endpoint(self, listen: str, endpoint: str) -> None:
        """``listen`` becomes the endpoint string for serverFromString."""
        frontend = frontend_for(listen)
        assert frontend.listen == listen
        assert frontend.endpoint == endpoint

    def test_backlog_from_the_endpoint_string_is_reported(self) -> None:
        """A backlog inside the endpoint string is the frontend's backlog."""
        assert frontend_for("tcp:6380:backlog=5").backlog == 5
        assert frontend_for("tcp:6380:backlog=5", "backlog = 5").backlog == 5

    @pytest.mark.parametrize(
        ("listen", "port", "interface"),
        [
            ("127.0.0.1:6380", 6380, "127.0.0.1"),
            ("[::1]:6380", 6380, "::1"),
            ("[fe80::1%eth0]:6380", 6380, "fe80::1%eth0"),
            (":6380", 6380, ""),
            (r"tcp6:6380:interface=\:\:", 6380, "::"),
        ],
    )
    def test_twisted_accepts_tcp_endpoints(
        self, listen: str, port: int, interface: str
    ) -> None:
        """Twisted parses the endpoint into the intended port, backlog and interface."""
        reactor = MemoryReactor()
        serverFromString(reactor, frontend_for(listen, "backlog = 77").endpoint).listen(
            Factory()
        )
        [(bound_port, _, backlog, bound_interface)] = reactor.tcpServers
        assert (bound_port, backlog, bound_interface) == (port, 77, interface)

    def test_twisted_accepts_unix_endpoints(self) -> None:
        """Twisted parses a unix endpoint with the backlog appended."""
        reactor = MemoryReactor()
        endpoint = frontend_for("unix:/tmp/l4lb.sock", "backlog = 3").endpoint
        serverFromString(reactor, endpoint).listen(Factory())
        [(address, _, backlog, _, _)] = reactor.unixServers
        assert (address, backlog) == ("/tmp/l4lb.sock", 3)

    @given(st.ip_addresses(), st.integers(0, 65535), st.integers(1, 65535))
    def test_any_ip_literal_round_trips_through_twisted(
        self, ip: Any, port: int, backlog: int
    ) -> None:
        """Every IP literal and port reaches Twisted unchanged."""
        listen = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        frontend = frontend_for(listen, f"backlog = {backlog}")
        reactor = MemoryReactor()
        serverFromString(reactor, frontend.endpoint).listen(Factory())
        [(bound_port, _, bound_backlog, interface)] = reactor.tcpServers
        assert (bound_port, bound_backlog, interface) == (port, backlog, str(ip))


# (description, config text, expected key, message fragment)
ERROR_CASES = [
    # unknown keys
    (
        "typo in a frontend key",
        make(frontend='idle_timout = "1h"'),
        "frontend.redis.idle_timout",
        'unknown key (did you mean "idle_timeout"?)',
    ),
    ("typo in global", make(glob="log_lvl = 1"), "global.log_lvl", '"log_level"?'),
    ("typo in pool", make(pool="retry = 1"), "pool.redis.retry", '"retries"?'),
    (
        "typo in server",
        make(server='adress = "x"'),
        "pool.redis.server[0].adress",
        '"address"?',
    ),
    ("unknown top-level key", make(head="frontends = 1"), "frontends", '"frontend"?'),
    (
        "unknown key, nothing close",
        make(pool="zzz = 1"),
        "pool.redis.zzz",
        "unknown key",
    ),
    # wrong types
    (
        "string for an integer",
        make(frontend='max_connections = "10"'),
        "frontend.redis.max_connections",
        'expected an integer, got string "10"',
    ),
    (
        "bool for an integer",
        make(frontend="backlog = true"),
        "frontend.redis.backlog",
        "expected an integer, got boolean true",
    ),
    (
        "float for an integer",
        make(server="weight = 1.0"),
        "pool.redis.server[0].weight",
        "expected an integer, got float 1.0",
    ),
    (
        "string for a boolean",
        make(server='backup = "yes"'),
        "pool.redis.server[0].backup",
        'expected a boolean (true or false), got string "yes"',
    ),
    (
        "integer for a boolean",
        make(server="backup = 1"),
        "pool.redis.server[0].backup",
        "got integer 1",
    ),
    (
        "integer for a string",
        make(uses="5"),
        "frontend.redis.pool",
        "expected a string",
    ),
    ("empty string", make(uses='""'), "frontend.redis.pool", "must not be empty"),
    (
        "date for a duration",
        make(frontend="idle_timeout = 1979-05-27"),
        "frontend.redis.idle_timeout",
        "got a date/time",
    ),
    # tables where scalars belong, and the reverse
    (
        "table for a scalar",
        make(frontend="idle_timeout = { s = 1 }"),
        "frontend.redis.idle_timeout",
        "got a table",
    ),
    (
        "sub-table header for a scalar",
        make(extra="[global.log_level]\nx = 1"),
        "global.log_level",
        "expected a string, got a table",
    ),
    (
        "array for a scalar",
        make(pool="retries = [1]"),
        "pool.redis.retries",
        "expected an integer, got an array",
    ),
    (
        "scalar for the global table",
        'global = "x"\n' + MINIMAL,
        "global",
        'expected a table, got string "x"',
    ),
    (
        "scalar for a frontend",
        make(extra="[frontend]\nb = 5"),
        "frontend.b",
        "got integer 5",
    ),
    (
        "scalar for the pool table",
        'pool = "p"\n[frontend.f]\nlisten = ":1"\npool = "p"\n',
        "pool",
        'expected a table of named tables, got string "p"',
    ),
    (
        "server as a table",
        make(extra='[pool.pg]\n[pool.pg.server]\naddress = "127.0.0.1:5432"'),
        "pool.pg.server",
        "expected an array of tables ([[pool.pg.server]]),"
        " got a table ([pool.pg.server])",
    ),
    (
        "server as a scalar",
        make(extra='[pool.pg]\nserver = "127.0.0.1:5432"'),
        "pool.pg.server",
        'expected an array of tables ([[pool.pg.server]]), got string "127.0.0.1:5432"',
    ),
    (
        "server entry not a table",
        make(extra="[pool.pg]\nserver = [1]"),
        "pool.pg.server[0]",
        "expected a table, got integer 1",
    ),
    # durations
    (
        "bare numeric string",
        make(frontend='idle_timeout = "10"'),
        "frontend.redis.idle_timeout",
        'duration "10" has no unit',
    ),
    (
        "unknown unit",
        make(glob='shutdown_grace = "1d"'),
        "global.shutdown_grace",
        'invalid duration "1d"',
    ),
    (
        "negative duration",
        make(frontend="half_closed_timeout = -1"),
        "frontend.redis.half_closed_timeout",
        "must not be negative",
    ),
    (
        "zero connect timeout",
        make(pool='connect_timeout = "0s"'),
        "pool.redis.connect_timeout",
        "must be greater than 0",
    ),
    (
        "infinite duration",
        make(pool="queue_timeout = inf"),
        "pool.redis.queue_timeout",
        "too large",
    ),
    (
        "nan duration",
        make(pool="queue_timeout = nan"),
        "pool.redis.queue_timeout",
        "got float nan",
    ),
    # server addresses
    (
        "missing port",
        make(address='"127.0.0.1"'),
        "pool.redis.server[0].address",
        "missing port",
    ),
    (
        "non-numeric port",
        make(address='"db:abc"'),
        "pool.redis.server[0].address",
        'port "abc" is not a number',
    ),
    (
        "port out of range",
        make(address='"127.0.0.1:70000"'),
        "pool.redis.server[0].address",
        "port 70000 is out of range",
    ),
    (
        "port zero for a server",
        make(address='"127.0.0.1:0"'),
        "pool.redis.server[0].address",
        "port 0 is out of range",
    ),
    (
        "huge port",
        make(address='"db:' + "9" * 5000 + '"'),
        "pool.redis.server[0].address",
        "is out of range",
    ),
    (
        "empty port",
        make(address='"db:"'),
        "pool.redis.server[0].address",
        "missing port",
    ),
    (
        "missing host",
        make(address='":6379"'),
        "pool.redis.server[0].address",
        "missing host",
    ),
    (
        "unclosed bracket",
        make(address='"[::1:6379"'),
        "pool.redis.server[0].address",
        "missing ']'",
    ),
    (
        "bracket without port",
        make(address='"[::1]"'),
        "pool.redis.server[0].address",
        "missing port",
    ),
    (
        "junk after bracket",
        make(address='"[::1]6379"'),
        "pool.redis.server[0].address",
        "after ']'",
    ),
    (
        "non-IPv6 in brackets",
        make(address='"[db]:6379"'),
        "pool.redis.server[0].address",
        '"db" in brackets is not an IPv6 address',
    ),
    (
        "stray closing bracket",
        make(address='"db]:6379"'),
        "pool.redis.server[0].address",
        "']' without '['",
    ),
    (
        "IPv6 without brackets",
        make(address='"::1:6379"'),
        "pool.redis.server[0].address",
        "IPv6 addresses must be in brackets, e.g. [::1]:6379",
    ),
    (
        "too many colons",
        make(address='"tcp:db:6379"'),
        "pool.redis.server[0].address",
        "too many ':'",
    ),
    (
        "empty unix path",
        make(address='"unix:"'),
        "pool.redis.server[0].address",
        "unix socket path is empty",
    ),
    (
        "bad host name",
        make(address='"bad host:1"'),
        "pool.redis.server[0].address",
        '"bad host" is not a valid IP address or host name',
    ),
    (
        "bad IPv4",
        make(address='"256.1.1.1:1"'),
        "pool.redis.server[0].address",
        '"256.1.1.1" is not a valid IPv4 address',
    ),
    # listen
    (
        "listen host name",
        make(listen='"localhost:6380"'),
        "frontend.redis.listen",
        'listen host must be an IP address, got "localhost" (use ":6380"',
    ),
    (
        "listen without port",
        make(listen='"127.0.0.1"'),
        "frontend.redis.listen",
        "missing port",
    ),
    (
        "listen port out of range",
        make(listen='"127.0.0.1:65536"'),
        "frontend.redis.listen",
        "port 65536 is out of range",
    ),
    (
        "listen IPv6 without brackets",
        make(listen='"::1:6380"'),
        "frontend.redis.listen",
        "must be in brackets",
    ),
    (
        "endpoint bad port",
        make(listen='"tcp:port=x"'),
        "frontend.redis.listen",
        'port "x" is not a number',
    ),
    (
        "endpoint missing port",
        make(listen='"tcp:interface=127.0.0.1"'),
        "frontend.redis.listen",
        "missing port in the tcp: endpoint",
    ),
    (
        "endpoint unknown parameter",
        make(listen='"tcp:6380:interfce=127.0.0.1"'),
        "frontend.redis.listen",
        'unknown parameter "interfce" for a tcp: endpoint (did you mean "interface"?)',
    ),
    (
        "endpoint parameter twice",
        make(listen='"tcp:6380:port=6381"'),
        "frontend.redis.listen",
        'parameter "port" is given twice',
    ),
    (
        "endpoint keyword twice",
        make(listen='"tcp:port=1:port=2"'),
        "frontend.redis.listen",
        'parameter "port" is given twice',
    ),
    (
        "endpoint too many arguments",
        make(listen='"tcp:1:127.0.0.1:5:x"'),
        "frontend.redis.listen",
        "too many arguments",
    ),
    (
        "endpoint interface host name",
        make(listen='"tcp:6380:interface=localhost"'),
        "frontend.redis.listen",
        'interface must be an IP address, got "localhost"',
    ),
    (
        "endpoint bad backlog",
        make(listen='"tcp:6380:backlog=0"'),
        "frontend.redis.listen",
        'backlog "0" must be an integer >= 1',
    ),
    (
        "endpoint lone backslash",
        make(listen="'tcp:6380\\'"),
        "frontend.redis.listen",
        "lone backslash",
    ),
    (
        "empty unix listen",
        make(listen='"unix:"'),
        "frontend.redis.listen",
        "path is empty",
    ),
    (
        "unix bad mode",
        make(listen='"unix:/x:mode=rw"'),
        "frontend.redis.listen",
        'mode "rw" must be an octal number',
    ),
    (
        "systemd without index or name",
        make(listen='"systemd:domain=INET"'),
        "frontend.redis.listen",
        "exactly one of index= or name=",
    ),
    (
        "systemd bad domain",
        make(listen='"systemd:domain=IP:index=0"'),
        "frontend.redis.listen",
        "domain= one of: INET, INET6, UNIX",
    ),
    (
        "backlog set twice, differently",
        make(listen='"tcp:6380:backlog=10"', frontend="backlog = 20"),
        "frontend.redis.backlog",
        "conflicts with backlog=10 in listen",
    ),
    (
        "backlog with systemd",
        make(listen='"systemd:domain=INET:index=0"', frontend="backlog = 20"),
        "frontend.redis.backlog",
        "has no effect",
    ),
    # references and duplicates
    (
        "frontend naming a missing pool",
        make(uses='"rdis"'),
        "frontend.redis.pool",
        'no pool named "rdis" (did you mean "redis"?); defined pools: "redis"',
    ),
    (
        "same address twice",
        make(extra='[[pool.redis.server]]\naddress = "127.0.0.1:6379"'),
        "pool.redis.server[1]",
        'duplicate name "127.0.0.1:6379" (also server[0]); a server\'s name defaults',
    ),
    (
        "same name twice",
        make(
            server='name = "a"',
            extra='[[pool.redis.server]]\naddress = "db:1"\nname = "a"',
        ),
        "pool.redis.server[1].name",
        'duplicate name "a" (also server[0])',
    ),
    (
        "pool without servers",
        make(extra='[pool.pg]\nbalance = "first"'),
        "pool.pg.server",
        "a pool needs at least one server (add a [[pool.pg.server]] table)",
    ),
    (
        "pool with an empty server array",
        make(extra="[pool.pg]\nserver = []"),
        "pool.pg.server",
        "a pool needs at least one server",
    ),
    (
        "wildcard and host on one port",
        make(extra='[frontend.b]\nlisten = ":6380"\npool = "redis"'),
        "frontend.b.listen",
        '":6380" conflicts with frontend.redis (listen = "127.0.0.1:6380")',
    ),
    (
        "same IPv6 address written two ways",
        make(
            listen='"[::1]:6380"',
            extra='[frontend.b]\nlisten = "[0:0:0:0:0:0:0:1]:6380"\npool = "redis"',
        ),
        "frontend.b.listen",
        "conflicts with frontend.redis",
    ),
    (
        "host form and endpoint form of one address",
        make(
            extra='[frontend.b]\nlisten = "tcp:6380:interface=127.0.0.1"'
            '\npool = "redis"'
        ),
        "frontend.b.listen",
        "conflicts with frontend.redis",
    ),
    (
        "same unix socket",
        make(
            listen='"unix:/tmp/a"',
            extra='[frontend.b]\nlisten = "unix:address=/tmp/a"\npool = "redis"',
        ),
        "frontend.b.listen",
        "conflicts with frontend.redis",
    ),
    # ranges
    (
        "weight too big",
        make(server="weight = 257"),
        "pool.redis.server[0].weight",
        "must be between 0 and 256, got 257",
    ),
    (
        "negative weight",
        make(server="weight = -1"),
        "pool.redis.server[0].weight",
        "must be between 0 and 256, got -1",
    ),
    (
        "negative global max_connections",
        make(glob="max_connections = -1"),
        "global.max_connections",
        "must be at least 0, got -1",
    ),
    (
        "negative frontend max_connections",
        make(frontend="max_connections = -1"),
        "frontend.redis.max_connections",
        "must be at least 0, got -1",
    ),
    (
        "negative server max_connections",
        make(server="max_connections = -5"),
        "pool.redis.server[0].max_connections",
        "must be at least 0, got -5",
    ),
    ("negative retries", make(pool="retries = -1"), "pool.redis.retries", "at least 0"),
    (
        "negative max_queue",
        make(pool="max_queue = -1"),
        "pool.redis.max_queue",
        "at least 0",
    ),
    (
        "zero backlog",
        make(frontend="backlog = 0"),
        "frontend.redis.backlog",
        "must be at least 1, got 0",
    ),
    (
        "absurd integer",
        make(frontend="max_connections = 0x" + "f" * 5000),
        "frontend.redis.max_connections",
        "must be at most 2147483647, got (a very large number)",
    ),
    # enumerations
    (
        "unknown balance",
        make(pool='balance = "least-conn"'),
        "pool.redis.balance",
        "expected one of: least-connections, round-robin, random-two,"
        " source-hash, first",
    ),
    (
        "unknown log format",
        make(glob='log_format = "text"'),
        "global.log_format",
        'unknown value "text"; expected one of: json, console',
    ),
    (
        "log level in capitals",
        make(glob='log_level = "INFO"'),
        "global.log_level",
        "expected one of: debug, info, warning, error, critical",
    ),
    # required keys
    (
        "frontend without listen",
        make(extra='[frontend.b]\npool = "redis"'),
        "frontend.b.listen",
        "required key is missing",
    ),
    (
        "frontend without pool",
        make(extra='[frontend.b]\nlisten = ":7000"'),
        "frontend.b.pool",
        "required key is missing",
    ),
    (
        "server without address",
        make(extra='[[pool.redis.server]]\nname = "b"'),
        "pool.redis.server[1].address",
        "required key is missing",
    ),
    (
        "no frontends",
        MINIMAL.partition("[pool.p]")[1] + MINIMAL.partition("[pool.p]")[2],
        "frontend",
        "at least one frontend is required",
    ),
    ("empty frontend table", "[frontend]\n", "frontend", "at least one frontend"),
    (
        "empty frontend name",
        make(extra='[frontend.""]\nlisten = ":7000"\npool = "redis"'),
        'frontend.""',
        "name must not be empty",
    ),
    (
        "quoted name in the key path",
        make(extra='[frontend."my db"]\nlisten = ":7000"\npool = "redis"\nbacklog = 0'),
        'frontend."my db".backlog',
        "must be at least 1",
    ),
]


class TestProblems:
    @pytest.mark.parametrize(
        ("text", "key", "fragment"),
        [case[1:] for case in ERROR_CASES],
        ids=[case[0] for case in ERROR_CASES],
    )
    def test_reported(self, text: str, key: str, fragment: str) -> None:
        """Each kind of mistake is one problem naming its key path."""
        problem = only_problem(text)
        assert problem.source == SOURCE
        assert problem.key == key
        assert fragment in problem.message

    def test_example_message_format(self) -> None:
        """A problem prints as ``source: key: message``."""
        text = make(extra='[[pool.redis.server]]\naddress = "127.0.0.1:70000"')
        assert str(only_problem(text)) == (
            "etc/l4lb.toml: pool.redis.server[1].address: port 70000 is out of range"
        )

    def test_many_problems_are_all_reported(self) -> None:
        """One parse reports all problems: tables in file order, then references."""
        text = make(
            glob='log_level = "loud"',
            frontend='idle_timout = "1h"\nbacklog = 0',
            pool='balance = "fastest"',
            server="weight = 1000",
            uses='"nope"',
            extra='[[pool.redis.server]]\naddress = "db"\n'
            '[frontend.b]\nlisten = ":6380"\npool = "redis"',
        )
        keys = [problem.key for problem in problems(text)]
        assert keys == [
            "global.log_level",
            "frontend.redis.idle_timout",
            "frontend.redis.backlog",
            "pool.redis.balance",
            "pool.redis.server[0].weight",
            "pool.redis.server[1].address",
            "frontend.redis.pool",
            "frontend.b.listen",
        ]

    def test_broken_pool_is_not_also_missing(self) -> None:
        """A frontend naming an invalid pool gets no extra "no pool" problem."""
        problem = only_problem(make(pool='balance = "x"'))
        assert problem.key == "pool.redis.balance"

    def test_invalid_frontend_still_checked_for_conflicts(self) -> None:
        """A bad key in one frontend does not hide a listen conflict."""
        text = make(
            frontend="backlog = -1",
            extra='[frontend.b]\nlisten = "127.0.0.1:6380"\npool = "redis"',
        )
        keys = [problem.key for problem in problems(text)]
        assert keys == ["frontend.redis.backlog", "frontend.b.listen"]

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            (":0", ":0"),
            ("127.0.0.1:6380", "127.0.0.2:6380"),
            ("127.0.0.1:6380", "127.0.0.1:6381"),
            ("[::1]:6380", "127.0.0.1:6380"),
            ("unix:/tmp/a", "unix:/tmp/b"),
        ],
    )
    def test_distinct_listens_do_not_conflict(self, first: str, second: str) -> None:
        """Port 0, different hosts, ports or paths may coexist."""
        text = make(
            listen=f'"{first}"',
            extra=f'[frontend.b]\nlisten = "{second}"\npool = "redis"',
        )
        assert len(parse_config(text, SOURCE).frontends) == 2


class TestSyntaxErrors:
    @pytest.mark.parametrize(
        ("text", "key", "message"),
        [
            ("[global]\nlog_level = \n", "line 2", "Invalid value"),
            ("[frontend\n", "line 1", "Expected ']' at the end of a table declaration"),
            ("a = 1\nb = 2\nb = 3\n", "line 3", "Cannot overwrite a value"),
            ('a = 1\nb = "x', "line 2", "Unterminated string"),
            ('a = 1\nb = "x\n', "line 2", "Illegal character '\\n'"),
        ],
    )
    def test_line_number_and_message(self, text: str, key: str, message: str) -> None:
        """A TOML syntax error is one problem keyed by its line, without the suffix."""
        problem = only_problem(text)
        assert (problem.key, problem.message) == (key, message)

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("x = " + "[" * 5000, "nested too deeply"),
            ("x = " + "1" * 5000, "invalid TOML"),
        ],
    )
    def test_other_tomllib_failures(self, text: str, fragment: str) -> None:
        """Failures tomllib reports without a position still become problems."""
        problem = only_problem(text)
        assert problem.key == "-"
        assert fragment in problem.message


class TestLoadConfig:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is one problem keyed ``-``, naming the path as given."""
        path = str(tmp_path / "nope.toml")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.problems == (
            Problem(path, "-", "cannot read file: No such file or directory"),
        )

    def test_directory(self, tmp_path: Path) -> None:
        """A directory is reported as unreadable, not as a traceback."""
        with pytest.raises(ConfigError, match="cannot read file: Is a directory"):
            load_config(str(tmp_path))

    def test_source_is_the_path_as_given(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Problems and Config.source use the path exactly as the user wrote it."""
        monkeypatch.chdir(tmp_path)
        Path("bad.toml").write_text(make(uses='"x"'))
        with pytest.raises(ConfigError) as caught:
            load_config("./bad.toml")
        assert caught.value.problems[0].source == "./bad.toml"
        Path("good.toml").write_text(make())
        assert load_config("good.toml").source == "good.toml"

    def test_invalid_utf8(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are a problem on their line."""
        path = tmp_path / "c.toml"
        path.write_bytes(b"a = 1\nb = '\xff'\n")
        with pytest.raises(ConfigError) as caught:
            load_config(str(path))
        [problem] = caught.value.problems
        assert problem.key == "line 2"
        assert problem.message.startswith("invalid UTF-8")

    def test_byte_order_mark_is_accepted(self, tmp_path: Path) -> None:
        """A UTF-8 byte order mark left by some editors is ignored."""
        path = tmp_path / "c.toml"
        path.write_bytes(b"\xef\xbb\xbf" + make().encode())
        assert load_config(str(path)).frontend("redis").pool == "redis"


class TestConfigError:
    def test_str_is_one_problem_per_line(self) -> None:
        """str(ConfigError) lists the problems one per line."""
        error = ConfigError((Problem("a", "b", "c"), Problem("a", "d", "e")))
        assert str(error) == "a: b: c\na: d: e"

    def test_pickles(self) -> None:
        """ConfigError survives pickling (e.g. across worker processes)."""
        error = ConfigError((Problem("a", "b", "c"),))
        assert pickle.loads(pickle.dumps(error)).problems == error.problems


_LEAVES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "1s",
            "250ms",
            "10",
            "127.0.0.1:6380",
            ":6380",
            "[::1]:1",
            "unix:/x",
            "tcp:0",
            "systemd:domain=INET:index=0",
            "redis",
            "postgres",
            "first",
            "json",
            "debug",
        ]
    ),
)
_SCHEMA_KEYS = {
    part.rstrip("[]") for path in schema_paths() for part in path.split(".")
}
_KEYS = st.sampled_from([*sorted(_SCHEMA_KEYS - {"*"}), "redis", "postgres", "x"])
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4)
    ),
    max_leaves=10,
)


def _locations(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a table entry or array item inside ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key)
            yield from _locations(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*path, index)
            yield from _locations(item, (*path, index))


@st.composite
def _mutated_examples(draw: st.DrawFn) -> str:
    """The example document with a few entries replaced, removed or added."""
    document = tomllib.loads(EXAMPLE.read_text())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(_locations(document))))
        parent = document
        for step in where[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[where[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(_KEYS)] = draw(_VALUES)
        else:
            parent[where[-1]] = draw(_VALUES)
    return dump_document(document)


class TestRobustness:
    def test_dump_round_trips_the_example(self) -> None:
        """The test-only TOML writer reproduces the example exactly."""
        text = dump_document(tomllib.loads(EXAMPLE.read_text()))
        assert parse_config(text, str(EXAMPLE)) == load_config(str(EXAMPLE))

    @settings(max_examples=300)
    @given(st.text())
    def test_arbitrary_text_raises_only_config_error(self, text: str) -> None:
        """Any text either parses or raises ConfigError, never anything else."""
        try:
            parse_config(text, SOURCE)
        except ConfigError as error:
            assert error.problems
            assert all(str(problem) for problem in error.problems)

    @settings(max_examples=300)
    @given(_mutated_examples())
    def test_mutated_example_raises_only_config_error(self, text: str) -> None:
        """Damaging a valid document in any way yields a Config or ConfigError."""
        try:
            cfg = parse_config(text, SOURCE)
        except ConfigError as error:
            assert error.problems
            for problem in error.problems:
                assert problem.source == SOURCE
                assert problem.key
                assert problem.message
        else:
            assert cfg.frontends
            assert all(pool.servers for pool in cfg.pools)
