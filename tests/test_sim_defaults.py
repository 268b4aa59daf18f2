"""The simulator's defaults follow the real server (docs/contract.md), item by item.

Every test runs the built-in catalog as it is (no 404 window turned off, no switch flipped)
unless it says otherwise, on a :class:`ManualClock`, so nothing depends on how fast this
machine is. ``ssh_backend="none"``: these are shapes, races and timings of the HTTP API.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import test_sim_api
from helpers import sim_process

from pytest_rerobots.sim import Simulator
from pytest_rerobots.sim.catalog import default_catalog, profile_catalog
from pytest_rerobots.sim.world import ManualClock

KOBUKI_US = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
KOBUKI_EU = "df013a45-f40f-451e-a911-2465a8c24f1a"
MISTY = "38496d28-386c-4cad-8daf-ef8a86616687"
CRAZYFLIE = "f9fc8622-4085-42c4-ada5-6eee7de23139"
ALL = [KOBUKI_US, KOBUKI_EU, CRAZYFLIE, MISTY]
UNKNOWN = "00000000-0000-4000-8000-000000000000"

#: The built-in defaults these tests rely on (test_builtin_defaults pins them).
READY = 1.0
TERMINATE = 0.3
WINDOW = 0.2


class Api(test_sim_api.Api):
    """The simulator tests' requests wrapper, called directly, and with ``info``."""

    def __call__(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.request(method, path, **kw)

    def info(self, iid: str) -> dict[str, Any]:
        res = self.get(f"/instance/{iid}")
        assert res.status_code == 200, res.text
        return dict(res.json())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sim(clock: ManualClock) -> Iterator[Simulator]:
    with Simulator(ssh_backend="none", clock=clock) as running:
        yield running
        running.check()


@pytest.fixture
def api(sim: Simulator) -> Iterator[Api]:
    client = Api(sim.url, sim.token)
    yield client
    client.session.close()


@pytest.fixture
def other(sim: Simulator) -> Iterator[Api]:
    client = Api(sim.url, sim.add_user("mallory"))
    yield client
    client.session.close()


def visible(api: Api, clock: ManualClock, target: str = "basic_kobuki", **body: Any) -> str:
    """Rent, and wait out the 404 window."""
    iid = api.new(target, **body)
    clock.advance(WINDOW)
    return iid


def ready(api: Api, clock: ManualClock, target: str = "basic_kobuki", **body: Any) -> str:
    iid = visible(api, clock, target, **body)
    clock.advance(READY)
    assert api.status(iid) == "READY"
    return iid


def terminated(api: Api, clock: ManualClock, iid: str) -> None:
    assert api.post(f"/terminate/{iid}").status_code == 200
    clock.advance(TERMINATE)
    assert api.status(iid) == "TERMINATED"


def test_builtin_defaults() -> None:
    catalog = default_catalog()
    assert catalog.timings.ready_delay == READY
    assert catalog.timings.terminate_delay == TERMINATE
    assert catalog.faults.not_found_window == WINDOW
    assert catalog.timings.deployments_cache == 0
    assert catalog.switches.sshkey_in_new_response is False
    assert catalog.switches.busy_race is False


# ---------------------------------------------------------------------- timing and races


def test_terminate_holds_the_deployment_for_the_terminate_delay(api: Api, clock: ManualClock
                                                                ) -> None:
    """Item 1: TERMINATING keeps the deployment busy until TERMINATED."""
    iid = ready(api, clock, MISTY)
    assert api.post(f"/terminate/{iid}").status_code == 200
    clock.advance(TERMINATE - 0.01)
    assert api.status(iid) == "TERMINATING"
    busy = api.post(f"/new/{MISTY}")
    assert busy.status_code == 503
    assert busy.json() == {
        "result_message": "All matching workspace deployments are busy. Try again later."}
    clock.advance(0.01)
    assert api.status(iid) == "TERMINATED"
    assert api.post(f"/new/{MISTY}").status_code == 200


def test_terminate_delay_is_configurable_as_a_range(api: Api, clock: ManualClock,
                                                    sim: Simulator) -> None:
    sim.configure(terminate_delay=[2.0, 4.0])
    iid = ready(api, clock, MISTY)
    api.post(f"/terminate/{iid}")
    clock.advance(1.99)
    assert api.status(iid) == "TERMINATING"
    clock.advance(2.01)
    assert api.status(iid) == "TERMINATED"


def test_not_found_window_after_new(api: Api, clock: ManualClock) -> None:
    """Items 2 and 24: right after POST /new the instance is not found, anywhere."""
    iid = api.new(MISTY, keepalive=True)
    for method, path in [("GET", f"/instance/{iid}"), ("GET", f"/instance/{iid}/sshkey"),
                         ("POST", f"/terminate/{iid}")]:
        res = api(method, path)
        assert res.status_code == 404, path
        assert res.json() == {"error_message": "instance not found"}
    ka = api.post(f"/instance/{iid}/ka")
    assert (ka.status_code, ka.content) == (404, b"")
    assert api.get("/instances").json()["workspace_instances"] == []
    assert "instance" not in api.get(f"/deployment/{MISTY}").json()
    clock.advance(WINDOW - 0.01)
    assert api.get(f"/instance/{iid}").status_code == 404
    clock.advance(0.01)
    assert api.status(iid) == "INIT"
    assert api.get("/instances").json()["workspace_instances"] == [iid]
    assert api.post(f"/instance/{iid}/ka").status_code == 200


def test_not_found_window_is_configurable(clock: ManualClock) -> None:
    with Simulator(ssh_backend="none", clock=clock, not_found_window=[0.5, 0.5]) as sim:
        api = Api(sim.url, sim.token)
        iid = api.new(MISTY)
        clock.advance(0.49)
        assert api.get(f"/instance/{iid}").status_code == 404
        clock.advance(0.01)
        assert api.get(f"/instance/{iid}").status_code == 200
        sim.configure(not_found_window=0)
        assert api.get(f"/instance/{api.new(KOBUKI_US)}").status_code == 200
        api.session.close()


def test_no_busy_race_by_default(api: Api) -> None:
    """Item 3, off by default: the second POST /new inside the 404 window is busy."""
    api.new(MISTY)
    assert api.post(f"/new/{MISTY}").status_code == 503
    assert api.get(f"/queuelen/{MISTY}").json()["len"] == 1


def test_busy_race_switch(api: Api, clock: ManualClock, sim: Simulator) -> None:
    """Items 3 and 23: both answered 200, then the later instance ends INIT_FAIL."""
    sim.configure(busy_race=True)
    first = api.new(MISTY)
    # While the first one's row is missing, the queue reads 0 and /new succeeds again.
    assert api.get(f"/queuelen/{MISTY}").json()["len"] == 0
    res = api.post(f"/new/{MISTY}")
    assert res.status_code == 200
    assert set(res.json()) == {"success", "id"}
    second = res.json()["id"]
    clock.advance(WINDOW)
    assert api.get(f"/queuelen/{MISTY}").json()["len"] == 1
    assert api.post(f"/new/{MISTY}").status_code == 503  # the race is over
    clock.advance(READY)
    assert api.status(first) == "READY"
    assert api.status(second) == "INIT_FAIL"


def test_deployments_cache_is_off_by_default(api: Api, clock: ManualClock) -> None:
    """Item 4: the fast default answers /deployments fresh every time."""
    before = api.get("/deployments?info").json()["info"][MISTY]["queuelen"]
    api.new(MISTY)
    assert (before, api.get("/deployments?info").json()["info"][MISTY]["queuelen"]) == (0, 1)


def test_deployments_cache_is_configurable(api: Api, clock: ManualClock, sim: Simulator) -> None:
    """Item 4: the server caches each path and query for its TTL; queue lengths go stale."""
    sim.configure(deployments_cache=30.0)
    assert api.get("/deployments?info").json()["info"][MISTY]["queuelen"] == 0
    api.new(MISTY)
    assert api.get("/deployments?info").json()["info"][MISTY]["queuelen"] == 0  # stale
    # Another query is another cache entry, computed now.
    assert MISTY not in api.get("/deployments?maxlen=0").json()["workspace_deployments"]
    assert api.get("/deployments?info=t").json()["info"][MISTY]["queuelen"] == 1
    clock.advance(30.0)
    assert api.get("/deployments?info").json()["info"][MISTY]["queuelen"] == 1


def test_reservations_are_served_only_after_termination(api: Api, clock: ManualClock,
                                                        sim: Simulator, other: Api) -> None:
    """Item 5: a deployment freed by INIT_FAIL does not serve its queue."""
    sim.configure(init_fail_rate=1.0)
    failing = visible(api, clock, MISTY)
    sim.configure(init_fail_rate=0.0)
    rid = other.post(f"/new/{MISTY}", json={"reserve": True}).json()["id"]
    clock.advance(READY)
    assert api.status(failing) == "INIT_FAIL"
    assert [r["id"] for r in other.get("/reservations").json()["reservations"]] == [rid]
    assert other.get(f"/instance/{rid}").status_code == 404
    # The queue still holds the deployment.
    assert api.post(f"/new/{MISTY}").status_code == 503
    assert other("DELETE", f"/reservation/{rid}").status_code == 200
    holder = ready(api, clock, MISTY)
    rid = other.post(f"/new/{MISTY}", json={"reserve": True}).json()["id"]
    terminated(api, clock, holder)
    clock.advance(WINDOW)
    assert other.status(rid) == "INIT"


def test_an_instance_from_a_reservation_has_no_keepalive(api: Api, clock: ManualClock,
                                                         other: Api) -> None:
    """Item 5: the server drops ``keepalive`` when a reservation becomes the instance."""
    holder = ready(api, clock, MISTY)
    rid = other.post(f"/new/{MISTY}", json={"reserve": True, "keepalive": True}).json()["id"]
    terminated(api, clock, holder)
    clock.advance(WINDOW + READY)
    assert other.status(rid) == "READY"
    assert other.post(f"/instance/{rid}/ka").json() == {
        "error_message": "no keep-alive monitor for this instance"}
    clock.advance(120)  # twice the keep-alive timeout without a ping
    assert other.status(rid) == "READY"


def test_icounter_grows_when_an_instance_reaches_terminated(api: Api, clock: ManualClock,
                                                            sim: Simulator) -> None:
    """Item 15."""
    def icounter() -> int:
        return int(api.get(f"/deployment/{MISTY}").json()["icounter"])

    start = icounter()
    iid = ready(api, clock, MISTY)
    api.post(f"/terminate/{iid}")
    assert icounter() == start
    clock.advance(TERMINATE)
    assert icounter() == start + 1
    assert api.get("/deployments?info").json()["info"][MISTY]["icounter"] == start + 1
    sim.configure(init_fail_rate=1.0)
    failed = visible(api, clock, MISTY)
    clock.advance(READY)
    assert api.status(failed) == "INIT_FAIL"
    assert icounter() == start + 1


# ---------------------------------------------------------------------- shapes


def test_new_answer_has_no_sshkey(api: Api, clock: ManualClock, sim: Simulator) -> None:
    """Item 6: ``{"success", "id"}`` only; the key comes from /sshkey (a switch: the summary's)."""
    res = api.post("/new/basic_kobuki")
    assert res.status_code == 200
    assert set(res.json()) == {"success", "id"}
    clock.advance(WINDOW)
    key = api.get(f"/instance/{res.json()['id']}/sshkey").json()["key"]
    assert "PRIVATE KEY" in key
    sim.configure(sshkey_in_new_response=True)
    assert "sshkey" in api.post(f"/new/{MISTY}").json()


def test_sshkey_of_an_init_fail_instance(api: Api, clock: ManualClock, sim: Simulator) -> None:
    """Item 6: GET /instance/:id/sshkey answers 200 even for INIT_FAIL."""
    sim.configure(init_fail_rate=1.0)
    iid = visible(api, clock)
    clock.advance(READY)
    assert api.status(iid) == "INIT_FAIL"
    res = api.get(f"/instance/{iid}/sshkey")
    assert res.status_code == 200
    assert "PRIVATE KEY" in res.json()["key"]


def test_hostkeys_absent_until_known(api: Api, clock: ManualClock) -> None:
    """Item 7."""
    iid = visible(api, clock)
    info = api.info(iid)
    assert info["status"] == "INIT"
    assert info["fwd"] == {}
    assert "hostkeys" not in info
    clock.advance(READY)
    info = api.info(iid)
    assert info["status"] == "READY"
    assert len(info["hostkeys"]) == 1


def test_no_endtime_on_init_fail(api: Api, clock: ManualClock, sim: Simulator) -> None:
    """Item 7, in GET /instance and in /instances?details."""
    sim.configure(init_fail_rate=1.0)
    iid = visible(api, clock)
    clock.advance(READY)
    info = api.info(iid)
    assert info["status"] == "INIT_FAIL"
    assert "endtime" not in info
    (detail,) = api.get("/instances?include_init_fail&details").json()["workspace_instances"]
    assert detail["status"] == "INIT_FAIL"
    assert "endtime" not in detail


def test_keepalive_for_unknown_or_foreign_is_an_empty_404(api: Api, clock: ManualClock,
                                                          other: Api) -> None:
    """Item 8 (and 25); one's own instance without keep-alive keeps its message."""
    iid = visible(api, clock)
    for client, ident in ((api, UNKNOWN), (other, iid)):
        res = client.post(f"/instance/{ident}/ka")
        assert (res.status_code, res.content) == (404, b"")
    assert api.post(f"/instance/{iid}/ka").json() == {
        "error_message": "no keep-alive monitor for this instance"}


@pytest.mark.parametrize("ident", ["not-a-uuid", UNKNOWN, "abc_DEF-123=", KOBUKI_EU.upper()])
def test_queuelen_of_any_id(api: Api, ident: str) -> None:
    """Items 9 and 25: 200 ``{"id", "len": 0}`` for any id of the route's pattern."""
    res = api.get(f"/queuelen/{ident}")
    assert res.status_code == 200
    assert res.json() == {"id": ident, "len": 0}


def test_queuelen_route_pattern(api: Api) -> None:
    res = api.get("/queuelen/a.b")
    assert res.status_code == 400
    assert res.json() == {"error_message": "unrecognized command"}


def test_qlen_needs_wds(api: Api, sim: Simulator) -> None:
    """Items 10 and 25."""
    for query in ("", "?wds=", "?wds=not-a-uuid", f"?wds={MISTY},nope"):
        res = api.get(f"/qlen{query}")
        assert (res.status_code, res.content) == (404, b""), query
    res = api.get(f"/qlen?wds={UNKNOWN}")
    assert res.status_code == 404
    assert res.json() == {"error": "no matching wdeployment found"}
    res = api.get(f"/qlen?wds={MISTY},{UNKNOWN}")
    assert res.json() == {"error": "some given IDs have no matching wdeployment"}
    assert api.get(f"/qlen?wds={MISTY}").json() == {MISTY: {"qlen": 0, "rem": None}}
    # Locked-out and offline deployments are skipped, dissolved ones refused.
    sim.world.set_deployment_state(KOBUKI_US, lockout=True)
    sim.world.set_deployment_state(KOBUKI_EU, offline=True)
    assert api.get(f"/qlen?wds={KOBUKI_US},{KOBUKI_EU},{MISTY}").json().keys() == {MISTY}
    assert api.get("/qlen/basic_kobuki").json() == {}
    sim.world.set_deployment_state(CRAZYFLIE, dissolved=True)
    res = api.get(f"/qlen?wds={CRAZYFLIE}")
    assert res.status_code == 400
    assert res.json() == {"error": "workspace deployment is permanently unavailable"}


def test_deployments_info_covers_every_match(api: Api) -> None:
    """Item 11."""
    body = api.get("/deployments?info&max_per_page=1&page=2").json()
    assert body["workspace_deployments"] == [KOBUKI_EU]
    assert body["page_count"] == 4
    assert set(body["info"]) == set(ALL)


def test_deployments_page_count_is_zero_when_empty_and_paged(api: Api) -> None:
    """Item 11."""
    assert api.get("/deployments/nosuchtype?max_per_page=2").json() == {
        "workspace_deployments": [], "page_count": 0}
    assert api.get("/deployments/nosuchtype").json()["page_count"] == 1


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ("!basic_kobuki,basic_kobuki", ALL),  # a union, not an intersection
        ("!fixed_misty2,fixed_misty2", ALL),
        ("!basic_kobuki,fixed_misty2", [CRAZYFLIE, MISTY]),
        ("fixed_misty2,basic_kobuki", [KOBUKI_US, KOBUKI_EU, MISTY]),
        ("basic_kobuki,!basic_kobuki", []),
        ("!basic_kobuki,!fixed_misty2", [CRAZYFLIE]),
    ],
)
def test_deployments_types_is_the_servers_union(api: Api, types: str, expected: list[str]
                                                ) -> None:
    """Item 11: ``!a,b`` is everything but ``a``, plus ``b``."""
    res = api.get("/deployments", params={"types": types})
    assert res.json()["workspace_deployments"] == expected


