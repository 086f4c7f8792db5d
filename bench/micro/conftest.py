"""Micro-benchmarks (pytest-benchmark): ``python -m pytest bench/micro``.

Kept out of the normal test run (``testpaths = ["tests"]``); they measure, they
do not pass or fail on speed.  The checkout root goes on ``sys.path`` so the
data-path fakes in ``tests/fakes.py`` can be reused.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("pytest_benchmark", reason="pip install -e '.[bench]'")
