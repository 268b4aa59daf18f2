"""The simulator's HTTP API, over real HTTP, against the server behaviour in docs/contract.md.

Every test runs its own :class:`Simulator` on ``127.0.0.1:0`` (``ssh_backend="none"`` unless
it needs SSH). Tests about waiting use a :class:`ManualClock` instead of sleeping.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
from helpers import sim_process, wait_until
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim import ServerLimits, Simulator
from pytest_rerobots.sim.catalog import default_catalog, load_catalog
from pytest_rerobots.sim.world import ManualClock, firewall_decision

KOBUKI_US = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
KOBUKI_EU = "df013a45-f40f-451e-a911-2465a8c24f1a"
MISTY = "38496d28-386c-4cad-8daf-ef8a86616687"
CRAZYFLIE = "f9fc8622-4085-42c4-ada5-6eee7de23139"
UNKNOWN = "00000000-0000-4000-8000-000000000000"
# Tests of other behaviours start without the 404 window after POST /new; the tests of
# the defaults (tests/test_sim_defaults.py) keep it.
FAST = {"ready_delay": 0.05, "terminate_delay": 0.05, "not_found_window": 0.0}


class Api:
    """A tiny requests wrapper: one session, one token, a timeout on every call."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=5, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.request("DELETE", path, **kw)

    def new(self, target: str = "basic_kobuki", **body: Any) -> str:
        res = self.post(f"/new/{target}", json=body)
        assert res.status_code == 200, res.text
        assert res.json()["success"] is True
        return res.json()["id"]

    def status(self, iid: str) -> str:
        res = self.get(f"/instance/{iid}")
        assert res.status_code == 200, res.text
        return res.json()["status"]

    def wait(self, iid: str, status: str, timeout: float = 3.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.get(f"/instance/{iid}").json()
            if body.get("status") == status or time.monotonic() > deadline:
                assert body.get("status") == status, body
                return body
            time.sleep(0.01)

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(ssh_backend="none", **FAST) as running:
        yield running
        running.check()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def csim(clock: ManualClock) -> Iterator[Simulator]:
    """A simulator on a manual clock: ready_delay 1 s, terminate_delay 0.5 s of fake time."""
    with Simulator(ssh_backend="none", clock=clock, ready_delay=1.0,
                   terminate_delay=0.5, not_found_window=0.0) as running:
        yield running
        running.check()


@pytest.fixture
def api(sim: Simulator) -> Iterator[Api]:
    client = Api(sim.url, sim.token)
    yield client
    client.close()


@pytest.fixture
def capi(csim: Simulator) -> Iterator[Api]:
    client = Api(csim.url, csim.token)
    yield client
    client.close()


@pytest.fixture
def anon(sim: Simulator) -> Iterator[Api]:
    client = Api(sim.url)
    yield client
    client.close()


def _ready(api: Api, clock: ManualClock, target: str = "basic_kobuki", **body: Any) -> str:
    iid = api.new(target, **body)
    clock.advance(1.0)
    assert api.status(iid) == "READY"
    return iid


# ---------------------------------------------------------------------- transport


def test_index_headers_and_cors(anon: Api, sim: Simulator) -> None:
    res = anon.get("/")
    assert res.status_code == 200
    body = res.json()
    assert body["workspace_types"] == f"{sim.url}/workspaces"
    assert set(body) == {"workspace_types", "workspace_deployments", "deployment_details",
                         "create_instance", "vpn", "firewall", "terminate_instance"}
    assert res.headers["Server"] == "rerobots.net"
    assert res.headers["X-RateLimit-Limit"] == "60"
    assert res.headers["X-RateLimit-Remaining"] == "59"
    assert int(res.headers["X-RateLimit-Reset"]) >= time.time() + 3500
    assert res.headers["Access-Control-Allow-Origin"] == "*"
    assert res.headers["Access-Control-Allow-Methods"] == "GET,POST,DELETE"
    assert res.headers["Access-Control-Allow-Credentials"] == "true"


def test_options_preflight(anon: Api) -> None:
    res = anon.request("OPTIONS", "/new/basic_kobuki")
    assert res.status_code == 200
    assert res.content == b""
    assert res.headers["Access-Control-Allow-Headers"] == "Authorization,Content-Type"
    # The real server: no rate-limit headers on OPTIONS (docs/contract.md).
    assert "X-RateLimit-Remaining" not in res.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nonexistent"),
        ("GET", "/instance/not-a-uuid"),
        ("GET", "/deployment/12345"),
        ("POST", "/terminate/xyz"),
        ("DELETE", "/instances"),
        ("POST", "/revoke/abc"),
        ("POST", "/new/bad-name"),
        ("GET", "/workspaces/extra"),
        ("GET", "/workspaces/"),
        ("GET", "/instances/"),
    ],
)
def test_unrecognized_command(api: Api, method: str, path: str) -> None:
    res = api.request(method, path)
    assert res.status_code == 400
    assert res.json() == {"error_message": "unrecognized command"}
    assert "X-RateLimit-Limit" in res.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/instances"),
        ("GET", f"/instance/{UNKNOWN}"),
        ("POST", "/new/basic_kobuki"),
        ("POST", f"/terminate/{UNKNOWN}"),
        ("GET", "/reservations"),
        ("GET", f"/firewall/{UNKNOWN}"),
        ("GET", f"/instance/{UNKNOWN}/sshkey"),
        ("POST", f"/instance/{UNKNOWN}/ka"),
        ("GET", "/qlen"),
        ("POST", "/ci/new"),
    ],
)
def test_auth_required(sim: Simulator, method: str, path: str) -> None:
    for token in (None, "not-a-token"):
        client = Api(sim.url, token)
        try:
            res = client.request(method, path)
        finally:
            client.close()
        assert res.status_code == 400
        assert res.json() == {"error_message": "wrong authorization token"}


def test_authorization_header_needs_bearer(sim: Simulator) -> None:
    res = requests.get(f"{sim.url}/instances", timeout=5,
                       headers={"Authorization": f"Token {sim.token}"})
    assert res.status_code == 400


# ---------------------------------------------------------------------- deployments


def test_workspaces(anon: Api, sim: Simulator) -> None:
    assert anon.get("/workspaces").json() == {
        "workspace_types": ["basic_kobuki", "fixed_crazyflie", "fixed_misty2"]}
    sim.world.set_deployment_state(CRAZYFLIE, dissolved=True)
    assert anon.get("/workspaces").json()["workspace_types"] == ["basic_kobuki", "fixed_misty2"]
    assert "fixed_crazyflie" in anon.get("/workspaces?with_dissolved=t").json()["workspace_types"]
    assert "fixed_crazyflie" not in anon.get(
        "/workspaces?with_dissolved=false").json()["workspace_types"]