def test_deployment_names_a_terminating_instance_and_has_addons_config(
        api: Api, clock: ManualClock, other: Api) -> None:
    """Items 12 and 21."""
    iid = ready(api, clock, MISTY)
    assert api.get(f"/deployment/{MISTY}").json()["instance"] == iid
    api.post(f"/terminate/{iid}")
    body = api.get(f"/deployment/{MISTY}").json()
    assert body["instance"] == iid
    assert body["addons_config"] == {}
    assert "instance" not in other.get(f"/deployment/{MISTY}").json()
    clock.advance(TERMINATE)
    assert "instance" not in api.get(f"/deployment/{MISTY}").json()


def test_firewall_answers_until_terminated(api: Api, clock: ManualClock, sim: Simulator) -> None:
    """Item 13: only TERMINATED is ``instance not active``."""
    sim.configure(init_fail_rate=1.0)
    failed = visible(api, clock)
    clock.advance(READY)
    assert api.status(failed) == "INIT_FAIL"
    assert api.get(f"/firewall/{failed}").json() == {"rules": []}
    sim.configure(init_fail_rate=0.0)
    iid = ready(api, clock, MISTY)
    api.post(f"/terminate/{iid}")
    for method in ("POST", "GET", "DELETE"):
        assert api(method, f"/firewall/{iid}").status_code == 200, method
    clock.advance(TERMINATE)
    for method in ("POST", "GET", "DELETE"):
        res = api(method, f"/firewall/{iid}")
        assert res.status_code == 400
        assert res.json() == {"error_message": "instance not active"}


