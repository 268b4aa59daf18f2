"""The example firmware suite, run exactly as the README tells a newcomer to run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_suite_passes_on_the_embedded_simulator():
    env = {k: v for k, v in os.environ.items() if not k.startswith("REROBOTS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES), "--rerobots-sim", "-p", "no:cacheprovider",
         "-rs"],
        cwd=EXAMPLES.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "6 passed, 1 skipped" in out, out
    assert "this run is for basic_kobuki" in out
    assert "LEAKED" not in out
