"""``RerobotsClient``: every endpoint of the rerobots HTTP API v1.

One ``requests.Session``, one private :meth:`RerobotsClient._request` that maps
every answer to a decoded body or to an error of :mod:`pytest_rerobots.errors`,
rate-limit pacing from the ``X-RateLimit-*`` headers, and retries (through
:mod:`pytest_rerobots.retry`) only for calls that are safe to repeat.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions

from . import retry
from .addons import ADDONS, CAMERA_IDS, AddonEndpoints, CameraSnapshot
from .errors import (
    AddonNotActive,
    AddonUnavailable,
    APIError,
    BusyWorkspaceDeployment,
    BusyWorkspaceInstance,
    DeploymentNotFound,
    InstanceNotFound,
    MalformedResponse,
    NotFound,
    RateLimited,
    RerobotsError,
    ReservationNotFound,
    ServerError,
    TransportError,
    UnreadableNewAnswer,
    WrongAuthToken,
)
from .settings import DEFAULT_API_URL, Secret
from .wire import check_id, epoch, error_message, is_uuid

# ADDONS, CAMERA_IDS and CameraSnapshot live in .addons; they stay importable from here.
__all__ = ["ADDONS", "CAMERA_IDS", "DEFAULT_API_URL", "CameraSnapshot", "NewInstance",
           "RateLimit", "RerobotsClient"]

log = logging.getLogger("pytest_rerobots.client")

#: How many times (1 s apart) a lost POST /new is looked for in GET /instances.
RECONCILE_LOOKS = 3
ACCEPT = "application/vnd.rerobots.v1+json"
USER_AGENT = "pytest-rerobots"

# Error strings of the API, matched by prefix (docs/contract.md, "Error strings").
_AUTH_MESSAGES = ("wrong authorization token", "authentication failed")
_BUSY_DEPLOYMENT = ("all matching workspace deployments are busy",
                    "all feasible workspace deployments are busy")
_BUSY_INSTANCE = ("cannot terminate instance that is init", "this instance is busy")
# "init_fail" must be tested before the busy prefix "... that is init", which it extends.
_ALREADY_ENDED = ("instance already terminating", "instance already terminated",
                  "cannot terminate instance that is init_fail")

_DEPLOYMENT_MISSING = ("no matching wdeployment found",
                       "no workspace deployment found with given id")

# 503 messages of the add-ons: not an outage, so not ServerError (and not retried).
_ADDON_UNAVAILABLE = ("this instance does not support the `",
                      "the add-on `",               # ... on this instance is not streaming yet
                      "add-on `")                   # ... already applied to instance <id>


@dataclass(frozen=True)
class RateLimit:
    """The budget the last answer reported: ``remaining`` calls until epoch ``reset``."""

    limit: int
    remaining: int
    reset: float


@dataclass(frozen=True)
class NewInstance:
    """The answer of ``POST /new``.

    ``success`` is true when an instance was created (``id`` is its id); false
    when a reservation was made instead (``id`` is the reservation's id, which
    becomes the instance's id once it is served). ``sshkey`` is the private key
    the server generated, when it returned one. ``reconciled`` is true when the
    answer was lost and the instance was found through ``GET /instances``.
    """

    success: bool
    id: str
    sshkey: str | None = None
    reconciled: bool = False

    def __repr__(self) -> str:  # the private key stays out of logs and reports
        key = "<redacted>" if self.sshkey else None
        return (f"NewInstance(success={self.success}, id={self.id!r}, sshkey={key}, "
                f"reconciled={self.reconciled})")


def _starts(message: str, prefixes: Iterable[str]) -> bool:
    low = message.lower()
    return any(low.startswith(p) for p in prefixes)


def classify(status: int, payload: Any, *, empty: bool,
             remaining: int | None = None) -> type[APIError]:
    """The error class for a non-200 answer (a pure function of status, body and the
    ``X-RateLimit-Remaining`` header, when there was one).

    A 403 with an empty body is rate limiting when the budget is spent (or unknown);
    with budget left it is the deployment's access rules saying no.
    """
    message = error_message(payload)
    if status == 429 or (status == 403 and empty and (remaining is None or remaining <= 0)):
        return RateLimited
    if _starts(message, _AUTH_MESSAGES):
        return WrongAuthToken
    if _starts(message, _BUSY_DEPLOYMENT):
        return BusyWorkspaceDeployment
    if _starts(message, _ALREADY_ENDED):
        return APIError
    if _starts(message, _BUSY_INSTANCE):
        return BusyWorkspaceInstance
    if status == 404 and message.lower().startswith("add-on `") and "not active" in message:
        return AddonNotActive
    if status == 503 and _starts(message, _ADDON_UNAVAILABLE):
        return AddonUnavailable
    if status == 404:
        if message.lower() == "instance not found":
            return InstanceNotFound
        if _starts(message, _DEPLOYMENT_MISSING):
            return DeploymentNotFound
        if message.lower() == "reservation not found":
            return ReservationNotFound
        return NotFound
    if status >= 500:
        return ServerError
    return APIError


def _surely_unsent(exc: requests.RequestException) -> bool:
    """Whether the request never reached the server (no connection was made), so that
    sending it again cannot do anything twice."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(exc, requests.ConnectionError) and isinstance(
        reason, urllib3.exceptions.NewConnectionError)


