"""Load and validate the l4lb TOML configuration.

The file is parsed into frozen attrs classes (:class:`Config` and friends).
Validation collects *every* problem it finds in one pass and raises a single
:class:`ConfigError`, so an operator fixes a broken file in one edit instead of
one restart per typo.

Problems name the offending key by its dotted path in the file, for example
``frontend.redis.idle_timeout`` or ``pool.redis.server[1].address``.  Entries of
an array of tables (``[[pool.redis.server]]``) are numbered from 0 in file
order, so ``server[1]`` is the second server of the pool.  Names that are not
bare TOML keys are quoted (``frontend."my db".listen``).  TOML syntax errors
use the key ``line N``; a file that cannot be read uses the key ``-``.

The schema is table driven: each TOML table is a :class:`_Section` that maps
its keys to readers (scalar converters, nested tables, named tables, arrays of
tables) and names the attrs class it builds.  Defaults live only on the attrs
classes.  Adding a key is one line in a section plus one attrs field; adding a
sub-table (``[pool.X.health]``) is one new section plus one ``_Table(...)``
entry in its parent.

This module is pure: it imports nothing from ``twisted.internet``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import attrs

from l4lb.balance import POLICY_NAMES
from l4lb.tls.sni import normalise_name, normalise_pattern

__all__ = [
    "CertificateConfig",
    "CheckStep",
    "Config",
    "ConfigError",
    "FrontendConfig",
    "FrontendTLSConfig",
    "GlobalConfig",
    "HealthConfig",
    "PoolConfig",
    "PoolTLSConfig",
    "Problem",
    "ServerAddress",
    "ServerConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TLS_VERSIONS = ("1.2", "1.3")
CLIENT_AUTH = ("required", "optional")
STARTTLS_PROTOCOLS = ("postgres",)
PLAINTEXT_POLICIES = ("refuse", "allow")

# Sanity cap for counts: keeps absurd values (and OverflowError in listen())
# out of the runtime.
_MAX_COUNT = 2**31 - 1


# --------------------------------------------------------------------------
# Result classes
# --------------------------------------------------------------------------


@attrs.frozen
class ServerAddress:
    """Where a backend server listens: TCP ``host``/``port`` or a unix path."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    @property
    def is_unix(self) -> bool:
        """True for a unix socket address (the pool connects with AF_UNIX)."""
        return self.unix_path is not None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class GlobalConfig:
    """Process-wide settings (the optional ``[global]`` table)."""

    max_connections: int = 100000
    shutdown_grace: float = 30.0
    log_format: str = "json"
    log_level: str = "info"
    # Zero-copy splicing of plain TCP (Linux os.splice); off or unsupported
    # falls back to copying through Python.
    splice: bool = True
    workers: int = 1  # processes serving clients; "auto" is resolved when parsed


@attrs.frozen
class FrontendConfig:
    """One listening socket and the pool it forwards to."""

    name: str
    listen: str  # the text as written in the file, for messages and logs
    endpoint: str  # Twisted server endpoint description for serverFromString
    pool: str | None  # None only with route_by_sni: unmatched SNI is refused
    max_connections: int = 10000
    idle_timeout: float = 3600.0
    half_closed_timeout: float = 60.0
    backlog: int = 1024
    tls: FrontendTLSConfig | None = None  # [frontend.X.tls]: terminate TLS
    # TLS passthrough: (SNI pattern, pool name) in file order; "*.x" wildcards.
    route_by_sni: tuple[tuple[str, str], ...] = ()
    # Passthrough only: time allowed for the whole ClientHello to arrive.
    handshake_timeout: float = 10.0


@attrs.frozen
class CertificateConfig:
    """One certificate (file may hold the chain) and its private key."""

    cert: str
    key: str


@attrs.frozen
class FrontendTLSConfig:
    """TLS termination on a frontend ([frontend.X.tls])."""

    certificates: tuple[CertificateConfig, ...]  # the first is the default
    min_version: str = "1.2"  # "1.2" | "1.3"
    ciphers: str | None = None  # None: Mozilla "intermediate"
    alpn: tuple[str, ...] = ()
    client_ca: str | None = None
    client_auth: str = "required"  # "required" | "optional"; only with client_ca
    handshake_timeout: float = 10.0
    starttls: str | None = None  # "postgres"
    plaintext: str = "refuse"  # with starttls: "refuse" | "allow"


@attrs.frozen
class ServerConfig:
    """One backend server of a pool."""

    name: str
    address: ServerAddress
    weight: int = 1
    max_connections: int = 0
    backup: bool = False


@attrs.frozen
class PoolConfig:
    """A group of interchangeable servers and how to spread clients over them."""

    name: str
    servers: tuple[ServerConfig, ...]
    balance: str = "least-connections"
    connect_timeout: float = 3.0
    retries: int = 3
    queue_timeout: float = 5.0
    max_queue: int = 1000
    health: HealthConfig | None = None  # None: no probes, servers always up
    tls: PoolTLSConfig | None = None  # None: plain TCP to the servers


@attrs.frozen
class PoolTLSConfig:
    """TLS from l4lb to the servers of a pool ([pool.X.tls])."""

    verify: bool = True
    ca: str | None = None  # None: the system trust store
    server_name: str | None = None  # None: the server's host
    cert: str | None = None  # client certificate for mTLS to the servers
    key: str | None = None


@attrs.frozen
class CheckStep:
    """One step of a send-expect check: send bytes, then match the reply's start."""

    send: bytes = b""
    expect: bytes | None = None  # the reply must start with these bytes
    expect_regex: str | None = None  # or match this (bytes regex, from the start)


