"""The ClientHello parser and SNI patterns: real hellos, records, refusals, properties."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.tls.clienthello import (
    MAX_HELLO_BYTES,
    ClientHello,
    Malformed,
    NeedMore,
    NotTLS,
    parse_client_hello,
)
from l4lb.tls.sni import SniRoutes, normalise_name, normalise_pattern

# --------------------------------------------------------------------------
# Making hellos
# --------------------------------------------------------------------------


def python_hello(
    server_name: str | None,
    alpn: list[str] | None = None,
    version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of Python's ssl client (OpenSSL underneath)."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def openssl_hello(*args: str) -> bytes:
    """What ``openssl s_client ARGS`` sends first, read from a local socket."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        process = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                deadline = time.monotonic() + 10
                while isinstance(parse_client_hello(data), NeedMore):
                    assert time.monotonic() < deadline, "no ClientHello from openssl"
                    chunk = conn.recv(65536)
                    assert chunk, "openssl closed before its ClientHello"
                    data += chunk
                return data
        finally:
            process.kill()
            process.wait(10)


def record(body: bytes, kind: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([kind]) + version + struct.pack("!H", len(body)) + body


def refragment(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake message re-split into records of ``sizes`` (then the rest)."""
    message = hello[5:]
    records, pos = [], 0
    for size in sizes:
        if pos >= len(message):
            break
        records.append(record(message[pos : pos + size]))
        pos += size
    if pos < len(message):
        records.append(record(message[pos:]))
    return b"".join(records)


def vec(length_size: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_size, "big") + body


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + vec(2, body)


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + vec(2, n) for n in names)
    return extension(0, vec(2, entries))


def alpn_extension(*names: bytes) -> bytes:
    return extension(16, vec(2, b"".join(vec(1, n) for n in names)))


def build_hello(
    extensions: list[bytes] | None = None,
    *,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\xc0\x2f",
    message_type: int = 1,
    version: bytes = b"\x03\x03",
) -> bytes:
    """A ClientHello in one record; ``extensions=None`` leaves the block out."""
    body = (
        version + b"\x00" * 32 + vec(1, session_id) + vec(2, suites) + vec(1, b"\x00")
    )
    if extensions is not None:
        body += vec(2, b"".join(extensions))
    message = bytes([message_type]) + len(body).to_bytes(3, "big") + body
    return record(message)


HELLO = python_hello("a.example.com", ["h2", "postgresql"])

# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


class TestRealHellos:
    @pytest.mark.parametrize(
        "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, None]
    )
    def test_python_ssl_hello(self, version: ssl.TLSVersion | None) -> None:
        """A Python ssl ClientHello yields its server name and ALPN list."""
        data = python_hello("A.Example.COM", ["h2", "postgresql"], version)
        assert parse_client_hello(data) == ClientHello(
            "a.example.com", ("h2", "postgresql"), len(data)
        )

    def test_python_ssl_hello_without_sni(self) -> None:
        """A hello without the server_name extension parses with no name."""
        data = python_hello(None)
        assert parse_client_hello(data) == ClientHello(None, (), len(data))

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
    def test_openssl_s_client_hello(self) -> None:
        """The hello of openssl s_client -servername -alpn parses."""
        data = openssl_hello("-servername", "b.example.com", "-alpn", "redis,h2")
        result = parse_client_hello(data)
        assert isinstance(result, ClientHello)
        assert (result.server_name, result.alpn) == ("b.example.com", ("redis", "h2"))

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
    def test_openssl_s_client_hello_without_sni(self) -> None:
        """openssl s_client -noservername sends no SNI."""
        result = parse_client_hello(openssl_hello("-noservername"))
        assert isinstance(result, ClientHello)
        assert result.server_name is None


class TestRecords:
    @pytest.mark.parametrize("sizes", [[1], [4], [3, 1, 2], [40] * 20, [100, 1]])
    def test_hello_split_over_records(self, sizes: list[int]) -> None:
        """A handshake message spread over several records is reassembled."""
        data = refragment(HELLO, sizes)
        result = parse_client_hello(data)
        assert isinstance(result, ClientHello)
        assert result.server_name == "a.example.com"
        assert result.size == len(data)

    def test_every_prefix_needs_more(self) -> None:
        """Each truncation of a valid hello asks for more bytes, never more."""
        data = refragment(HELLO, [50, 7])
        for end in range(len(data)):
            assert parse_client_hello(data[:end]) == NeedMore(), end

    def test_bytes_after_the_hello_are_not_consumed(self) -> None:
        """What follows the hello's record is left for the server (size stops there)."""
        result = parse_client_hello(HELLO + record(b"\x01", kind=20))
        assert isinstance(result, ClientHello)
        assert result.size == len(HELLO)

    def test_hello_without_extensions(self) -> None:
        """An old-style hello with no extension block has no name."""
        assert parse_client_hello(build_hello(None)) == ClientHello(
            None, (), len(build_hello(None))
        )

    def test_unknown_name_types_are_skipped(self) -> None:
        """Server name entries of other types are ignored (RFC 6066)."""
        entries = b"\x07" + vec(2, b"x") + b"\x00" + vec(2, b"c.example.com")
        data = build_hello([extension(0, vec(2, entries))])
        result = parse_client_hello(data)
        assert isinstance(result, ClientHello)
        assert result.server_name == "c.example.com"


class TestRefusals:
    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"GET / HTTP/1.1\r\n", "first byte 0x47 is not a TLS handshake record"),
            (b"\x80\x2e\x01\x00\x02", "SSLv2-style hello"),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "first byte 0x00"),  # SSLRequest
        ],
    )
    def test_not_tls(self, data: bytes, reason: str) -> None:
        """Other protocols are told apart from broken TLS."""
        result = parse_client_hello(data)
        assert isinstance(result, NotTLS)
        assert reason in result.reason

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (build_hello([], message_type=2), "type 2, not ClientHello"),
            (record(HELLO[5:20]) + record(b"\x02", kind=21), "record of type 21"),
            (HELLO[:1] + b"\x02\x00" + HELLO[3:], "record version 2.0"),
            (record(b""), "empty handshake record"),
            (b"\x16\x03\x01\xff\xff", "exceeds the TLS limit"),
            (
                build_hello([sni_extension(b"a.x"), sni_extension(b"b.x")]),
                "extension 0 appears twice",
            ),
            (build_hello([sni_extension(b"a.x", b"b.x")]), "more than one host name"),
            (build_hello([sni_extension(b"")]), "empty host name"),
            (build_hello([sni_extension(b"a\xff.x")]), "not ASCII"),
            (build_hello([sni_extension(b"a\n.x")]), "control characters"),
            (build_hello([alpn_extension(b"")]), "empty ALPN protocol name"),
            (build_hello([], suites=b""), "cipher suite list is empty"),
            (build_hello([], session_id=b"x" * 33), "session id longer"),
            (build_hello([], version=b"\x02\x00"), "client version 0x0200"),
            (
                build_hello([extension(0, b"\x00\x09\x00\x00\x01x")]),
                "runs past the end",
            ),
        ],
    )
    def test_malformed(self, data: bytes, reason: str) -> None:
        """Broken hellos are refused with a reason that says what is wrong."""
        result = parse_client_hello(data)
        assert isinstance(result, Malformed), result
        assert reason in result.reason

    def test_hello_larger_than_the_limit(self) -> None:
        """A hello announcing more than 16 KiB is refused before it arrives."""
        big = build_hello([extension(21, b"\x00" * MAX_HELLO_BYTES)])
        result = parse_client_hello(big[:100])
        assert isinstance(result, Malformed)
        assert "larger than 16 KiB" in result.reason

    def test_endless_small_records_hit_the_limit(self) -> None:
        """Records that never complete a hello stop at 16 KiB, not later."""
        message = b"\x01\x00\xff\xff" + b"\x00" * 40000
        data = b"".join(
            record(message[i : i + 100]) for i in range(0, len(message), 100)
        )
        result = parse_client_hello(data)
        assert isinstance(result, Malformed)
        assert "16 KiB" in result.reason


names = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
protocols = st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b.isascii()))


@st.composite
def hellos(draw: st.DrawFn) -> tuple[bytes, str | None, tuple[bytes, ...]]:
    """A generated ClientHello in random record splits, with what it should say."""
    name = draw(st.none() | names)
    alpn = tuple(draw(protocols))
    extensions = [extension(draw(st.integers(17, 60000)), draw(st.binary(max_size=30)))]
    if name is not None:
        extensions.append(sni_extension(name.encode()))
    if alpn:
        extensions.append(alpn_extension(*alpn))
    extensions = draw(st.permutations(extensions))
    data = build_hello(list(extensions), session_id=draw(st.binary(max_size=32)))
    sizes = draw(st.lists(st.integers(1, 300), max_size=5))
    return refragment(data, sizes), name, alpn


class TestProperties:
    @given(st.binary(max_size=2000))
    def test_random_bytes_never_raise(self, data: bytes) -> None:
        """Any bytes give one of the four results."""
        assert isinstance(
            parse_client_hello(data), ClientHello | NeedMore | NotTLS | Malformed
        )

    @given(st.binary(max_size=2000))
    def test_random_records_never_raise(self, body: bytes) -> None:
        """Random handshake record bodies give one of the four results."""
        result = parse_client_hello(record(b"\x01" + body[:3] + body))
        assert isinstance(result, ClientHello | NeedMore | NotTLS | Malformed)

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(hellos())
    def test_generated_hellos_parse(
        self, case: tuple[bytes, str | None, tuple[bytes, ...]]
    ) -> None:
        """A generated hello, however split, yields its name and protocols."""
        data, name, alpn = case
        result = parse_client_hello(data)
        assert result == ClientHello(name, tuple(p.decode() for p in alpn), len(data))

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(hellos(), st.data())
    def test_truncated_hellos_need_more(
        self, case: tuple[bytes, str | None, tuple[bytes, ...]], data: st.DataObject
    ) -> None:
        """Any strict prefix of a valid hello needs more bytes."""
        whole = case[0]
        end = data.draw(st.integers(0, len(whole) - 1))
        assert parse_client_hello(whole[:end]) == NeedMore()

    @given(st.data())
    def test_corrupted_real_hello_never_raises(self, data: st.DataObject) -> None:
        """A real hello with bytes changed gives a result, never an exception."""
        hello = bytearray(HELLO)
        for _ in range(data.draw(st.integers(1, 5))):
            position = data.draw(st.integers(0, len(hello) - 1))
            hello[position] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(hello)))
        result = parse_client_hello(bytes(hello[:cut]))
        assert isinstance(result, ClientHello | NeedMore | NotTLS | Malformed)


