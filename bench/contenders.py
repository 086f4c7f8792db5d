"""The proxies compared, each with an equivalent config generated per run.

Every contender forwards one listening port per backend (``iperf``,
``redis``, ``pg``; in TLS mode ``redis`` and ``sink`` behind a TLS listener)
to a single server, with least-connections balancing where the proxy has a
choice, no logging of connections, and connection limits above what the
scenarios open.  A contender whose program is missing, or whose config the
installed version rejects (e.g. l4lb's TLS before the TLS work lands), is
reported and skipped.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import env
from bench.procs import Process, StartError, free_port, stop_all

TWISTD = Path(sys.executable).parent / "twistd"
PLAIN_KINDS = ("iperf", "redis", "pg")
TLS_KINDS = ("redis", "sink")


@dataclass
class Settings:
    """What every contender's config shares within one run."""

    workdir: Path
    backends: Mapping[str, tuple[str, int]]  # kind -> (host, port)
    max_connections: int = 4000
    cert: Path | None = None  # ECDSA P-256 certificate, for TLS mode
    key: Path | None = None
    l4lb_extra: str = ""  # TOML merged into every l4lb config


@dataclass
class Instance:
    """A running contender: where to connect for each backend kind, its pids."""

    contender: str
    addresses: dict[str, tuple[str, int]]
    processes: list[Process] = field(default_factory=list)

    def pids(self) -> list[int]:
        """Every process of the contender now (workers and children included)."""
        return [
            pid for p in self.processes if p.proc for pid in env.process_tree(p.pid)
        ]

    def stop(self) -> None:
        stop_all(self.processes)

    def dead(self) -> str | None:
        """Why the instance is gone (a process exited), or None while all run."""
        for p in self.processes:
            if p.proc is not None and p.proc.poll() is not None:
                return f"{p.name} exited with {p.proc.returncode}: {p.tail()}"
        return None


class Contender:
    name = ""
    label = ""
    tls = False  # has a TLS mode
    plain = True  # has a plain mode

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    def start(self, settings: Settings, tls: bool) -> Instance:
        kinds = [
            k for k in (TLS_KINDS if tls else PLAIN_KINDS) if k in settings.backends
        ]
        if not kinds:
            raise StartError("no backend running for this mode")
        ports = {kind: free_port() for kind in kinds}
        directory = (
            settings.workdir
            / f"{self.name}-{'tls' if tls else 'plain'}-{ports[kinds[0]]}"
        )
        directory.mkdir(parents=True)
        processes = self.processes(settings, directory, ports, tls)
        instance = Instance(
            self.name, {k: ("127.0.0.1", p) for k, p in ports.items()}, processes
        )
        try:
            for process in processes:
                process.start()
            for process in processes:
                process.wait_listening(self.ports_of(process, ports))
        except (StartError, OSError):
            instance.stop()
            raise
        return instance

    def ports_of(self, process: Process, ports: dict[str, int]) -> list[int]:
        """The ports ``process`` listens on (all of them, unless one per process)."""
        return list(ports.values())

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        raise NotImplementedError


class Direct(Contender):
    """No proxy: the clients talk to the backends (the limit)."""

    name, label = "direct", "direct"

    def start(self, settings: Settings, tls: bool) -> Instance:
        return Instance(self.name, dict(settings.backends))


