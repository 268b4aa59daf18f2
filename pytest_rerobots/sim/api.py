"""The simulator's HTTP API: a WSGI application over a :class:`~.world.World`.

Routing is a werkzeug :class:`~werkzeug.routing.Map` built from the one endpoint table,
:data:`~.endpoints.ENDPOINTS`; converters carry the server's route patterns (UUIDs, 64-hex
digests, workspace type names), so a malformed id fails to match and gets the catch-all
answer, 400 ``{"error_message": "unrecognized command"}``, as on the real
server. Each request, in order:

0. is held to the :class:`~.server.ServerLimits`: a body past ``max_body`` is a 413 (by its
   ``Content-Length`` before anything is read; a chunked one while reading) that closes the
   connection, and the body is read before anything else, so the server's request deadline
   ends there;
1. ticks the world, so time-driven transitions are never stale;
2. answers ``OPTIONS`` (CORS preflight) at once, uncharged and without rate-limit headers
   (``OPTIONS /`` is a 405, as the server has no preflight route for ``/``);
3. authenticates the bearer token (a bad or revoked one counts as anonymous);
4. charges the rate-limit window (per token, else per address); once spent (the server's
   check is ``>``, so the budget's next request is still served), a request is answered 403
   with an empty body, after the user check on endpoints that need a token;
5. applies the endpoint's injected latency, pending forced failures and error rate;
6. runs the handler; a :class:`~.model.Refusal` becomes its status and body;
7. for a successful ``POST /new`` with a lost-response fault: closes the connection without
   answering (the instance exists all the same).

``HEAD`` matches no route (the server registers none), so it gets the catch-all answer.

Every body is shaped here, from the model objects and plain data the world returns. Every
answer carries ``X-RateLimit-Limit/Remaining/Reset``, the CORS headers and, through
:class:`RequestHandler`, ``Server: rerobots.net``.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.routing import BaseConverter, Map, Rule
from werkzeug.wrappers import Request, Response

from .accounts import RateState
from .addons import CameraAddon
from .endpoints import ENDPOINTS
from .model import (
    ACTIVE,
    ENDED_STATUSES,
    INIT_FAIL,
    READY,
    TERMINATED,
    TERMINATING,
    Refusal,
    SimDeployment,
    SimInstanceOptions,
    format_iso_z,
    format_time,
    utc,
)
from .server import LimitedHandler, ServerLimits
from .world import World

__all__ = ["RequestHandler", "SimApp"]

log = logging.getLogger(__name__)

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(_UUID)

_BY_NAME = {endpoint.name: endpoint for endpoint in ENDPOINTS}
_CORS = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "GET,POST,DELETE",
    "Access-Control-Allow-Origin": "*",
}
_FIREWALL_ACTIONS = ("ACCEPT", "DROP", "REJECT")
# POST /new options and their types, in the order the server checks them.
_OPTION_TYPES: tuple[tuple[str, type], ...] = (
    ("reserve", bool), ("expire_d", int), ("keepalive", bool), ("eurl", str), ("vpn", bool),
    ("sshkey", str), ("allow_noop", bool),
)
# The server's pattern for a firewall source: it rejects netmask forms such as
# 10.0.0.0/255.0.0.0 and does not range-check the numbers.
_SRC = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(/[0-9]{1,2})?")
#: ``GET /``'s ``deployment_details``, which the server names literally.
DEPLOYMENT_DETAILS = "https://api.rerobots.net/deployment/:deploymentID"
# Cached GET /deployments answers kept at most (one per path and query string).
_DEPLOYMENTS_CACHE_MAX = 1024
_SORT_KEYS = {"inc_wtype", "dec_wtype", "inc_created", "dec_created", "inc_count", "dec_count"}


class _UUIDConverter(BaseConverter):
    """A UUID in the server's route pattern, lowercased."""

    regex = _UUID

    def to_python(self, value: str) -> str:
        return value.lower()


class _DigestConverter(BaseConverter):
    """64 hexadecimal characters: a SHA-256 digest."""

    regex = r"[0-9a-fA-F]{64}"

    def to_python(self, value: str) -> str:
        return value.lower()


class _WtypeConverter(BaseConverter):
    """A workspace type in listing routes (``[a-zA-Z\\d_\\-]+`` on the server)."""

    regex = r"[a-zA-Z0-9_\-]+"