class _BearerAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer`` to each request. The token lives only here, so no
    local variable of ours holds it (pytest prints the arguments of traceback frames),
    and this object's repr hides it."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token.reveal()}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<redacted>)"


def _flag(params: dict[str, Any], key: str, on: bool) -> None:
    # The API tests for the presence of these keys, so "false" must be absent.
    if on:
        params[key] = "t"


def _put(params: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        params[key] = value


class RerobotsClient(AddonEndpoints):
    """A client of the rerobots API.

    ``token`` defaults to the environment variable ``REROBOTS_API_TOKEN`` and
    ``api_url`` to ``REROBOTS_API_URL`` or ``https://api.rerobots.net``. Every
    call has ``timeout`` seconds. Idempotent calls are retried on transport
    errors and 5xx ``retries`` times; ``POST /new`` never is (a lost answer is
    reconciled, see :meth:`new_instance`). ``sleep`` and ``clock`` are
    injectable for tests. The token never appears in ``repr``, logs or errors. Proxies
    and a CA bundle set in the environment (``HTTPS_PROXY``, ``NO_PROXY``,
    ``REQUESTS_CA_BUNDLE``...) are read when the client is made, not at every call (a
    ``session`` given is used as it is).

    Asking what is on offer needs no token: :meth:`workspace_types`, :meth:`deployments`
    (with ``info=True``: type, region and queue length of each) and :meth:`queue_length`.
    With one, :meth:`queue_lengths` gives fresher queue lengths and :meth:`instances`
    what the user holds. The add-on endpoints (the camera's: :meth:`apply_camera`,
    :meth:`camera_snapshot`, ...) come from :class:`~pytest_rerobots.addons.AddonEndpoints`.
    """

    def __init__(
        self,
        token: str | None = None,
        api_url: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        max_rate_wait: float = 120.0,
        ignore_env: bool = False,
        token_source: str | None = None,
        session: requests.Session | None = None,
        sleep: retry.Sleep = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        env = {} if ignore_env else os.environ
        if token is None:
            token = env.get("REROBOTS_API_TOKEN") or None
            if token and token_source is None:
                token_source = "environment variable REROBOTS_API_TOKEN"  # noqa: S105 (a name)
        #: Where the token came from (never the token), named when the API refuses it.
        self.token_source = token_source
        # Held as a Secret: vars(client) (and pytest's -l locals) never show it.
        self._token = Secret(token.strip()) if token and token.strip() else None
        self.api_url = (api_url or env.get("REROBOTS_API_URL") or DEFAULT_API_URL).rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.max_rate_wait = max_rate_wait
        self.sleep = sleep
        self.clock = clock
        self.calls = 0  # requests sent; the benchmarks count them
        self._rate: RateLimit | None = None
        self._rate_lock = threading.Lock()
        self._owns_session = session is None
        self.session = session or requests.Session()
        self.session.headers.update({"Accept": ACCEPT, "User-Agent": USER_AGENT})
        if self._owns_session:
            # Keepalive threads and parallel terminates share this session.
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
            # The environment's proxy and CA bundle settings for the API's address, read
            # once: requests reads them again on every call (all of os.environ, twice),
            # about a fifth of a call's time, and every call goes to this address.
            found = self.session.merge_environment_settings(self.api_url, {}, None, None, None)
            self.session.trust_env = False
            self.session.proxies.update(found["proxies"])
            self.session.verify = found["verify"]
        self._auth = _BearerAuth(self._token) if self._token else None
        # Every instance id the API gave this client: never adoptable as "lost".
        self._issued: set[str] = set()
        self._calls_lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------

    def __repr__(self) -> str:
        return f"RerobotsClient(api_url={self.api_url!r}, token={'set' if self._token else None})"

    def __enter__(self) -> RerobotsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (if this client made it)."""
        if self._owns_session:
            self.session.close()

    @property
    def has_token(self) -> bool:
        """Whether a token is configured (the token itself is never exposed)."""
        return bool(self._token)

    @property
    def rate_limit(self) -> RateLimit | None:
        """The budget reported by the most recent answer, if any."""
        return self._rate

    def token_sha256(self) -> str:
        """The SHA-256 of the token, as ``POST /revoke`` takes it."""
        if not self._token:
            raise WrongAuthToken("no API token is configured")
        return hashlib.sha256(self._token.reveal().encode()).hexdigest()

    def _pace(self) -> None:
        """Wait for the budget to refill instead of sending a call that will be refused."""
        rate = self._rate
        if rate is None or rate.remaining > 0:
            return
        wait = rate.reset - self.clock()
        if wait <= 0:
            return
        if wait > self.max_rate_wait:
            raise RateLimited(
                f"API rate limit spent; it resets in {wait:.0f} s "
                f"(more than the {self.max_rate_wait:.0f} s this client waits)",
                reset=rate.reset,
            )
        log.info("rate limit spent; waiting %.1f s for it to reset", wait)
        self.sleep(wait)

    def _note_rate(self, headers: Mapping[str, str]) -> None:
        rate = _parse_rate(headers)
        if rate is None:
            return
        with self._rate_lock:
            self._rate = rate

    def _send(
        self, method: str, path: str, params: Mapping[str, Any] | None, body: Any,
        pace: bool = True,
    ) -> requests.Response:
        """One HTTP exchange; foreign transport errors become ``TransportError``."""
        if pace:
            self._pace()
        with self._calls_lock:
            self.calls += 1
        try:
            response = self.session.request(
                method, self.api_url + path, params=params, json=body,
                auth=self._auth, timeout=self.timeout,
            )
        except requests.RequestException as exc:
            # "from None", against the usual rule: the chained frames of urllib3 carry
            # the request headers as arguments, and pytest prints them (token included).
            # str(exc) from requests names the URL, never the headers.
            raise TransportError(f"{method} {path}: no answer from {self.api_url}: {exc}",
                                 not_sent=_surely_unsent(exc)) from None
        log.debug("%s %s -> %s", method, path, response.status_code)
        self._note_rate(response.headers)
        return response

    def _decode(self, method: str, path: str, response: requests.Response) -> Any:
        """Map one answer to its decoded body or to the error it stands for."""
        text = response.text
        empty = not text.strip()
        payload: Any = None
        if not empty:
            try:
                payload = response.json()
            except ValueError as exc:
                if response.status_code == 200:
                    raise MalformedResponse(
                        f"{method} {path}: answer is not JSON: {text[:200]!r}"
                    ) from exc
                payload = text.strip()[:500]
        status = response.status_code
        if status == 200:
            return payload
        cls = classify(status, payload, empty=empty, remaining=_remaining(response.headers))
        message = error_message(payload)
        if status == 403 and empty and cls is APIError:
            message = "forbidden (the deployment's access rules refuse this token)"
        if cls is RateLimited:
            rate = self._rate
            raise RateLimited(
                message or "API rate limit spent", status=status, payload=payload,
                method=method, path=path, reset=rate.reset if rate else None,
            )
        error = cls(message, status=status, payload=payload, method=method, path=path)
        if cls is WrongAuthToken:
            error.args = (f"{error}\n{self._token_hint()}",)
        raise error

    def _token_hint(self) -> str:
        """Where the refused token came from and how to give another (never the token)."""
        if not self._token:
            return ("no API token was sent: set REROBOTS_API_TOKEN (or pass "
                    "--rerobots-token-file PATH to pytest, token= to Run)")
        source = self.token_source or "the token given to this client"
        return (f"the token came from {source} (not shown here); it may be mistyped, "
                "expired or revoked: put a current token of your rerobots account there, "
                "or pass another with --rerobots-token-file PATH")

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotent: bool = True,
        pace: bool = True,
    ) -> Any:
        """Send a request and decode its answer; retry it only if ``idempotent``; wait for
        a spent rate-limit budget only if ``pace``."""
        if not idempotent:
            return self._decode(method, path, self._send(method, path, params, body, pace))
        for attempt in retry.idempotent(attempts=self.retries + 1, sleep=self.sleep):
            with attempt:
                return self._decode(method, path, self._send(method, path, params, body, pace))
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _expect(payload: Any, key: str, kind: type, what: str) -> Any:
        """Check the shape of a decoded answer; a wrong one is ``MalformedResponse``."""
        if not isinstance(payload, Mapping) or not isinstance(payload.get(key), kind):
            got = repr(payload)[:300]
            raise MalformedResponse(f"{what}: expected a JSON object with {key!r}, got {got}")
        return payload[key]

    # -- public, no token needed ----------------------------------------------

    def index(self) -> dict[str, Any]:
        """``GET /``: the summary of commands."""
        return self._request("GET", "/") or {}

    def workspace_types(self, *, with_dissolved: bool = False) -> list[str]:
        """``GET /workspaces``: the names of the workspace types on offer, e.g.
        ``["basic_kobuki", "fixed_misty2"]``: every type with at least one deployment that
        is not dissolved (``with_dissolved=True`` adds the types of dissolved ones).

        Public: no token needed. Their deployments, with region and queue length, are in
        :meth:`deployments` (``info=True``); ``pytest --rerobots-list`` prints both.
        """
        params: dict[str, Any] = {}
        _flag(params, "with_dissolved", with_dissolved)
        payload = self._request("GET", "/workspaces", params=params)
        return list(self._expect(payload, "workspace_types", list, "GET /workspaces"))

    def deployments(
        self,
        wtype: str | None = None,
        *,
        q: str | None = None,
        maxlen: int | str | None = None,
        types: Iterable[str] | None = None,
        sort_by: str | None = None,
        max_per_page: int | None = None,
        page: int | None = None,
        info: bool = False,
        with_dissolved: bool = False,
    ) -> dict[str, Any]:
        """``GET /deployments[/wtype]``: ``{"workspace_deployments": [...], "page_count": N}``,
        plus ``"info": {id: {...}}`` when ``info`` is true.

        ``types`` entries may start with ``!`` to exclude a type; ``maxlen`` is
        an int or ``"u"`` (unbounded).
        """
        params: dict[str, Any] = {}
        _put(params, "q", q)
        _put(params, "maxlen", maxlen)
        if types is not None:
            params["types"] = ",".join(types)
        _put(params, "sort_by", sort_by)
        _put(params, "max_per_page", max_per_page)
        _put(params, "page", page)
        _flag(params, "info", info)
        _flag(params, "with_dissolved", with_dissolved)
        path = f"/deployments/{wtype}" if wtype else "/deployments"
        payload = self._request("GET", path, params=params)
        self._expect(payload, "workspace_deployments", list, f"GET {path}")
        return dict(payload)

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """``GET /deployment/:id``: details of one workspace deployment."""
        payload = self._request("GET", f"/deployment/{deployment_id}")
        self._expect(payload, "id", str, "GET /deployment")
        return dict(payload)

    def queue_length(self, deployment_id: str) -> int:
        """``GET /queuelen/:id``: 0 when idle, else 1 + reservations."""
        payload = self._request("GET", f"/queuelen/{deployment_id}")
        return int(self._expect(payload, "len", int, "GET /queuelen"))

    def queue_lengths(
        self, wtype: str | None = None, *, deployments: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """``GET /qlen[/wtype]``: ``{deployment_id: {"qlen": N, "rem": s|None}}``."""
        params: dict[str, Any] = {}
        if deployments is not None:
            params["wds"] = ",".join(deployments)
        payload = self._request("GET", f"/qlen/{wtype}" if wtype else "/qlen", params=params)
        if not isinstance(payload, Mapping):
            raise MalformedResponse(f"GET /qlen: expected a JSON object, got {payload!r}"[:400])
        return dict(payload)

    # -- tokens ---------------------------------------------------------------

    def revoke_token(self, sha256: str | None = None) -> None:
        """``POST /revoke/:sha256``: revoke a token (this client's own by default)."""
        self._request("POST", f"/revoke/{sha256 or self.token_sha256()}")

    def purge_tokens(self) -> None:
        """``POST /purge``: revoke every token of the user, this one included."""
        self._request("POST", "/purge")

    # -- instances ------------------------------------------------------------

    def new_instance(
        self,
        target: str,
        *,
        sshkey: str | None = None,
        vpn: bool | None = None,
        reserve: bool | None = None,
        eurl: str | None = None,
        expire_d: int | None = None,
        keepalive: bool | None = None,
        allow_noop: bool | None = None,
        wds: Iterable[str] | None = None,
        known_ids: Callable[[], Iterable[str]] | None = None,
    ) -> NewInstance:
        """``POST /new/:target`` (a workspace type or a deployment id), or, with ``wds``,
        ``POST /new`` choosing among those deployments (of type ``target``).

        Never retried blindly. It is sent again only when no connection was made
        at all. When the answer is lost after the request may have been acted on
        (a dropped connection, a 5xx), the client looks in ``GET /instances`` for
        an instance of ``target`` that started since and that is not among
        ``known_ids()`` (instances this checkout already holds). If exactly one
        is found it is adopted (``reconciled=True``); if none is found after a
        few looks, the original error is raised; if several, the client cannot
        tell which is its own and raises ``TransportError``. Either way, an
        instance created with ``keepalive`` and never pinged is ended by the
        server within its keepalive window.
        """
        body: dict[str, Any] = {}
        for key, value in (("sshkey", sshkey), ("vpn", vpn), ("reserve", reserve),
                           ("eurl", eurl), ("expire_d", expire_d), ("keepalive", keepalive),
                           ("allow_noop", allow_noop)):
            if value is not None:
                body[key] = value
        path = f"/new/{target}"
        if wds is not None:
            body["wds"] = list(wds)
            path = "/new"
        sent_at = self.clock()
        for attempt in range(2):
            try:
                payload = self._request("POST", path, body=body, idempotent=False)
            except TransportError as lost:
                if lost.not_sent:
                    if attempt == 0:
                        continue  # no connection was made: sending again cannot rent twice
                    raise  # twice unsent: nothing to look for
                return self._adopt(target, sent_at, known_ids, lost)
            except ServerError as failed:
                # A gateway or server error may come after the server acted.
                return self._adopt(target, sent_at, known_ids, failed)
            except MalformedResponse as unreadable:
                return self._adopt_unreadable(target, sent_at, known_ids, unreadable)
            break
        try:
            success = self._expect(payload, "success", bool, f"POST {path}")
            ident = check_id(self._expect(payload, "id", str, f"POST {path}"), f"POST {path}")
        except MalformedResponse as unreadable:
            return self._adopt_unreadable(target, sent_at, known_ids, unreadable)
        self._issued.add(ident)  # (a reservation's id becomes its instance's id)
        key = payload.get("sshkey")
        return NewInstance(success=success, id=ident, sshkey=key if isinstance(key, str) else None)

    def _adopt_unreadable(
        self,
        target: str,
        sent_at: float,
        known_ids: Callable[[], Iterable[str]] | None,
        cause: MalformedResponse,
    ) -> NewInstance:
        """A 200 answer to ``POST /new`` that cannot be read: the server acted, but what it
        made is unknown. Reconciled like a lost answer; always raises
        :class:`UnreadableNewAnswer`, whose ``made`` is the instance found (to be ended)."""
        try:
            found = self._adopt(target, sent_at, known_ids, cause)
        except MalformedResponse:
            raise UnreadableNewAnswer(
                f"{cause}; GET /instances shows no instance it made") from None
        except RerobotsError as exc:
            raise UnreadableNewAnswer(f"{cause}; and looking for what it made: {exc}") from None
        raise UnreadableNewAnswer(
            f"{cause}; GET /instances shows it made instance {found.id}, which is ended",
            made=found.id)

    def _adopt(
        self,
        target: str,
        sent_at: float,
        known_ids: Callable[[], Iterable[str]] | None,
        cause: RerobotsError,
    ) -> NewInstance:
        """Find the instance a lost ``POST /new`` may have created, or raise ``cause``."""
        for look in range(RECONCILE_LOOKS):
            if look:
                # The real server inserts the instance after it answers.
                self.sleep(1.0)
            try:
                found = self.find_new_instance(target, sent_at, known_ids)
            except (TransportError, ServerError) as exc:
                raise TransportError(
                    f"POST /new/{target}: answer lost ({cause}), and GET /instances failed "
                    f"too: {exc}"
                ) from None
            if found is not None:
                log.warning("POST /new/%s: answer lost; adopted instance %s", target, found)
                self._issued.add(found)
                return NewInstance(success=True, id=found, reconciled=True)
        # Not sent again: it may yet appear, and a second robot must not be rented.
        raise cause

    def find_new_instance(
        self,
        target: str,
        sent_at: float,
        known_ids: Callable[[], Iterable[str]] | None = None,
    ) -> str | None:
        """One look in ``GET /instances`` for the instance a ``POST /new/<target>`` sent at
        ``sent_at`` (our clock) may have created: one that started since, of that type or
        deployment, and neither among ``known_ids()`` nor one this client already got
        from the API. None if there is none; ``TransportError`` if several match (the
        client cannot tell which is its own).

        Another holder of the same token renting the same type in the same seconds
        (another CI job) cannot be told apart; the window is kept short to make that
        unlikely, at the price of missing our own instance when the server's clock runs
        more than 2 s behind ours (it then ends by keepalive).
        """
        since = sent_at - 2.0
        listing = self.instances(details=True, include_init_fail=True)
        known = set(known_ids()) if known_ids else set()
        known |= self._issued
        candidates = [
            str(item["id"]) for item in listing.get("workspace_instances", [])
            if isinstance(item, Mapping)
            and is_uuid(item.get("id"))
            and item.get("id") not in known
            and target in (item.get("type"), item.get("deployment"))
            and epoch(item.get("starttime")) >= since
        ]
        if len(candidates) > 1:
            raise TransportError(
                f"POST /new/{target}: answer lost and {len(candidates)} new instances match "
                f"({', '.join(candidates)}); none adopted, keepalive will end them"
            )
        return candidates[0] if candidates else None

    def terminate(self, instance_id: str, *, once: bool = False) -> bool:
        """``POST /terminate/:id``. True if this call ended it, False if it was already ending.

        Safe to retry; ``BusyWorkspaceInstance`` means the instance is still in
        INIT (the server refuses to terminate it then). ``once``: send it once, no
        retries here (the caller retries on its own, bounded, schedule).
        """
        try:
            # once: no sleep for a spent budget either (teardown must not stall on it).
            self._request("POST", f"/terminate/{check_id(instance_id, 'a path')}",
                          idempotent=not once, pace=not once)
        except APIError as exc:
            if type(exc) is APIError and _starts(exc.message, _ALREADY_ENDED):
                return False
            raise
        return True

    def instances(
        self,
        wtype: str | None = None,
        *,
        include_terminated: bool = False,
        include_init_fail: bool = False,
        details: bool = False,
        sort_by: str | None = None,
        max_per_page: int | None = None,
        page: int | None = None,
    ) -> dict[str, Any]:
        """``GET /instances[/wtype]``.

        ``{"workspace_instances": [...], "workspace_deployments": [...], "page_count": N}``;
        with ``details`` each instance is an object (id, status, type, ...).
        """
        params: dict[str, Any] = {}
        _flag(params, "include_terminated", include_terminated)
        _flag(params, "include_init_fail", include_init_fail)
        _flag(params, "details", details)
        _put(params, "sort_by", sort_by)
        _put(params, "max_per_page", max_per_page)
        _put(params, "page", page)
        path = f"/instances/{wtype}" if wtype else "/instances"
        payload = self._request("GET", path, params=params)
        self._expect(payload, "workspace_instances", list, f"GET {path}")
        return dict(payload)

    def instance(self, instance_id: str) -> dict[str, Any]:
        """``GET /instance/:id``: status, ``fwd``, ``hostkeys`` and the rest."""
        payload = self._request("GET", f"/instance/{check_id(instance_id, 'a path')}")
        self._expect(payload, "status", str, "GET /instance")
        return dict(payload)

    def instance_sshkey(self, instance_id: str) -> str:
        """``GET /instance/:id/sshkey``: the private key the server generated."""
        payload = self._request("GET", f"/instance/{check_id(instance_id, 'a path')}/sshkey")
        return str(self._expect(payload, "key", str, "GET /instance/:id/sshkey"))

    def keepalive(self, instance_id: str) -> None:
        """``POST /instance/:id/ka``: ping an instance created with ``keepalive: true``.

        Not retried here: the caller pings on its own schedule."""
        self._request("POST", f"/instance/{check_id(instance_id, 'a path')}/ka",
                      idempotent=False, pace=False)

    # -- firewall -------------------------------------------------------------

    def firewall_rules(self, instance_id: str) -> list[list[str]] | None:
        """``GET /firewall/:id``: ordered ``[source, action]`` rules, or None if no chain yet."""
        payload = self._request("GET", f"/firewall/{check_id(instance_id, 'a path')}")
        if not isinstance(payload, Mapping) or "rules" not in payload:
            raise MalformedResponse(f"GET /firewall: expected 'rules', got {payload!r}"[:400])
        rules = payload["rules"]
        return None if rules is None else [list(rule) for rule in rules]

    def add_firewall_rule(
        self, instance_id: str, src: str | None = None, action: str = "ACCEPT"
    ) -> None:
        """``POST /firewall/:id``: append a rule; ``src`` defaults to the caller's address."""
        action = action.upper()
        if action not in ("ACCEPT", "DROP", "REJECT"):
            raise ValueError(f"firewall action must be ACCEPT, DROP or REJECT, not {action!r}")
        body: dict[str, Any] = {} if src is None and action == "ACCEPT" else {"action": action}
        if src is not None:
            body["src"] = src
        # Appending twice is harmless for an allow rule, so transient errors may retry.
        self._request("POST", f"/firewall/{check_id(instance_id, 'a path')}", body=body or None)

    def flush_firewall(self, instance_id: str) -> None:
        """``DELETE /firewall/:id``: remove every rule.

        What an empty chain means differs by source (the API summary: drop
        everything; the official client: accept everything; docs/contract.md,
        "Firewall"); add the rules you need after.
        """
        self._request("DELETE", f"/firewall/{check_id(instance_id, 'a path')}")

    # -- VPN ------------------------------------------------------------------

    def vpn(self, instance_id: str) -> dict[str, Any]:
        """``GET /vpn/:id``: ``{"status", "clients"}``; ``{"status": "nil"}`` without a VPN
        (both the API summary's shape and the server's 400 are understood; docs/contract.md,
        "VPN, reservations, CI")."""
        try:
            payload = self._request("GET", f"/vpn/{check_id(instance_id, 'a path')}")
        except APIError as exc:
            if exc.status == 400 and exc.message == "instance does not have VPN":
                return {"status": "nil"}
            raise
        self._expect(payload, "status", str, "GET /vpn")
        return dict(payload)

    def new_vpn_client(self, instance_id: str) -> dict[str, Any]:
        """``POST /vpn/:id``: ``{"client_id", "ovpn"}`` credentials for one new client."""
        payload = self._request("POST", f"/vpn/{check_id(instance_id, 'a path')}", idempotent=False)
        self._expect(payload, "ovpn", str, "POST /vpn")
        return dict(payload)

    # -- reservations ---------------------------------------------------------

    def reservations(self) -> list[dict[str, Any]]:
        """``GET /reservations``: ``[{"id", "created", "desc", ...}]``."""
        payload = self._request("GET", "/reservations")
        return [dict(r) for r in self._expect(payload, "reservations", list, "GET /reservations")]

    def cancel_reservation(self, reservation_id: str) -> None:
        """``DELETE /reservation/:id``."""
        self._request("DELETE", f"/reservation/{check_id(reservation_id, 'a path')}")

    # -- CI -------------------------------------------------------------------

    def new_ci_build(self, repo_url: str) -> dict[str, Any]:
        """``POST /ci/new``: ``{"pid": ...}`` for a repository URL."""
        payload = self._request("POST", "/ci/new", body={"repo_url": repo_url}, idempotent=False)
        self._expect(payload, "pid", str, "POST /ci/new")
        return dict(payload)


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    """A finite, non-negative number from a rate-limit header; None for anything else
    (absent, garbage, ``nan``, ``inf``, negative): a hostile or broken header is ignored."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(str(raw).strip())
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def _parse_rate(headers: Mapping[str, str]) -> RateLimit | None:
    """The ``X-RateLimit-*`` headers as a :class:`RateLimit`, or None unless all three
    are readable."""
    limit = _header_number(headers, "X-RateLimit-Limit")
    remaining = _header_number(headers, "X-RateLimit-Remaining")
    reset = _header_number(headers, "X-RateLimit-Reset")
    if limit is None or remaining is None or reset is None:
        return None
    return RateLimit(limit=int(limit), remaining=int(remaining), reset=reset)


def _remaining(headers: Mapping[str, str]) -> int | None:
    value = _header_number(headers, "X-RateLimit-Remaining")
    return None if value is None else int(value)