# ---------------------------------------------------------------------------


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A small TOML writer for generated configs (tables, arrays of tables, scalars).

    Hand-written because the standard library reads TOML but does not write
    it, and the configs here need nothing beyond these three shapes.
    """
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        raise TypeError(f"cannot write {value!r} as TOML")

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        for key, value in body.items():
            if not isinstance(value, dict) and not _is_table_array(value):
                lines.append(f"{key} = {scalar(value)}")
        for key, value in body.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                lines.append(f"\n[{path}]")
                table(path, value)
            elif _is_table_array(value):
                for item in value:
                    lines.append(f"\n[[{path}]]")
                    table(path, item)

    table("", data)
    return "\n".join(lines).lstrip() + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s keys laid over it, tables merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class L4LB(Contender):
    """``twistd -n l4lb`` from this virtualenv, log level warning."""

    name, label, tls = "l4lb", "l4lb", True

    def __init__(self, name: str = "l4lb", extra: str = "") -> None:
        self.name = self.label = name
        self.extra = extra

    def unavailable(self) -> str | None:
        if not TWISTD.exists():
            return f"{TWISTD} not found (pip install -e . into this venv)"
        return None

    def config(
        self, settings: Settings, ports: dict[str, int], tls: bool
    ) -> dict[str, Any]:
        frontends: dict[str, Any] = {}
        pools: dict[str, Any] = {}
        for kind, port in ports.items():
            host, backend_port = settings.backends[kind]
            frontend: dict[str, Any] = {
                "listen": f"127.0.0.1:{port}",
                "pool": kind,
                "max_connections": settings.max_connections * 2,
            }
            if tls:
                # The issue 4 contract: [frontend.X.tls] certificates = [{cert, key}]
                frontend["tls"] = {
                    "certificates": [
                        {"cert": str(settings.cert), "key": str(settings.key)}
                    ]
                }
            frontends[kind] = frontend
            pools[kind] = {
                "balance": "least-connections",
                "server": [{"address": f"{host}:{backend_port}", "name": kind}],
            }
        config: dict[str, Any] = {
            "global": {"log_level": "warning", "max_connections": 100000},
            "frontend": frontends,
            "pool": pools,
        }
        for extra in (settings.l4lb_extra, self.extra):
            if extra:
                config = deep_merge(config, tomllib.loads(extra))
        return config

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        path = directory / "l4lb.toml"
        path.write_text(toml_dumps(self.config(settings, ports, tls)))
        argv = [str(TWISTD), "-n", "--pidfile=", "l4lb", "--config", str(path)]
        return [Process(self.name, argv, directory)]


class HAProxy(Contender):
    """HAProxy in ``mode tcp``, ``balance leastconn``, N threads, optional splice."""

    tls = False

    def __init__(
        self, name: str, threads: int, splice: bool = False, tls: bool = False
    ) -> None:
        self.name = self.label = name
        self.threads = threads
        self.splice = splice
        self.tls = tls

    def unavailable(self) -> str | None:
        return None if env.find_tool("haproxy") else env.missing_message("haproxy")

    def config(self, settings: Settings, ports: dict[str, int], tls: bool) -> str:
        maxconn = settings.max_connections
        lines = [
            "global",
            f"    maxconn {maxconn}",
            f"    nbthread {self.threads}",
            "defaults",
            "    mode tcp",
            "    balance leastconn",
            f"    maxconn {maxconn}",
            "    timeout connect 3s",
            "    timeout client 1h",
            "    timeout server 1h",
        ]
        if tls:
            combined = settings.workdir / "haproxy-cert.pem"
            if not combined.exists():
                assert settings.cert and settings.key
                combined.write_text(
                    settings.cert.read_text() + settings.key.read_text()
                )
        for kind, port in ports.items():
            host, backend_port = settings.backends[kind]
            bind = f"    bind 127.0.0.1:{port}"
            if tls:
                bind += f" ssl crt {settings.workdir / 'haproxy-cert.pem'}"
            lines += [f"listen {kind}", bind]
            if self.splice:
                lines += ["    option splice-request", "    option splice-response"]
            lines.append(f"    server {kind} {host}:{backend_port}")
        return "\n".join(lines) + "\n"

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        path = directory / "haproxy.cfg"
        path.write_text(self.config(settings, ports, tls))
        haproxy = env.find_tool("haproxy")
        assert haproxy
        return [Process(self.name, [haproxy, "-db", "-f", str(path)], directory)]


class Nginx(Contender):
    """nginx ``stream`` proxy, one worker process, ``least_conn``."""

    name, label, tls = "nginx", "nginx stream", True

    def unavailable(self) -> str | None:
        if not env.find_tool("nginx"):
            return env.missing_message("nginx")
        if env.nginx_stream_module() is None:
            return "nginx has no stream module (Debian package: libnginx-mod-stream)"
        return None

    def config(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> str:
        module = env.nginx_stream_module()
        lines = []
        if module and module != "static":
            lines.append(f"load_module {module};")
        lines += [
            "daemon off;",
            "worker_processes 1;",
            f"pid {directory / 'nginx.pid'};",
            f"error_log {directory / 'error.log'} warn;",
            f"worker_rlimit_nofile {settings.max_connections * 2 + 100};",
            f"events {{ worker_connections {settings.max_connections * 2 + 50}; }}",
            "stream {",
        ]
        for kind, port in ports.items():
            host, backend_port = settings.backends[kind]
            lines.append(
                f"  upstream {kind} {{ least_conn; server {host}:{backend_port}; }}"
            )
            listen = f"listen 127.0.0.1:{port}{' ssl' if tls else ''};"
            lines.append(f"  server {{ {listen} proxy_pass {kind};")
            if tls:
                lines.append(
                    f"    ssl_certificate {settings.cert}; ssl_certificate_key {settings.key};"
                )
            lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        path = directory / "nginx.conf"
        path.write_text(self.config(settings, directory, ports, tls))
        nginx = env.find_tool("nginx")
        assert nginx
        argv = [
            nginx,
            "-p",
            str(directory),
            "-e",
            str(directory / "error.log"),
            "-c",
            str(path),
        ]
        return [Process(self.name, argv, directory)]


class Pen(Contender):
    """pen, one process per listening port (pen listens on one port)."""

    name, label = "pen", "pen"

    def unavailable(self) -> str | None:
        return None if env.find_tool("pen") else env.missing_message("pen")

    def ports_of(self, process: Process, ports: dict[str, int]) -> list[int]:
        return [ports[process.name.rsplit("-", 1)[1]]]

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        pen = env.find_tool("pen")
        assert pen
        limit = str(settings.max_connections + 100)
        result = []
        for kind, port in ports.items():
            host, backend_port = settings.backends[kind]
            # -f foreground, -r no client tracking (one server anyway),
            # -x simultaneous connections, -c client table size.
            argv = [
                pen,
                "-f",
                "-r",
                "-x",
                limit,
                "-c",
                limit,
                f"127.0.0.1:{port}",
                f"{host}:{backend_port}",
            ]
            result.append(Process(f"pen-{kind}", argv, directory))
        return result


class Portforward(Contender):
    """Twisted's own ``twistd portforward`` (one process per listening port)."""

    name, label = "portforward", "twistd portforward"

    def unavailable(self) -> str | None:
        return None if TWISTD.exists() else f"{TWISTD} not found"

    def ports_of(self, process: Process, ports: dict[str, int]) -> list[int]:
        return [ports[process.name.rsplit("-", 1)[1]]]

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        result = []
        for kind, port in ports.items():
            host, backend_port = settings.backends[kind]
            argv = [
                str(TWISTD),
                "-n",
                "--pidfile=",
                "-l",
                str(directory / f"{kind}.twistd.log"),
                "portforward",
                "-p",
                f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                "-h",
                host,
                "-d",
                str(backend_port),
            ]
            result.append(Process(f"portforward-{kind}", argv, directory))
        return result


