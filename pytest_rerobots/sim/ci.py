"""The CI projects of ``POST /ci/new``: registered per user, their jobs only counted."""

from __future__ import annotations

import base64
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .model import Refusal

__all__ = ["CIProject", "CIProjects"]


@dataclass
class CIProject:
    """A CI project of ``POST /ci/new``; jobs are only counted."""

    pid: str
    user: str
    repo_url: str
    created: float
    jobs: int = 0


class CIProjects:
    """Every user's CI projects, by id; thread-safe. ``clock`` gives epoch seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._projects: dict[str, CIProject] = {}
        self._lock = threading.Lock()

    def new(self, user: str, repo_url: str) -> str:
        """``POST /ci/new``: register a CI project; returns its 22-character id."""
        pid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")
        with self._lock:
            self._projects[pid] = CIProject(pid, user, repo_url, self._clock())
        return pid

    def of(self, user: str) -> list[CIProject]:
        """``GET /ci/projects``: the caller's projects."""
        with self._lock:
            return [p for p in self._projects.values() if p.user == user]

    def job(self, user: str, pid: str) -> int:
        """``POST /ci/project/:pid/job``: count a job; returns its number."""
        with self._lock:
            project = self._projects.get(pid)
            if project is None or project.user != user:
                raise Refusal(404)
            project.jobs += 1
            return project.jobs