def test_deployments_filters(anon: Api) -> None:
    def ids(query: str) -> list[str]:
        res = anon.get(query)
        assert res.status_code == 200
        return res.json()["workspace_deployments"]

    assert ids("/deployments") == [KOBUKI_US, KOBUKI_EU, CRAZYFLIE, MISTY]
    assert ids("/deployments/basic_kobuki") == [KOBUKI_US, KOBUKI_EU]
    assert ids("/deployments/nosuchtype") == []
    assert ids("/deployments?types=fixed_misty2,fixed_crazyflie") == [CRAZYFLIE, MISTY]
    assert ids("/deployments?types=!basic_kobuki") == [CRAZYFLIE, MISTY]
    assert ids("/deployments?types=%2521basic_kobuki") == [CRAZYFLIE, MISTY]
    assert ids("/deployments/basic_kobuki?types=fixed_misty2") == [MISTY]
    assert ids("/deployments?q=EU") == [KOBUKI_EU]
    assert ids("/deployments?q=misty") == [MISTY]
    assert ids("/deployments?maxlen=0") == [KOBUKI_US, KOBUKI_EU, CRAZYFLIE, MISTY]
    body = anon.get("/deployments/fixed_misty2?info=t").json()
    assert body["info"][MISTY] == {
        "type": "fixed_misty2", "type_version": 1, "supported_addons": ["cam", "mistyproxy", "py"],
        "desc": "Misty II robot, fixed in place", "region": "us:cali", "icounter": 312,
        "created": "2020-05-23 02:05:20.311535", "queuelen": 0}
    assert "info" not in anon.get("/deployments?info=0").json()


def test_deployments_maxlen_counts_queue(api: Api) -> None:
    api.new(MISTY)
    assert MISTY not in api.get("/deployments?maxlen=0").json()["workspace_deployments"]
    assert MISTY in api.get("/deployments?maxlen=1").json()["workspace_deployments"]
    assert MISTY in api.get("/deployments?maxlen=u").json()["workspace_deployments"]
    assert MISTY in api.get("/deployments?maxlen=bogus").json()["workspace_deployments"]


@pytest.mark.parametrize(
    ("sort_by", "expected"),
    [
        ("inc_wtype", [KOBUKI_US, KOBUKI_EU, CRAZYFLIE, MISTY]),
        ("dec_wtype", [MISTY, CRAZYFLIE, KOBUKI_EU, KOBUKI_US]),
        ("inc_created", [KOBUKI_US, MISTY, KOBUKI_EU, CRAZYFLIE]),
        ("dec_created", [CRAZYFLIE, KOBUKI_EU, MISTY, KOBUKI_US]),
        ("inc_count", [CRAZYFLIE, KOBUKI_EU, MISTY, KOBUKI_US]),
        ("dec_count", [KOBUKI_US, MISTY, KOBUKI_EU, CRAZYFLIE]),
        ("nonsense", [KOBUKI_US, KOBUKI_EU, CRAZYFLIE, MISTY]),
    ],
)
def test_deployments_sort_by(anon: Api, sort_by: str, expected: list[str]) -> None:
    assert anon.get(f"/deployments?sort_by={sort_by}").json()["workspace_deployments"] == expected


def test_deployments_pagination(anon: Api) -> None:
    everything = [KOBUKI_US, KOBUKI_EU, CRAZYFLIE, MISTY]
    pages = [anon.get(f"/deployments?max_per_page=3&page={p}").json() for p in (1, 2, 9)]
    assert [p["page_count"] for p in pages] == [2, 2, 2]
    assert pages[0]["workspace_deployments"] == everything[:3]
    assert pages[1]["workspace_deployments"] == everything[3:]
    # A page past the end is the last page.
    assert pages[2]["workspace_deployments"] == everything[3:]
    whole = anon.get("/deployments?max_per_page=0&page=5").json()
    assert whole == {"workspace_deployments": everything, "page_count": 1}
    assert anon.get("/deployments?max_per_page=x").json()["page_count"] == 1


def test_deployment_info(api: Api, anon: Api, sim: Simulator) -> None:
    body = anon.get(f"/deployment/{KOBUKI_EU}").json()
    assert body == {
        "id": KOBUKI_EU, "type": "basic_kobuki", "type_version": 1,
        "supported_addons": ["cam", "drive", "py"],
        "desc": "Kobuki mobile base with a Raspberry Pi host", "region": "eu:de",
        "icounter": 166, "created": "2021-07-17 03:37:44.284117", "queuelen": 0, "online": True,
        "addons_config": {}}
    iid = api.new(KOBUKI_EU)
    mine = api.get(f"/deployment/{KOBUKI_EU}").json()
    assert mine["instance"] == iid
    assert mine["queuelen"] == 1
    # icounter grows when an instance reaches TERMINATED (section 8, item 15).
    assert mine["icounter"] == 166
    assert "instance" not in anon.get(f"/deployment/{KOBUKI_EU}").json()
    sim.world.set_deployment_state(KOBUKI_EU, lockout=True)
    sim.world.set_deployment_state(CRAZYFLIE, dissolved=True)
    assert anon.get(f"/deployment/{KOBUKI_EU}").json()["lockout"] is True
    gone = anon.get(f"/deployment/{CRAZYFLIE}").json()
    assert gone["online"] is False
    assert isinstance(gone["dissolved"], str)
    res = anon.get(f"/deployment/{UNKNOWN}")
    assert res.status_code == 404
    assert res.json() == {"error_message": "no workspace deployment found with given ID"}


def test_queuelen(api: Api, sim: Simulator) -> None:
    assert api.get(f"/queuelen/{MISTY}").json() == {"id": MISTY, "len": 0}
    api.new(MISTY)
    assert api.get(f"/queuelen/{MISTY}").json()["len"] == 1
    other = Api(sim.url, sim.add_user("bob"))
    try:
        assert other.post(f"/new/{MISTY}", json={"reserve": True}).json()["success"] is False
    finally:
        other.close()
    assert api.get(f"/queuelen/{MISTY}").json()["len"] == 2
    # The server does not check existence; the published docs' 404 is a switch.
    assert api.get(f"/queuelen/{UNKNOWN}").json() == {"id": UNKNOWN, "len": 0}
    sim.configure(queuelen_404_unknown=True)
    assert api.get(f"/queuelen/{UNKNOWN}").status_code == 404
    assert api.get(f"/queuelen/{MISTY}").status_code == 200


def test_qlen(api: Api) -> None:
    iid = api.new(MISTY, expire_d=100)
    # Without ``wds``, /qlen is a 404 (section 8, item 10): ask for every deployment.
    body = api.get(f"/qlen?wds={KOBUKI_US},{KOBUKI_EU},{MISTY},{CRAZYFLIE}").json()
    assert set(body) == {KOBUKI_US, KOBUKI_EU, MISTY, CRAZYFLIE}
    assert body[KOBUKI_US] == {"qlen": 0, "rem": None}
    assert body[MISTY]["qlen"] == 1
    assert 99 <= body[MISTY]["rem"] <= 100
    assert set(api.get("/qlen/basic_kobuki").json()) == {KOBUKI_US, KOBUKI_EU}
    assert set(api.get(f"/qlen?wds={KOBUKI_EU},{MISTY}").json()) == {KOBUKI_EU, MISTY}
    assert iid