@pytest.mark.parametrize(
    ("src", "accepted"),
    [
        ("300.1.1.1", True),  # the pattern does not range-check octets
        ("10.0.0.0/33", True),
        ("192.0.2.0/24", True),
        ("10.0.0.0/255.0.0.0", False),  # no netmask forms
        ("10.0.0", False),
        ("::1", False),
    ],
)
def test_firewall_src_is_checked_by_the_servers_pattern(api: Api, clock: ManualClock,
                                                        src: str, accepted: bool) -> None:
    """Item 13."""
    iid = ready(api, clock)
    res = api.post(f"/firewall/{iid}", json={"src": src})
    if accepted:
        assert res.status_code == 200
        assert api.get(f"/firewall/{iid}").json()["rules"] == [[src, "ACCEPT"]]
    else:
        assert res.status_code == 400
        assert res.json() == {"error_message": "value for option `src` must be an IPv4 "
                                               "address or subnet in CIDR notation"}


def test_vpn_without_a_vpn(api: Api, clock: ManualClock) -> None:
    """Item 14: POST is the server's busy answer, GET a 400."""
    iid = ready(api, clock)
    res = api.post(f"/vpn/{iid}")
    assert res.status_code == 503
    assert res.json() == {"result_message": "This instance is busy. Try again later."}
    res = api.get(f"/vpn/{iid}")
    assert res.status_code == 400
    assert res.json() == {"error_message": "instance does not have VPN"}


