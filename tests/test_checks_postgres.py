"""The postgres check against the machine's PostgreSQL (a primary, trust auth) and fakes.

Fake servers speak the v3 protocol from the server side: a replica
(``pg_is_in_recovery()`` = t), servers that demand MD5 or SCRAM-SHA-256 (the
server half of SCRAM by scramp's ``ScramMechanism``, independent of the
client code), and one that refuses with an ErrorResponse. The authentication
code is also checked against the RFC 7677 and RFC 5802 examples, and the MD5
answer against one computed by PostgreSQL itself.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
import scramp

from l4lb.config import HealthConfig
from l4lb.health.checks.conversation import BadReplyError
from l4lb.health.checks.postgres import Scram, md5_password
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

PG = ("127.0.0.1", 5432)
pg_up = pytest.mark.skipif(
    not port_accepts(*PG), reason="no PostgreSQL on 127.0.0.1:5432"
)


class TestAuthVectors:
    """The password answers match published and independently computed values."""

    def test_rfc7677_scram_sha256(self) -> None:
        """The RFC 7677 section 3 example exchange, from the client side."""
        scram = Scram("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
        assert scram.first() == "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
        final = scram.final(
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        )
        assert final == (
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        )
        scram.verify("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")

    def test_rfc5802_scram_sha1(self) -> None:
        """The RFC 5802 section 5 example exchange (the code is not SHA-256 only)."""
        scram = Scram("SCRAM-SHA-1", "user", "pencil", nonce="fyko+d2lbbFgONRv9qkxdawL")
        assert scram.first() == "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
        final = scram.final(
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
        )
        assert final == (
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
            "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        )
        scram.verify("v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")

    def test_wrong_server_signature(self) -> None:
        """A server that cannot prove it knows the password fails the check."""
        scram = Scram("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
        scram.first()
        scram.final(
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        )
        with pytest.raises(BadReplyError, match="SCRAM exchange failed"):
            scram.verify("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")

    def test_md5(self) -> None:
        """The MD5 answer equals PostgreSQL's own md5() of the documented formula."""
        # SELECT 'md5' || md5(convert_to(md5('secretpostgres'), 'UTF8') || '\x01020304'::bytea)
        assert md5_password("postgres", "secret", b"\x01\x02\x03\x04") == (
            "md5bb41a296aab6baccb36ff243a562abff"
        )


def pg_sessions(ports: list[int]) -> int:
    """Sessions on the real server from the probe's local ports."""
    with psycopg.connect(
        host=PG[0], port=PG[1], user="postgres", dbname="postgres"
    ) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(%s)",
            (ports,),
        ).fetchone()
        assert row is not None
        return int(row[0])


@pg_up
class TestRealPostgres:
    """The machine's PostgreSQL is a primary with trust authentication."""

    @pytest_twisted.ensureDeferred
    async def test_roles(self, lab: Any) -> None:
        """It passes role=primary and role=any, fails role=replica, and keeps no session."""
        ep = Recording(PG[1], PG[0])
        result = await run_check(HealthConfig(type="postgres", role="primary"), ep)
        assert (result.ok, result.reason) == (True, "role is primary")
        result = await run_check(HealthConfig(type="postgres", role="replica"), ep)
        assert (result.ok, result.reason) == (
            False,
            "role is primary, pool wants replica",
        )
        result = await run_check(HealthConfig(type="postgres"), ep)
        assert (result.ok, result.reason) == (True, "ready for queries")
        await lab.until(lambda: pg_sessions(ep.ports) == 0, 5, "probe sessions gone")

    @pytest_twisted.ensureDeferred
    async def test_missing_database(self, lab: Any) -> None:
        """The server's FATAL message is the reason."""
        config = HealthConfig(type="postgres", database="l4lb_no_such_database")
        result = await run_check(config, endpoint(PG[1], PG[0]))
        assert (result.ok, result.reason) == (
            False,
            'server sent an error: FATAL: database "l4lb_no_such_database"'
            " does not exist (3D000)",
        )


# -- a fake PostgreSQL ---------------------------------------------------------


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def auth(code: int, data: bytes = b"") -> bytes:
    return msg(b"R", struct.pack("!I", code) + data)


def error(message: str, code: str = "XX000", severity: str = "FATAL") -> bytes:
    fields = f"S{severity}\0V{severity}\0C{code}\0M{message}\0\0".encode()
    return msg(b"E", fields)


