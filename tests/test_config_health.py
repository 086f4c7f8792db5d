"""Tests for the [pool.X.health] table: defaults, conversions and exact problems."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb.config import CheckStep, HealthConfig, parse_config
from tests.test_config import SOURCE, make, only_problem, problems


def health(lines: str, extra: str = "") -> HealthConfig:
    """The health config of pool "redis" with ``lines`` in its health table."""
    text = make(extra="[pool.redis.health]\n" + lines + "\n" + extra)
    result = parse_config(text, SOURCE).pool("redis").health
    assert result is not None
    return result


def problem(lines: str, extra: str = "") -> str:
    """The one problem the health table ``lines`` causes, as printed."""
    return str(only_problem(make(extra="[pool.redis.health]\n" + lines + "\n" + extra)))


P = f"{SOURCE}: pool.redis.health"


class TestDefaults:
    def test_no_table_no_health(self) -> None:
        """Without [pool.X.health] the pool has no probes."""
        assert parse_config(make(), SOURCE).pool("redis").health is None

    def test_empty_table_gets_defaults(self) -> None:
        """An empty table is a tcp check with the documented defaults."""
        assert health("") == HealthConfig()
        assert HealthConfig().jitter == 0.1
        assert (HealthConfig().rise, HealthConfig().fall) == (2, 3)

    def test_every_shared_key(self) -> None:
        """Every key shared by all types is read and converted."""
        cfg = health(
            'interval = "3s"\nfast_interval = "100ms"\ndown_interval = "1m"\n'
            "timeout = 0.5\nrise = 1\nfall = 5\njitter = 0.25\nport = 8008\n"
            'initial_state = "down"\nobserve = false\nslow_start = "30s"\n'
            'on_down = "close"\n'
        )
        assert cfg == HealthConfig(
            interval=3.0,
            fast_interval=0.1,
            down_interval=60.0,
            timeout=0.5,
            rise=1,
            fall=5,
            jitter=0.25,
            port=8008,
            initial_state="down",
            observe=False,
            slow_start=30.0,
            on_down="close",
        )


class TestJitter:
    @pytest.mark.parametrize(
        ("text", "fraction"),
        [
            ('"10%"', 0.1),
            ('"0%"', 0.0),
            ('"100%"', 1.0),
            ('"2.5%"', 0.025),
            ("0", 0.0),
            ("1", 1.0),
            ("0.3", 0.3),
        ],
    )
    def test_percent_or_fraction(self, text: str, fraction: float) -> None:
        """Jitter is a percentage string or a fraction from 0 to 1, stored as a fraction."""
        assert health(f"jitter = {text}").jitter == pytest.approx(fraction)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('"150%"', 'must be between 0% and 100%, got "150%"'),
            ('"ten"', 'expected a percentage like "10%" or a fraction from 0 to 1,'
             ' got string "ten"'),
            ("1.5", 'a fraction must be between 0 and 1 (or write a percentage like'
             ' "10%"), got float 1.5'),
            ("-0.1", "a fraction must be between 0 and 1 (or write a percentage like"
             ' "10%"), got float -0.1'),
            ("true", 'expected a percentage like "10%" or a fraction from 0 to 1,'
             " got boolean true"),
        ],
    )  # fmt: skip
    def test_bad_jitter(self, text: str, message: str) -> None:
        """Out-of-range or mistyped jitter names the key."""
        assert problem(f"jitter = {text}") == f"{P}.jitter: {message}"


class TestSharedKeyProblems:
    @pytest.mark.parametrize(
        ("line", "key", "message"),
        [
            ("rise = 0", "rise", "must be between 1 and 1000, got 0"),
            ("fall = 0", "fall", "must be between 1 and 1000, got 0"),
            ("port = 0", "port", "must be between 1 and 65535, got 0"),
            ("port = 65536", "port", "must be between 1 and 65535, got 65536"),
            ('interval = "0s"', "interval", "must be greater than 0"),
            ("timeout = 0", "timeout", "must be greater than 0"),
            ('fast_interval = "-1s"', "fast_interval", 'must not be negative, got "-1s"'),
            ('slow_start = "soon"', "slow_start", 'invalid duration "soon"; expected'
             ' a number of seconds or a string like "250ms", "2s", "5m", "1h"'),
            ('type = "ping"', "type", 'unknown value "ping"; expected one of: tcp,'
             " send-expect, tls, http, redis, postgres, mysql"),
            ('type = "htp"', "type", 'unknown value "htp" (did you mean "http"?);'
             " expected one of: tcp, send-expect, tls, http, redis, postgres, mysql"),
            ('initial_state = "maybe"', "initial_state", 'unknown value "maybe";'
             " expected one of: up, down"),
            ('on_down = "drop"', "on_down", 'unknown value "drop"; expected one of:'
             " keep, close"),
            ('observe = "yes"', "observe", 'expected a boolean (true or false),'
             ' got string "yes"'),
            ("intervall = 1", "intervall", 'unknown key (did you mean "interval"?)'),
        ],
    )  # fmt: skip
    def test_problem(self, line: str, key: str, message: str) -> None:
        """Each bad value is reported at its own key path."""
        assert problem(line) == f"{P}.{key}: {message}"

    def test_not_a_table(self) -> None:
        """``health`` must be a table."""
        text = make(pool='health = "tcp"')
        assert str(only_problem(text)) == f'{P}: expected a table, got string "tcp"'

    def test_all_problems_at_once(self) -> None:
        """Several bad keys are all reported in one pass."""
        found = problems(make(extra="[pool.redis.health]\nrise = 0\nfall = 0\n"))
        assert [p.key for p in found] == [
            "pool.redis.health.rise",
            "pool.redis.health.fall",
        ]

    def test_port_with_unix_server(self) -> None:
        """A check port cannot apply to a unix socket server."""
        text = make(
            address='"unix:/run/redis.sock"', extra="[pool.redis.health]\nport = 1"
        )
        assert str(only_problem(text)) == (
            f"{P}.port: server[0] is a unix socket; a check port needs TCP servers"
        )


class TestRole:
    @pytest.mark.parametrize("kind", ["redis", "postgres", "mysql"])
    @pytest.mark.parametrize("role", ["primary", "replica", "any"])
    def test_role_types(self, kind: str, role: str) -> None:
        """redis, postgres and mysql checks take a role."""
        assert health(f'type = "{kind}"\nrole = "{role}"').role == role

    @pytest.mark.parametrize("kind", ["tcp", "tls", "http"])
    def test_role_needs_a_database_type(self, kind: str) -> None:
        """A role on a check that cannot tell roles apart is refused."""
        assert problem(f'type = "{kind}"\nrole = "primary"') == (
            f'{P}.role: a role needs type = "redis", "postgres" or "mysql"'
            f' (type is "{kind}")'
        )

    def test_role_any_is_fine_everywhere(self) -> None:
        """``role = "any"`` (the default) is accepted with any type."""
        assert health('type = "tcp"\nrole = "any"').role == "any"

    def test_unknown_role(self) -> None:
        """The role is one of three words."""
        assert problem('type = "redis"\nrole = "master"') == (
            f'{P}.role: unknown value "master"; expected one of: any, primary, replica'
        )


class TestTypeKeys:
    def test_http_keys(self) -> None:
        """``path`` and ``expect_status`` configure the http check."""
        cfg = health('type = "http"\npath = "/primary"\nexpect_status = [200, 204]')
        assert (cfg.path, cfg.expect_status) == ("/primary", (200, 204))

    @pytest.mark.parametrize(
        ("line", "key", "message"),
        [
            ("expect_status = []", "expect_status", "must list at least one status code"),
            ("expect_status = 200", "expect_status",
             "expected an array of status codes, got integer 200"),
            ("expect_status = [200, 600]", "expect_status",
             "item 1: must be between 100 and 599, got 600"),
            ('expect_status = ["200"]', "expect_status",
             'item 0: expected an integer status code, got string "200"'),
            ('path = "primary"', "path", 'must start with "/", got "primary"'),
            ('path = "/a b"', "path",
             'must not contain spaces or control characters, got "/a b"'),
        ],
    )  # fmt: skip
    def test_http_problems(self, line: str, key: str, message: str) -> None:
        """Bad http keys are reported at their paths."""
        assert problem(f'type = "http"\n{line}') == f"{P}.{key}: {message}"

    @pytest.mark.parametrize(
        ("line", "key", "types"),
        [
            ('path = "/x"', "path", '"http"'),
            ("expect_status = [200]", "expect_status", '"http"'),
            ('send = "x"', "send", '"send-expect"'),
            ('expect = "x"', "expect", '"send-expect"'),
            ('expect_regex = "x"', "expect_regex", '"send-expect"'),
            ('user = "u"', "user", '"redis" or "postgres" or "mysql"'),
            ('password_file = "/p"', "password_file", '"redis" or "postgres" or "mysql"'),
            ('database = "d"', "database", '"redis" or "postgres" or "mysql"'),
            ("verify = true", "verify", '"tls"'),
            ('ca = "/ca.pem"', "ca", '"tls"'),
            ('server_name = "x"', "server_name", '"tls"'),
        ],
    )  # fmt: skip
    def test_keys_of_another_type_are_refused(
        self, line: str, key: str, types: str
    ) -> None:
        """A key the configured type would ignore is an error, not silence."""
        assert (
            problem(line) == f'{P}.{key}: only used with type = {types} (type is "tcp")'
        )

    def test_step_of_another_type_is_refused(self) -> None:
        """[[step]] tables belong to send-expect only."""
        text = 'type = "tcp"\n[[pool.redis.health.step]]\nexpect = "x"'
        assert problem(text) == (
            f'{P}.step: only used with type = "send-expect" (type is "tcp")'
        )

    def test_credentials(self) -> None:
        """postgres/mysql credentials are plain strings; the password stays in a file."""
        cfg = health(
            'type = "postgres"\nrole = "primary"\nuser = "monitor"\n'
            'password_file = "/etc/l4lb/pw"\ndatabase = "postgres"'
        )
        assert (cfg.user, cfg.password_file, cfg.database) == (
            "monitor",
            "/etc/l4lb/pw",
            "postgres",
        )

    def test_tls_keys(self) -> None:
        """The tls check may verify with a CA and a name."""
        cfg = health('type = "tls"\nverify = true\nca = "/ca.pem"\nserver_name = "db"')
        assert (cfg.verify, cfg.ca, cfg.server_name) == (True, "/ca.pem", "db")


class TestSendExpect:
    def test_one_step_from_top_level_keys(self) -> None:
        """Top-level send/expect make one step; TOML escapes arrive as bytes."""
        cfg = health('type = "send-expect"\nsend = "PING\\r\\n"\nexpect = "+PONG"')
        assert cfg.steps == (CheckStep(send=b"PING\r\n", expect=b"+PONG"),)

    @pytest.mark.parametrize(
        ("literal", "data"),
        [
            (r"'PING\r\n'", b"PING\r\n"),
            (r"'\x00\xff\x7F'", b"\x00\xff\x7f"),
            (r"'a\tb\\n'", b"a\tb\\n"),
            ("'caf\u00e9'", "caf\u00e9".encode()),
        ],
    )
    def test_escapes(self, literal: str, data: bytes) -> None:
        r"""\r \n \t \\ \xNN in the text become bytes; other text is UTF-8."""
        cfg = health(f'type = "send-expect"\nsend = {literal}\nexpect = "x"')
        assert cfg.steps[0].send == data

    @pytest.mark.parametrize(
        ("literal", "message"),
        [
            (r"'\q'", 'unknown escape "\\q" at character 0'),
            (r"'ab\x4'", 'unknown escape "\\x4" at character 2'),
            (r"'ab\'", 'unknown escape "\\" at character 2'),
        ],
    )
    def test_bad_escape(self, literal: str, message: str) -> None:
        """An unknown escape names the position and the escapes that exist."""
        assert problem(f'type = "send-expect"\nsend = {literal}\nexpect = "x"') == (
            f"{P}.send: {message}; use \\r, \\n, \\t, \\\\ or \\xNN (two hex digits)"
        )

    def test_regex_step(self) -> None:
        """expect_regex is kept as text once it compiles (as a bytes pattern)."""
        cfg = health('type = "send-expect"\nexpect_regex = "^\\\\+PONG"')
        assert cfg.steps == (CheckStep(expect_regex="^\\+PONG"),)

    def test_bad_regex(self) -> None:
        """A regex that does not compile is reported with the reason."""
        assert problem('type = "send-expect"\nexpect_regex = "(x"') == (
            f"{P}.expect_regex: invalid regular expression:"
            " missing ), unterminated subpattern at position 0"
        )

    def test_steps(self) -> None:
        """[[pool.X.health.step]] tables make the steps, in order."""
        cfg = health(
            'type = "send-expect"',
            extra='[[pool.redis.health.step]]\nsend = "PING\\r\\n"\nexpect = "+PONG"\n'
            '[[pool.redis.health.step]]\nsend = "QUIT\\r\\n"\nexpect_regex = "\\\\+OK"\n'
            "[[pool.redis.health.step]]\nexpect = '\\x00'\n",
        )
        assert cfg.steps == (
            CheckStep(send=b"PING\r\n", expect=b"+PONG"),
            CheckStep(send=b"QUIT\r\n", expect_regex="\\+OK"),
            CheckStep(expect=b"\x00"),
        )

    @pytest.mark.parametrize(
        ("lines", "extra", "key", "message"),
        [
            ("", "", "", 'type = "send-expect" needs expect (and usually send), or'
             " [[pool.redis.health.step]] tables"),
            ('send = "x"', "", ".expect",
             'type = "send-expect" needs expect or expect_regex'),
            ('expect = "x"\nexpect_regex = "x"', "", ".expect_regex",
             "give either expect or expect_regex, not both"),
            ('expect = ""', "", ".expect", "must not be empty"),
            ('send = "x"', '[[pool.redis.health.step]]\nexpect = "y"', ".send",
             "give send/expect here or [[pool.redis.health.step]] tables, not both"),
            ("", '[[pool.redis.health.step]]\nsend = "y"', ".step[0]",
             "a step needs expect or expect_regex"),
            ("", '[[pool.redis.health.step]]\nexpect = "y"\nexpect_regex = "y"',
             ".step[0].expect_regex", "give either expect or expect_regex, not both"),
            ("", '[[pool.redis.health.step]]\nexpect = "y"\nsned = "x"',
             ".step[0].sned", 'unknown key (did you mean "send"?)'),
            ("step = []", "", ".step",
             "needs at least one [[pool.redis.health.step]] table"),
        ],
    )  # fmt: skip
    def test_problems(self, lines: str, extra: str, key: str, message: str) -> None:
        """Missing, doubled or malformed steps are reported at their key paths."""
        assert (
            problem('type = "send-expect"\n' + lines, extra) == f"{P}{key}: {message}"
        )

    @given(st.binary(max_size=40))
    def test_every_byte_string_round_trips(self, data: bytes) -> None:
        r"""Any bytes written as \xNN escapes come back exactly."""
        literal = "".join(f"\\x{b:02x}" for b in data) + "\\x00"
        cfg = health(f"type = \"send-expect\"\nsend = '{literal}'\nexpect = 'x'")
        assert cfg.steps[0].send == data + b"\x00"