def test_new_by_type_whose_deployments_are_all_unavailable(api: Api, sim: Simulator) -> None:
    """Item 16: locked out or offline, a wtype has no matching deployment."""
    sim.world.set_deployment_state(KOBUKI_US, lockout=True)
    sim.world.set_deployment_state(KOBUKI_EU, offline=True)
    res = api.post("/new/basic_kobuki")
    assert res.status_code == 404
    assert res.json() == {"error": "no matching wdeployment found"}


@pytest.mark.parametrize(
    ("wds", "status", "body"),
    [
        ([UNKNOWN], 404, {"error": "no matching wdeployment found"}),
        ([MISTY, UNKNOWN], 404, {"error": "some given IDs have no matching wdeployment"}),
        ([CRAZYFLIE], 400, {"error": "workspace deployment is permanently unavailable"}),
        ([MISTY, CRAZYFLIE], 400,
         {"error": "some of the given workspace deployments are permanently unavailable"}),
        (["not-a-uuid"], 404, None),
        ("not-a-list", 404, None),
    ],
)
def test_new_with_wds_errors(api: Api, sim: Simulator, wds: Any, status: int,
                             body: dict[str, str] | None) -> None:
    """Item 16."""
    sim.world.set_deployment_state(CRAZYFLIE, dissolved=True)
    res = api.post("/new", json={"wds": wds})
    assert res.status_code == status
    assert (res.json() if body is not None else res.content) == (body or b"")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"repo": "https://example.org/fw.git"}, "value for option `repo` missing url"),
        ({"repo": {"path": "fw"}}, "value for option `repo` missing url"),
        ({"eurl": "   "}, "value for option `eurl` must be nonempty"),
        # The server checks in its order: repo first.
        ({"repo": 1, "reserve": "yes"}, "value for option `repo` missing url"),
        ({"reserve": "yes", "sshkey": 1}, "value for option `reserve` has wrong type"),
    ],
)
def test_new_option_errors_as_the_server(api: Api, body: dict[str, Any], message: str) -> None:
    """Item 16."""
    res = api.post("/new/basic_kobuki", json=body)
    assert res.status_code == 400
    assert res.json() == {"error_message": message}