# ---------------------------------------------------------------------- the lifecycle


def test_lifecycle_by_wtype(capi: Api, clock: ManualClock) -> None:
    res = capi.post("/new/basic_kobuki")
    assert res.status_code == 200
    body = res.json()
    assert body["success"] is True
    iid = body["id"]
    info = capi.get(f"/instance/{iid}").json()
    assert info["status"] == "INIT"
    assert info["fwd"] == {}
    assert "hostkeys" not in info  # absent until known (section 8, item 7)
    assert info["type"] == "basic_kobuki"
    assert info["deployment"] == KOBUKI_US
    assert info["region"] == "us:cali"
    assert info["rootuser"] == "tester"
    assert info["wdinfo"]["id"] == KOBUKI_US
    assert "endtime" not in info
    assert "expires" not in info
    clock.advance(0.99)
    assert capi.status(iid) == "INIT"
    clock.advance(0.02)
    info = capi.get(f"/instance/{iid}").json()
    assert info["status"] == "READY"
    assert info["fwd"]["ipv4"] == "127.0.0.1"
    assert isinstance(info["fwd"]["port"], int)
    assert info["fwd"]["port"] != 22
    assert info["hostkeys"][0].startswith("ssh-ed25519 ")
    res = capi.post(f"/terminate/{iid}")
    assert res.status_code == 200
    assert res.content == b""
    info = capi.get(f"/instance/{iid}").json()
    assert info["status"] == "TERMINATING"
    assert "fwd" not in info
    assert "hostkeys" not in info
    clock.advance(0.5)
    info = capi.get(f"/instance/{iid}").json()
    assert info["status"] == "TERMINATED"
    assert "endtime" in info
    assert "fwd" not in info
    assert capi.get("/instances").json()["workspace_instances"] == []
    assert capi.get("/instances?include_terminated").json()["workspace_instances"] == [iid]


def test_second_request_takes_second_deployment_then_busy(api: Api) -> None:
    first = api.new("basic_kobuki")
    second = api.new("basic_kobuki")
    deployments = {api.get(f"/instance/{i}").json()["deployment"] for i in (first, second)}
    assert deployments == {KOBUKI_US, KOBUKI_EU}
    res = api.post("/new/basic_kobuki", json={"reserve": True})
    assert res.status_code == 404
    assert res.json() == {"error": "All feasible workspace deployments are busy"}
    res = api.post(f"/new/{KOBUKI_US}")
    assert res.status_code == 503
    assert res.json() == {
        "result_message": "All matching workspace deployments are busy. Try again later."}


def test_terminating_still_holds_the_deployment(capi: Api, clock: ManualClock) -> None:
    iid = _ready(capi, clock, MISTY)
    capi.post(f"/terminate/{iid}")
    assert capi.post(f"/new/{MISTY}").status_code == 503
    clock.advance(0.5)
    assert capi.status(iid) == "TERMINATED"
    assert capi.post(f"/new/{MISTY}").status_code == 200


def test_new_unknown_targets(api: Api, sim: Simulator) -> None:
    for target in ("nul", UNKNOWN):
        res = api.post(f"/new/{target}")
        assert res.status_code == 404
        assert res.json() == {"error": "no matching wdeployment found"}
    sim.world.set_deployment_state(MISTY, lockout=True)
    res = api.post(f"/new/{MISTY}")
    assert res.status_code == 400
    assert res.json() == {
        "error": "workspace deployment is locked out (unavailable), please contact us "}
    sim.world.set_deployment_state(MISTY, lockout=False, offline=True)
    res = api.post(f"/new/{MISTY}")
    assert res.status_code == 503
    assert res.json() == {"error": "workspace deployment temporarily unavailable, try again later"}
    sim.world.set_deployment_state(MISTY, offline=False, dissolved=True)
    res = api.post(f"/new/{MISTY}")
    assert res.status_code == 400
    assert res.json() == {"error": "workspace deployment is permanently unavailable"}
    res = api.post("/new/fixed_misty2")
    assert res.status_code == 404
    assert res.json() == {"error": "no matching wdeployment found"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"reserve": "yes"}, "value for option `reserve` has wrong type"),
        ({"sshkey": 5}, "value for option `sshkey` has wrong type"),
        ({"vpn": 1}, "value for option `vpn` has wrong type"),
        ({"eurl": ["x"]}, "value for option `eurl` has wrong type"),
        ({"expire_d": "60"}, "value for option `expire_d` has wrong type"),
        ({"expire_d": True}, "value for option `expire_d` has wrong type"),
        ({"expire_d": 1.5}, "value for option `expire_d` has wrong type"),
        ({"keepalive": "true"}, "value for option `keepalive` has wrong type"),
        ({"allow_noop": None}, "value for option `allow_noop` has wrong type"),
        ({"expire_d": 0}, "value for option `expire_d` must be positive"),
        ({"eurl": ""}, "value for option `eurl` must be nonempty"),
        ({"repo": {"path": "x"}}, "value for option `repo` missing url"),
    ],
)
def test_new_option_errors(api: Api, body: dict[str, Any], message: str) -> None:
    res = api.post("/new/basic_kobuki", json=body)
    assert res.status_code == 400
    assert res.json() == {"error_message": message}
    assert api.get("/instances").json()["workspace_instances"] == []


def test_new_body_without_content_type_and_bad_json(api: Api) -> None:
    # The official client posts json.dumps(...) with no Content-Type.
    res = api.post("/new/basic_kobuki", data=json.dumps({"reserve": False, "expire_d": 30}))
    assert res.status_code == 200
    assert "expires" in api.get(f"/instance/{res.json()['id']}").json()
    res = api.post("/new/basic_kobuki", data="{not json")
    assert res.status_code == 400


def test_new_with_wds_body(api: Api, sim: Simulator) -> None:
    res = api.post("/new", json={"wds": [KOBUKI_EU, KOBUKI_US]})
    assert res.status_code == 200
    assert api.get(f"/instance/{res.json()['id']}").json()["deployment"] == KOBUKI_EU
    assert api.post("/new", json={"wds": [UNKNOWN]}).status_code == 404
    # An unknown id is "no matching" (section 8, item 16); a malformed list is empty.
    assert api.post("/new", json={"wds": [UNKNOWN]}).json() == {
        "error": "no matching wdeployment found"}
    assert api.post("/new", json={"wds": ["not-a-uuid"]}).content == b""
    assert api.post("/new", json={}).status_code == 404
    res = api.post("/new", json={"wds": [KOBUKI_US, MISTY]})
    assert res.status_code == 400
    assert res.json() == {
        "error": "multiple request for wdeployments of different wtype not supported"}
    api.new(KOBUKI_US)
    res = api.post("/new", json={"wds": [KOBUKI_US, KOBUKI_EU]})
    assert res.status_code == 503
    res = api.post("/new", json={"wds": [KOBUKI_US, KOBUKI_EU], "reserve": True})
    assert res.json()["success"] is False