@attrs.frozen
class HealthConfig:
    """Active health checking of a pool's servers ([pool.X.health])."""

    type: str = "tcp"  # tcp | send-expect | tls | http | redis | postgres | mysql
    interval: float = 2.0  # fully up
    fast_interval: float = 0.5  # changing state
    down_interval: float = 5.0  # fully down
    timeout: float = 1.0  # a whole check: connect + exchange
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1  # fraction of each interval (from "10%")
    port: int | None = None  # probe this port instead of the server's own
    initial_state: str = "up"  # "up" | "down"
    observe: bool = True  # failed client connects count as failed checks
    slow_start: float = 0.0  # 0: off
    on_down: str = "keep"  # "keep" | "close"
    role: str = "any"  # "primary" | "replica" | "any" (redis/postgres/mysql)
    # send-expect: `send`/`expect`/`expect_regex` keys make one step;
    # [[pool.X.health.step]] tables make several.
    steps: tuple[CheckStep, ...] = ()
    # http
    path: str = "/"
    expect_status: tuple[int, ...] = (200,)
    # postgres / mysql
    user: str | None = None
    password_file: str | None = None
    database: str | None = None
    # tls check on a pool without [pool.X.tls]
    verify: bool = False
    ca: str | None = None
    server_name: str | None = None


@attrs.frozen
class Config:
    """The whole validated configuration; sequences keep file order."""

    source: str
    global_: GlobalConfig
    frontends: tuple[FrontendConfig, ...]
    pools: tuple[PoolConfig, ...]

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name``; KeyError when there is none."""
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def frontend(self, name: str) -> FrontendConfig:
        """The frontend called ``name``; KeyError when there is none."""
        for frontend in self.frontends:
            if frontend.name == name:
                return frontend
        raise KeyError(name)


@attrs.frozen
class Problem:
    """One thing wrong with the file, located by its key path."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        super().__init__(problems)
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


# --------------------------------------------------------------------------
# Value helpers
# --------------------------------------------------------------------------


def _quote(text: str, limit: int = 60) -> str:
    """``text`` in double quotes with escapes, shortened for messages."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _number(value: int | float) -> str:
    """A number as text, even one too long for Python's int-to-str limit."""
    try:
        return str(value)
    except ValueError:
        return "(a very large number)"


def _describe(value: object) -> str:
    """Name a TOML value's type (and the value) for "got ..." messages."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {_number(value)}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a date/time ({value})"


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ``(did you mean "x"?)`` hint, or nothing when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    """Append ``key`` to a dotted path, quoting it when it is not a bare key."""
    if not _BARE_KEY.fullmatch(key):
        key = _quote(key, limit=200)
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------
# Scalar converters: take a TOML value, return the Python value or raise
# ValueError with a message for the operator.
# --------------------------------------------------------------------------


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_BARE_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_UNIT_SECONDS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_DURATION_HINT = 'a number of seconds or a string like "250ms", "2s", "5m", "1h"'


def parse_duration(value: object) -> float:
    """Seconds in a duration given as a number or a string such as ``"250ms"``.

    Timeouts are easier to read with a unit, but plain numbers of seconds are
    what TOML users write first, so both are accepted.  A numeric *string*
    without a unit is refused: it is ambiguous (seconds? milliseconds?).
    Raises ValueError with a message meant for the operator.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f"expected a duration ({_DURATION_HINT}), got {_describe(value)}"
        )
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            if _BARE_NUMBER.fullmatch(value):
                if value.startswith("-"):
                    raise ValueError(f"must not be negative, got {_quote(value)}")
                raise ValueError(
                    f"duration {_quote(value)} has no unit; write a number of seconds"
                    f" without quotes, or add a unit: ms, s, m or h"
                    f" (e.g. {_quote(value.lstrip('+') + 's')})"
                )
            if value.startswith("-") and _DURATION.fullmatch(value[1:]):
                raise ValueError(f"must not be negative, got {_quote(value)}")
            raise ValueError(
                f"invalid duration {_quote(value)}; expected {_DURATION_HINT}"
            )
        try:
            seconds = float(Decimal(match[1]) * _UNIT_SECONDS[match[2]])
        except ArithmeticError:  # decimal.Overflow on absurdly long numbers
            seconds = math.inf
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds):
        raise ValueError("expected a number of seconds, got float nan")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {_describe(value)}")
    if math.isinf(seconds):
        raise ValueError(f"duration is too large: {_describe(value)}")
    return seconds if seconds else 0.0  # no -0.0


def _duration(*, positive: bool = False) -> Callable[[object], float]:
    """A duration converter; ``positive`` refuses 0 (elsewhere 0 means "disabled")."""

    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise ValueError("must be greater than 0")
        return seconds

    return convert


def _integer(low: int = 0, high: int = _MAX_COUNT) -> Callable[[object], int]:
    """An integer converter with inclusive bounds; refuses bools and floats."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if low <= value <= high:
            return value
        if high == _MAX_COUNT:
            if value < low:
                raise ValueError(f"must be at least {low}, got {_number(value)}")
            raise ValueError(f"must be at most {high}, got {_number(value)}")
        raise ValueError(f"must be between {low} and {high}, got {_number(value)}")

    return convert


def _boolean(value: object) -> bool:
    """A TOML boolean; strings like "yes" are refused."""
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean (true or false), got {_describe(value)}")
    return value


def _string(value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    if not value:
        raise ValueError("must not be empty")
    return value


def _http_path(value: object) -> str:
    """An HTTP request path: starts with "/", no spaces or control characters."""
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f'must start with "/", got {_quote(text)}')
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ValueError(
            f"must not contain spaces or control characters, got {_quote(text)}"
        )
    return text


def _choice(allowed: tuple[str, ...]) -> Callable[[object], str]:
    """A string that must be one of ``allowed`` (listed in the message)."""

    def convert(value: object) -> str:
        text = _string(value)
        if text not in allowed:
            raise ValueError(
                f"unknown value {_quote(text)}{_suggest(text, allowed)};"
                f" expected one of: {', '.join(allowed)}"
            )
        return text

    return convert


# --------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?")
_ADDRESS_FORMS = 'expected "host:port", "[ipv6]:port" or "unix:/path"'


def _split_host_port(text: str, forms: str) -> tuple[str, str, bool]:
    """Split ``host:port`` / ``[v6]:port`` into (host, port text, bracketed)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' after the IPv6 address ({forms})")
        host, rest = text[1:close], text[close + 1 :]
        if not rest:
            raise ValueError("missing port (expected [ipv6]:port)")
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {_quote(rest)} after ']' ({forms})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{_quote(host)} in brackets is not an IPv6 address"
            ) from None
        return host, rest[1:], True
    if "]" in text:
        raise ValueError(f"']' without '[' ({forms})")
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"missing port ({forms})")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"too many ':' ({forms})") from None
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. [{host}]:{port}")
    return host, port, False