def test_new_strips_eurl(api: Api, sim: Simulator) -> None:
    """Item 16: ``eurl`` is stripped before use."""
    iid = api.new(MISTY, eurl="  mailto://me@example.org  ")
    assert sim.world.instances[iid].options.eurl == "mailto://me@example.org"


# ---------------------------------------------------------------------- rate limits, routes


def test_rate_limit_serves_one_more_then_refuses(clock: ManualClock) -> None:
    """Item 17: the server's check is ``>``: request budget + 1 is served."""
    with Simulator(ssh_backend="none", clock=clock, ip_budget=2, token_budget=3) as sim:
        anon, user = Api(sim.url), Api(sim.url, sim.token)
        answers = [anon.get("/workspaces") for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 403]
        assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["1", "0", "-1", "-1"]
        answers = [user.get("/instances") for _ in range(5)]
        assert [r.status_code for r in answers] == [200, 200, 200, 200, 403]
        for client in (anon, user):
            client.session.close()


def test_unknown_route_after_the_budget_is_spent_is_403(clock: ManualClock) -> None:
    """Item 17."""
    with Simulator(ssh_backend="none", clock=clock, ip_budget=1) as sim:
        anon = Api(sim.url)
        assert anon.get("/nonexistent").status_code == 400
        assert anon.get("/nonexistent").status_code == 400  # the one more
        res = anon.get("/nonexistent")
        assert (res.status_code, res.content) == (403, b"")
        anon.session.close()


