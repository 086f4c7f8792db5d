"""``python -m bench``: run the benchmark and write the report.

Order of work: check tools, start the backends a selection needs, then for
each scenario run every repeat, and in each repeat every contender in turn
(interleaved, so a slow minute on the shared machine hurts all contenders
alike).  Contenders are started once per mode (plain, TLS) and kept running,
except for the idle-memory scenario, which starts a fresh instance for each
measurement so earlier traffic does not leave freed memory to reuse.
Anything missing or failing is recorded in the report and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import backends as backends_mod
from bench import env, report
from bench.contenders import Contender, Instance, Settings, all_contenders
from bench.procs import REPO, StartError, stop_all
from bench.scenarios import SCENARIOS, Context, Scenario, by_name

DEFAULT_OUT = REPO / "docs" / "benchmarks"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark l4lb beside HAProxy and other proxies with real clients.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 repeat, 0.5 s runs, 200 idle connections (smoke run)",
    )
    parser.add_argument(
        "--repeats", type=int, help="interleaved repeats (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds per measurement (default 2; 0.5 with --quick)",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        help="connections held for idle memory (default 5000; 200 with --quick)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS),
    )
    parser.add_argument(
        "--contenders",
        help="comma-separated contenders: "
        + ",".join(c.name for c in all_contenders()),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"report directory (default {DEFAULT_OUT.relative_to(REPO)})",
    )
    parser.add_argument(
        "--l4lb-config-extra",
        default="",
        help="TOML merged into every l4lb config, e.g. '[global]\\nsplice = false'",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="only re-render DIR/results.md and chart.png from DIR/results.json",
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep generated configs and process logs (path printed)",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration = args.duration or (0.5 if args.quick else 2.0)
    args.idle_connections = args.idle_connections or (200 if args.quick else 5000)
    if args.repeats < 1 or args.duration <= 0 or args.idle_connections < 1:
        parser.error("--repeats, --duration and --idle-connections must be positive")
    args.l4lb_config_extra = args.l4lb_config_extra.replace("\\n", "\n")
    try:
        args.scenarios = by_name(args.only.split(",")) if args.only else list(SCENARIOS)
    except ValueError as e:
        parser.error(str(e))
    known = {c.name: c for c in all_contenders()}
    if args.contenders:
        wanted = args.contenders.split(",")
        unknown = [n for n in wanted if n not in known]
        if unknown:
            parser.error(
                f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(known)}"
            )
        args.contender_list = [c for c in all_contenders() if c.name in wanted]
    else:
        args.contender_list = all_contenders()
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Run:
    """One benchmark run: its contenders' instances, samples and problems."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.samples: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.status: dict[str, str] = {}
        self.instances: dict[tuple[str, bool], Instance | None] = {}
        self.settings: Settings | None = None

    def contender_status(self, contender: Contender) -> str:
        if contender.name not in self.status:
            self.status[contender.name] = contender.unavailable() or "ok"
        return self.status[contender.name]

    def start(self, contender: Contender, tls: bool) -> Instance | None:
        assert self.settings is not None
        try:
            return contender.start(self.settings, tls)
        except (StartError, OSError, ValueError) as e:
            mode = "TLS" if tls else "plain"
            message = f"{mode} mode failed to start: {e}"
            if tls:
                # The plain mode may still be fine (e.g. l4lb without TLS support).
                self.problems.append(f"{contender.name}: {message}")
            else:
                self.status[contender.name] = message
            log(f"{contender.name}: {message}")
            return None

    def instance(self, contender: Contender, tls: bool) -> Instance | None:
        key = (contender.name, tls)
        instance = self.instances.get(key)
        if instance is not None and (why := instance.dead()):
            # It crashed during an earlier measurement: say so, start it again.
            self.problems.append(f"{contender.name} died and was restarted: {why}")
            log(f"{contender.name} died: {why}")
            instance.stop()
            del self.instances[key]
        if key not in self.instances:
            self.instances[key] = self.start(contender, tls)
        return self.instances[key]

    def start_together(self, scenario: Scenario) -> None:
        """Start every contender this scenario needs that is not running yet, at once.

        Starting is mostly waiting (twistd imports, listening); doing it in
        parallel saves that wait per contender.  The instances are idle until
        their turn comes.
        """
        wanted = [
            c
            for c in self.args.contender_list
            if self.eligible(scenario, c)
            and (c.name, scenario.tls) not in self.instances
            and self.contender_status(c) == "ok"
        ]
        with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
            list(pool.map(lambda c: self.instance(c, scenario.tls), wanted))

    def stop_all(self) -> None:
        stop_all(
            [p for i in self.instances.values() if i is not None for p in i.processes]
        )
        self.instances.clear()

    def eligible(self, scenario: Scenario, contender: Contender) -> bool:
        if contender.name == "direct":
            return scenario.direct
        return contender.tls if scenario.tls else contender.plain

    def measure(
        self, scenario: Scenario, contender: Contender, ctx: Context, repeat: int
    ) -> None:
        if self.contender_status(contender) != "ok":
            return
        fresh = scenario.fresh and contender.name != "direct"
        instance = (
            self.start(contender, scenario.tls)
            if fresh
            else self.instance(contender, scenario.tls)
        )
        if instance is None:
            return
        started = time.monotonic()
        sample: dict[str, Any] = {
            "scenario": scenario.name,
            "contender": contender.name,
            "repeat": repeat,
        }
        try:
            sample["metrics"] = scenario.runner(ctx, instance, scenario)
        except Exception as e:  # a failed client run is a result to report, not a crash
            sample["error"] = f"{type(e).__name__}: {e}"
            self.problems.append(
                f"{scenario.name} / {contender.name} (repeat {repeat + 1}): {sample['error']}"
            )
        finally:
            if fresh:
                instance.stop()
        sample["seconds"] = round(time.monotonic() - started, 2)
        figures = ", ".join(
            f"{k}={v:.3g}" for k, v in sample.get("metrics", {}).items()
        )
        log(
            f"{scenario.name} #{repeat + 1} {contender.name}: {figures or sample.get('error')}"
        )
        self.samples.append(sample)

    def execute(self) -> dict[str, Any]:
        args = self.args
        scenarios: list[Scenario] = []
        for scenario in args.scenarios:
            missing = [t for t in scenario.tools if not env.find_tool(t)]
            if missing:
                self.problems.append(
                    f"scenario {scenario.name} skipped: "
                    + "; ".join(env.missing_message(t) for t in missing)
                )
            else:
                scenarios.append(scenario)
        kinds = {s.backend for s in scenarios}
        max_connections = max(4000, args.idle_connections + 100)
        cert = key = None
        if any(s.tls for s in scenarios):
            cert, key = backends_mod.certificate(self.workdir)
        with backends_mod.started(self.workdir, kinds, max_connections * 2) as backends:
            for kind, problem in backends.problems.items():
                self.problems.append(f"backend {kind}: {problem}")
            self.settings = Settings(
                workdir=self.workdir,
                backends=backends.addresses,
                max_connections=max_connections,
                cert=cert,
                key=key,
                l4lb_extra=args.l4lb_config_extra,
            )
            ctx = Context(
                duration=args.duration,
                idle_connections=args.idle_connections,
                pg_database=backends.pg_database,
            )
            try:
                for scenario in scenarios:
                    if scenario.backend not in backends.addresses:
                        self.problems.append(
                            f"scenario {scenario.name} skipped: no {scenario.backend} backend"
                        )
                        continue
                    if not scenario.fresh:
                        self.start_together(scenario)
                    for repeat in range(args.repeats):
                        for contender in args.contender_list:
                            if self.eligible(scenario, contender):
                                self.measure(scenario, contender, ctx, repeat)
            finally:
                self.stop_all()
        for contender in args.contender_list:
            self.contender_status(contender)
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.UTC).strftime(
                    "%Y-%m-%d %H:%M UTC"
                ),
                "machine": env.machine(),
                "versions": env.versions(),
                "repeats": args.repeats,
                "duration": args.duration,
                "idle_connections": args.idle_connections,
                "quick": args.quick,
                "l4lb_config_extra": args.l4lb_config_extra,
                "command": "python -m bench " + shlex.join(sys.argv[1:]),
            },
            "scenarios": [
                {
                    "name": s.name,
                    "title": s.title,
                    "metrics": [m.__dict__ for m in s.metrics],
                }
                for s in scenarios
            ],
            "contenders": [
                {
                    "name": c.name,
                    "label": c.label,
                    "status": self.status.get(c.name, "ok"),
                }
                for c in args.contender_list
            ],
            "samples": self.samples,
            "problems": self.problems,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        for path in report.render(args.render):
            print(path)
        return 0
    for module in ("matplotlib",):
        if problem := env.python_module_missing(module):
            log(f"{problem}: no chart will be drawn")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="l4lb-bench-"))
    try:
        data = Run(args, workdir).execute()
    finally:
        if args.keep_workdir:
            log(f"configs and logs kept in {workdir}")
        else:
            import shutil

            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    data["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    for path in [args.out / "results.json", *report.render(args.out)]:
        print(path)
    log(
        f"done in {data['meta']['wall_seconds']:g}s; {len(data['problems'])} problem(s) noted"
    )
    return 0