def _port(text: str, low: int) -> int:
    """A decimal port number in ``low``..65535."""
    if not text:
        raise ValueError("missing port")
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"port {_quote(text)} is not a number")
    if len(text.lstrip("0")) > 5 or not low <= int(text) <= 65535:
        raise ValueError(f"port {_quote(text, limit=20)[1:-1]} is out of range")
    return int(text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None when it is not an IP literal."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _server_address(value: object) -> ServerAddress:
    """A backend address: ``host:port``, ``[v6]:port`` or ``unix:/path``."""
    text = _string(value)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix socket path is empty")
        if "\0" in path:
            raise ValueError("unix socket path contains a NUL character")
        return ServerAddress(unix_path=path)
    host, port_text, bracketed = _split_host_port(text, _ADDRESS_FORMS)
    if not host:
        raise ValueError(f"missing host ({_ADDRESS_FORMS})")
    port = _port(port_text, low=1)
    ip = _ip(host)
    if ip is not None:
        return ServerAddress(host=str(ip), port=port)
    if bracketed or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{_quote(host)} is not a valid IP address or host name")
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{_quote(host)} is not a valid IPv4 address")
    return ServerAddress(host=host, port=port)


# Listen side: Twisted's endpoint grammar is ``type:arg:key=value`` with
# ``\`` escaping the next character; these are the parameters l4lb accepts
# for each endpoint type, in Twisted's positional order.
_ENDPOINT_PARAMS: Mapping[str, tuple[str, ...]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def _escape(text: str) -> str:
    """Escape the characters that are special in Twisted endpoint strings."""
    return re.sub(r"([\\:=])", r"\\\1", text)


def _endpoint_args(text: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint description like Twisted's ``_parse`` does."""
    fields: list[list[str]] = [[""]]
    ops = ":="
    chars = iter(text)
    for char in chars:
        if char in ops:
            if char == ":":
                fields.append([""])
                ops = ":="
            else:
                fields[-1].append("")
                ops = ":"
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("endpoint description ends with a lone backslash")
            fields[-1][-1] += escaped
        else:
            fields[-1][-1] += char
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for field in fields:
        if len(field) == 1:
            args.append(field[0])
        elif field[0] in kwargs:
            raise ValueError(f"parameter {_quote(field[0])} is given twice")
        else:
            kwargs[field[0]] = field[1]
    return args, kwargs


@attrs.frozen
class _Listen:
    """A parsed ``listen`` value: the endpoint and what it binds."""

    kind: str  # endpoint type: tcp, tcp6, unix or systemd
    endpoint: str  # without a backlog when ``backlog`` is None
    backlog: int | None  # backlog given inside an endpoint string
    bind: tuple[Any, ...]  # what two frontends must not share, see _conflicts


def _listen(value: object) -> _Listen:
    """A frontend ``listen`` value: ``host:port``, ``:port`` or an endpoint string."""
    text = _string(value)
    kind = text.partition(":")[0]
    if kind in _ENDPOINT_PARAMS and ":" in text:
        return _listen_endpoint(text, kind)
    host, port_text, bracketed = _split_host_port(
        text, 'expected "ip:port", "[ipv6]:port", ":port" or a Twisted endpoint string'
    )
    port = _port(port_text, low=0)
    if not host and not bracketed:
        return _Listen("tcp", f"tcp:port={port}", None, ("tcp", None, port))
    ip = _ip(host)
    if ip is None:
        raise ValueError(
            f"listen host must be an IP address, got {_quote(host)}"
            f' (use ":{port}" for all interfaces)'
        )
    kind = "tcp6" if ip.version == 6 else "tcp"
    endpoint = f"{kind}:port={port}:interface={_escape(str(ip))}"
    return _Listen(kind, endpoint, None, ("tcp", _wildcard(ip), port))


def _wildcard(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> object:
    """None for the any-address (0.0.0.0, ::), else the address itself."""
    return None if ip.is_unspecified else ip


def _listen_endpoint(text: str, kind: str) -> _Listen:
    """Check a Twisted endpoint string enough to catch typos before startup."""
    args, kwargs = _endpoint_args(text)
    names = _ENDPOINT_PARAMS[kind]
    positional = args[1:]
    if len(positional) > len(names):
        raise ValueError(f"too many arguments for a {kind}: endpoint")
    params = dict(zip(names, positional, strict=False))
    for key, item in kwargs.items():
        if key not in names:
            raise ValueError(
                f"unknown parameter {_quote(key)} for a {kind}: endpoint"
                f"{_suggest(key, names)}; known: {', '.join(names)}"
            )
        if key in params:
            raise ValueError(f"parameter {_quote(key)} is given twice")
        params[key] = item
    backlog = None
    if "backlog" in params:
        backlog_text = params["backlog"]
        if (
            not _DIGITS.fullmatch(backlog_text)
            or len(backlog_text.lstrip("0")) > 10
            or not 1 <= int(backlog_text) <= _MAX_COUNT
        ):
            raise ValueError(f"backlog {_quote(backlog_text)} must be an integer >= 1")
        backlog = int(backlog_text)
    if kind in ("tcp", "tcp6"):
        if "port" not in params:
            raise ValueError(f"missing port in the {kind}: endpoint")
        port = _port(params["port"], low=0)
        interface = params.get("interface", "" if kind == "tcp" else "::")
        if not interface:
            return _Listen(kind, text, backlog, ("tcp", None, port))
        ip = _ip(interface)
        if ip is None:
            raise ValueError(
                f"interface must be an IP address, got {_quote(interface)}"
            )
        return _Listen(kind, text, backlog, ("tcp", _wildcard(ip), port))
    if kind == "unix":
        address = params.get("address", "")
        if not address:
            raise ValueError("unix socket path is empty")
        if not re.fullmatch(r"[0-7]+", params.get("mode", "666")):
            raise ValueError(f"mode {_quote(params['mode'])} must be an octal number")
        if params.get("lockfile", "1") not in ("0", "1"):
            raise ValueError(f"lockfile {_quote(params['lockfile'])} must be 0 or 1")
        return _Listen(kind, text, backlog, ("unix", address))
    if params.get("domain") not in _SYSTEMD_DOMAINS:
        raise ValueError(
            f"systemd: endpoints need domain= one of: {', '.join(_SYSTEMD_DOMAINS)}"
        )
    if ("index" in params) == ("name" in params):
        raise ValueError("systemd: endpoints need exactly one of index= or name=")
    if "index" in params and not _DIGITS.fullmatch(params["index"]):
        raise ValueError(f"systemd index {_quote(params['index'])} is not a number")
    return _Listen(
        kind, text, None, ("systemd", params.get("index"), params.get("name"))
    )


def _conflicts(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """True when two frontends' binds cannot both succeed."""
    if a[0] != b[0]:
        return False
    if a[0] == "tcp":
        _, host_a, port_a = a
        _, host_b, port_b = b
        if port_a != port_b or port_a == 0:  # port 0 = a fresh ephemeral port
            return False
        return host_a is None or host_b is None or host_a == host_b
    return a == b


# --------------------------------------------------------------------------
# The schema machinery
# --------------------------------------------------------------------------


class _Invalid:
    """Marks a value that failed validation (its problem is already reported)."""


_INVALID: Any = _Invalid()


@attrs.define
class _Ctx:
    """Where problems are collected during one parse."""

    source: str
    problems: list[Problem] = attrs.Factory(list)

    def report(self, key: str, message: str) -> None:
        """Record one problem at ``key``."""
        self.problems.append(Problem(self.source, key, message))


class _Reader:
    """Reads one TOML value at ``path``; returns _INVALID after reporting."""

    def read(self, ctx: _Ctx, value: object, path: str) -> Any:
        raise NotImplementedError


@attrs.frozen
class _Scalar(_Reader):
    """A leaf value checked by a converter that raises ValueError."""

    convert: Callable[[object], Any]

    def read(self, ctx: _Ctx, value: object, path: str) -> Any:
        try:
            return self.convert(value)
        except ValueError as error:
            ctx.report(path, str(error))
            return _INVALID


@attrs.frozen
class _Key:
    """One key of a section: how to read it and whether it may be left out."""

    reader: _Reader
    required: bool = False
    attr: str | None = None  # attrs field name, when not the TOML key
    missing: str = "required key is missing"  # message; may use {path}


# finish(ctx, path, raw table, values so far) may derive fields, check keys
# against each other, and returns False when the section is unusable.
_Finish = Callable[[_Ctx, str, Mapping[str, Any], dict[str, Any]], bool]


@attrs.frozen
class _Section:
    """A TOML table: its keys, the class it builds, and cross-key checks."""

    cls: Callable[..., Any]
    keys: Mapping[str, _Key]
    finish: _Finish | None = None


@attrs.frozen
class _Table(_Reader):
    """A table read with a section; invalid keys fall back to defaults.

    Building the object even when some keys are bad lets later cross-checks
    (pool references, listen conflicts) still run, so all problems surface at
    once; parse_config refuses the result anyway when anything was reported.
    """

    section: _Section

    def read(
        self,
        ctx: _Ctx,
        value: object,
        path: str,
        extra: Mapping[str, Any] | None = None,
    ) -> Any:
        if not isinstance(value, dict):
            ctx.report(path, f"expected a table, got {_describe(value)}")
            return _INVALID
        keys = self.section.keys
        values: dict[str, Any] = dict(extra or {})
        for key, item in value.items():
            spec = keys.get(key)
            if spec is None:
                ctx.report(_join(path, key), f"unknown key{_suggest(key, tuple(keys))}")
                continue
            result = spec.reader.read(ctx, item, _join(path, key))
            if result is not _INVALID:
                values[spec.attr or key] = result
        usable = True
        for key, spec in keys.items():
            if spec.required and (spec.attr or key) not in values:
                usable = False
                if key not in value:
                    where = _join(path, key)
                    ctx.report(where, spec.missing.format(path=where))
        if usable and self.section.finish is not None:
            usable = self.section.finish(ctx, path, value, values)
        return self.section.cls(**values) if usable else _INVALID


@attrs.frozen
class _Named(_Reader):
    """A table of named tables (``[frontend.NAME]``), built in file order."""

    section: _Section
    empty: str | None = None  # message when there are none, if one is needed

    def read(self, ctx: _Ctx, value: object, path: str) -> Any:
        if not isinstance(value, dict):
            ctx.report(
                path, f"expected a table of named tables, got {_describe(value)}"
            )
            return _INVALID
        if not value and self.empty is not None:
            ctx.report(path, self.empty.format(path=path))
            return _INVALID
        built = []
        for name, item in value.items():
            where = _join(path, name)
            if not name:
                ctx.report(where, "name must not be empty")
                continue
            result = _Table(self.section).read(ctx, item, where, extra={"name": name})
            if result is not _INVALID:
                built.append(result)
        return tuple(built)


@attrs.frozen
class _Array(_Reader):
    """An array of tables (``[[pool.X.server]]``) whose ``name``s are unique."""

    section: _Section
    empty: str | None = None  # message when the array is empty, if one is needed
    # Added to a duplicate-name message when the name was not written out.
    implicit_name: str = ""

    def read(self, ctx: _Ctx, value: object, path: str) -> Any:
        if isinstance(value, dict):
            ctx.report(
                path,
                f"expected an array of tables ([[{path}]]), got a table ([{path}])",
            )
            return _INVALID
        if not isinstance(value, list):
            ctx.report(
                path,
                f"expected an array of tables ([[{path}]]), got {_describe(value)}",
            )
            return _INVALID
        if not value and self.empty is not None:
            ctx.report(path, self.empty.format(path=path))
            return _INVALID
        built = []
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            result = _Table(self.section).read(ctx, item, where)
            if result is _INVALID:
                continue
            built.append(result)
            name = getattr(result, "name", None)
            if name is None:
                continue
            if name not in seen:
                seen[name] = index
                continue
            first = f"{path.rpartition('.')[2]}[{seen[name]}]"
            message = f"duplicate name {_quote(name)} (also {first})"
            if "name" in item:
                ctx.report(f"{where}.name", message)
            else:
                ctx.report(where, message + self.implicit_name)
        return tuple(built)


@attrs.frozen
class _SniRouteTable(_Reader):
    """``route_by_sni``: an inline table of SNI pattern → pool name.

    Patterns are normalised (lower case, IDNA, no trailing dot) so two
    spellings of one name are caught as duplicates; pool names are checked
    against the pools by the root's finish.
    """

    def read(self, ctx: _Ctx, value: object, path: str) -> Any:
        if not isinstance(value, dict):
            ctx.report(
                path,
                "expected a table of SNI pattern = pool name"
                f' (e.g. {{ "db.example.com" = "pg" }}), got {_describe(value)}',
            )
            return _INVALID
        if not value:
            ctx.report(path, "must route at least one name (or remove the key)")
            return _INVALID
        routes: list[tuple[str, str]] = []
        seen: dict[str, str] = {}
        for pattern, pool in value.items():
            where = _join(path, pattern)
            try:
                normal = normalise_pattern(pattern)
            except ValueError as e:
                ctx.report(where, f"invalid SNI pattern: {e}")
                continue
            if not isinstance(pool, str) or not pool:
                ctx.report(where, f"expected a pool name, got {_describe(pool)}")
                continue
            if normal in seen:
                ctx.report(
                    where, f"same name as {_quote(seen[normal])} (names ignore case)"
                )
                continue
            seen[normal] = pattern
            routes.append((normal, pool))
        return tuple(routes)


def _server_name(value: object) -> str:
    """A host name or IP address to verify a server certificate against."""
    text = _string(value)
    if _ip(text) is None:
        normalise_name(text)  # raises ValueError in words
    return text


def _default(cls: type, field: str) -> Any:
    """The attrs default of ``cls.field`` (defaults live on the classes only)."""
    return getattr(attrs.fields(cls), field).default


# --------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------


def _finish_server(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """A server's name defaults to its address as text."""
    values.setdefault("name", str(values["address"]))
    return True


def _finish_frontend(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """Turn ``listen`` into the raw text plus an endpoint carrying the backlog."""
    listen: _Listen = values["listen"]
    values["listen"] = raw["listen"]
    if not _check_routing(ctx, path, raw, values):
        return False
    if listen.kind == "systemd":  # the socket is inherited, already listening
        values["endpoint"] = listen.endpoint
        if "backlog" in raw:
            ctx.report(
                _join(path, "backlog"),
                "has no effect with a systemd: listen endpoint"
                " (systemd sets the backlog)",
            )
        return True
    if listen.backlog is None:
        backlog = values.get("backlog", _default(FrontendConfig, "backlog"))
        values["endpoint"] = f"{listen.endpoint}:backlog={backlog}"
        return True
    values["endpoint"] = listen.endpoint
    if "backlog" in values and values["backlog"] != listen.backlog:
        ctx.report(
            _join(path, "backlog"),
            f"conflicts with backlog={listen.backlog} in listen; set it in one place",
        )
    values["backlog"] = listen.backlog
    return True


def _check_routing(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """``pool`` may be left out only with ``route_by_sni``; passthrough excludes termination."""
    routed = "route_by_sni" in raw
    if "pool" not in raw and not routed:
        where = _join(path, "pool")
        ctx.report(
            where,
            "required key is missing (a frontend forwards to a pool,"
            " or routes TLS by server name with route_by_sni)",
        )
        return False
    values.setdefault("pool", None)
    if routed and "tls" in raw:
        ctx.report(
            _join(path, "route_by_sni"),
            f"cannot be combined with [{_join(path, 'tls')}]: passthrough forwards"
            " TLS undecrypted, termination decrypts it; use two frontends",
        )
    if "handshake_timeout" in raw and not routed:
        ctx.report(
            _join(path, "handshake_timeout"),
            "only applies with route_by_sni (TLS termination has its own,"
            f" in [{_join(path, 'tls')}])",
        )
    return True


def _check_pool_references(
    ctx: _Ctx, frontend: FrontendConfig, pool_names: list[str]
) -> None:
    """Every pool a frontend names (``pool`` and route_by_sni targets) exists."""
    where = _join("frontend", frontend.name)
    defined = ", ".join(_quote(name) for name in pool_names) or "none"
    references = [(_join(where, "pool"), frontend.pool)] if frontend.pool else []
    for pattern, pool in frontend.route_by_sni:
        references.append((_join(_join(where, "route_by_sni"), pattern), pool))
    for key, name in references:
        if name not in pool_names:
            ctx.report(
                key,
                f"no pool named {_quote(name)}"
                f"{_suggest(name, pool_names)}; defined pools: {defined}",
            )


def _finish_root(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """Check references between tables: frontend pools and shared listen addresses."""
    values["source"] = ctx.source
    values.setdefault("global_", GlobalConfig())
    values.setdefault("pools", ())
    pools = raw.get("pool")
    # Names of every [pool.X] table, valid or not, so a broken pool is not
    # also reported as missing.
    if pools is None:
        pools = {}
    pool_names = [name for name in pools if name] if isinstance(pools, dict) else None
    bound: list[tuple[FrontendConfig, tuple[Any, ...]]] = []
    for frontend in values["frontends"]:
        where = _join("frontend", frontend.name)
        if pool_names is not None:
            _check_pool_references(ctx, frontend, pool_names)
        bind = _listen(frontend.listen).bind
        for other, other_bind in bound:
            if _conflicts(bind, other_bind):
                ctx.report(
                    _join(where, "listen"),
                    f"{_quote(frontend.listen)} conflicts with"
                    f" {_join('frontend', other.name)}"
                    f" (listen = {_quote(other.listen)})",
                )
                break
        bound.append((frontend, bind))
        workers = getattr(values["global_"], "workers", 1)
        if workers > 1 and bind[0] != "tcp":
            ctx.report(
                _join(where, "listen"),
                f"{_quote(frontend.listen)} cannot be shared by {workers} workers"
                " (only TCP listeners can use SO_REUSEPORT); use an ip:port"
                " address or set [global] workers = 1",
            )
    for pool in values["pools"]:
        tls = pool.tls
        if tls is None or tls.server_name or not tls.verify:
            continue
        if any(server.address.is_unix for server in pool.servers):
            ctx.report(
                _join(_join(_join("pool", pool.name), "tls"), "server_name"),
                "required with verify = true when a server is a unix: socket"
                " (there is no host name to verify)",
            )
    return True


def _finish_pool_tls(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """A client certificate needs its key, and a key its certificate."""
    for have, need in (("cert", "key"), ("key", "cert")):
        if have in raw and need not in raw:
            ctx.report(
                _join(path, need),
                f"required with {have} (a client certificate needs both files)",
            )
            return False
    return True


def _workers(value: object) -> int:
    """``workers``: an integer >= 1, or "auto" for the number of CPUs."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        raise ValueError(f'expected an integer >= 1 or "auto", got {_quote(value)}')
    return _integer(1, 1024)(value)


_GLOBAL = _Section(
    GlobalConfig,
    {
        "max_connections": _Key(_Scalar(_integer(0))),
        "shutdown_grace": _Key(_Scalar(_duration())),
        "log_format": _Key(_Scalar(_choice(LOG_FORMATS))),
        "log_level": _Key(_Scalar(_choice(LOG_LEVELS))),
        "splice": _Key(_Scalar(_boolean)),
        "workers": _Key(_Scalar(_workers)),
    },
)


def _alpn_list(value: object) -> tuple[str, ...]:
    """ALPN protocol names: a list of non-empty strings of at most 255 bytes."""
    if not isinstance(value, list):
        raise ValueError(f"expected an array of strings, got {_describe(value)}")
    names: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"item {index}: expected a string, got {_describe(item)}")
        if not item:
            raise ValueError(f"item {index}: must not be empty")
        if len(item.encode()) > 255:
            raise ValueError(f"item {index}: longer than 255 bytes")
        if item in names:
            raise ValueError(f"item {index}: {_quote(item)} is listed twice")
        names.append(item)
    return tuple(names)


def _finish_frontend_tls(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """At least one certificate; ``client_auth`` needs ``client_ca``; ``plaintext``
    needs ``starttls``."""
    usable = "certificates" in values
    if "certificates" not in raw:
        ctx.report(_join(path, "certificates"), _NO_CERTIFICATES.format())
    if "client_auth" in values and "client_ca" not in raw:
        ctx.report(
            _join(path, "client_auth"),
            "needs client_ca (the CA that signs client certificates)",
        )
    if "plaintext" in values and "starttls" not in raw:
        ctx.report(
            _join(path, "plaintext"),
            "has no effect without starttls (a TLS-only frontend has no plaintext)",
        )
    if values.get("starttls") == "postgres":
        alpn = values.get("alpn", ())
        if "alpn" not in raw:
            # libpq 17+ direct TLS (sslnegotiation=direct) must negotiate ALPN
            # "postgresql"; older clients send no ALPN and are unaffected.
            values["alpn"] = ("postgresql",)
        elif "postgresql" not in alpn:
            ctx.report(
                _join(path, "alpn"),
                'must include "postgresql" with starttls = "postgres"'
                " (libpq's direct TLS requires it)",
            )
    return usable


_NO_CERTIFICATES = (
    "at least one certificate is required"
    ' (certificates = [{{ cert = "...", key = "..." }}])'
)

_CERTIFICATE = _Section(
    CertificateConfig,
    {
        "cert": _Key(_Scalar(_string), required=True),
        "key": _Key(_Scalar(_string), required=True),
    },
)

_FRONTEND_TLS = _Section(
    FrontendTLSConfig,
    {
        # Not `required`: checked in _finish_frontend_tls, so the other
        # cross-key checks still run when the certificates are missing.
        "certificates": _Key(_Array(_CERTIFICATE, empty=_NO_CERTIFICATES)),
        "min_version": _Key(_Scalar(_choice(TLS_VERSIONS))),
        "ciphers": _Key(_Scalar(_string)),
        "alpn": _Key(_Scalar(_alpn_list)),
        "client_ca": _Key(_Scalar(_string)),
        "client_auth": _Key(_Scalar(_choice(CLIENT_AUTH))),
        "handshake_timeout": _Key(_Scalar(_duration())),
        "starttls": _Key(_Scalar(_choice(STARTTLS_PROTOCOLS))),
        "plaintext": _Key(_Scalar(_choice(PLAINTEXT_POLICIES))),
    },
    finish=_finish_frontend_tls,
)

_FRONTEND = _Section(
    FrontendConfig,
    {
        "listen": _Key(_Scalar(_listen), required=True),
        "pool": _Key(_Scalar(_string)),  # required unless route_by_sni
        "route_by_sni": _Key(_SniRouteTable()),
        "handshake_timeout": _Key(_Scalar(_duration(positive=True))),
        "max_connections": _Key(_Scalar(_integer(0))),
        "idle_timeout": _Key(_Scalar(_duration())),
        "half_closed_timeout": _Key(_Scalar(_duration())),
        "backlog": _Key(_Scalar(_integer(1))),
        "tls": _Key(_Table(_FRONTEND_TLS)),
    },
    finish=_finish_frontend,
)

_SERVER = _Section(
    ServerConfig,
    {
        "address": _Key(_Scalar(_server_address), required=True),
        "name": _Key(_Scalar(_string)),
        "weight": _Key(_Scalar(_integer(0, 256))),
        "max_connections": _Key(_Scalar(_integer(0))),
        "backup": _Key(_Scalar(_boolean)),
    },
    finish=_finish_server,
)

_POOL_TLS = _Section(
    PoolTLSConfig,
    {
        "verify": _Key(_Scalar(_boolean)),
        "ca": _Key(_Scalar(_string)),
        "server_name": _Key(_Scalar(_server_name)),
        "cert": _Key(_Scalar(_string)),
        "key": _Key(_Scalar(_string)),
    },
    finish=_finish_pool_tls,
)

# -- [pool.X.health] ---------------------------------------------------------

HEALTH_TYPES = ("tcp", "send-expect", "tls", "http", "redis", "postgres", "mysql")
HEALTH_ROLES = ("any", "primary", "replica")
_ROLE_TYPES = ("redis", "postgres", "mysql")
# Keys that only one family of check types reads: given for another type they
# would be silently ignored, so they are refused instead.
_TYPE_KEYS: Mapping[str, tuple[str, ...]] = {
    "send": ("send-expect",),
    "expect": ("send-expect",),
    "expect_regex": ("send-expect",),
    "step": ("send-expect",),
    "path": ("http",),
    "expect_status": ("http",),
    "user": _ROLE_TYPES,
    "password_file": _ROLE_TYPES,
    "database": _ROLE_TYPES,
    "verify": ("tls",),
    "ca": ("tls",),
    "server_name": ("tls",),
}
_BYTE_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}
_HEX = re.compile(r"[0-9A-Fa-f]{2}")


def _escaped_bytes(value: object) -> bytes:
    r"""Bytes from a string with ``\r \n \t \\ \xNN`` escapes (TOML has no ``\x``).

    TOML basic strings already turn ``\r`` into a carriage return; these
    escapes matter in literal strings (``'PING\r\n'``) and for bytes TOML cannot
    write (``\x00``).  Other characters are sent as UTF-8.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogatepass")
            i += 1
            continue
        code = value[i + 1 : i + 2]
        if code in _BYTE_ESCAPES:
            out += _BYTE_ESCAPES[code]
            i += 2
        elif code == "x" and _HEX.fullmatch(value[i + 2 : i + 4]):
            out.append(int(value[i + 2 : i + 4], 16))
            i += 4
        else:
            shown = value[i : i + 4] if code == "x" else value[i : i + 2]
            raise ValueError(
                f'unknown escape "{shown}" at character {i};'
                r" use \r, \n, \t, \\ or \xNN (two hex digits)"
            )
    return bytes(out)


def _expect_bytes(value: object) -> bytes:
    """What a reply must start with: escaped bytes, not empty."""
    data = _escaped_bytes(value)
    if not data:
        raise ValueError("must not be empty")
    return data


def _regex(value: object) -> str:
    """A regular expression matched against the reply bytes; must compile."""
    text = _string(value)
    try:
        re.compile(text.encode("utf-8", "surrogatepass"))
    except re.error as error:
        raise ValueError(f"invalid regular expression: {error}") from None
    return text


_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


def _fraction(value: object) -> float:
    """A share: ``"10%"`` or a number from 0 to 1, stored as a fraction."""
    if isinstance(value, str):
        match = _PERCENT.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f'expected a percentage like "10%" or a fraction from 0 to 1,'
                f" got {_describe(value)}"
            )
        percent = float(match[1])
        if percent > 100:
            raise ValueError(f"must be between 0% and 100%, got {_quote(value)}")
        return percent / 100
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f'expected a percentage like "10%" or a fraction from 0 to 1,'
            f" got {_describe(value)}"
        )
    if not 0 <= value <= 1:  # also refuses nan
        raise ValueError(
            f"a fraction must be between 0 and 1 (or write a percentage"
            f' like "10%"), got {_describe(value)}'
        )
    return float(value)


def _status_list(value: object) -> tuple[int, ...]:
    """HTTP status codes that count as healthy: a non-empty array of 100..599."""
    if not isinstance(value, list):
        raise ValueError(f"expected an array of status codes, got {_describe(value)}")
    if not value:
        raise ValueError("must list at least one status code")
    codes = []
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(
                f"item {index}: expected an integer status code, got {_describe(item)}"
            )
        if not 100 <= item <= 599:
            raise ValueError(
                f"item {index}: must be between 100 and 599, got {_number(item)}"
            )
        codes.append(item)
    return tuple(codes)


def _finish_step(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """A step needs exactly one of expect and expect_regex."""
    if "expect" in raw and "expect_regex" in raw:
        ctx.report(
            _join(path, "expect_regex"), "give either expect or expect_regex, not both"
        )
        return False
    if "expect" not in raw and "expect_regex" not in raw:
        ctx.report(path, "a step needs expect or expect_regex")
        return False
    return True


_STEP = _Section(
    CheckStep,
    {
        "send": _Key(_Scalar(_escaped_bytes)),
        "expect": _Key(_Scalar(_expect_bytes)),
        "expect_regex": _Key(_Scalar(_regex)),
    },
    finish=_finish_step,
)


def _finish_health(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """Check keys against the check type; top-level send/expect make one step."""
    single = {
        k: values.pop(k) for k in ("send", "expect", "expect_regex") if k in values
    }
    if "type" in raw and "type" not in values:
        return False  # an unknown type is reported; other checks would guess
    kind = values.get("type", _default(HealthConfig, "type"))
    usable = True
    for key, types in _TYPE_KEYS.items():
        if key in raw and kind not in types:
            wanted = " or ".join(f'"{t}"' for t in types)
            ctx.report(
                _join(path, key), f'only used with type = {wanted} (type is "{kind}")'
            )
            usable = False
    if "role" in raw and values.get("role", "any") != "any" and kind not in _ROLE_TYPES:
        ctx.report(
            _join(path, "role"),
            f'a role needs type = "redis", "postgres" or "mysql" (type is "{kind}")',
        )
        usable = False
    top_level = [k for k in ("send", "expect", "expect_regex") if k in raw]
    if kind != "send-expect":
        return usable
    if top_level and "step" in raw:
        ctx.report(
            _join(path, top_level[0]),
            "give send/expect here or [[" + _join(path, "step") + "]] tables, not both",
        )
        return False
    if top_level:
        if "expect" in raw and "expect_regex" in raw:
            ctx.report(
                _join(path, "expect_regex"),
                "give either expect or expect_regex, not both",
            )
            return False
        if "expect" not in raw and "expect_regex" not in raw:
            ctx.report(
                _join(path, "expect"),
                'type = "send-expect" needs expect or expect_regex',
            )
            return False
        if len(single) != len(top_level):  # one of them was invalid
            return False
        values["steps"] = (CheckStep(**single),)
    elif "step" not in raw:
        ctx.report(
            path,
            'type = "send-expect" needs expect (and usually send), or'
            " [[" + _join(path, "step") + "]] tables",
        )
        return False
    return usable


_HEALTH = _Section(
    HealthConfig,
    {
        "type": _Key(_Scalar(_choice(HEALTH_TYPES))),
        "interval": _Key(_Scalar(_duration(positive=True))),
        "fast_interval": _Key(_Scalar(_duration(positive=True))),
        "down_interval": _Key(_Scalar(_duration(positive=True))),
        "timeout": _Key(_Scalar(_duration(positive=True))),
        "rise": _Key(_Scalar(_integer(1, 1000))),
        "fall": _Key(_Scalar(_integer(1, 1000))),
        "jitter": _Key(_Scalar(_fraction)),
        "port": _Key(_Scalar(_integer(1, 65535))),
        "initial_state": _Key(_Scalar(_choice(("up", "down")))),
        "observe": _Key(_Scalar(_boolean)),
        "slow_start": _Key(_Scalar(_duration())),
        "on_down": _Key(_Scalar(_choice(("keep", "close")))),
        "role": _Key(_Scalar(_choice(HEALTH_ROLES))),
        "send": _Key(_Scalar(_escaped_bytes)),
        "expect": _Key(_Scalar(_expect_bytes)),
        "expect_regex": _Key(_Scalar(_regex)),
        "step": _Key(
            _Array(_STEP, empty="needs at least one [[{path}]] table"), attr="steps"
        ),
        "path": _Key(_Scalar(_http_path)),
        "expect_status": _Key(_Scalar(_status_list)),
        "user": _Key(_Scalar(_string)),
        "password_file": _Key(_Scalar(_string)),
        "database": _Key(_Scalar(_string)),
        "verify": _Key(_Scalar(_boolean)),
        "ca": _Key(_Scalar(_string)),
        "server_name": _Key(_Scalar(_string)),
    },
    finish=_finish_health,
)


def _finish_pool(
    ctx: _Ctx, path: str, raw: Mapping[str, Any], values: dict[str, Any]
) -> bool:
    """A health check ``port`` needs servers with a host to probe."""
    health = values.get("health")
    if health is not None and health.port is not None:
        for index, server in enumerate(values.get("servers", ())):
            if server.address.is_unix:
                ctx.report(
                    _join(_join(path, "health"), "port"),
                    f"server[{index}] is a unix socket; a check port needs TCP servers",
                )
                break
    return True


_NO_SERVERS = "a pool needs at least one server (add a [[{path}]] table)"

_POOL = _Section(
    PoolConfig,
    {
        "server": _Key(
            _Array(
                _SERVER,
                empty=_NO_SERVERS,
                implicit_name="; a server's name defaults to its address,"
                " so give one of them a distinct name",
            ),
            required=True,
            attr="servers",
            missing=_NO_SERVERS,
        ),
        "balance": _Key(_Scalar(_choice(POLICY_NAMES))),
        "connect_timeout": _Key(_Scalar(_duration(positive=True))),
        "retries": _Key(_Scalar(_integer(0))),
        "queue_timeout": _Key(_Scalar(_duration())),
        "max_queue": _Key(_Scalar(_integer(0))),
        "tls": _Key(_Table(_POOL_TLS)),
        "health": _Key(_Table(_HEALTH)),
    },
    finish=_finish_pool,
)

_NO_FRONTENDS = "at least one frontend is required (add a [frontend.NAME] table)"

_ROOT = _Section(
    Config,
    {
        "global": _Key(_Table(_GLOBAL), attr="global_"),
        "frontend": _Key(
            _Named(_FRONTEND, empty=_NO_FRONTENDS),
            required=True,
            attr="frontends",
            missing=_NO_FRONTENDS,
        ),
        "pool": _Key(_Named(_POOL), attr="pools"),
    },
    finish=_finish_root,
)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------

_TOML_POSITION = re.compile(r" \(at (?:line (\d+), column \d+|end of document)\)$")


def _syntax_problem(source: str, text: str, error: tomllib.TOMLDecodeError) -> Problem:
    """A TOML syntax error as a Problem keyed by its line number."""
    message = str(error)
    match = _TOML_POSITION.search(message)
    if match is None:
        return Problem(source, "-", message)
    if match[1] is not None:
        line = int(match[1])
    else:  # "end of document": the last line
        line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
    return Problem(source, f"line {line}", message[: match.start()])


def parse_config(text: str, source: str) -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in problems.

    Raises ConfigError listing every problem found, so one run shows them all.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError((_syntax_problem(source, text, error),)) from None
    except RecursionError:
        raise ConfigError(
            (Problem(source, "-", "values are nested too deeply"),)
        ) from None
    except ValueError as error:  # e.g. Python's limit on integer digits
        raise ConfigError((Problem(source, "-", f"invalid TOML: {error}"),)) from None
    ctx = _Ctx(source)
    config = _Table(_ROOT).read(ctx, document, "")
    if ctx.problems or config is _INVALID:
        raise ConfigError(tuple(ctx.problems))
    return config


def load_config(path: str) -> Config:
    """Read and validate the file at ``path`` (problems name it as given)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(
            (Problem(path, "-", f"cannot read file: {reason}"),)
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        problem = Problem(path, f"line {line}", f"invalid UTF-8: {error.reason}")
        raise ConfigError((problem,)) from None
    return parse_config(text, path)