def test_options_is_uncharged_and_has_no_rate_limit_headers(clock: ManualClock) -> None:
    """Item 17."""
    with Simulator(ssh_backend="none", clock=clock, ip_budget=1) as sim:
        anon = Api(sim.url)
        for _ in range(5):
            res = anon("OPTIONS", "/new/basic_kobuki")
            assert res.status_code == 200
            assert not any(h.lower().startswith("x-ratelimit") for h in res.headers)
            assert res.headers["Access-Control-Allow-Origin"] == "*"
        assert anon.get("/workspaces").headers["X-RateLimit-Remaining"] == "0"
        anon.session.close()


@pytest.mark.parametrize("path", ["/workspaces", "/", f"/deployment/{MISTY}", "/nonexistent"])
def test_head_is_the_catch_all(api: Api, path: str) -> None:
    """Item 17: HEAD is not allowed anywhere (400 ``unrecognized command``)."""
    res = api("HEAD", path)
    assert res.status_code == 400
    assert "X-RateLimit-Limit" in res.headers


def test_options_on_the_root_is_405(api: Api) -> None:
    """Item 22."""
    res = api("OPTIONS", "/")
    assert res.status_code == 405
    assert res.headers["Content-Type"].startswith("text/plain")
    assert res.text == "405: Method Not Allowed"