def test_allow_noop_returns_existing(api: Api) -> None:
    iid = api.new(MISTY)
    res = api.post(f"/new/{MISTY}", json={"allow_noop": True})
    assert res.json() == {"success": True, "id": iid}
    assert api.post("/new/fixed_misty2", json={"allow_noop": True}).json()["id"] == iid


def test_sshkey_in_new_response_and_endpoint(api: Api, sim: Simulator) -> None:
    # The published summary's variant, a switch: the real server never sends it.
    sim.configure(sshkey_in_new_response=True)
    body = api.post("/new/basic_kobuki").json()
    pem = body["sshkey"]
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    key = paramiko.RSAKey.from_private_key(io.StringIO(pem))
    assert key.get_bits() == 2048
    res = api.get(f"/instance/{body['id']}/sshkey")
    assert res.json() == {"key": pem}
    # A public key in the request: no private key in the answer, but /sshkey still has one.
    public = f"ssh-rsa {key.get_base64()} me@laptop"
    other = api.post("/new/basic_kobuki", json={"sshkey": public}).json()
    assert "sshkey" not in other
    assert api.get(f"/instance/{other['id']}/sshkey").json()["key"].startswith("-----BEGIN")
    # The default, as on the real server.
    sim.configure(sshkey_in_new_response=False)
    third = api.post(f"/new/{MISTY}").json()
    assert "sshkey" not in third
    assert api.get(f"/instance/{third['id']}/sshkey").status_code == 200


