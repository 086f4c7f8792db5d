"""The mysql check against the machine's MariaDB (root, no password; a primary) and fakes.

Fakes play a read-only replica, a server that refuses with an error greeting,
the auth-switch request, the ``caching_sha2_password`` fast path and full
login, and a wrong password. The password scrambles are checked the way a
server checks them, from the stored hash, with MariaDB's own ``PASSWORD()``
value as the known vector.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from l4lb.config import HealthConfig
from l4lb.health.checks.mysql import (
    CACHING_SHA2,
    NATIVE,
    parse_greeting,
    scramble_native,
    scramble_sha256,
)
from tests.checkpeers import (
    Fake,
    Recording,
    endpoint,
    fake_server,
    lab,
    password_file,
    run_check,
    run_on_fake,
)
from tests.e2e import port_accepts

__all__ = ["lab"]

MARIADB = ("127.0.0.1", 3306)
mariadb_up = pytest.mark.skipif(
    not port_accepts(*MARIADB), reason="no MariaDB on 127.0.0.1:3306"
)
NONCE = bytes(range(1, 21))


def native_ok(response: bytes, nonce: bytes, stored: bytes) -> bool:
    """The server's check of mysql_native_password, from the stored SHA1(SHA1(pw))."""
    mask = hashlib.sha1(nonce + stored).digest()
    stage1 = bytes(a ^ b for a, b in zip(response, mask, strict=True))
    return hashlib.sha1(stage1).digest() == stored


def sha2_ok(response: bytes, nonce: bytes, stored: bytes) -> bool:
    """The server's check of the caching_sha2 fast path, from SHA256(SHA256(pw))."""
    mask = hashlib.sha256(stored + nonce).digest()
    stage1 = bytes(a ^ b for a, b in zip(response, mask, strict=True))
    return hashlib.sha256(stage1).digest() == stored


class TestScrambles:
    """The password scrambles verify the way servers verify them."""

    def test_native_against_mariadb_password_hash(self) -> None:
        """MariaDB's PASSWORD('password') is the stored hash the scramble must match."""
        stored = bytes.fromhex("2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19")
        assert native_ok(scramble_native("password", NONCE), NONCE, stored)
        assert not native_ok(scramble_native("Password", NONCE), NONCE, stored)

    def test_caching_sha2(self) -> None:
        """The caching_sha2_password fast-path scramble verifies against SHA256(SHA256(pw))."""
        stored = hashlib.sha256(hashlib.sha256(b"s3cret").digest()).digest()
        assert sha2_ok(scramble_sha256("s3cret", NONCE), NONCE, stored)

    def test_empty_password(self) -> None:
        """No password sends an empty auth response, as MySQL clients do."""
        assert scramble_native("", NONCE) == b"" == scramble_sha256("", NONCE)


