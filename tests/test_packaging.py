"""``twistd l4lb`` is found after ``pip install .`` and ``pip install -e .``.

Each case copies the project to a scratch folder and installs it into a fresh
virtualenv without downloading anything: the new venv sees this environment's
site-packages (Twisted, structlog, attrs, pip, setuptools) through a ``.pth``
file, and pip runs with ``--no-index --no-deps --no-build-isolation``. A ``.pth``
line adds a folder but does not run the ``.pth`` files inside it, so this
environment's own editable l4lb (a ``.pth`` pointing at the checkout) stays
invisible there; the test checks that the l4lb and the plugin it finds are the
scratch copy's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent
# Git-tracked plus untracked-not-ignored files that the build needs.
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "l4lb", "twisted", "etc")
BUILD_LEFTOVERS = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "dropin.cache", "*.egg-info", "build"
)

# `twistd ARGS` in a given interpreter (the new venv has no twistd script).
TWISTD = (
    "import sys; sys.argv = ['twistd', *sys.argv[1:]];"
    " from twisted.scripts.twistd import run; run()"
)

# Which l4lb and which dropin Twisted finds, seen from inside the new venv.
PROBE = """
import json, sys
import l4lb, l4lb.tap
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "l4lb"]
print(json.dumps({
    "l4lb": l4lb.__file__,
    "tap": l4lb.tap.__file__,
    "plugin": getattr(sys.modules.get("twisted.plugins.l4lb_plugin"), "__file__", None),
    "makers": [m.module for m in makers],
    "sys_path": sys.path,
}))
"""


def run(
    args: list[str | Path], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a command with no PYTHON* or PIP_* settings leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def require_build_backend() -> None:
    """pip builds with this environment's setuptools (setup.cfg's test extras)."""
    setuptools = version("setuptools")
    assert int(setuptools.split(".")[0]) >= 68, (
        f"setuptools {setuptools} is too old to build l4lb without downloading;"
        " install the test extras: pip install -e '.[test]'"
    )


def outer_l4lb_files(site: Path) -> list[str]:
    """This environment's own l4lb install records (must survive the test)."""
    return sorted(p.name for p in site.iterdir() if "l4lb" in p.name.lower())


def is_under(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.parametrize(
    "editable", [False, True], ids=["pip-install", "pip-install-e"]
)
def test_twistd_finds_l4lb_after_install(tmp_path: Path, editable: bool) -> None:
    """A fresh venv with l4lb installed lists it in twistd --help and runs --check."""
    require_build_backend()
    copy = tmp_path / "project"
    copy.mkdir()
    for name in PROJECT_FILES:
        source = CHECKOUT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=BUILD_LEFTOVERS)
        else:
            shutil.copy2(source, copy / name)
    elsewhere = tmp_path / "cwd"  # no l4lb on '' of sys.path
    elsewhere.mkdir()

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], elsewhere)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site_query = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        elsewhere,
    )
    site = Path(site_query.stdout.strip())
    assert is_under(str(site), venv), site_query
    outer_site = Path(sysconfig.get_paths()["purelib"])
    (site / "outer-environment.pth").write_text(f"{outer_site}\n")
    outer_before = outer_l4lb_files(outer_site)

    install = run(
        [python, "-m", "pip", "install", "--isolated", "--no-index", "--no-deps",
         "--no-build-isolation", *(["-e"] if editable else []), copy],
        elsewhere,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    assert outer_l4lb_files(outer_site) == outer_before, "the outer l4lb was touched"

    probe = run([python, "-c", PROBE], elsewhere)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert str(CHECKOUT) not in found["sys_path"]
    assert found["plugin"] is not None, f"Twisted found no l4lb dropin: {found}"
    installed_in = copy if editable else site
    for key in ("l4lb", "tap", "plugin"):
        assert is_under(found[key], installed_in), (key, found)
    assert found["makers"] == ["l4lb.tap"], found

    help_text = run([python, "-c", TWISTD, "--help"], elsewhere)
    assert help_text.returncode == 0, help_text.stderr
    assert re.search(r"^\s+l4lb\s+A TCP", help_text.stdout, re.M), help_text.stdout

    check = run(
        [
            python,
            "-c",
            TWISTD,
            "l4lb",
            "--check",
            "--config",
            copy / "etc" / "l4lb.toml",
        ],
        elsewhere,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "configuration is valid" in check.stdout