class _NewTargetConverter(BaseConverter):
    """``/new/:target``: a deployment UUID, or else a workspace type ``[a-zA-Z_0-9]+``."""

    regex = rf"(?:{_UUID}|[a-zA-Z0-9_]+)"


class _PidConverter(BaseConverter):
    """A CI project id: 22 url-safe base64 characters."""

    regex = r"[A-Za-z0-9_\-]{22}"


class _QueueIdConverter(BaseConverter):
    """``/queuelen/:id``: letters, digits, ``_``, ``-`` and ``=``, as the server's route."""

    regex = r"[a-zA-Z0-9_\-=]+"


class _DigitsConverter(BaseConverter):
    """A camera id in the add-on's routes (``[0-9]+`` on the server)."""

    regex = r"[0-9]+"


def _rules() -> list[Rule]:
    return [Rule(path, endpoint=e.name, methods=[e.method]) for e in ENDPOINTS for path in e.paths]


class _DropConnection(Exception):
    """Raised to end a request without any answer (the lost-response fault)."""


def _json(status: int, body: Any) -> Response:
    if body is None:
        return Response(b"", status=status)
    return Response(json.dumps(body), status=status, content_type="application/json; charset=utf-8")


def _preflight(request: Request) -> Response:
    """The answer to ``OPTIONS``: the CORS preflight, which carries no rate-limit headers
    and is not charged; ``/`` has no preflight route on the server, so there it is a 405."""
    if request.path == "/":
        response = Response("405: Method Not Allowed", status=405,
                            content_type="text/plain; charset=utf-8")
        response.headers["Allow"] = "GET"
        return response
    response = Response(b"", status=200)
    response.headers["Access-Control-Allow-Headers"] = "Authorization,Content-Type"
    response.headers.update(_CORS)
    return response


def _refused(refusal: Refusal) -> Response:
    """The answer to a :class:`~.model.Refusal`: its status, and its message as JSON."""
    body = None if refusal.message is None else {refusal.key: refusal.message}
    return _json(refusal.status, body)


def _server_error(status: int) -> Response:
    """An injected 5xx: plain text, as a failing server or proxy answers, not the API's JSON."""
    if status == 500:
        text = "500 Internal Server Error\n\nServer got itself in trouble"
    else:
        text = f"{status}: {HTTP_STATUS_CODES.get(status, 'Server Error')}"
    return Response(text, status=status, content_type="text/plain; charset=utf-8")


def _bare() -> Response:
    """A bare success: 200 with an empty body."""
    return Response(b"", status=200)


def _flag(request: Request, name: str) -> bool:
    """A query flag that is on when present and not f/false/0 (``info``, ``with_dissolved``)."""
    if name not in request.args:
        return False
    return request.args.get(name, "").strip().lower() not in ("f", "false", "0")


def _int_arg(request: Request, name: str, default: int) -> int:
    """An integer query argument; a bad number is clamped to the default, as the server does."""
    try:
        return max(0, int(request.args.get(name, default)))
    except (TypeError, ValueError):
        return default


def _paginate(items: list[Any], max_per_page: int, page: int, *, empty_pages: int = 1
              ) -> tuple[list[Any], int]:
    """The requested page and the page count (``max_per_page`` 0: everything, one page).

    ``empty_pages`` is the page count of an empty, paged listing: the server says 1 for
    instances and 0 for deployments."""
    if max_per_page <= 0:
        return items, 1
    if not items:
        return [], empty_pages
    page_count = math.ceil(len(items) / max_per_page)
    page = min(max(page, 1), page_count)
    start = (page - 1) * max_per_page
    return items[start:start + max_per_page], page_count


def _filter_types(found: list[SimDeployment], types: str) -> list[SimDeployment]:
    """``types=a,!b,...`` the server's way: the first item selects; each next one adds its
    type (a union) or, as ``!t`` (or a literal ``%21t``), removes ``t`` from what is selected.
    So ``!a,b`` is everything but ``a``, plus ``b``."""
    selected: list[SimDeployment] | None = None
    for item in (part.strip() for part in types.split(",")):
        negated = item.startswith(("!", "%21"))
        name = item[1:] if item.startswith("!") else item[3:] if negated else item
        if not name:
            continue
        if negated:
            base = found if selected is None else selected
            selected = [d for d in base if d.type != name]
        else:
            matches = [d for d in found if d.type == name]
            selected = matches if selected is None else selected + [
                d for d in matches if d not in selected]
    return found if selected is None else [d for d in found if d in selected]