class TestSniRoutes:
    ROUTES = SniRoutes.build(
        [
            (normalise_pattern("db.example.com"), "pg"),
            (normalise_pattern("*.cache.example.com"), "redis"),
            (normalise_pattern("exact.cache.example.com"), "special"),
            (normalise_pattern("bücher.example"), "books"),
        ]
    )

    @pytest.mark.parametrize(
        ("name", "pool"),
        [
            ("db.example.com", "pg"),
            ("DB.Example.COM", "pg"),
            ("db.example.com.", "pg"),
            ("eu.cache.example.com", "redis"),
            ("exact.cache.example.com", "special"),  # exact beats wildcard
            ("cache.example.com", None),  # * is one label, not zero
            ("a.eu.cache.example.com", None),  # nor two
            ("xn--bcher-kva.example", "books"),
            ("other.example.com", None),
            (None, None),
            ("bad..name", None),
        ],
    )
    def test_match(self, name: str | None, pool: str | None) -> None:
        """Exact names and one-label wildcards match, ignoring case and a final dot."""
        assert self.ROUTES.match(name) == pool

    @pytest.mark.parametrize(
        ("pattern", "normal"),
        [
            ("Db.Example.com.", "db.example.com"),
            ("*.Cache.example.com", "*.cache.example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
        ],
    )
    def test_normal_form(self, pattern: str, normal: str) -> None:
        """Patterns are lower case IDNA A-labels without the final dot."""
        assert normalise_pattern(pattern) == normal

    @pytest.mark.parametrize(
        "pattern", ["*", "a.*.com", "*foo.example.com", "", "a b.com", "x..y", "-a.com"]
    )
    def test_bad_patterns(self, pattern: str) -> None:
        """Patterns that are not host names or one-label wildcards are refused."""
        with pytest.raises(ValueError):
            normalise_pattern(pattern)

    def test_long_name_refused(self) -> None:
        """Names beyond 253 characters are not host names."""
        with pytest.raises(ValueError, match="253"):
            normalise_name(".".join(["a" * 60] * 5))
