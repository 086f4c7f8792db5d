"""Config for SNI passthrough (route_by_sni, handshake_timeout) and [pool.X.tls]."""

from __future__ import annotations

import pytest

from l4lb.config import ConfigError, PoolTLSConfig, Problem, parse_config

SOURCE = "etc/edge.toml"

POOLS = """
[pool.pg]
[[pool.pg.server]]
address = "10.0.0.1:5432"
[pool.redis]
[[pool.redis.server]]
address = "10.0.0.2:6379"
[pool.web]
[[pool.web.server]]
address = "10.0.0.3:443"
"""


def edge(keys: str, pools: str = POOLS) -> str:
    return f'[frontend.edge]\nlisten = ":8443"\n{keys}\n{pools}'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    return [str(p) for p in caught.value.problems]


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


class TestRouteBySni:
    def test_routes_in_normal_form(self) -> None:
        """Patterns are stored normalised with their pools, in file order."""
        config = parse_config(
            edge(
                'route_by_sni = { "DB.example.com." = "pg", "*.Cache.example.com"'
                ' = "redis", "bücher.example" = "web" }\npool = "web"'
            ),
            SOURCE,
        )
        frontend = config.frontend("edge")
        assert frontend.route_by_sni == (
            ("db.example.com", "pg"),
            ("*.cache.example.com", "redis"),
            ("xn--bcher-kva.example", "web"),
        )
        assert frontend.pool == "web"
        assert frontend.handshake_timeout == 10.0

    def test_pool_is_optional_with_routes(self) -> None:
        """Without pool, unmatched clients will be refused: pool is None."""
        config = parse_config(edge('route_by_sni = { "a.example.com" = "pg" }'), SOURCE)
        assert config.frontend("edge").pool is None

    def test_handshake_timeout(self) -> None:
        """handshake_timeout takes a duration."""
        config = parse_config(
            edge('route_by_sni = { "a.x" = "pg" }\nhandshake_timeout = "2500ms"'),
            SOURCE,
        )
        assert config.frontend("edge").handshake_timeout == 2.5

    @pytest.mark.parametrize(
        ("keys", "problem"),
        [
            (
                'route_by_sni = { "a.example.com" = "pgg" }',
                'frontend.edge.route_by_sni."a.example.com": no pool named "pgg"'
                ' (did you mean "pg"?); defined pools: "pg", "redis", "web"',
            ),
            (
                'route_by_sni = { "a.x" = "pg" }\npool = "webb"',
                'frontend.edge.pool: no pool named "webb" (did you mean "web"?)',
            ),
            (
                'route_by_sni = { "a.*.com" = "pg" }',
                'frontend.edge.route_by_sni."a.*.com": invalid SNI pattern:'
                " a wildcard must be a whole leftmost label",
            ),
            (
                'route_by_sni = { "*" = "pg" }',
                'frontend.edge.route_by_sni."*": invalid SNI pattern',
            ),
            (
                'route_by_sni = { "a b.com" = "pg" }',
                'frontend.edge.route_by_sni."a b.com": invalid SNI pattern:'
                " invalid label 'a b' in host name",
            ),
            (
                'route_by_sni = { "" = "pg" }',
                'frontend.edge.route_by_sni."": invalid SNI pattern: empty host name',
            ),
            (
                'route_by_sni = { "a.x" = 5 }',
                'frontend.edge.route_by_sni."a.x": expected a pool name, got integer 5',
            ),
            (
                'route_by_sni = { "a.x" = "pg", "A.X." = "redis" }',
                'frontend.edge.route_by_sni."A.X.": same name as "a.x"',
            ),
            (
                "route_by_sni = {}",
                "frontend.edge.route_by_sni: must route at least one name",
            ),
            (
                'route_by_sni = "a.x"',
                "frontend.edge.route_by_sni: expected a table of SNI pattern = pool"
                ' name (e.g. { "db.example.com" = "pg" }), got string "a.x"',
            ),
            (
                "",
                "frontend.edge.pool: required key is missing (a frontend forwards to"
                " a pool, or routes TLS by server name with route_by_sni)",
            ),
            (
                'pool = "pg"\nhandshake_timeout = "5s"',
                "frontend.edge.handshake_timeout: only applies with route_by_sni",
            ),
            (
                'route_by_sni = { "a.x" = "pg" }\nhandshake_timeout = 0',
                "frontend.edge.handshake_timeout: must be greater than 0",
            ),
            (
                'route_by_sni = { "a.x" = "pg" }\nhandshake_timeout = "soon"',
                'frontend.edge.handshake_timeout: invalid duration "soon"',
            ),
        ],
    )
    def test_problems(self, keys: str, problem: str) -> None:
        """Each mistake is reported once, at its key path, in words."""
        assert only_problem(edge(keys)).startswith(f"{SOURCE}: {problem}")

    def test_routes_with_termination_is_an_error(self) -> None:
        """route_by_sni and [frontend.X.tls] together are refused."""
        text = edge(
            'route_by_sni = { "a.x" = "pg" }\n'
            '[frontend.edge.tls]\ncertificates = [{ cert = "c", key = "k" }]'
        )
        assert (
            f"{SOURCE}: frontend.edge.route_by_sni: cannot be combined with"
            " [frontend.edge.tls]: passthrough forwards TLS undecrypted,"
            " termination decrypts it; use two frontends"
        ) in problems(text)

    def test_every_problem_at_once(self) -> None:
        """Bad patterns and unknown pools in one table are all reported."""
        found = problems(edge('route_by_sni = { "*.*.x" = "pg", "b.x" = "nope" }'))
        assert len(found) == 2
        assert 'route_by_sni."*.*.x": invalid SNI pattern' in found[0]
        assert 'route_by_sni."b.x": no pool named "nope"' in found[1]


