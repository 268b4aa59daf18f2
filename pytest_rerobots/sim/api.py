"""The simulator's HTTP API: a WSGI application over a :class:`~.state.World`.

Routing is a werkzeug :class:`~werkzeug.routing.Map`; converters carry the server's route
patterns (UUIDs, 64-hex digests, workspace type names), so a malformed id fails to match and
gets the catch-all answer, 400 ``{"error_message": "unrecognized command"}``, as on the real
server. Each request, in order:

1. ticks the world, so time-driven transitions are never stale;
2. answers ``OPTIONS`` (CORS preflight) at once;
3. authenticates the bearer token (a bad or revoked one counts as anonymous);
4. charges the rate-limit window (per token, else per address; 403 with an empty body
   when spent);
5. applies the endpoint's injected latency, pending forced failures and error rate;
6. runs the handler; a :class:`~.state.Refusal` becomes its status and body;
7. for a successful ``POST /new`` with a lost-response fault: closes the connection without
   answering (the instance exists all the same).

Every answer carries ``X-RateLimit-Limit/Remaining/Reset``, the CORS headers and, through
:class:`RequestHandler`, ``Server: rerobots.net``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.routing import BaseConverter, Map, Rule
from werkzeug.serving import WSGIRequestHandler
from werkzeug.wrappers import Request, Response

from .state import (
    ACTIVE,
    INIT_FAIL,
    TERMINATED,
    TERMINATING,
    InstanceOptions,
    RateState,
    Refusal,
    World,
    format_iso_z,
)

__all__ = ["AUTH_ENDPOINTS", "RequestHandler", "SimApp"]

log = logging.getLogger(__name__)

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

#: Endpoints that need a valid token (the others are public).
AUTH_ENDPOINTS = frozenset({
    "qlen", "revoke", "purge", "new", "terminate", "instances", "instance", "sshkey", "ka",
    "firewall_get", "firewall_post", "firewall_delete", "vpn_get", "vpn_post", "reservations",
    "reservation_delete", "ci_new", "ci_projects", "ci_job",
})

_CORS = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "GET,POST,DELETE",
    "Access-Control-Allow-Origin": "*",
}
_FIREWALL_ACTIONS = ("ACCEPT", "DROP", "REJECT")
# POST /new options and their types, in the order the server checks them.
_OPTION_TYPES: tuple[tuple[str, type], ...] = (
    ("sshkey", str), ("vpn", bool), ("reserve", bool), ("eurl", str), ("expire_d", int),
    ("keepalive", bool), ("allow_noop", bool),
)
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


def _rules() -> list[Rule]:
    return [
        Rule("/", endpoint="index", methods=["GET"]),
        Rule("/workspaces", endpoint="workspaces", methods=["GET"]),
        Rule("/deployments", endpoint="deployments", methods=["GET"]),
        Rule("/deployments/<wtype:wtype>", endpoint="deployments", methods=["GET"]),
        Rule("/deployment/<uuid:deployment_id>", endpoint="deployment", methods=["GET"]),
        Rule("/queuelen/<uuid:deployment_id>", endpoint="queuelen", methods=["GET"]),
        Rule("/qlen", endpoint="qlen", methods=["GET"]),
        Rule("/qlen/<wtype:wtype>", endpoint="qlen", methods=["GET"]),
        Rule("/revoke/<digest:digest>", endpoint="revoke", methods=["POST"]),
        Rule("/purge", endpoint="purge", methods=["POST"]),
        Rule("/new", endpoint="new", methods=["POST"]),
        Rule("/new/<target:target>", endpoint="new", methods=["POST"]),
        Rule("/terminate/<uuid:instance_id>", endpoint="terminate", methods=["POST"]),
        Rule("/instances", endpoint="instances", methods=["GET"]),
        Rule("/instances/<wtype:wtype>", endpoint="instances", methods=["GET"]),
        Rule("/instance/<uuid:instance_id>", endpoint="instance", methods=["GET"]),
        Rule("/instance/<uuid:instance_id>/sshkey", endpoint="sshkey", methods=["GET"]),
        Rule("/instance/<uuid:instance_id>/ka", endpoint="ka", methods=["POST"]),
        Rule("/firewall/<uuid:instance_id>", endpoint="firewall_get", methods=["GET"]),
        Rule("/firewall/<uuid:instance_id>", endpoint="firewall_post", methods=["POST"]),
        Rule("/firewall/<uuid:instance_id>", endpoint="firewall_delete", methods=["DELETE"]),
        Rule("/vpn/<uuid:instance_id>", endpoint="vpn_get", methods=["GET"]),
        Rule("/vpn/<uuid:instance_id>", endpoint="vpn_post", methods=["POST"]),
        Rule("/reservations", endpoint="reservations", methods=["GET"]),
        Rule("/reservation/<uuid:reservation_id>", endpoint="reservation_delete",
             methods=["DELETE"]),
        Rule("/ci/new", endpoint="ci_new", methods=["POST"]),
        Rule("/ci/projects", endpoint="ci_projects", methods=["GET"]),
        Rule("/ci/project/<pid:pid>/job", endpoint="ci_job", methods=["POST"]),
    ]


class _DropConnection(Exception):
    """Raised to end a request without any answer (the lost-response fault)."""


def _json(status: int, body: Any) -> Response:
    if body is None:
        return Response(b"", status=status)
    return Response(json.dumps(body), status=status, content_type="application/json; charset=utf-8")


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


def _paginate(items: list[Any], max_per_page: int, page: int) -> tuple[list[Any], int]:
    """The requested page and the page count (``max_per_page`` 0: everything, one page)."""
    if max_per_page <= 0:
        return items, 1
    page_count = max(1, math.ceil(len(items) / max_per_page))
    page = min(max(page, 1), page_count)
    start = (page - 1) * max_per_page
    return items[start:start + max_per_page], page_count


def _caller_ip(request: Request) -> str:
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded.strip():
        return forwarded.split(",")[0].strip()
    return request.remote_addr or "127.0.0.1"


def _bearer(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``; anything else carries none."""
    parts = request.headers.get("Authorization", "").split()
    if len(parts) == 2 and parts[0] == "Bearer":
        return parts[1]
    return None