READY = (
    auth(0)
    + msg(b"S", b"server_version\x0015.0\x00")
    + msg(b"K", struct.pack("!II", 1, 2))
    + msg(b"Z", b"I")
)


def result_rows(value: bytes) -> bytes:
    row_description = msg(
        b"T",
        struct.pack("!H", 1)
        + b"pg_is_in_recovery\0"
        + struct.pack("!IHIhih", 0, 0, 16, 1, -1, 0),
    )
    data_row = msg(b"D", struct.pack("!Hi", 1, len(value)) + value)
    return row_description + data_row + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")


class PgFake:
    """Plays a PostgreSQL server; records what the client did for the assertions."""

    def __init__(
        self,
        lab: Any,
        *,
        method: str = "trust",
        password: str = "pw",
        in_recovery: bool = False,
        refuse: bytes | None = None,
    ) -> None:
        self.method = method
        self.password = password
        self.in_recovery = in_recovery
        self.refuse = refuse
        self.startup: dict[str, str] = {}
        self.queries: list[bytes] = []
        self.terminated = False
        self.server = fake_server(lab, self.script)

    async def message(self, fake: Fake) -> tuple[bytes, bytes]:
        kind = await fake.take(1)
        (length,) = struct.unpack("!I", await fake.take(4))
        return kind, await fake.take(length - 4)

    async def script(self, fake: Fake) -> None:
        (length,) = struct.unpack("!I", await fake.take(4))
        body = await fake.take(length - 4)
        assert struct.unpack("!I", body[:4]) == (196608,)
        words = body[4:].split(b"\0")
        self.startup = {
            words[i].decode(): words[i + 1].decode()
            for i in range(0, len(words) - 2, 2)
        }
        if self.refuse is not None:
            fake.write(self.refuse)
            fake.transport.loseConnection()
            return
        if not await self.authenticate(fake):
            return
        fake.write(READY)
        while True:
            kind, body = await self.message(fake)
            if kind == b"X":
                self.terminated = True
                fake.transport.loseConnection()
                return
            assert kind == b"Q", kind
            self.queries.append(body)
            fake.write(result_rows(b"t" if self.in_recovery else b"f"))

    async def authenticate(self, fake: Fake) -> bool:
        user = self.startup["user"]
        if self.method == "md5":
            salt = b"\x0a\x0b\x0c\x0d"
            fake.write(auth(5, salt))
            kind, body = await self.message(fake)
            import hashlib

            inner = hashlib.md5((self.password + user).encode()).hexdigest()
            expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
            if kind != b"p" or body != expected.encode() + b"\0":
                fake.write(
                    error(f'password authentication failed for user "{user}"', "28P01")
                )
                fake.transport.loseConnection()
                return False
        elif self.method == "scram":
            mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
            info = mechanism.make_auth_info(self.password, iteration_count=4096)
            server = mechanism.make_server(lambda _: info)
            fake.write(auth(10, b"SCRAM-SHA-256\0\0"))
            kind, body = await self.message(fake)
            name, _, rest = body.partition(b"\0")
            assert name == b"SCRAM-SHA-256"
            (size,) = struct.unpack("!i", rest[:4])
            server.set_client_first(rest[4 : 4 + size].decode())
            fake.write(auth(11, server.get_server_first().encode()))
            kind, body = await self.message(fake)
            try:
                server.set_client_final(body.decode())
            except scramp.ScramException:
                fake.write(
                    error(f'password authentication failed for user "{user}"', "28P01")
                )
                fake.transport.loseConnection()
                return False
            fake.write(auth(12, server.get_server_final().encode()))
        return True