def test_index_names_deployment_details_literally(api: Api, sim: Simulator) -> None:
    """Item 19."""
    body = api.get("/").json()
    assert body["deployment_details"] == "https://api.rerobots.net/deployment/:deploymentID"
    assert body["workspace_types"] == f"{sim.url}/workspaces"


# ---------------------------------------------------------------------- the realistic profile


def test_realistic_profile_settings() -> None:
    catalog = profile_catalog("realistic")
    assert catalog.timings.ready_delay == (2.0, 9.0)
    assert catalog.timings.terminate_delay == (1.0, 12.0)
    window = catalog.faults.not_found_window
    assert isinstance(window, tuple) and 0 < window[1] <= 1.0
    assert catalog.timings.deployments_cache == 30.0
    assert catalog.switches.busy_race is True
    # Everything else is the built-in catalog's.
    assert catalog.deployments == default_catalog().deployments


def test_realistic_profile_runs_the_real_timings_at_a_tenth(clock: ManualClock) -> None:
    with Simulator("realistic", ssh_backend="none", clock=clock) as sim:
        api = Api(sim.url, sim.token)
        ids = [api.new(target) for target in (KOBUKI_US, KOBUKI_EU, MISTY)]
        clock.advance(1.0)  # past any 404 window
        clock.advance(0.9)  # not yet 2 s after POST /new: nothing is READY
        assert {api.status(i) for i in ids} == {"INIT"}
        clock.advance(7.5)  # past 9 s: all are
        assert {api.status(i) for i in ids} == {"READY"}
        for iid in ids:
            api.post(f"/terminate/{iid}")
        clock.advance(0.9)
        assert {api.status(i) for i in ids} == {"TERMINATING"}
        clock.advance(11.5)
        assert {api.status(i) for i in ids} == {"TERMINATED"}
        api.session.close()


def test_realistic_profile_by_name_on_the_command_line(tmp_path: Path) -> None:
    # --help names the profiles.
    done = subprocess.run([sys.executable, "-m", "pytest_rerobots.sim", "--help"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert "realistic" in done.stdout
    # A bare profile name is never read as a file, even where one has that name.
    (tmp_path / "realistic").write_text("this is not TOML [")
    (tmp_path / "token").write_text("t0k3n\n")
    with sim_process("--ssh-backend", "none", "--config", "realistic", "--token-file",
                     str(tmp_path / "token"), cwd=tmp_path) as sim:
        first, second = sim.lines
        assert second == "REROBOTS_API_TOKEN=t0k3n"
        res = requests.get(f"{first.split('=', 1)[1]}/workspaces", timeout=5)
        assert "basic_kobuki" in res.json()["workspace_types"]


def test_plugin_passes_the_realistic_profile(pytester: pytest.Pytester) -> None:
    """``--rerobots-sim-config realistic`` reaches ``Simulator(...)`` as the profile."""
    pytester.makepyfile("""
        def test_profile(rerobots_sim):
            assert rerobots_sim.world.timings.ready_delay == (2.0, 9.0)
            assert rerobots_sim.world.switches.busy_race is True
    """)
    result = pytester.runpytest("--rerobots-sim", "--rerobots-sim-config", "realistic")
    result.assert_outcomes(passed=1)