def _body(request: Request) -> dict[str, Any]:
    """The JSON body whatever the Content-Type; a missing body is ``{}``."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise Refusal(400, {"error_message": "request body is not valid JSON"}) from None
    if not isinstance(data, dict):
        raise Refusal(400, {"error_message": "request body must be a JSON object"})
    return data


def _wrong_type(name: str) -> Refusal:
    return Refusal(400, {"error_message": f"value for option `{name}` has wrong type"})


def _new_options(body: dict[str, Any]) -> InstanceOptions:
    """Type-check the POST /new options, with the server's error strings."""
    values: dict[str, Any] = {}
    for name, kind in _OPTION_TYPES:
        if name not in body:
            continue
        value = body[name]
        # bool is a subclass of int: ``expire_d: true`` must still be the wrong type.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _wrong_type(name)
        values[name] = value
    if "expire_d" in values and values["expire_d"] < 1:
        raise Refusal(400, {"error_message": "value for option `expire_d` must be positive"})
    if "eurl" in values and not values["eurl"]:
        raise Refusal(400, {"error_message": "value for option `eurl` must be nonempty"})
    if "repo" in body:
        repo = body["repo"]
        if not isinstance(repo, dict):
            raise _wrong_type("repo")
        if not isinstance(repo.get("url"), str):
            raise Refusal(400, {"error_message": "value for option `repo` missing url"})
        values["repo"] = dict(repo)
    return InstanceOptions(**values)