class TestFakePostgres:
    """Replica, password methods and refusals, played by a fake server."""

    @pytest_twisted.ensureDeferred
    async def test_replica(self, lab: Any) -> None:
        """pg_is_in_recovery() = t is a replica; the check ends with Terminate."""
        pg = PgFake(lab, in_recovery=True)
        result = await run_on_fake(
            lab, pg.server, HealthConfig(type="postgres", role="primary")
        )
        assert (result.ok, result.reason) == (
            False,
            "role is replica, pool wants primary",
        )
        assert pg.queries == [b"SELECT pg_is_in_recovery()\0"]
        assert pg.terminated
        assert pg.startup == {"user": "postgres", "application_name": "l4lb-health"}
        result = await run_on_fake(
            lab, pg.server, HealthConfig(type="postgres", role="replica")
        )
        assert (result.ok, result.reason) == (True, "role is replica")

    @pytest.mark.parametrize("method", ["md5", "scram"])
    @pytest_twisted.ensureDeferred
    async def test_password_methods(
        self, lab: Any, tmp_path: Path, method: str
    ) -> None:
        """MD5 and SCRAM-SHA-256 logins with the right password pass; a wrong one fails."""
        pg = PgFake(lab, method=method, password="s3cret")
        config = HealthConfig(
            type="postgres", role="primary", user="monitor", database="app",
            password_file=password_file(tmp_path, "s3cret"),
        )  # fmt: skip
        result = await run_on_fake(lab, pg.server, config)
        assert (result.ok, result.reason) == (True, "role is primary")
        assert pg.startup["user"] == "monitor" and pg.startup["database"] == "app"
        assert pg.terminated

        wrong = HealthConfig(
            type="postgres", role="primary", user="monitor",
            password_file=password_file(tmp_path, "wrong"),
        )  # fmt: skip
        result = await run_on_fake(lab, pg.server, wrong)
        assert (result.ok, result.reason) == (
            False,
            'server sent an error: FATAL: password authentication failed for user "monitor" (28P01)',
        )

    @pytest_twisted.ensureDeferred
    async def test_no_password_role_any(self, lab: Any) -> None:
        """Without a password and a role, the password request is success; the check leaves quietly."""
        pg = PgFake(lab, method="md5")
        result = await run_on_fake(lab, pg.server, HealthConfig(type="postgres"))
        assert (result.ok, result.reason) == (
            True,
            "accepting connections (asks for an MD5 password)",
        )
        assert not pg.terminated

    @pytest_twisted.ensureDeferred
    async def test_no_password_with_role(self, lab: Any) -> None:
        """A role check that is asked for a password it does not have fails saying so."""
        pg = PgFake(lab, method="scram")
        result = await run_on_fake(
            lab, pg.server, HealthConfig(type="postgres", role="primary")
        )
        assert (result.ok, result.reason) == (
            False,
            "server asks for SASL (SCRAM), no password_file configured",
        )

    @pytest_twisted.ensureDeferred
    async def test_not_postgres(self, lab: Any) -> None:
        """A server speaking something else fails with its bytes quoted."""

        async def script(fake: Fake) -> None:
            await fake.take(8)
            fake.write(b"-ERR unknown command\r\n")

        server = fake_server(lab, script)
        result = await run_on_fake(lab, server, HealthConfig(type="postgres"))
        assert (result.ok, result.reason) == (
            False,
            'not a PostgreSQL reply: "-ERR unknown command"',
        )

    @pytest_twisted.ensureDeferred
    async def test_error_response(self, lab: Any) -> None:
        """An ErrorResponse at startup is the reason, in the server's words."""
        pg = PgFake(lab, refuse=error("the database system is starting up", "57P03"))
        result = await run_on_fake(
            lab, pg.server, HealthConfig(type="postgres", role="primary")
        )
        assert (result.ok, result.reason) == (
            False,
            "server sent an error: FATAL: the database system is starting up (57P03)",
        )


class TestGarbage:
    """Framing that claims huge or broken messages fails instead of buffering."""

    @pytest_twisted.ensureDeferred
    async def test_huge_message(self, lab: Any) -> None:
        """A message announcing 1 GiB fails at once."""

        async def script(fake: Fake) -> None:
            await fake.take(8)
            fake.write(b"R" + struct.pack("!I", 1 << 30))

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="postgres")
        )
        assert not result.ok
        assert result.reason.startswith("not a PostgreSQL reply")

    @pytest_twisted.ensureDeferred
    async def test_short_authentication(self, lab: Any) -> None:
        """An Authentication message too short for its code is malformed, not a crash."""

        async def script(fake: Fake) -> None:
            await fake.take(8)
            fake.write(msg(b"R", b"\x00"))

        result = await run_on_fake(
            lab, fake_server(lab, script), HealthConfig(type="postgres")
        )
        assert not result.ok
        assert result.reason.startswith("malformed reply")