def processlist(ports: list[int]) -> int:
    """MariaDB sessions from the probe's local ports."""
    hosts = ",".join(f"'127.0.0.1:{p}'" for p in ports) or "''"
    out = subprocess.run(
        ["mysql", "-h", MARIADB[0], "-P", str(MARIADB[1]), "-uroot", "-N", "-e",
         f"SELECT COUNT(*) FROM information_schema.processlist WHERE host IN ({hosts})"],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    return int(out.stdout.strip())


@mariadb_up
class TestRealMariaDB:
    """The machine's MariaDB: root without a password, read_only off."""

    @pytest_twisted.ensureDeferred
    async def test_roles(self, lab: Any) -> None:
        """A primary by @@read_only (MariaDB has no super_read_only); no session stays."""
        ep = Recording(MARIADB[1], MARIADB[0])
        result = await run_check(HealthConfig(type="mysql", role="primary"), ep)
        assert (result.ok, result.reason) == (True, "role is primary")
        result = await run_check(HealthConfig(type="mysql", role="replica"), ep)
        assert (result.ok, result.reason) == (
            False,
            "role is primary, pool wants replica",
        )
        result = await run_check(HealthConfig(type="mysql", user="root"), ep)
        assert result.ok and result.reason.startswith("logged in to ")
        assert "MariaDB" in result.reason
        assert "5.5.5-" not in result.reason  # MariaDB's compatibility prefix dropped
        await lab.until(lambda: processlist(ep.ports) == 0, 5, "probe sessions gone")

    @pytest_twisted.ensureDeferred
    async def test_greeting_only(self, lab: Any) -> None:
        """Without a user or role, the greeting is the check."""
        result = await run_check(HealthConfig(type="mysql"), endpoint(MARIADB[1]))
        assert result.ok and result.reason.startswith("greeting from ")

    @pytest_twisted.ensureDeferred
    async def test_unknown_user(self, lab: Any) -> None:
        """A refused login is the server's message."""
        config = HealthConfig(type="mysql", role="primary", user="l4lb_no_such_user")
        result = await run_check(config, endpoint(MARIADB[1]))
        assert not result.ok
        assert result.reason.startswith("server sent an error: 1045 Access denied")


# -- a fake MySQL ----------------------------------------------------------------


def pkt(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def greeting(plugin: str = NATIVE) -> bytes:
    caps = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x80000 | 0x100000
    return (
        b"\x0a8.0.36-fake\0"
        + struct.pack("<I", 7)
        + NONCE[:8]
        + b"\0"
        + struct.pack("<H", caps & 0xFFFF)
        + b"\x21"
        + struct.pack("<H", 2)
        + struct.pack("<H", caps >> 16)
        + bytes([21])
        + b"\0" * 10
        + NONCE[8:]
        + b"\0"
        + plugin.encode()
        + b"\0"
    )


OK = b"\x00\x00\x00\x02\x00\x00\x00"
EOF_PACKET = b"\xfe\x00\x00\x02\x00"


def err(code: int, message: str, state: str = "HY000") -> bytes:
    return b"\xff" + struct.pack("<H", code) + b"#" + state.encode() + message.encode()


def result_set(values: list[bytes]) -> bytes:
    out = pkt(1, bytes([len(values)]))
    seq = 2
    for _ in values:
        out += pkt(
            seq,
            b"\x03def\x00\x00\x00\x01v\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x80\x00\x00\x00\x00",
        )
        seq += 1
    out += pkt(seq, EOF_PACKET)
    row = b"".join(bytes([len(v)]) + v for v in values)
    out += pkt(seq + 1, row) + pkt(seq + 2, EOF_PACKET)
    return out


class MyFake:
    """Plays a MySQL/MariaDB server; records what the client did."""

    def __init__(
        self, lab: Any, *, read_only: bool = False, password: str = "",
        plugin: str = NATIVE, switch_to: str | None = None, full_auth: bool = False,
        refuse: bytes | None = None, mariadb: bool = False,
    ) -> None:  # fmt: skip
        self.read_only = read_only
        self.password = password
        self.plugin = plugin
        self.switch_to = switch_to
        self.full_auth = full_auth
        self.refuse = refuse
        self.mariadb = mariadb
        self.user = b""
        self.attrs = b""
        self.queries: list[bytes] = []
        self.quit = False
        self.server = fake_server(lab, self.script)

    async def packet(self, fake: Fake) -> tuple[int, bytes]:
        header = await fake.take(4)
        length = int.from_bytes(header[:3], "little")
        return header[3], await fake.take(length)

    def verify(self, plugin: str, response: bytes, nonce: bytes) -> bool:
        if not self.password:
            return response == b""
        if plugin == NATIVE:
            stored = hashlib.sha1(
                hashlib.sha1(self.password.encode()).digest()
            ).digest()
            return native_ok(response, nonce, stored)
        stored = hashlib.sha256(
            hashlib.sha256(self.password.encode()).digest()
        ).digest()
        return sha2_ok(response, nonce, stored)

    async def script(self, fake: Fake) -> None:
        if self.refuse is not None:
            fake.write(pkt(0, self.refuse))
            fake.transport.loseConnection()
            return
        fake.write(pkt(0, greeting(self.plugin)))
        seq, payload = await self.packet(fake)
        assert seq == 1
        (flags,) = struct.unpack("<I", payload[:4])
        pos = 32
        end = payload.index(b"\0", pos)
        self.user, pos = payload[pos:end], end + 1
        auth = payload[pos + 1 : pos + 1 + payload[pos]]
        pos += 1 + payload[pos]
        if flags & 0x8:
            pos = payload.index(b"\0", pos) + 1
        end = payload.index(b"\0", pos)
        plugin, pos = payload[pos:end].decode(), end + 1
        self.attrs = payload[pos:]
        nonce = NONCE
        if self.switch_to is not None:
            plugin, nonce = self.switch_to, bytes(range(30, 50))
            fake.write(pkt(2, b"\xfe" + plugin.encode() + b"\0" + nonce + b"\0"))
            seq, auth = await self.packet(fake)
        if not self.verify(plugin, auth, nonce):
            fake.write(
                pkt(
                    seq + 1,
                    err(
                        1045,
                        f"Access denied for user '{self.user.decode()}'@'127.0.0.1' (using password: YES)",
                        "28000",
                    ),
                )
            )
            fake.transport.loseConnection()
            return
        if plugin == CACHING_SHA2:
            if self.full_auth:
                fake.write(pkt(seq + 1, b"\x01\x04"))
                await self.packet(fake)
                return
            fake.write(pkt(seq + 1, b"\x01\x03"))
            seq += 1
        fake.write(pkt(seq + 1, OK))
        while True:
            seq, payload = await self.packet(fake)
            if payload == b"\x01":
                self.quit = True
                fake.transport.loseConnection()
                return
            assert payload[:1] == b"\x03"
            self.queries.append(payload[1:])
            flag = b"1" if self.read_only else b"0"
            if b"super_read_only" in payload and self.mariadb:
                fake.write(
                    pkt(1, err(1193, "Unknown system variable 'super_read_only'"))
                )
            elif b"super_read_only" in payload:
                fake.write(result_set([flag, flag]))
            else:
                fake.write(result_set([flag]))


class TestFakeMySQL:
    """Replica, refusals and the login variants, played by a fake server."""

    @pytest_twisted.ensureDeferred
    async def test_read_only_replica(self, lab: Any) -> None:
        """read_only = 1 is a replica; the check ends with COM_QUIT."""
        my = MyFake(lab, read_only=True)
        result = await run_on_fake(
            lab, my.server, HealthConfig(type="mysql", role="primary")
        )
        assert (result.ok, result.reason) == (
            False,
            "role is replica, pool wants primary",
        )
        assert my.queries == [b"SELECT @@read_only, @@super_read_only"]
        assert my.quit and my.user == b"root"
        assert b"l4lb-health" in my.attrs
        result = await run_on_fake(
            lab, my.server, HealthConfig(type="mysql", role="replica")
        )
        assert (result.ok, result.reason) == (True, "role is replica")

    @pytest_twisted.ensureDeferred
    async def test_mariadb_fallback(self, lab: Any) -> None:
        """Without super_read_only the check asks @@read_only alone."""
        my = MyFake(lab, read_only=True, mariadb=True)
        result = await run_on_fake(
            lab, my.server, HealthConfig(type="mysql", role="replica")
        )
        assert (result.ok, result.reason) == (True, "role is replica")
        assert my.queries == [
            b"SELECT @@read_only, @@super_read_only",
            b"SELECT @@read_only",
        ]

    @pytest_twisted.ensureDeferred
    async def test_error_greeting(self, lab: Any) -> None:
        """An error packet instead of a greeting is the reason."""
        message = "Host '127.0.0.1' is blocked because of many connection errors"
        my = MyFake(lab, refuse=b"\xff" + struct.pack("<H", 1129) + message.encode())
        result = await run_on_fake(lab, my.server, HealthConfig(type="mysql"))
        assert (result.ok, result.reason) == (
            False,
            f"server sent an error: 1129 {message}",
        )

    @pytest.mark.parametrize(
        ("plugin", "switch_to"),
        [
            (NATIVE, None),
            (CACHING_SHA2, None),
            (CACHING_SHA2, NATIVE),
            (NATIVE, CACHING_SHA2),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_password_logins(
        self, lab: Any, tmp_path: Path, plugin: str, switch_to: str | None
    ) -> None:
        """Native, caching_sha2 fast path and auth-switch logins pass with the right password."""
        my = MyFake(lab, password="s3cret", plugin=plugin, switch_to=switch_to)
        config = HealthConfig(
            type="mysql", role="primary", user="monitor",
            password_file=password_file(tmp_path, "s3cret"),
        )  # fmt: skip
        result = await run_on_fake(lab, my.server, config)
        assert (result.ok, result.reason) == (True, "role is primary")
        assert my.user == b"monitor" and my.quit

    @pytest_twisted.ensureDeferred
    async def test_wrong_password(self, lab: Any, tmp_path: Path) -> None:
        """A wrong password is the server's Access denied."""
        my = MyFake(lab, password="s3cret")
        config = HealthConfig(
            type="mysql", user="monitor", password_file=password_file(tmp_path, "nope")
        )
        result = await run_on_fake(lab, my.server, config)
        assert (result.ok, result.reason) == (
            False,
            "server sent an error: 1045 Access denied for user 'monitor'@'127.0.0.1' (using password: YES)",
        )

    @pytest_twisted.ensureDeferred
    async def test_caching_sha2_full_auth(self, lab: Any, tmp_path: Path) -> None:
        """caching_sha2 full authentication (TLS or RSA) is reported as unsupported."""
        my = MyFake(lab, password="s3cret", plugin=CACHING_SHA2, full_auth=True)
        config = HealthConfig(
            type="mysql", user="m", password_file=password_file(tmp_path, "s3cret")
        )
        result = await run_on_fake(lab, my.server, config)
        assert (result.ok, result.reason) == (
            False,
            "caching_sha2_password needs a full login (TLS or RSA), which l4lb does not speak",
        )

    def test_greeting_parse(self) -> None:
        """The v10 greeting gives the version, the 20-byte nonce and the plugin."""
        assert parse_greeting(greeting()) == ("8.0.36-fake", NONCE, NATIVE)


class TestGarbage:
    """Framing that claims huge or broken packets fails instead of buffering."""

    @pytest_twisted.ensureDeferred
    async def test_huge_packet_header(self, lab: Any) -> None:
        """A packet header announcing 16 MiB fails at once."""

        async def script(fake: Fake) -> None:
            fake.write(b"\xff\xff\xff\x00" + b"x" * 100)

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="mysql")
        )
        assert not result.ok
        assert result.reason.startswith("not a MySQL reply")

    @pytest_twisted.ensureDeferred
    async def test_truncated_greeting(self, lab: Any) -> None:
        """A v10 greeting cut short is a failure, not a crash."""

        async def script(fake: Fake) -> None:
            fake.write(pkt(0, b"\x0a8.0\0\x01"))

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="mysql")
        )
        assert not result.ok
