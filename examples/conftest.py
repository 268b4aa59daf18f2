"""Fixtures of the example firmware suite: a firmware image built for the test run."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Firmware:
    path: Path
    version: str
    sha256: str


@pytest.fixture(scope="session")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Firmware:
    """A firmware image as the build would produce it: a version header, then the payload."""
    version = "2.7.1"
    path = tmp_path_factory.mktemp("build") / "kobuki-fw.bin"
    path.write_bytes(f"VERSION={version}\n".encode() + os.urandom(256 * 1024))
    return Firmware(path, version, hashlib.sha256(path.read_bytes()).hexdigest())