def test_sshkey_errors(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    iid = _ready(capi, clock)
    capi.post(f"/terminate/{iid}")
    res = capi.get(f"/instance/{iid}/sshkey")
    assert res.status_code == 400
    assert res.json() == {"error_message": "instance already terminating"}
    clock.advance(1)
    assert capi.get(f"/instance/{iid}/sshkey").json() == {
        "error_message": "instance already terminated"}
    csim.set_init_fail_rate(1.0)
    failed = capi.new(MISTY)
    clock.advance(1)
    # An INIT_FAIL instance still has its key (section 8, item 6).
    res = capi.get(f"/instance/{failed}/sshkey")
    assert res.status_code == 200
    assert res.json()["key"].startswith("-----BEGIN")
    assert capi.get(f"/instance/{UNKNOWN}/sshkey").status_code == 404


def test_terminate_errors(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    iid = capi.new()
    res = capi.post(f"/terminate/{iid}")
    assert res.status_code == 400
    assert res.json() == {"error_message": "cannot terminate instance that is init"}
    clock.advance(1)
    assert capi.post(f"/terminate/{iid}").status_code == 200
    res = capi.post(f"/terminate/{iid}")
    assert res.json() == {"error_message": "instance already terminating"}
    clock.advance(1)
    res = capi.post(f"/terminate/{iid}")
    assert res.status_code == 400
    assert res.json() == {"error_message": "instance already terminated"}
    res = capi.post(f"/terminate/{UNKNOWN}")
    assert res.status_code == 404
    assert res.json() == {"error_message": "instance not found"}
    csim.set_init_fail_rate(1.0)
    failed = capi.new()
    clock.advance(1)
    assert capi.status(failed) == "INIT_FAIL"
    assert capi.post(f"/terminate/{failed}").json() == {
        "error_message": "cannot terminate instance that is init_fail"}


def test_instances_are_private(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    iid = _ready(capi, clock)
    other = Api(csim.url, csim.add_user("mallory"))
    try:
        for method, path in [("GET", f"/instance/{iid}"), ("POST", f"/terminate/{iid}"),
                             ("GET", f"/firewall/{iid}"), ("GET", f"/instance/{iid}/sshkey")]:
            res = other.request(method, path)
            assert res.status_code == 404, path
            assert res.json() == {"error_message": "instance not found"}
        assert other.get("/instances").json()["workspace_instances"] == []
    finally:
        other.close()


def test_init_fail(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    csim.set_init_fail_rate(1.0)
    iid = capi.new()
    clock.advance(1)
    info = capi.get(f"/instance/{iid}").json()
    assert info["status"] == "INIT_FAIL"
    assert "fwd" not in info
    assert "hostkeys" not in info
    # INIT_FAIL frees the deployment at once.
    csim.set_init_fail_rate(0.0)
    assert capi.new(KOBUKI_US)
    assert capi.get("/instances").json()["workspace_instances"] != [iid]
    assert iid in capi.get("/instances?include_init_fail").json()["workspace_instances"]


def test_stuck_in_init_then_init_timeout(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    csim.set_stuck_init(True)
    iid = capi.new()
    clock.advance(30)
    assert capi.status(iid) == "INIT"
    assert capi.get(f"/instance/{iid}").json()["fwd"] == {}
    clock.advance(31)
    assert capi.status(iid) == "INIT_FAIL"
    csim.configure(init_timeout=0)
    stuck = capi.new()
    clock.advance(1000)
    assert capi.status(stuck) == "INIT"


def test_not_found_window_after_new(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    csim.set_not_found_window(2.0)
    iid = capi.new(MISTY)
    for _ in range(2):
        res = capi.get(f"/instance/{iid}")
        assert res.status_code == 404
        assert res.json() == {"error_message": "instance not found"}
    assert capi.get("/instances").json()["workspace_instances"] == []
    clock.advance(2.0)
    assert capi.status(iid) == "READY"


def test_keepalive(capi: Api, clock: ManualClock) -> None:
    iid = _ready(capi, clock, keepalive=True)
    for _ in range(3):
        clock.advance(45)
        res = capi.post(f"/instance/{iid}/ka")
        assert res.status_code == 200
        assert res.content == b""
        assert capi.status(iid) == "READY"
    clock.advance(60)
    assert capi.status(iid) == "TERMINATING"
    res = capi.post(f"/instance/{iid}/ka")
    assert res.status_code == 404
    assert res.json() == {"error_message": "no keep-alive monitor for this instance"}
    plain = _ready(capi, clock, MISTY)
    assert capi.post(f"/instance/{plain}/ka").json() == {
        "error_message": "no keep-alive monitor for this instance"}
    clock.advance(3600)
    assert capi.status(plain) == "READY"


def test_keepalive_timeout_is_configurable(capi: Api, clock: ManualClock,
                                           csim: Simulator) -> None:
    csim.configure(keepalive_timeout=5)
    iid = _ready(capi, clock, keepalive=True)
    clock.advance(5)
    assert capi.status(iid) == "TERMINATING"


def test_expire_d(capi: Api, clock: ManualClock) -> None:
    iid = _ready(capi, clock, expire_d=30)
    info = capi.get(f"/instance/{iid}").json()
    assert info["expires"] > info["starttime"]
    clock.advance(28.9)
    assert capi.status(iid) == "READY"
    clock.advance(0.2)
    assert capi.status(iid) == "TERMINATING"
    clock.advance(0.5)
    info = capi.get(f"/instance/{iid}").json()
    assert info["status"] == "TERMINATED"
    assert info["endtime"] >= info["expires"]


def test_force_terminate_and_live_instances(api: Api, sim: Simulator) -> None:
    iid = api.new(MISTY)
    assert [s.id for s in sim.live_instances()] == [iid]
    snapshot = sim.live_instances()[0]
    assert (snapshot.type, snapshot.deployment, snapshot.user) == ("fixed_misty2", MISTY, "tester")
    sim.world.force_terminate(iid)
    assert sim.live_instances() == []
    api.wait(iid, "TERMINATED")


# ---------------------------------------------------------------------- reservations


def test_reservations_fifo_same_id(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    holder = _ready(capi, clock, MISTY)
    bob = Api(csim.url, csim.add_user("bob"))
    try:
        first = capi.post(f"/new/{MISTY}", json={"reserve": True}).json()
        clock.advance(61)  # so that the two reservations have distinct minutes
        second = bob.post(f"/new/{MISTY}", json={"reserve": True}).json()
        assert first["success"] is False
        assert second["success"] is False
        assert first["id"] != second["id"]
        listed = capi.get("/reservations").json()["reservations"]
        assert len(listed) == 1
        assert listed[0]["id"] == first["id"]
        assert listed[0]["desc"] == f"wd:{MISTY}"
        assert listed[0]["user"] == "tester"
        assert listed[0]["created"].endswith(" UTC")
        assert time.strptime(listed[0]["created"], "%Y-%m-%d %H:%M UTC")
        assert capi.get(f"/queuelen/{MISTY}").json()["len"] == 3
        # A reservation is not an instance yet.
        assert capi.get(f"/instance/{first['id']}").status_code == 404
        capi.post(f"/terminate/{holder}")
        clock.advance(0.5)
        # The first in line gets the robot, under the reservation's id, once the holder's
        # host is down (a host worker stops it after POST /terminate was answered).
        assert wait_until(lambda: capi.status(first["id"]) == "INIT", 10)
        assert capi.get("/reservations").json()["reservations"] == []
        assert bob.get(f"/instance/{second['id']}").status_code == 404
        clock.advance(1)
        assert capi.status(first["id"]) == "READY"
        capi.post(f"/terminate/{first['id']}")
        clock.advance(0.5)
        assert wait_until(lambda: bob.status(second["id"]) == "INIT", 10)
        assert bob.get("/reservations").json()["reservations"] == []
    finally:
        bob.close()


def test_delete_reservation(api: Api) -> None:
    api.new(MISTY)
    rid = api.post(f"/new/{MISTY}", json={"reserve": True}).json()["id"]
    res = api.delete(f"/reservation/{rid}")
    assert res.status_code == 200
    assert res.content == b""
    assert api.get("/reservations").json() == {"reservations": []}
    res = api.delete(f"/reservation/{rid}")
    assert res.status_code == 404
    assert res.json() == {"error_message": "reservation not found"}


# ---------------------------------------------------------------------- listing instances


def test_instances_listing(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    made = []
    for target in (KOBUKI_US, KOBUKI_EU, MISTY):
        made.append(capi.new(target))
        clock.advance(1)
    body = capi.get("/instances").json()
    assert body["workspace_instances"] == made[::-1]
    assert body["workspace_deployments"] == [MISTY, KOBUKI_EU, KOBUKI_US]
    assert body["page_count"] == 1
    assert capi.get("/instances?sort_by=inc_start_date").json()["workspace_instances"] == made
    page = capi.get("/instances?sort_by=inc_start_date&max_per_page=2&page=2").json()
    assert page["workspace_instances"] == made[2:]
    assert page["page_count"] == 2
    assert capi.get("/instances/basic_kobuki").json()["workspace_instances"] == made[1::-1]
    details = capi.get("/instances?details").json()["workspace_instances"]
    assert details[0]["id"] == made[2]
    assert set(details[0]) == {"id", "status", "deployment", "type", "region", "starttime",
                               "rootuser"}
    assert details[0]["starttime"].endswith("Z")
    assert "T" in details[0]["starttime"]
    capi.post(f"/terminate/{made[0]}")
    clock.advance(1)
    assert made[0] not in capi.get("/instances").json()["workspace_instances"]
    ended = capi.get("/instances?include_terminated&details").json()["workspace_instances"]
    assert next(d for d in ended if d["id"] == made[0])["endtime"].endswith("Z")
    assert capi.get("/instances?user=someone").status_code == 403


# ---------------------------------------------------------------------- firewall and VPN


def test_firewall(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    iid = _ready(capi, clock)
    assert capi.get(f"/firewall/{iid}").json() == {"rules": []}
    assert csim.world.firewall_action(iid, "127.0.0.1") == "DROP"
    res = capi.post(f"/firewall/{iid}")
    assert res.status_code == 200
    assert res.content == b""
    capi.post(f"/firewall/{iid}", json={"src": "10.0.0.0/8", "action": "REJECT"})
    capi.post(f"/firewall/{iid}", data='{"src": "192.0.2.7", "action": "DROP"}')
    assert capi.get(f"/firewall/{iid}").json() == {
        "rules": [["127.0.0.1", "ACCEPT"], ["10.0.0.0/8", "REJECT"], ["192.0.2.7", "DROP"]]}
    assert csim.world.firewall_action(iid, "127.0.0.1") == "ACCEPT"
    assert csim.world.firewall_action(iid, "10.1.2.3") == "REJECT"
    # X-Forwarded-For is not believed unless a setting says so (tests/test_sim_limits.py).
    forwarded = capi.post(f"/firewall/{iid}", headers={"X-Forwarded-For": "198.51.100.9"})
    assert forwarded.status_code == 200
    assert capi.get(f"/firewall/{iid}").json()["rules"][-1] == ["127.0.0.1", "ACCEPT"]
    for body, message in [
        ({"src": 17}, "value for option `src` has wrong type"),
        # The server's check is a pattern (section 8, item 13): no netmask forms.
        ({"src": "10.0.0.0/255.0.0.0"},
         "value for option `src` must be an IPv4 address or subnet in CIDR notation"),
        ({"src": "10.0.0.0/"},
         "value for option `src` must be an IPv4 address or subnet in CIDR notation"),
        ({"src": "::1"},
         "value for option `src` must be an IPv4 address or subnet in CIDR notation"),
        ({"action": "ALLOW"}, "value for option `action` not recognized"),
    ]:
        res = capi.post(f"/firewall/{iid}", json=body)
        assert res.status_code == 400, body
        assert res.json() == {"error_message": message}
    res = capi.delete(f"/firewall/{iid}")
    assert res.status_code == 200
    assert res.content == b""
    assert capi.get(f"/firewall/{iid}").json() == {"rules": []}
    assert csim.world.firewall_action(iid, "127.0.0.1") == "DROP"
    assert capi.get(f"/firewall/{UNKNOWN}").status_code == 404
    capi.post(f"/terminate/{iid}")
    clock.advance(1)
    for method in ("GET", "POST", "DELETE"):
        res = capi.request(method, f"/firewall/{iid}")
        assert res.status_code == 400
        assert res.json() == {"error_message": "instance not active"}


def test_firewall_decision() -> None:
    assert firewall_decision([], "127.0.0.1") == "DROP"
    rules = [["10.0.0.0/8", "REJECT"], ["10.1.2.3", "ACCEPT"], ["0.0.0.0/0", "ACCEPT"]]
    assert firewall_decision(rules, "10.1.2.3") == "REJECT"  # first match wins
    assert firewall_decision(rules, "192.0.2.1") == "ACCEPT"
    assert firewall_decision([["192.0.2.1", "ACCEPT"]], "192.0.2.2") == "DROP"
    assert firewall_decision([["192.0.2.1", "ACCEPT"]], "192.0.2.1") == "ACCEPT"
    assert firewall_decision([("192.0.2.0/24", "DROP")], "192.0.2.200") == "DROP"
    assert firewall_decision([["0.0.0.0/0", "ACCEPT"]], "::1") == "DROP"


def test_vpn(capi: Api, clock: ManualClock, csim: Simulator) -> None:
    plain = _ready(capi, clock)
    res = capi.get(f"/vpn/{plain}")
    assert res.status_code == 400
    assert res.json() == {"error_message": "instance does not have VPN"}
    csim.configure(vpn_nil_shape=True)
    assert capi.get(f"/vpn/{plain}").json() == {"status": "nil"}
    with_vpn = _ready(capi, clock, MISTY, vpn=True)
    assert capi.get(f"/vpn/{with_vpn}").json() == {"status": "ready", "clients": []}
    client = capi.post(f"/vpn/{with_vpn}").json()
    assert set(client) == {"client_id", "ovpn"}
    assert "client" in client["ovpn"]
    assert capi.get(f"/vpn/{with_vpn}").json()["clients"] == [client["client_id"]]
    assert capi.get(f"/instance/{with_vpn}").json()["vpn"]["status"] == "ready"
    assert "vpn" not in capi.get(f"/instance/{plain}").json()


# ---------------------------------------------------------------------- tokens, limits, CI


def test_revoke_own_token(sim: Simulator) -> None:
    token = sim.add_user("carol")
    client = Api(sim.url, token)
    try:
        assert client.get("/instances").status_code == 200
        digest = hashlib.sha256(token.encode()).hexdigest()
        res = client.post(f"/revoke/{digest}")
        assert res.status_code == 200
        assert res.content == b""
        res = client.get("/instances")
        assert res.status_code == 400
        assert res.json() == {"error_message": "wrong authorization token"}
        res = client.post(f"/revoke/{digest}")
        assert res.json() == {"error_message": "authentication failed"}
    finally:
        client.close()


def test_revoke_cannot_touch_other_users(sim: Simulator, api: Api) -> None:
    victim = sim.add_user("dave")
    api.post(f"/revoke/{hashlib.sha256(victim.encode()).hexdigest()}")
    assert sim.world.authenticate(victim) == "dave"
    # An unknown digest is recorded as revoked.
    assert api.post(f"/revoke/{'ab' * 32}").status_code == 200


def test_purge(sim: Simulator) -> None:
    first = sim.world.add_user("erin")
    second = sim.world.add_token("erin")
    other = sim.world.add_user("frank")
    client = Api(sim.url, first)
    try:
        res = client.post("/purge")
        assert res.status_code == 200
        assert res.content == b""
        assert client.post("/purge").json() == {"error_message": "authentication failed"}
    finally:
        client.close()
    assert sim.world.authenticate(second) is None
    assert sim.world.authenticate(other) == "frank"


def test_rate_limit_per_token(clock: ManualClock) -> None:
    with Simulator(ssh_backend="none", clock=clock, token_budget=3, rate_window=100) as sim:
        client = Api(sim.url, sim.token)
        other = Api(sim.url, sim.add_user("gina"))
        try:
            remaining = [client.get("/instances").headers["X-RateLimit-Remaining"]
                         for _ in range(3)]
            assert remaining == ["2", "1", "0"]
            # The server's check is ">" (section 8, item 17): one more is still served.
            res = client.get("/instances")
            assert res.status_code == 200
            assert res.headers["X-RateLimit-Remaining"] == "-1"
            res = client.get("/instances")
            assert res.status_code == 403
            assert res.content == b""
            assert res.headers["X-RateLimit-Limit"] == "3"
            assert res.headers["X-RateLimit-Remaining"] == "-1"
            assert int(res.headers["X-RateLimit-Reset"]) == int(clock()) + 100
            assert client.get("/workspaces").status_code == 403
            # Windows are per token.
            assert other.get("/instances").status_code == 200
            clock.advance(100)
            res = client.get("/instances")
            assert res.status_code == 200
            assert res.headers["X-RateLimit-Remaining"] == "2"
        finally:
            client.close()
            other.close()


@pytest.mark.parametrize("trusted", [False, True])
def test_rate_limit_anonymous_per_ip(clock: ManualClock, trusted: bool) -> None:
    limits = ServerLimits(trust_forwarded_for=trusted)
    with Simulator(ssh_backend="none", clock=clock, ip_budget=2, limits=limits) as sim:
        anon = Api(sim.url)
        try:
            reset = int(anon.get("/workspaces").headers["X-RateLimit-Reset"])
            assert reset == int(clock()) + 3600
            assert anon.get("/deployments").status_code == 200
            assert anon.get("/workspaces").status_code == 200  # the server's ">"
            res = anon.get("/workspaces")
            assert res.status_code == 403
            assert res.content == b""
            # Another address (as a trusted X-Forwarded-For says) has its own window; an
            # untrusted one changes nothing.
            assert anon.get("/workspaces",
                            headers={"X-Forwarded-For": "203.0.113.5"}
                            ).status_code == (200 if trusted else 403)
            # A call that needs a user is refused for that first.
            assert anon.get("/instances").status_code == 400
        finally:
            anon.close()


def test_ci(api: Api) -> None:
    res = api.post("/ci/new", json={"repo_url": "https://github.com/rerobots/py.git"})
    assert res.status_code == 200
    pid = res.json()["pid"]
    assert len(pid) == 22
    assert api.get("/ci/projects").json()[pid]["repo_url"].endswith("py.git")
    res = api.post(f"/ci/project/{pid}/job", json={"branch": "main", "commit": "abc"})
    assert res.json() == {"jid": 1}
    res = api.post(f"/ci/project/{pid}/job", json={"branch": "main"})
    assert res.json() == {"error_message": "request is missing required parameters"}
    res = api.post("/ci/new", json={})
    assert res.status_code == 400
    assert res.json() == {"error_message": "request is missing required parameter: repo_url"}


# ---------------------------------------------------------------------- faults


def test_lost_new_response_acts_anyway(api: Api, sim: Simulator) -> None:
    sim.lose_new_responses(1)
    with pytest.raises(requests.ConnectionError):
        api.post(f"/new/{MISTY}")
    listed = api.get("/instances").json()
    assert listed["workspace_deployments"] == [MISTY]
    # The next request is answered normally.
    assert api.post(f"/new/{KOBUKI_US}").status_code == 200


def test_lost_new_response_rate_from_overrides() -> None:
    with Simulator(ssh_backend="none", lose_new_response=1.0) as sim:
        client = Api(sim.url, sim.token)
        try:
            with pytest.raises(requests.ConnectionError):
                client.post("/new/fixed_misty2")
            # Errors are not "successes": they are answered.
            assert client.post("/new/fixed_misty2").status_code == 404
        finally:
            client.close()
        assert len(sim.live_instances()) == 1


def test_endpoint_error_rate_and_latency(api: Api, sim: Simulator) -> None:
    sim.set_endpoint_fault("instances", error_rate=1.0, error_status=503)
    res = api.get("/instances")
    assert res.status_code == 503
    assert "X-RateLimit-Limit" in res.headers
    assert api.get("/reservations").status_code == 200
    sim.set_endpoint_fault("*", error_rate=1.0)
    assert api.get("/workspaces").status_code == 500
    sim.clear_faults()
    sim.set_endpoint_fault("workspaces", latency=0.2)
    started = time.monotonic()
    assert api.get("/workspaces").status_code == 200
    assert time.monotonic() - started >= 0.2
    with pytest.raises(ConfigurationError, match="unknown endpoint"):
        sim.set_endpoint_fault("nope", error_rate=1.0)


def test_faults_from_catalog(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(_MINIMAL + """
[faults]
not_found_window = 5.0
seed = 3
[faults.endpoints.new]
error_rate = 1.0
error_status = 502
""")
    with Simulator(path, ssh_backend="none") as sim:
        client = Api(sim.url, sim.token)
        try:
            assert client.post("/new/robot").status_code == 502
        finally:
            client.close()
        assert sim.world.faults.not_found_window == 5.0


class Receiver:
    """A local HTTP endpoint that records the eurl POSTs it gets."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.arrived = threading.Condition()
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request = Request(environ)
        with self.arrived:
            self.events.append(json.loads(request.get_data()))
            self.auth.append(request.headers.get("Authorization", ""))
            self.arrived.notify_all()
        return Response("ok")(environ, start_response)

    def wait(self, count: int) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.events) >= count, timeout=3), (
                self.events)
            return list(self.events)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    rec.thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


def test_eurl_events(capi: Api, clock: ManualClock, csim: Simulator,
                     receiver: Receiver) -> None:
    iid = capi.new(MISTY, eurl=receiver.url)
    clock.advance(1)
    capi.post(f"/terminate/{iid}")
    clock.advance(1)
    capi.get(f"/instance/{iid}")
    events = receiver.wait(2)
    assert [e["val"] for e in events] == ["INIT", "TERMINATED"]
    assert events[0]["id"] == iid
    assert events[0]["wd"] == MISTY
    assert events[0]["kind"] == "instance status"
    assert events[0]["user"] == "tester"
    assert events[0]["sshkey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert "sshkey" not in events[1]
    assert receiver.auth[0] == f"Bearer {csim.world.eurl_token}"
    # An unreachable receiver is logged, never fatal.
    dead = _ready(capi, clock, KOBUKI_US, eurl="http://127.0.0.1:9/x")
    assert capi.status(dead) == "READY"


def test_eurl_when_reservation_becomes_instance(capi: Api, clock: ManualClock, csim: Simulator,
                                               receiver: Receiver) -> None:
    csim.configure(eurl_on_ready=True)
    holder = _ready(capi, clock, MISTY)
    rid = capi.post(f"/new/{MISTY}", json={"reserve": True, "eurl": receiver.url,
                                           "sshkey": "ssh-ed25519 AAAA me"}).json()["id"]
    capi.post(f"/terminate/{holder}")
    clock.advance(0.5)
    capi.get("/instances")
    clock.advance(1)
    capi.get("/instances")
    events = receiver.wait(2)
    assert [(e["id"], e["val"]) for e in events] == [(rid, "INIT"), (rid, "READY")]
    assert "sshkey" not in events[0]


def test_fail_next(api: Api, sim: Simulator) -> None:
    sim.fail_next("new", count=2, status=502)
    for _ in range(2):
        res = api.post(f"/new/{MISTY}")
        assert res.status_code == 502
        assert res.headers["Content-Type"].startswith("text/plain")
    assert sim.live_instances() == []
    assert api.post(f"/new/{MISTY}").status_code == 200
    sim.fail_next("*")
    assert api.get("/workspaces").status_code == 503
    assert api.get("/workspaces").status_code == 200


# ---------------------------------------------------------------------- catalog and Simulator


_MINIMAL = """
[types.robot]
[[deployments]]
type = "robot"
region = "lab"
"""


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[timings]\nready_delay = -1\n", "timings.ready_delay"),
        ("[timings]\nready_delay = 'soon'\n", "timings.ready_delay"),
        ("[timings]\ninit_fail_rate = 2\n", "timings.init_fail_rate"),
        ("[timings]\nreadydelay = 1\n", "timings.readydelay"),
        ("[rate_limits]\ntoken_budget = 0\n", "rate_limits.token_budget"),
        ("[switches]\nvpn_nil_shape = 1\n", "switches.vpn_nil_shape"),
        ("[faults.endpoints.bogus]\nerror_rate = 1\n", "faults.endpoints.bogus"),
        ("[faults.endpoints.new]\nerror_status = 404\n", "faults.endpoints.new.error_status"),
        ("[[deployments]]\ntype = 'ghost'\n", "deployments[1].type"),
        ("[[deployments]]\ntype = 'robot'\nid = 'xyz'\n", "deployments[1].id"),
        ("[types.robot2]\nfiles = {'../evil' = 'x'}\n", "types.robot2.files.../evil"),
        ("[types.robot2]\ncommands = 'ls'\n", "types.robot2.commands"),
        ("[tokens]\nabc = 5\n", "tokens.abc"),
        ("surprise = 1\n", "surprise"),
        ("[timings\n", "not valid TOML"),
    ],
)
def test_catalog_validation(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(_MINIMAL + text)
    with pytest.raises(ConfigurationError) as excinfo:
        load_catalog(path)
    assert str(path) in str(excinfo.value)
    assert key in str(excinfo.value)


def test_catalog_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text("[types.r]\n" + f"[[deployments]]\ntype='r'\nid='{MISTY}'\n" * 2)
    with pytest.raises(ConfigurationError, match=r"deployments\[1\]\.id: duplicate"):
        load_catalog(path)


def test_catalog_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        Simulator(tmp_path / "absent.toml", ssh_backend="none")


def test_custom_catalog(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("replace_builtin = true\n" + _MINIMAL + """
[timings]
ready_delay = 0.0
[tokens]
"lab-token" = "lab"
[switches]
sshkey_in_new_response = false
""")
    catalog = load_catalog(path)
    assert catalog.deployments[0].id == load_catalog(path).deployments[0].id  # stable
    with Simulator(path, ssh_backend="none") as sim:
        client = Api(sim.url, "lab-token")
        try:
            assert client.get("/workspaces").json() == {"workspace_types": ["robot"]}
            body = client.post("/new/robot").json()
            assert "sshkey" not in body
            client.wait(body["id"], "READY")
            assert client.get(f"/instance/{body['id']}").json()["rootuser"] == "lab"
        finally:
            client.close()


def test_default_catalog_contents() -> None:
    catalog = default_catalog()
    kobukis = [d for d in catalog.deployments if d.type == "basic_kobuki"]
    assert len(kobukis) == 2
    assert len({d.region for d in kobukis}) == 2
    assert [d.type for d in catalog.deployments].count("fixed_misty2") == 1
    assert catalog.timings.ready_delay <= 2
    for wtype in ("basic_kobuki", "fixed_misty2"):
        assert catalog.types[wtype].files["bin/flash-fw"].startswith("#!/bin/sh\n")


def test_simulator_arguments() -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        Simulator(host="0.0.0.0", ssh_backend="none")
    with pytest.raises(ConfigurationError, match="ssh_backend"):
        Simulator(ssh_backend="telnet")
    with pytest.raises(ConfigurationError, match="unknown key"):
        Simulator(ssh_backend="none", ready_dealy=1)
    with pytest.raises(ConfigurationError, match="ready_delay"):
        Simulator(ssh_backend="none", ready_delay=-1)
    with pytest.raises(ConfigurationError):
        Simulator(ssh_backend="none").configure(stuck_init="yes")


def test_simulator_stop_is_idempotent() -> None:
    chosen = secrets.token_hex(8)
    sim = Simulator(ssh_backend="none", token=chosen)
    with sim:
        url = sim.url
        assert sim.token == chosen
        assert requests.get(f"{url}/workspaces", timeout=5).status_code == 200
    sim.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/workspaces", timeout=2)


def test_port_in_use() -> None:
    with Simulator(ssh_backend="none") as first:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(ConfigurationError, match="cannot listen"):
            with Simulator(ssh_backend="none", port=port):
                pass


def test_command_line_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    with sim_process("--ssh-backend", "none", "--token-file", str(token_file),
                     timeout=15) as sim:
        proc = sim.proc
        # The token is nowhere on the command line other local users can read.
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            assert b"cli-token" not in cmdline.read()
        lines = sim.lines
        assert lines[0].startswith("REROBOTS_API_URL=http://127.0.0.1:")
        assert lines[1] == "REROBOTS_API_TOKEN=cli-token"
        url = lines[0].split("=", 1)[1]
        res = requests.get(f"{url}/instances", timeout=5,
                           headers={"Authorization": "Bearer cli-token"})
        assert res.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_command_line_token_from_the_environment_and_argv_refused(tmp_path: Path) -> None:
    env = {**os.environ, "REROBOTS_SIM_TOKEN": "env-token"}
    env.pop("REROBOTS_API_TOKEN", None)
    with sim_process("--ssh-backend", "none", env=env, timeout=15) as sim:
        assert sim.lines[1] == "REROBOTS_API_TOKEN=env-token"
    refused = subprocess.run(
        [sys.executable, "-m", "pytest_rerobots.sim", "--port", "0", "--ssh-backend", "none",
         "--token", "argv-token"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "--token is not accepted" in refused.stderr
    assert "--token-file PATH" in refused.stderr and "REROBOTS_SIM_TOKEN" in refused.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, message in [(empty, "has no token"), (tmp_path / "missing", "cannot read")]:
        bad = subprocess.run(
            [sys.executable, "-m", "pytest_rerobots.sim", "--port", "0", "--ssh-backend",
             "none", "--token-file", str(path)], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2, bad.stderr
        assert message in bad.stderr


# ---------------------------------------------------------------------- host scripts


@pytest.mark.parametrize("wtype", ["basic_kobuki", "fixed_misty2"])
def test_host_scripts(tmp_path: Path, wtype: str) -> None:
    shell = shutil.which("dash") or "/bin/sh"
    for rel, text in default_catalog().types[wtype].files.items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shell, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=10, check=False)

    assert run("bin/robot-status").stdout == "battery=97 fw=none base=ok\n"
    image = tmp_path / "fw.bin"
    image.write_bytes(b"VERSION=1.4.2\n\x00\x01binary-payload\n")
    flashed = run("bin/flash-fw", str(image))
    assert flashed.returncode == 0, flashed.stderr
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert flashed.stdout == f"flashed {digest} version 1.4.2\n"
    assert (tmp_path / "state" / "fw_version").read_text() == "1.4.2\n"
    assert run("bin/robot-status").stdout == "battery=97 fw=1.4.2 base=ok\n"
    missing = run("bin/flash-fw", "nope.bin")
    assert missing.returncode == 2
    assert "nope.bin" in missing.stderr
    assert missing.stdout == ""
    blank = tmp_path / "blank.bin"
    blank.write_text("no version here\n")
    assert run("bin/flash-fw", str(blank)).returncode == 3


# ---------------------------------------------------------------------- real SSH hosts


@pytest.mark.skipif(importlib.util.find_spec("pytest_rerobots.sim.hosts") is None,
                    reason="pytest_rerobots.sim.hosts is not there yet")
def test_real_host_behind_firewall() -> None:
    with Simulator(ssh_backend="asyncssh", **FAST) as sim:
        client = Api(sim.url, sim.token)
        try:
            iid = client.new(MISTY)
            info = client.wait(iid, "READY")
            assert info["fwd"]["ipv4"] == "127.0.0.1"
            port = info["fwd"]["port"]
            assert isinstance(port, int)
            assert port != 22
            assert info["hostkeys"][0].split()[0] in ("ecdsa-sha2-nistp256", "ssh-ed25519")
            # New instances drop everything: the TCP connection opens but stays silent.
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    sock.recv(64)
            assert client.post(f"/firewall/{iid}").status_code == 200
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                assert sock.recv(64).startswith(b"SSH-")
                client.post(f"/terminate/{iid}")
                # Terminating closes live connections.
                sock.settimeout(2)
                data = b"x"
                while data:
                    data = sock.recv(4096)
        finally:
            client.close()
        sim.check()