def pool_tls(keys: str, server: str = '"10.0.0.1:6380"') -> str:
    return (
        '[frontend.f]\nlisten = ":1"\npool = "p"\n[pool.p]\n'
        f"[[pool.p.server]]\naddress = {server}\n[pool.p.tls]\n{keys}\n"
    )


class TestPoolTLS:
    def test_defaults(self) -> None:
        """An empty [pool.X.tls] verifies against the system store, by host name."""
        config = parse_config(pool_tls(""), SOURCE)
        assert config.pool("p").tls == PoolTLSConfig()
        assert PoolTLSConfig().verify is True

    def test_all_keys(self) -> None:
        """Every key is read into PoolTLSConfig."""
        config = parse_config(
            pool_tls(
                'verify = false\nca = "ca.pem"\nserver_name = "redis.internal"\n'
                'cert = "c.pem"\nkey = "c.key"'
            ),
            SOURCE,
        )
        assert config.pool("p").tls == PoolTLSConfig(
            verify=False,
            ca="ca.pem",
            server_name="redis.internal",
            cert="c.pem",
            key="c.key",
        )

    def test_ip_server_name(self) -> None:
        """server_name may be an IP address (verified against IP SANs)."""
        config = parse_config(pool_tls('server_name = "10.0.0.1"'), SOURCE)
        assert config.pool("p").tls.server_name == "10.0.0.1"

    def test_no_tls_table(self) -> None:
        """Without the table the pool speaks plain TCP."""
        config = parse_config(pool_tls("").replace("[pool.p.tls]\n", ""), SOURCE)
        assert config.pool("p").tls is None

    @pytest.mark.parametrize(
        ("keys", "problem"),
        [
            ('cert = "c.pem"', "pool.p.tls.key: required with cert"),
            ('key = "c.key"', "pool.p.tls.cert: required with key"),
            ('verify = "yes"', "pool.p.tls.verify: expected a boolean"),
            ('ca = ""', "pool.p.tls.ca: must not be empty"),
            (
                'server_name = "bad name"',
                "pool.p.tls.server_name: invalid label 'bad name'",
            ),
            ('sni = "x"', "pool.p.tls.sni: unknown key"),
        ],
    )
    def test_problems(self, keys: str, problem: str) -> None:
        """Each mistake is reported at its key path."""
        assert only_problem(pool_tls(keys)).startswith(f"{SOURCE}: {problem}")

    def test_unix_server_needs_a_name_to_verify(self) -> None:
        """A unix: server has no host name, so verify needs server_name."""
        assert only_problem(pool_tls("", server='"unix:/run/r.sock"')) == str(
            Problem(
                SOURCE,
                "pool.p.tls.server_name",
                "required with verify = true when a server is a unix: socket"
                " (there is no host name to verify)",
            )
        )
        parse_config(pool_tls("verify = false", server='"unix:/run/r.sock"'), SOURCE)
