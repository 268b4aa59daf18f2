"""The GitHub Actions workflow users copy: valid for GitHub's workflow schema, and keeping the
promises the docs make about it. (tests/test_docs_readme.py checks that the docs' GitHub
Actions page includes this very file.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "github" / "robot-tests.yml"


def load() -> dict[str, Any]:
    # ruamel.yaml comes with check-jsonschema; unlike a YAML 1.1 loader it reads the
    # `on:` key as a string, as GitHub does.
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(WORKFLOW.read_text())


@pytest.mark.parametrize("schema", ["vendor.github-workflows",
                                    "custom.github-workflows-require-timeout"])
def test_the_workflow_is_valid_for_githubs_schema(schema: str):
    # The schemas ship inside check-jsonschema: no network needed.
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is in the test extra"
    proc = subprocess.run([exe, "--builtin-schema", schema, str(WORKFLOW)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def steps_by_name(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step.get("name") or step.get("uses", ""): step for step in job["steps"]}


def test_the_workflow_keeps_the_readmes_promises():
    workflow = load()
    assert set(workflow["on"]) == {"push", "pull_request"}
    (job,) = workflow["jobs"].values()
    assert "wtype" in job["strategy"]["matrix"]
    assert "matrix.wtype" in job["concurrency"]["group"]
    assert job["concurrency"]["cancel-in-progress"] is False
    steps = steps_by_name(job)
    tests = steps["Tests on ${{ matrix.wtype }}"]
    assert tests["run"].startswith("exec pytest ")
    assert "--junitxml=" in tests["run"]
    assert "--rerobots-require" in tests["env"]["PYTEST_ADDOPTS"]
    assert tests["timeout-minutes"] < job["timeout-minutes"]
    sweep = steps["End whatever the tests left running"]
    assert sweep["run"] == "pytest --rerobots-sweep"
    upload = steps["Upload the JUnit report"]
    assert sweep["if"] == upload["if"] == "always()"
    assert upload["uses"].startswith("actions/upload-artifact@")
    assert "pytest-github-actions-annotate-failures" in steps["Install"]["run"]
    assert steps["actions/setup-python@v5"]["with"]["cache"] == "pip"
    # The token reaches only the steps that talk to the API.
    with_token = [name for name, step in steps.items()
                  if "REROBOTS_API_TOKEN" in (step.get("env") or {})]
    assert with_token == ["Rent the robot ahead", "Tests on ${{ matrix.wtype }}",
                          "End whatever the tests left running"]
    # Rented ahead right after the plugin is installed, before the project's dependencies.
    names = list(steps)
    ahead = steps["Rent the robot ahead"]
    assert ahead["run"].startswith("pytest --rerobots-rent-ahead --rerobots-wtype=")
    assert names.index("Install pytest-rerobots") + 1 == names.index("Rent the robot ahead")
    assert names.index("Rent the robot ahead") < names.index("Install")