class SimApp:
    """The WSGI application of one simulated API over ``world``."""

    def __init__(self, world: World) -> None:
        self.world = world
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
            },
        )
        self._handlers: dict[str, Callable[..., Response]] = {
            "index": self.index,
            "workspaces": self.workspaces,
            "deployments": self.deployments,
            "deployment": self.deployment,
            "queuelen": self.queuelen,
            "qlen": self.qlen,
            "revoke": self.revoke,
            "purge": self.purge,
            "new": self.new,
            "terminate": self.terminate,
            "instances": self.instances,
            "instance": self.instance,
            "sshkey": self.sshkey,
            "ka": self.ka,
            "firewall_get": self.firewall_get,
            "firewall_post": self.firewall_post,
            "firewall_delete": self.firewall_delete,
            "vpn_get": self.vpn_get,
            "vpn_post": self.vpn_post,
            "reservations": self.reservations,
            "reservation_delete": self.reservation_delete,
            "ci_new": self.ci_new,
            "ci_projects": self.ci_projects,
            "ci_job": self.ci_job,
        }

    # ------------------------------------------------------------------ WSGI plumbing

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        request = Request(environ)
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
        world.tick()
        token = _bearer(request)
        user = world.authenticate(token)
        if user is not None and token is not None:
            key, budget = f"token:{token}", world.rate_limits.token_budget
        else:
            key, budget = f"ip:{_caller_ip(request)}", world.rate_limits.ip_budget
        if request.method == "OPTIONS":
            rate = world.charge(key, budget, count=False)
            response = Response(b"", status=200)
            response.headers["Access-Control-Allow-Headers"] = "Authorization,Content-Type"
            return self._finish(response, rate)
        rate = world.charge(key, budget)
        adapter = self.url_map.bind_to_environ(request.environ)
        try:
            endpoint, args = adapter.match()
        except HTTPException:
            # Unknown route, malformed id and wrong method alike hit the catch-all route.
            return self._finish(_json(400, {"error_message": "unrecognized command"}), rate)
        if endpoint in AUTH_ENDPOINTS and user is None:
            message = ("authentication failed" if endpoint in ("revoke", "purge")
                       else "wrong authorization token")
            return self._finish(_json(400, {"error_message": message}), rate)
        if not rate.allowed:
            return self._finish(Response(b"", status=403), rate)
        fault = world.endpoint_fault(endpoint)
        failure = world.take_forced_failure(endpoint)
        if fault is not None:
            if fault.latency > 0:
                # Latency is real time even under a manual clock: it is about the wire.
                time.sleep(fault.latency)
            if failure is None and world.draw(fault.error_rate):
                failure = fault.error_status
        if failure is not None:
            return self._finish(_server_error(failure), rate)
        try:
            response = self._handlers[endpoint](request, user, **args)
        except Refusal as refusal:
            response = _json(refusal.status, refusal.body)
        if endpoint == "new" and response.status_code == 200 and world.take_lost_response():
            log.info("simulated fault: losing the answer to POST %s", request.path)
            raise _DropConnection
        return self._finish(response, rate)

    @staticmethod
    def _finish(response: Response, rate: RateState) -> Response:
        response.headers["X-RateLimit-Limit"] = str(rate.limit)
        response.headers["X-RateLimit-Remaining"] = str(rate.remaining)
        response.headers["X-RateLimit-Reset"] = str(rate.reset)
        for name, value in _CORS.items():
            response.headers[name] = value
        return response

    # ------------------------------------------------------------------ public endpoints

    def index(self, request: Request, user: str | None) -> Response:
        """``GET /``: URL templates of the main commands."""
        base = request.host_url.rstrip("/")
        return _json(200, {
            "workspace_types": f"{base}/workspaces",
            "workspace_deployments": f"{base}/deployments{{/workspace_type}}",
            "deployment_details": f"{base}/deployment/{{:deploymentID}}",
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
        """``GET /deployments[/:wtype]`` with q, types, maxlen, sort_by, paging and info."""
        world = self.world
        with_dissolved = _flag(request, "with_dissolved")
        with world.lock:
            found = [d for d in world.deployments.values()
                     if with_dissolved or d.dissolved is None]
            queuelens = {d.id: world.queuelen(d) for d in found}
        if "types" in request.args:
            # ``types`` overrides the path; "!t" (or a literal "%21t") excludes t.
            wanted, unwanted = set(), set()
            for item in request.args.get("types", "").split(","):
                item = item.strip()
                if item.startswith("!") or item.startswith("%21"):
                    unwanted.add(item[1:] if item.startswith("!") else item[3:])
                elif item:
                    wanted.add(item)
            found = [d for d in found
                     if (not wanted or d.type in wanted) and d.type not in unwanted]
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
        keys: dict[str, Callable[[Any], Any]] = {
            "wtype": lambda d: (d.type, d.created, d.id),
            "created": lambda d: (d.created, d.type, d.id),
            "count": lambda d: (d.icounter, d.type, d.id),
        }
        found.sort(key=keys[field], reverse=sort_by.startswith("dec_"))
        page, page_count = _paginate(found, _int_arg(request, "max_per_page", 0),
                                     _int_arg(request, "page", 1))
        body: dict[str, Any] = {"workspace_deployments": [d.id for d in page],
                                "page_count": page_count}
        if _flag(request, "info"):
            body["info"] = {d.id: world.deployment_summary(d) for d in page}
        return _json(200, body)

    def deployment(self, request: Request, user: str | None, deployment_id: str) -> Response:
        """``GET /deployment/:id``."""
        return _json(200, self.world.deployment_info(deployment_id, user))

    def queuelen(self, request: Request, user: str | None, deployment_id: str) -> Response:
        """``GET /queuelen/:id``: 200 with len 0 for an unknown id, unless switched to 404."""
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
        self.world.revoke(user, digest)
        return _bare()

    def purge(self, request: Request, user: str) -> Response:
        """``POST /purge``: revoke every token of the caller."""
        self.world.purge(user)
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
                    or not all(isinstance(w, str) for w in wds)):
                return _json(404, None)
            result = world.request_instance(user, wds=[w.lower() for w in wds],
                                            options=options)
        elif "-" in target:
            # The converter allows dashes only in a UUID: this is a deployment id.
            result = world.request_instance(user, deployment=target.lower(), options=options)
        else:
            result = world.request_instance(user, wtype=target, options=options)
        return _json(200, result)

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
                if inst.ended_at is not None:
                    item["endtime"] = format_iso_z(inst.ended_at)
                details.append(item)
            body["workspace_instances"] = details
        return _json(200, body)

    def instance(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /instance/:id``."""
        return _json(200, self.world.instance_view(user, instance_id))

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
        src = body.get("src", _caller_ip(request))
        if not isinstance(src, str):
            raise _wrong_type("src")
        try:
            ipaddress.IPv4Network(src, strict=False)
        except ValueError:
            raise Refusal(400, {"error_message": "value for option `src` must be an IPv4 "
                                                 "address or subnet in CIDR notation"}) from None
        action = body.get("action", "ACCEPT")
        if action not in _FIREWALL_ACTIONS:
            raise Refusal(400, {"error_message": "value for option `action` not recognized"})
        self.world.add_firewall_rule(user, instance_id, src, action)
        return _bare()

    def firewall_delete(self, request: Request, user: str, instance_id: str) -> Response:
        """``DELETE /firewall/:id``: flush, which leaves the default: drop everything."""
        self.world.flush_firewall(user, instance_id)
        return _bare()

    def vpn_get(self, request: Request, user: str, instance_id: str) -> Response:
        """``GET /vpn/:id``."""
        return _json(200, self.world.vpn_info(user, instance_id))

    def vpn_post(self, request: Request, user: str, instance_id: str) -> Response:
        """``POST /vpn/:id``: new client credentials."""
        return _json(200, self.world.vpn_new_client(user, instance_id))

    # ------------------------------------------------------------------ reservations, CI

    def reservations(self, request: Request, user: str) -> Response:
        """``GET /reservations``."""
        return _json(200, {"reservations": self.world.list_reservations(user)})

    def reservation_delete(self, request: Request, user: str, reservation_id: str) -> Response:
        """``DELETE /reservation/:id``."""
        self.world.cancel_reservation(user, reservation_id)
        return _bare()

    def qlen(self, request: Request, user: str, wtype: str | None = None) -> Response:
        """``GET /qlen[/:wtype][?wds=a,b]``."""
        wds = None
        if "wds" in request.args:
            wds = [w.strip().lower() for w in request.args.get("wds", "").split(",") if w.strip()]
        return _json(200, self.world.qlen(wtype, wds))

    def ci_new(self, request: Request, user: str) -> Response:
        """``POST /ci/new`` with ``{"repo_url": ...}``."""
        if user.startswith("sandbox_anon"):
            return _json(403, None)
        repo_url = _body(request).get("repo_url")
        if not isinstance(repo_url, str) or not repo_url:
            raise Refusal(400, {"error_message":
                                "request is missing required parameter: repo_url"})
        return _json(200, {"pid": self.world.ci_new(user, repo_url)})

    def ci_projects(self, request: Request, user: str) -> Response:
        """``GET /ci/projects``."""
        return _json(200, self.world.ci_projects(user))

    def ci_job(self, request: Request, user: str, pid: str) -> Response:
        """``POST /ci/project/:pid/job`` with ``{"branch", "commit"}``."""
        body = _body(request)
        branch, commit = body.get("branch"), body.get("commit")
        if not isinstance(branch, str) or not isinstance(commit, str):
            raise Refusal(400, {"error_message": "request is missing required parameters"})
        return _json(200, {"jid": self.world.ci_job(user, pid, branch, commit)})


class RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, answering as ``Server: rerobots.net`` and logging quietly."""

    def version_string(self) -> str:
        """The ``Server`` header."""
        return "rerobots.net"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One debug line per request instead of werkzeug's coloured INFO line."""
        log.debug('"%s" %s %s', getattr(self, "requestline", ""), code, size)

    def log_error(self, format: str, *args: Any) -> None:
        """Server-side errors go to this module's logger."""
        log.warning(format, *args)