def _caller_ip(request: Request, trust_forwarded_for: bool) -> str:
    """The caller's address: the socket's, or with ``trust_forwarded_for`` the first one of
    ``X-Forwarded-For`` (which any caller can write, so it is off by default)."""
    if trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded.strip():
            return forwarded.split(",")[0].strip()
    return request.remote_addr or "127.0.0.1"


def _json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in ``raw`` nest deeper than ``limit`` (brackets inside
    strings do not count); one linear pass, so a hostile body cannot make the parser recurse."""
    depth = 0
    in_string = False
    escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _too_large(limit: int) -> Response:
    """413 for a body past ``limit`` bytes; werkzeug's server then closes the connection."""
    return _json(413, {"error_message": f"request body larger than {limit} bytes"})


def _bearer(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``; anything else carries none."""
    parts = request.headers.get("Authorization", "").split()
    if len(parts) == 2 and parts[0] == "Bearer":
        return parts[1]
    return None


def _body(request: Request) -> dict[str, Any]:
    """The JSON body whatever the Content-Type; a missing body is ``{}``.

    The body was read (within ``max_body``) by :meth:`SimApp.__call__`; one nested past
    ``max_json_depth`` (the request's ``json_depth``) is a 400 and never reaches the parser."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    limit = getattr(request, "json_depth", ServerLimits.max_json_depth)
    if _json_depth_exceeds(raw, limit):
        raise Refusal(400, f"request body nests deeper than {limit} levels")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise Refusal(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refusal(400, "request body must be a JSON object")
    return data


def _wrong_type(name: str) -> Refusal:
    return Refusal(400, f"value for option `{name}` has wrong type")


def _new_options(body: dict[str, Any]) -> SimInstanceOptions:
    """Type-check the POST /new options, with the server's error strings and in its order."""
    values: dict[str, Any] = {}
    if "repo" in body:
        repo = body["repo"]
        if not isinstance(repo, dict) or not isinstance(repo.get("url"), str):
            raise Refusal(400, "value for option `repo` missing url")
        values["repo"] = dict(repo)
    for name, kind in _OPTION_TYPES:
        if name not in body:
            continue
        value = body[name]
        # bool is a subclass of int: ``expire_d: true`` must still be the wrong type.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _wrong_type(name)
        if isinstance(value, int) and name == "expire_d" and value < 1:
            raise Refusal(400, "value for option `expire_d` must be positive")
        if isinstance(value, str) and name == "eurl":
            value = value.strip()
            if not value:
                raise Refusal(400, "value for option `eurl` must be nonempty")
        values[name] = value
    return SimInstanceOptions(**values)


class SimApp:
    """The WSGI application of one simulated API over ``world``.

    One handler method per endpoint of :data:`~.endpoints.ENDPOINTS`, named as the endpoint;
    each returns the :class:`~werkzeug.wrappers.Response` and builds its body here, from
    the model objects the world hands out.
    """

    def __init__(self, world: World, limits: ServerLimits | None = None) -> None:
        self.world = world
        self.limits = limits if limits is not None else ServerLimits()
        #: Told each connection's socket once its request body is read (the server's
        #: request deadline ends there); set by the server.
        self.on_body_read: Callable[[Any], None] = lambda sock: None
        #: Told each connection's socket whose body is refused (413); set by the server.
        self.on_body_refused: Callable[[Any], None] = lambda sock: None
        #: Requests answered, by endpoint name (what a test asks: "no POST /new?").
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self.url_map = Map(
            _rules(),
            # No rule ends in "/", so a trailing slash never matches: like the server's
            # catch-all, "/workspaces/" is an unrecognized command rather than a redirect.
            strict_slashes=True,
            merge_slashes=False,
            converters={
                "uuid": _UUIDConverter,
                "digest": _DigestConverter,
                "wtype": _WtypeConverter,
                "target": _NewTargetConverter,
                "pid": _PidConverter,
                "queueid": _QueueIdConverter,
                "digits": _DigitsConverter,
            },
        )
        # GET /deployments answers by path and query, with their expiry (world clock).
        self._deployments_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cache_lock = threading.Lock()
        #: The camera add-on's state (sim/addons.py).
        self.camera = CameraAddon(world)
        self._handlers: dict[str, Callable[..., Response]] = {
            e.name: getattr(self, e.name) for e in ENDPOINTS
        }

    def request_count(self, endpoint: str) -> int:
        """How many requests of ``endpoint`` (an endpoint's name) it has answered."""
        with self._counts_lock:
            return self._counts[endpoint]

    # ------------------------------------------------------------------ WSGI plumbing

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        request = Request(environ)
        limits = self.limits
        # One byte over: a chunked body cut off at the limit is then known to be too large.
        request.max_content_length = limits.max_body + 1
        request.json_depth = limits.max_json_depth  # type: ignore[attr-defined]
        length = request.content_length
        too_large = length is not None and length > limits.max_body
        if not too_large:
            try:
                too_large = len(request.get_data(cache=True)) > limits.max_body
            except RequestEntityTooLarge:
                too_large = True
        if too_large:
            self.on_body_refused(environ.get("werkzeug.socket"))
            return _too_large(limits.max_body)(environ, start_response)
        self.on_body_read(environ.get("werkzeug.socket"))
        try:
            response = self.dispatch(request)
        except _DropConnection:
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                # Close both directions first: the server then reads EOF instead of waiting
                # for another request on this keep-alive connection.
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # werkzeug's server treats a ConnectionError as a dropped connection: no answer.
            raise ConnectionAbortedError("simulated lost response") from None
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        """Answer one request (see the module docstring for the order of the steps)."""
        world = self.world
        accounts = world.accounts
        world.tick()
        if request.method == "OPTIONS":
            return _preflight(request)
        token = _bearer(request)
        user = accounts.authenticate(token)
        caller = _caller_ip(request, self.limits.trust_forwarded_for)
        key, budget = accounts.window_for(user, token, caller)
        rate = accounts.charge(key, budget)
        match = self._match(request)
        if match is None:
            # Unknown route, malformed id and wrong method alike hit the catch-all route,
            # which checks the rate limit first.
            if not rate.allowed:
                return self._finish(Response(b"", status=403), rate)
            return self._finish(_json(400, {"error_message": "unrecognized command"}), rate)
        name, args = match
        with self._counts_lock:
            self._counts[name] += 1
        endpoint = _BY_NAME[name]
        if endpoint.auth and user is None:
            return self._finish(_json(400, {"error_message": endpoint.auth_error}), rate)
        if not rate.allowed:
            return self._finish(Response(b"", status=403), rate)
        injector = world.injector
        fault = injector.endpoint_fault(name)
        failure = injector.take_forced_failure(name)
        if fault is not None:
            if fault.latency > 0:
                # Latency is real time even under a manual clock: it is about the wire.
                time.sleep(fault.latency)
            if failure is None and injector.draw(fault.error_rate):
                failure = fault.error_status
        if failure is not None:
            return self._finish(_server_error(failure), rate)
        try:
            response = self._handlers[name](request, user, **args)
        except Refusal as refusal:
            response = _refused(refusal)
        if name == "new" and response.status_code == 200 and injector.take_lost_response():
            log.info("simulated fault: losing the answer to POST %s", request.path)
            raise _DropConnection
        return self._finish(response, rate)

    def _match(self, request: Request) -> tuple[str, Mapping[str, Any]] | None:
        """The endpoint name and arguments of a request, or ``None`` for the catch-all."""
        if request.method == "HEAD":
            # werkzeug adds HEAD to every GET rule; the server has no HEAD routes.
            return None
        try:
            name, args = self.url_map.bind_to_environ(request.environ).match()
        except HTTPException:
            return None
        return str(name), args

    @staticmethod
    def _finish(response: Response, rate: RateState) -> Response:
        response.headers["X-RateLimit-Limit"] = str(rate.limit)
        response.headers["X-RateLimit-Remaining"] = str(rate.remaining)
        response.headers["X-RateLimit-Reset"] = str(rate.reset)
        for name, value in _CORS.items():
            response.headers[name] = value
        return response

    # ------------------------------------------------------------------ bodies

    def _deployment_summary(self, deployment: SimDeployment) -> dict[str, Any]:
        """The per-deployment object of ``GET /deployments?info``."""
        return {
            "type": deployment.type,
            "type_version": deployment.spec.type_version,
            "supported_addons": list(deployment.spec.supported_addons),
            "desc": deployment.spec.desc,
            "region": deployment.region,
            "icounter": deployment.icounter,
            "created": str(deployment.created),
            "queuelen": self.world.queuelen(deployment),
        }

    def _deployment_info(self, deployment: SimDeployment, user: str | None) -> dict[str, Any]:
        """The body of ``GET /deployment/:id`` (also ``wdinfo`` in GET /instance)."""
        with self.world.lock:
            info = {"id": deployment.id, **self._deployment_summary(deployment)}
            info["online"] = deployment.dissolved is None and not deployment.offline
            if deployment.lockout:
                info["lockout"] = True
            if deployment.dissolved is not None:
                info["dissolved"] = str(deployment.dissolved)
            instance = self.world.users_instance(deployment, user)
            if instance is not None:
                info["instance"] = instance
            # Add-on settings of the deployment; the simulator's types have none.
            info["addons_config"] = {}
            return info

    # ------------------------------------------------------------------ public endpoints

    def index(self, request: Request, user: str | None) -> Response:
        """``GET /``: URL templates of the main commands."""
        base = request.host_url.rstrip("/")
        return _json(200, {
            "workspace_types": f"{base}/workspaces",
            "workspace_deployments": f"{base}/deployments{{/workspace_type}}",
            "deployment_details": DEPLOYMENT_DETAILS,
            "create_instance": f"{base}/new/{{:workspace_type,:deploymentID}}",
            "vpn": f"{base}/vpn/{{:instanceID}}",
            "firewall": f"{base}/firewall/{{:instanceID}}",
            "terminate_instance": f"{base}/terminate/{{:instanceID}}",
        })

    def workspaces(self, request: Request, user: str | None) -> Response:
        """``GET /workspaces``: the types of (non-dissolved) deployments."""
        with_dissolved = _flag(request, "with_dissolved")
        with self.world.lock:
            types = {d.type for d in self.world.deployments.values()
                     if with_dissolved or d.dissolved is None}
        return _json(200, {"workspace_types": sorted(types)})

    def deployments(self, request: Request, user: str | None, wtype: str | None = None
                    ) -> Response:
        """``GET /deployments[/:wtype]`` with q, types, maxlen, sort_by, paging and info.

        With ``deployments_cache`` > 0 the answer for a path and query is reused for that
        many seconds, as the server's cache does (queue lengths are then stale)."""
        ttl = self.world.timings.deployments_cache
        key = f"{request.path}?{request.query_string.decode('latin-1')}"
        now = self.world.clock()
        with self._cache_lock:
            cached = self._deployments_cache.get(key)
            if ttl > 0 and cached is not None and now < cached[0]:
                return _json(200, cached[1])
        body = self._list_deployments(request, wtype)
        if ttl > 0:
            with self._cache_lock:
                cache = self._deployments_cache
                cache[key] = (now + ttl, body)
                if len(cache) > _DEPLOYMENTS_CACHE_MAX:
                    # Each query string is a key: drop what expired, else start over.
                    for stale in [k for k, (until, _) in cache.items() if now >= until]:
                        del cache[stale]
                    if len(cache) > _DEPLOYMENTS_CACHE_MAX:
                        cache.clear()
        return _json(200, body)

    def _list_deployments(self, request: Request, wtype: str | None) -> dict[str, Any]:
        world = self.world
        with_dissolved = _flag(request, "with_dissolved")
        with world.lock:
            found = [d for d in world.deployments.values()
                     if with_dissolved or d.dissolved is None]
            queuelens = {d.id: world.queuelen(d) for d in found}
        if "types" in request.args:
            found = _filter_types(found, request.args.get("types", ""))
        elif wtype is not None:
            found = [d for d in found if d.type == wtype]
        query = request.args.get("q", "").strip().lower()
        if query:
            found = [d for d in found if query in d.type.lower() or query in d.region.lower()]
        maxlen = request.args.get("maxlen", "u").strip()
        if maxlen != "u":
            try:
                bound = max(0, int(maxlen))
            except ValueError:
                bound = None  # a bad number means "unbounded", as the default does
            if bound is not None:
                found = [d for d in found if queuelens[d.id] <= bound]
        sort_by = request.args.get("sort_by", "inc_wtype")
        if sort_by not in _SORT_KEYS:
            sort_by = "inc_wtype"
        field = sort_by[4:]
        keys: dict[str, Callable[[SimDeployment], Any]] = {
            "wtype": lambda d: (d.type, d.created, d.id),
            "created": lambda d: (d.created, d.type, d.id),
            "count": lambda d: (d.icounter, d.type, d.id),
        }
        found.sort(key=keys[field], reverse=sort_by.startswith("dec_"))
        page, page_count = _paginate(found, _int_arg(request, "max_per_page", 0),
                                     _int_arg(request, "page", 1), empty_pages=0)
        body: dict[str, Any] = {"workspace_deployments": [d.id for d in page],
                                "page_count": page_count}
        if _flag(request, "info"):
            # As on the server, ``info`` describes every match, not only this page's.
            with world.lock:
                body["info"] = {d.id: self._deployment_summary(d) for d in found}
        return body

    def deployment(self, request: Request, user: str | None, deployment_id: str) -> Response:
        """``GET /deployment/:id``."""
        return _json(200, self._deployment_info(self.world.deployment(deployment_id), user))

    def queuelen(self, request: Request, user: str | None, deployment_id: str) -> Response:
        """``GET /queuelen/:id``: 200 with len 0 for any unknown id (the server checks
        nothing), unless switched to the published docs' 404."""
        length = self.world.queue_length(deployment_id)
        if length is None:
            if self.world.switches.queuelen_404_unknown:
                return _json(404, {"error_message":
                                   "no workspace deployment found with given ID"})
            length = 0
        return _json(200, {"id": deployment_id, "len": length})

    # ------------------------------------------------------------------ tokens

    def revoke(self, request: Request, user: str, digest: str) -> Response:
        """``POST /revoke/:sha256``."""
        self.world.accounts.revoke(user, digest)
        return _bare()

    def purge(self, request: Request, user: str) -> Response:
        """``POST /purge``: revoke every token of the caller."""
        self.world.accounts.purge(user)
        return _bare()

    # ------------------------------------------------------------------ instances

    def new(self, request: Request, user: str, target: str | None = None) -> Response:
        """``POST /new/:wtype``, ``/new/:deploymentID`` or ``/new`` with ``{"wds": [...]}``."""
        body = _body(request)
        options = _new_options(body)
        world = self.world
        if target is None:
            wds = body.get("wds")
            if (not isinstance(wds, list) or not wds
                    or not all(isinstance(w, str) and _UUID_RE.fullmatch(w) for w in wds)):
                return _json(404, None)
            result = world.request_instance(user, wds=[w.lower() for w in wds],
                                            options=options)
        elif "-" in target:
            # The converter allows dashes only in a UUID: this is a deployment id.
            result = world.request_instance(user, deployment=target.lower(), options=options)
        else:
            result = world.request_instance(user, wtype=target, options=options)
        answer: dict[str, Any] = {"success": result.success, "id": result.id}
        if (result.private_key is not None and not options.sshkey
                and world.switches.sshkey_in_new_response):
            answer["sshkey"] = result.private_key
        return _json(200, answer)

    def terminate(self, request: Request, user: str, instance_id: str) -> Response:
        """``POST /terminate/:id``."""
        self.world.terminate(user, instance_id)
        return _bare()

    def instances(self, request: Request, user: str, wtype: str | None = None) -> Response:
        """``GET /instances[/:wtype]``."""
        if "user" in request.args:
            # Listing another user's instances needs a superuser token; the simulator has none.
            return _json(403, None)
        statuses = set(ACTIVE)
        if "include_terminated" in request.args:
            statuses |= {TERMINATING, TERMINATED}
        if "include_init_fail" in request.args:
            statuses.add(INIT_FAIL)
        newest_first = request.args.get("sort_by", "dec_start_date") != "inc_start_date"
        found = self.world.list_instances(user, wtype=wtype, statuses=frozenset(statuses),
                                          newest_first=newest_first)
        page, page_count = _paginate(found, _int_arg(request, "max_per_page", 0),
                                     _int_arg(request, "page", 1))
        body: dict[str, Any] = {"workspace_instances": [i.id for i in page],
                                "workspace_deployments": [i.deployment.id for i in page],
                                "page_count": page_count}
        if "details" in request.args:
            details = []
            for inst in page:
                item = {"id": inst.id, "status": inst.status, "deployment": inst.deployment.id,
                        "type": inst.wtype, "region": inst.region,
                        "starttime": format_iso_z(inst.created), "rootuser": inst.user}
                if inst.ended_at is not None and inst.status != INIT_FAIL:
                    item["endtime"] = format_iso_z(inst.ended_at)
                details.append(item)
            body["workspace_instances"] = details
        return _json(200, body)

    def instance(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /instance/:id``."""
        with self.world.lock:
            inst = self.world.find(user, instance_id)
            body: dict[str, Any] = {
                "id": inst.id,
                "deployment": inst.deployment.id,
                "type": inst.wtype,
                "region": inst.region,
                "starttime": format_time(inst.created),
                "rootuser": inst.user,
                "status": inst.status,
                "wdinfo": self._deployment_info(inst.deployment, user),
            }
            if inst.options.expire_d is not None:
                body["expires"] = format_time(inst.created + inst.options.expire_d)
            if inst.ended_at is not None and inst.status != INIT_FAIL:
                body["endtime"] = format_time(inst.ended_at)
            if inst.status not in ENDED_STATUSES:
                # ``hostkeys`` is absent, not empty, until the host key is known.
                if inst.status == READY and inst.host is not None:
                    body["fwd"] = {"ipv4": "127.0.0.1", "port": inst.host.port}
                    body["hostkeys"] = [inst.host.hostkey]
                else:
                    body["fwd"] = {}
                if inst.options.vpn:
                    body["vpn"] = {"status": "ready", "clients": list(inst.vpn_clients)}
        return _json(200, body)

    def sshkey(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /instance/:id/sshkey``: the generated private key."""
        return _json(200, {"key": self.world.private_key(user, instance_id)})

    def ka(self, request: Request, user: str, instance_id: str) -> Response:
        """``POST /instance/:id/ka``: keep-alive ping."""
        self.world.keepalive(user, instance_id)
        return _bare()

    # ------------------------------------------------------------------ firewall and VPN

    def firewall_get(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /firewall/:id``: ``{"rules": [[src, action], ...]}``."""
        return _json(200, {"rules": self.world.firewall_rules(user, instance_id)})

    def firewall_post(self, request: Request, user: str, instance_id: str) -> Response:
        """``POST /firewall/:id``: append a rule; defaults: the caller's address, ACCEPT."""
        self.world.find(user, instance_id)
        body = _body(request)
        src = body.get("src", _caller_ip(request, self.limits.trust_forwarded_for))
        if not isinstance(src, str):
            raise _wrong_type("src")
        if "src" in body and not _SRC.fullmatch(src):
            raise Refusal(400, "value for option `src` must be an IPv4 address or subnet "
                               "in CIDR notation")
        action = body.get("action", "ACCEPT")
        if action not in _FIREWALL_ACTIONS:
            raise Refusal(400, "value for option `action` not recognized")
        self.world.add_firewall_rule(user, instance_id, src, action)
        return _bare()

    def firewall_delete(self, request: Request, user: str, instance_id: str) -> Response:
        """``DELETE /firewall/:id``: flush, which leaves the default: drop everything."""
        self.world.flush_firewall(user, instance_id)
        return _bare()

    def vpn_get(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /vpn/:id``; without a VPN, 400 (or the published docs'
        ``{"status": "nil"}``, a switch)."""
        clients = self.world.vpn_clients(user, instance_id)
        if clients is None:
            if self.world.switches.vpn_nil_shape:
                return _json(200, {"status": "nil"})
            raise Refusal(400, "instance does not have VPN")
        return _json(200, {"status": "ready", "clients": clients})

    def vpn_post(self, request: Request, user: str, instance_id: str) -> Response:
        """``POST /vpn/:id``: new client credentials."""
        client_id, ovpn = self.world.vpn_new_client(user, instance_id)
        return _json(200, {"client_id": client_id, "ovpn": ovpn})

    # ------------------------------------------------------------------ reservations, CI

    def reservations(self, request: Request, user: str) -> Response:
        """``GET /reservations``."""
        listed = [{"id": r.id,
                   "created": utc(r.created).strftime("%Y-%m-%d %H:%M UTC"),
                   "desc": f"wd:{r.deployment.id}",
                   "user": r.user}
                  for r in self.world.list_reservations(user)]
        return _json(200, {"reservations": listed})

    def reservation_delete(self, request: Request, user: str, reservation_id: str) -> Response:
        """``DELETE /reservation/:id``."""
        self.world.cancel_reservation(user, reservation_id)
        return _bare()

    def qlen(self, request: Request, user: str, wtype: str | None = None) -> Response:
        """``GET /qlen/:wtype`` or ``GET /qlen?wds=a,b``; without ``wds``, or with an id
        that is not a UUID, ``/qlen`` is a 404 with an empty body."""
        if wtype is not None:
            found = self.world.qlen(wtype=wtype)
        else:
            if "wds" not in request.args:
                return _json(404, None)
            wds = [w.strip() for w in request.args.get("wds", "").split(",")]
            if not all(_UUID_RE.fullmatch(w) for w in wds):
                return _json(404, None)
            found = self.world.qlen(wds=[w.lower() for w in wds])
        return _json(200, {q.deployment: {"qlen": q.qlen, "rem": q.rem} for q in found})

    def ci_new(self, request: Request, user: str) -> Response:
        """``POST /ci/new`` with ``{"repo_url": ...}``."""
        if user.startswith("sandbox_anon"):
            return _json(403, None)
        repo_url = _body(request).get("repo_url")
        if not isinstance(repo_url, str) or not repo_url:
            raise Refusal(400, "request is missing required parameter: repo_url")
        return _json(200, {"pid": self.world.ci.new(user, repo_url)})

    def ci_projects(self, request: Request, user: str) -> Response:
        """``GET /ci/projects``."""
        return _json(200, {p.pid: {"created": format_time(p.created), "repo_url": p.repo_url}
                           for p in self.world.ci.of(user)})

    def ci_job(self, request: Request, user: str, pid: str) -> Response:
        """``POST /ci/project/:pid/job`` with ``{"branch", "commit"}``."""
        body = _body(request)
        if not isinstance(body.get("branch"), str) or not isinstance(body.get("commit"), str):
            raise Refusal(400, "request is missing required parameters")
        return _json(200, {"jid": self.world.ci.job(user, pid)})

    # ------------------------------------------------------------------ add-ons

    def addon_cam_apply(self, request: Request, user: str, instance_id: str) -> Response:
        """``POST /addon/cam/:id``: apply the camera add-on."""
        self.camera.apply(user, instance_id, _body(request))
        return _bare()

    def addon_cam_status(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /addon/cam/:id``: ``{"status", "remote_user"}``."""
        return _json(200, self.camera.status(user, instance_id))

    def addon_cam_img(self, request: Request, user: str, instance_id: str, camera: str
                      ) -> Response:
        """``GET /addon/cam/:id/:camera/img``: one snapshot, a base64 JPEG."""
        return _json(200, self.camera.snapshot(user, instance_id, camera))

    def addon_cam_remove(self, request: Request, user: str, instance_id: str) -> Response:
        """``DELETE /addon/cam/:id``: remove the camera add-on."""
        self.camera.remove(user, instance_id)
        return _bare()


class RequestHandler(LimitedHandler):
    """The server's handler (with its limits, :mod:`.server`), answering as
    ``Server: rerobots.net`` and logging quietly."""

    #: Set once a request line is read; an error before that logs it empty.
    requestline = ""

    def version_string(self) -> str:
        """The ``Server`` header."""
        return "rerobots.net"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One debug line per request instead of werkzeug's coloured INFO line."""
        log.debug('"%s" %s %s', self.requestline, code, size)

    def log_error(self, format: str, *args: Any) -> None:
        """Server-side errors go to this module's logger."""
        log.warning(format, *args)