class Uvloop(Contender):
    """The minimal asyncio + uvloop proxy in ``bench/uvloop_proxy.py``."""

    name, label = "uvloop", "asyncio+uvloop"

    def unavailable(self) -> str | None:
        return env.python_module_missing("uvloop")

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        specs = [
            f"{port}:{settings.backends[kind][0]}:{settings.backends[kind][1]}"
            for kind, port in ports.items()
        ]
        argv = [sys.executable, "-m", "bench.uvloop_proxy", *specs]
        return [Process(self.name, argv, directory)]


class Stunnel(Contender):
    """stunnel (TLS only): the TLS-terminating anchor beside HAProxy and nginx."""

    name, label, tls, plain = "stunnel", "stunnel", True, False

    def unavailable(self) -> str | None:
        if env.find_tool("stunnel4") or env.find_tool("stunnel"):
            return None
        return env.missing_message("stunnel4")

    def processes(
        self, settings: Settings, directory: Path, ports: dict[str, int], tls: bool
    ) -> list[Process]:
        lines = [
            "foreground = yes",
            "pid =",
            "debug = 3",
            f"cert = {settings.cert}",
            f"key = {settings.key}",
        ]
        for kind, port in ports.items():
            host, backend_port = settings.backends[kind]
            lines += [
                f"[{kind}]",
                f"accept = 127.0.0.1:{port}",
                f"connect = {host}:{backend_port}",
            ]
        path = directory / "stunnel.conf"
        path.write_text("\n".join(lines) + "\n")
        stunnel = env.find_tool("stunnel4") or env.find_tool("stunnel")
        assert stunnel
        return [Process(self.name, [stunnel, str(path)], directory)]


def all_contenders() -> list[Contender]:
    """Every contender in report order; the reference (HAProxy 1 thread) second."""
    return [
        Direct(),
        HAProxy("haproxy-1t", threads=1, tls=True),
        HAProxy("haproxy-2t", threads=2),
        HAProxy("haproxy-splice", threads=1, splice=True),
        L4LB(),
        L4LB("l4lb-w2", extra="[global]\nworkers = 2\n"),
        Nginx(),
        Pen(),
        Portforward(),
        Uvloop(),
        Stunnel(),
    ]


REFERENCE = "haproxy-1t"
