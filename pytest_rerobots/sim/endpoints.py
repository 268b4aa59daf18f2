"""The simulator's endpoints, written once.

:data:`ENDPOINTS` is the one table of the API's endpoints. Everything that names an endpoint
derives from it: the router and the dispatch table of :mod:`.api` (one handler method per
name), the order of the authentication and rate-limit checks, and the endpoint names that
fault injection accepts (:mod:`.catalog`, ``Simulator.set_endpoint_fault``).

Paths use werkzeug's rule syntax; the converters (``uuid``, ``digest``, ``wtype``, ``target``,
``pid``, ``queueid``, ``digits``) carry the real server's route patterns and are defined in
:mod:`.api`.
This module imports nothing, so that the catalog can use the names without werkzeug.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ENDPOINTS", "ENDPOINT_NAMES", "Endpoint"]


@dataclass(frozen=True)
class Endpoint:
    """One endpoint: its name, method and paths, and whether it needs a valid token.

    ``auth_error`` is the message of the 400 an anonymous caller gets (the server checks the
    user before the rate limit on these endpoints).
    """

    name: str
    method: str
    paths: tuple[str, ...]
    auth: bool = True
    auth_error: str = "wrong authorization token"


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("index", "GET", ("/",), auth=False),
    Endpoint("workspaces", "GET", ("/workspaces",), auth=False),
    Endpoint("deployments", "GET", ("/deployments", "/deployments/<wtype:wtype>"), auth=False),
    Endpoint("deployment", "GET", ("/deployment/<uuid:deployment_id>",), auth=False),
    Endpoint("queuelen", "GET", ("/queuelen/<queueid:deployment_id>",), auth=False),
    Endpoint("qlen", "GET", ("/qlen", "/qlen/<wtype:wtype>")),
    Endpoint("revoke", "POST", ("/revoke/<digest:digest>",),
             auth_error="authentication failed"),
    Endpoint("purge", "POST", ("/purge",), auth_error="authentication failed"),
    Endpoint("new", "POST", ("/new", "/new/<target:target>")),
    Endpoint("terminate", "POST", ("/terminate/<uuid:instance_id>",)),
    Endpoint("instances", "GET", ("/instances", "/instances/<wtype:wtype>")),
    Endpoint("instance", "GET", ("/instance/<uuid:instance_id>",)),
    Endpoint("sshkey", "GET", ("/instance/<uuid:instance_id>/sshkey",)),
    Endpoint("ka", "POST", ("/instance/<uuid:instance_id>/ka",)),
    Endpoint("firewall_get", "GET", ("/firewall/<uuid:instance_id>",)),
    Endpoint("firewall_post", "POST", ("/firewall/<uuid:instance_id>",)),
    Endpoint("firewall_delete", "DELETE", ("/firewall/<uuid:instance_id>",)),
    Endpoint("vpn_get", "GET", ("/vpn/<uuid:instance_id>",)),
    Endpoint("vpn_post", "POST", ("/vpn/<uuid:instance_id>",)),
    Endpoint("reservations", "GET", ("/reservations",)),
    Endpoint("reservation_delete", "DELETE", ("/reservation/<uuid:reservation_id>",)),
    Endpoint("ci_new", "POST", ("/ci/new",)),
    Endpoint("ci_projects", "GET", ("/ci/projects",)),
    Endpoint("ci_job", "POST", ("/ci/project/<pid:pid>/job",)),
    # The camera add-on (sim/addons.py).
    Endpoint("addon_cam_apply", "POST", ("/addon/cam/<uuid:instance_id>",)),
    Endpoint("addon_cam_status", "GET", ("/addon/cam/<uuid:instance_id>",)),
    Endpoint("addon_cam_img", "GET", ("/addon/cam/<uuid:instance_id>/<digits:camera>/img",)),
    Endpoint("addon_cam_remove", "DELETE", ("/addon/cam/<uuid:instance_id>",)),
)

#: The endpoint names, which fault injection accepts (besides ``"*"``, every endpoint).
ENDPOINT_NAMES: frozenset[str] = frozenset(e.name for e in ENDPOINTS)
