"""RerobotsClient against the simulator's real HTTP server: every endpoint, and its errors."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import pytest

from pytest_rerobots import (
    APIError,
    BusyWorkspaceDeployment,
    BusyWorkspaceInstance,
    DeploymentNotFound,
    InstanceNotFound,
    MalformedResponse,
    RateLimited,
    ReservationNotFound,
    ServerError,
    TransportError,
    WrongAuthToken,
)
from pytest_rerobots.client import RerobotsClient, classify
from pytest_rerobots.sim import Simulator
from pytest_rerobots.wire import epoch as _epoch

# No 404 window after POST /new: these tests look at an instance right after renting it.
FAST = dict(ready_delay=0.05, terminate_delay=0.05, not_found_window=0.0, ssh_backend="none")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(**FAST) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[RerobotsClient]:
    naps: list[float] = []
    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=naps.append) as client:
        client.naps = naps  # type: ignore[attr-defined]
        yield client


def wait_status(api: RerobotsClient, ident: str, status: str, limit: float = 3.0) -> dict:
    deadline = time.monotonic() + limit
    while True:
        info = api.instance(ident)
        if info["status"] == status or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def kobuki_deployments(api: RerobotsClient) -> list[str]:
    return api.deployments("basic_kobuki")["workspace_deployments"]


# -- pure functions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "payload", "empty", "expected"),
    [
        (400, {"error_message": "wrong authorization token"}, False, WrongAuthToken),
        (400, {"error_message": "authentication failed"}, False, WrongAuthToken),
        (403, None, True, RateLimited),
        (500, None, True, ServerError),
        (429, None, True, RateLimited),
        (403, None, False, APIError),
        (404, {"error_message": "instance not found"}, False, InstanceNotFound),
        (404, {"error": "no matching wdeployment found"}, False, DeploymentNotFound),
        (404, {"error_message": "reservation not found"}, False, ReservationNotFound),
        (404, {"error": "All feasible workspace deployments are busy"}, False,
         BusyWorkspaceDeployment),
        (404, {"error": "All matching workspace deployments are busy"}, False,
         BusyWorkspaceDeployment),
        (503, {"result_message": "All matching workspace deployments are busy. Try again later."},
         False, BusyWorkspaceDeployment),
        (400, {"error_message": "cannot terminate instance that is init"}, False,
         BusyWorkspaceInstance),
        (400, {"error_message": "cannot terminate instance that is init_fail"}, False, APIError),
        (503, {"result_message": "This instance is busy. Try again later."}, False,
         BusyWorkspaceInstance),
        (500, None, True, ServerError),
        (502, "Bad Gateway", False, ServerError),
    ],
)
def test_classify_maps_each_answer_to_its_error(status, payload, empty, expected):
    assert classify(status, payload, empty=empty) is expected


def test_empty_403_with_budget_left_is_access_denied_not_rate_limit():
    assert classify(403, None, empty=True, remaining=0) is RateLimited
    assert classify(403, None, empty=True, remaining=-1) is RateLimited
    assert classify(403, None, empty=True, remaining=120) is APIError


def test_epoch_reads_both_timestamp_formats():
    assert _epoch("1970-01-01 00:01:00") == 60.0
    assert _epoch("1970-01-01T00:01:00.5Z") == 60.5
    assert _epoch("garbage") == float("-inf")
    assert _epoch(None) == float("-inf")


def test_repr_and_errors_never_show_the_token(sim: Simulator):
    secret = "not-a-real-token-4f9c2b"
    client = RerobotsClient(secret, sim.url, ignore_env=True)
    assert secret not in repr(client)
    with pytest.raises(WrongAuthToken) as raised:
        client.instances()
    assert secret not in str(raised.value)
    assert raised.value.status == 400


def test_token_and_url_come_from_the_environment(monkeypatch, sim: Simulator):
    monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
    monkeypatch.setenv("REROBOTS_API_URL", sim.url)
    with RerobotsClient() as client:
        assert client.has_token and client.api_url == sim.url
        assert client.instances()["workspace_instances"] == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_proxy_settings_of_the_environment_are_read_when_the_client_is_made(
        monkeypatch, sim: Simulator):
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")
    with RerobotsClient(sim.token, sim.url, retries=0) as proxied:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # too late for this client
        with pytest.raises(TransportError):
            proxied.index()
    with RerobotsClient(sim.token, sim.url, retries=0) as direct:
        assert "workspace_types" in direct.index()


# -- public endpoints -------------------------------------------------------------


def test_index_types_and_deployments(api: RerobotsClient):
    assert "workspace_types" in api.index()
    assert {"basic_kobuki", "fixed_misty2"} <= set(api.workspace_types())
    listing = api.deployments(info=True)
    ids = listing["workspace_deployments"]
    assert listing["page_count"] == 1 and len(ids) >= 3
    kobukis = kobuki_deployments(api)
    assert len(kobukis) == 2
    regions = {listing["info"][d]["region"] for d in kobukis}
    assert len(regions) == 2
    details = api.deployment(kobukis[0])
    assert details["type"] == "basic_kobuki" and details["queuelen"] == 0
    assert api.queue_length(kobukis[0]) == 0


def test_deployment_queries(api: RerobotsClient):
    everything = api.deployments()["workspace_deployments"]
    not_kobuki = api.deployments(types=["!basic_kobuki"])["workspace_deployments"]
    assert set(not_kobuki) == set(everything) - set(kobuki_deployments(api))
    paged = api.deployments(max_per_page=1, page=2)
    assert paged["page_count"] == len(everything) and len(paged["workspace_deployments"]) == 1
    by_type = api.deployments(sort_by="dec_wtype", info=True)
    types = [by_type["info"][d]["type"] for d in by_type["workspace_deployments"]]
    assert types == sorted(types, reverse=True)
    assert api.deployments(q="misty")["workspace_deployments"]


def test_unknown_deployment_is_not_found(api: RerobotsClient):
    with pytest.raises(DeploymentNotFound):
        api.deployment("00000000-0000-4000-8000-000000000000")
    with pytest.raises(APIError, match="unrecognized command"):
        api.deployment("not-a-uuid")


# -- instances ---------------------------------------------------------------------


def test_instance_lifecycle(api: RerobotsClient, sim: Simulator):
    sim.configure(sshkey_in_new_response=True)  # the summary's shape, read by the client
    new = api.new_instance("basic_kobuki", expire_d=600, keepalive=True)
    assert new.success and new.sshkey and "PRIVATE KEY" in new.sshkey
    assert "PRIVATE KEY" not in repr(new)
    info = wait_status(api, new.id, "READY")
    assert info["status"] == "READY" and info["type"] == "basic_kobuki"
    assert set(info["fwd"]) == {"ipv4", "port"} and info["hostkeys"]
    assert "PRIVATE KEY" in api.instance_sshkey(new.id)
    api.keepalive(new.id)
    listing = api.instances()
    assert listing["workspace_instances"] == [new.id]
    assert listing["workspace_deployments"] == [info["deployment"]]
    detailed = api.instances(details=True)["workspace_instances"][0]
    assert detailed["id"] == new.id and detailed["status"] == "READY"
    assert api.terminate(new.id) is True
    assert api.terminate(new.id) is False  # already terminating: success, not an error
    assert api.instances()["workspace_instances"] == []
    assert new.id in api.instances(include_terminated=True)["workspace_instances"]


def test_public_key_means_no_private_key_in_the_answer(api: RerobotsClient):
    new = api.new_instance("fixed_misty2", sshkey="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFake")
    assert new.success and new.sshkey is None
    wait_status(api, new.id, "READY")
    api.terminate(new.id)


def test_terminate_during_init_is_busy_instance(sim: Simulator):
    with Simulator(ready_delay=5.0, not_found_window=0.0, ssh_backend="none") as slow, \
            RerobotsClient(slow.token, slow.url, ignore_env=True) as api:
        new = api.new_instance("basic_kobuki")
        with pytest.raises(BusyWorkspaceInstance, match="init"):
            api.terminate(new.id)
        slow.world.configure(ready_delay=0.0)
        wait_status(api, new.id, "READY")
        assert api.terminate(new.id)


def test_unknown_instance_and_type(api: RerobotsClient):
    with pytest.raises(InstanceNotFound):
        api.instance("00000000-0000-4000-8000-000000000000")
    with pytest.raises(DeploymentNotFound):
        api.new_instance("no_such_type")


def test_busy_by_type_and_by_deployment(api: RerobotsClient):
    (misty,) = api.deployments("fixed_misty2")["workspace_deployments"]
    first = api.new_instance("fixed_misty2")
    with pytest.raises(BusyWorkspaceDeployment) as by_type:
        api.new_instance("fixed_misty2")
    assert by_type.value.status == 404
    with pytest.raises(BusyWorkspaceDeployment) as by_id:
        api.new_instance(misty)
    assert by_id.value.status == 503
    wait_status(api, first.id, "READY")
    api.terminate(first.id)


def test_reservation_becomes_the_instance(api: RerobotsClient):
    (misty,) = api.deployments("fixed_misty2")["workspace_deployments"]
    first = api.new_instance(misty)
    reserved = api.new_instance(misty, reserve=True)
    assert reserved.success is False
    (entry,) = api.reservations()
    assert entry["id"] == reserved.id and entry["desc"] == f"wd:{misty}"
    assert api.queue_length(misty) == 2
    wait_status(api, first.id, "READY")
    api.terminate(first.id)
    deadline = time.monotonic() + 3
    while api.reservations() and time.monotonic() < deadline:
        time.sleep(0.02)  # a reservation id is no instance (404) until it is served
    info = wait_status(api, reserved.id, "READY")
    assert info["status"] == "READY" and api.reservations() == []
    api.terminate(reserved.id)


def test_cancel_reservation(api: RerobotsClient):
    (misty,) = api.deployments("fixed_misty2")["workspace_deployments"]
    first = api.new_instance(misty)
    reserved = api.new_instance(misty, reserve=True)
    api.cancel_reservation(reserved.id)
    assert api.reservations() == []
    with pytest.raises(ReservationNotFound):
        api.cancel_reservation(reserved.id)
    wait_status(api, first.id, "READY")
    api.terminate(first.id)


def test_pagination_and_sorting_of_instances(api: RerobotsClient):
    ids = []
    for target in kobuki_deployments(api):
        ids.append(api.new_instance(target).id)
        time.sleep(0.01)
    newest_first = api.instances()["workspace_instances"]
    assert newest_first == ids[::-1]
    assert api.instances(sort_by="inc_start_date")["workspace_instances"] == ids
    page = api.instances(max_per_page=1, page=2)
    assert page["page_count"] == 2 and page["workspace_instances"] == [ids[0]]
    assert api.instances("fixed_misty2")["workspace_instances"] == []
    for ident in ids:
        wait_status(api, ident, "READY")
        api.terminate(ident)


# -- firewall, VPN, CI ----------------------------------------------------------------


def test_firewall_rules(api: RerobotsClient):
    new = api.new_instance("basic_kobuki")
    wait_status(api, new.id, "READY")
    assert not api.firewall_rules(new.id)
    api.add_firewall_rule(new.id)
    api.add_firewall_rule(new.id, "10.0.0.0/8", "reject")
    rules = api.firewall_rules(new.id)
    assert rules == [["127.0.0.1", "ACCEPT"], ["10.0.0.0/8", "REJECT"]]
    with pytest.raises(ValueError, match="ACCEPT, DROP or REJECT"):
        api.add_firewall_rule(new.id, action="ALLOW")
    with pytest.raises(APIError, match="must be an IPv4 address"):
        api.add_firewall_rule(new.id, src="not-an-address")
    api.flush_firewall(new.id)
    assert not api.firewall_rules(new.id)
    api.terminate(new.id)


def test_vpn_without_vpn_reads_nil(api: RerobotsClient, sim: Simulator):
    new = api.new_instance("basic_kobuki")
    wait_status(api, new.id, "READY")
    assert api.vpn(new.id) == {"status": "nil"}  # the server's 400
    sim.world.configure(vpn_nil_shape=True)
    assert api.vpn(new.id) == {"status": "nil"}  # the API summary's shape (docs/contract.md)
    api.terminate(new.id)


def test_vpn_client_credentials(api: RerobotsClient):
    new = api.new_instance("fixed_misty2", vpn=True)
    wait_status(api, new.id, "READY")
    assert api.vpn(new.id) == {"status": "ready", "clients": []}
    creds = api.new_vpn_client(new.id)
    assert creds["ovpn"] and api.vpn(new.id)["clients"] == [creds["client_id"]]
    api.terminate(new.id)


def test_queue_lengths_by_type_and_by_ids(api: RerobotsClient):
    kobukis = kobuki_deployments(api)
    held = api.new_instance(kobukis[0], expire_d=100)
    by_type = api.queue_lengths("basic_kobuki")
    assert set(by_type) == set(kobukis)
    assert by_type[kobukis[0]]["qlen"] == 1 and by_type[kobukis[1]]["qlen"] == 0
    assert set(api.queue_lengths(deployments=[kobukis[1]])) == {kobukis[1]}
    wait_status(api, held.id, "READY")
    api.terminate(held.id)


def test_ci_new(api: RerobotsClient):
    assert len(api.new_ci_build("https://example.org/robot-fw.git")["pid"]) == 22


# -- tokens and rate limits ------------------------------------------------------------


def test_revoke_own_token(api: RerobotsClient):
    assert api.instances()["workspace_instances"] == []
    api.revoke_token()
    with pytest.raises(WrongAuthToken):
        api.instances()


def test_purge_revokes_every_token_of_the_user(sim: Simulator):
    other = sim.add_user("bilbo")
    second = sim.world.add_token("bilbo") if hasattr(sim.world, "add_token") else None
    with RerobotsClient(other, sim.url, ignore_env=True) as bilbo:
        bilbo.purge_tokens()
        with pytest.raises(WrongAuthToken):
            bilbo.instances()
    if second:
        with RerobotsClient(second, sim.url, ignore_env=True) as again, \
                pytest.raises(WrongAuthToken):
            again.instances()
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as alice:
        assert alice.instances()["workspace_instances"] == []


def test_revoke_needs_a_token(sim: Simulator):
    with RerobotsClient(None, sim.url, ignore_env=True) as anonymous:
        with pytest.raises(WrongAuthToken):
            anonymous.revoke_token(hashlib.sha256(b"x").hexdigest())


def test_rate_limit_headers_and_pacing(sim: Simulator):
    fake_now = [time.time()]
    slept: list[float] = []
    sim.world.configure(token_budget=3, rate_window=100.0)

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        sim.world.configure(token_budget=1000)  # the window "resets" while we sleep

    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=sleep,
                        clock=lambda: fake_now[0]) as api:
        api.instances()
        first = api.rate_limit
        assert first is not None and first.limit == 3 and first.remaining == 2
        api.instances()
        api.instances()
        assert api.rate_limit.remaining == 0
        assert slept == []
        api.instances()  # paced: waits for the reset instead of being refused
        # The window opened at the server's first request, which real time may put later
        # than fake_now on a busy machine; Reset is rounded up.
        late = time.time() - fake_now[0]
        assert len(slept) == 1 and 0 < slept[0] <= 101.0 + late


def test_rate_limit_spent_is_rate_limited_not_auth(sim: Simulator):
    sim.world.configure(token_budget=1, rate_window=3600.0)
    with RerobotsClient(sim.token, sim.url, ignore_env=True, retries=0,
                        max_rate_wait=1.0) as api:
        api.instances()
        with pytest.raises(RateLimited) as raised:
            api.instances()
        assert raised.value.reset is not None


def test_server_errors_are_retried_for_idempotent_calls(sim: Simulator):
    sim.world.set_endpoint_fault("instances", error_rate=1.0, error_status=503)
    naps: list[float] = []
    with RerobotsClient(sim.token, sim.url, ignore_env=True, retries=2,
                        sleep=naps.append) as api:
        with pytest.raises(ServerError):
            api.instances()
        assert api.calls == 3 and len(naps) == 2
        sim.world.set_endpoint_fault("instances", error_rate=0.0)
        assert api.instances()["workspace_instances"] == []


def test_transport_error_when_nobody_listens():
    with RerobotsClient("t", "http://127.0.0.1:9", ignore_env=True, retries=1,
                        sleep=lambda s: None, timeout=2) as api:
        with pytest.raises(TransportError, match="no answer"):
            api.workspace_types()


def test_malformed_answer(sim: Simulator):
    with RerobotsClient(sim.token, sim.url + "/instance", ignore_env=True) as api:
        # GET /instance/workspaces is no route: the server's 400, not a crash.
        with pytest.raises(APIError):
            api.workspace_types()
    with pytest.raises(MalformedResponse):
        RerobotsClient._expect({"nope": 1}, "workspace_types", list, "GET /workspaces")


# -- lost answers --------------------------------------------------------------------


def test_lost_new_answer_is_reconciled_not_rented_twice(sim: Simulator):
    sim.world.configure(lose_new_response=1.0)
    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=lambda s: None) as api:
        new = api.new_instance("basic_kobuki", keepalive=True)
        assert new.success and new.reconciled
        listing = api.instances(include_init_fail=True)["workspace_instances"]
        assert listing == [new.id]
        sim.world.configure(lose_new_response=0.0)
        wait_status(api, new.id, "READY")
        api.terminate(new.id)


def test_lost_answer_with_a_known_instance_is_not_confused(sim: Simulator):
    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=lambda s: None) as api:
        kobukis = kobuki_deployments(api)
        mine = api.new_instance(kobukis[0]).id
        sim.world.configure(lose_new_response=1.0)
        new = api.new_instance("basic_kobuki", known_ids=lambda: [mine])
        assert new.reconciled and new.id != mine
        sim.world.configure(lose_new_response=0.0)
        for ident in (mine, new.id):
            wait_status(api, ident, "READY")
            api.terminate(ident)


def test_server_error_on_new_that_created_nothing_is_not_resent(sim: Simulator):
    sim.world.set_endpoint_fault("new", error_rate=1.0, error_status=502)
    naps: list[float] = []
    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=naps.append) as api:
        with pytest.raises(ServerError):
            api.new_instance("basic_kobuki")
        # One POST, then three looks in GET /instances 1 s apart; never a second POST.
        assert api.calls == 4 and naps == [1.0, 1.0]
        assert api.instances(include_init_fail=True)["workspace_instances"] == []


def test_connection_refused_is_known_unsent():
    with RerobotsClient("t", "http://127.0.0.1:9", ignore_env=True, retries=0) as api:
        with pytest.raises(TransportError) as raised:
            api.new_instance("basic_kobuki")
        assert raised.value.not_sent is True
        assert api.calls == 2  # sent once more, safely: it never reached a server


def test_a_lost_answer_never_adopts_an_instance_this_client_was_given(sim: Simulator):
    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=lambda s: None) as api:
        mine = api.new_instance("basic_kobuki").id  # e.g. the session's instance
        sim.world.fail_next("new", 1, 503)  # answers 503 without acting
        with pytest.raises(ServerError):
            api.new_instance("basic_kobuki")
        assert api.instances()["workspace_instances"] == [mine]
        wait_status(api, mine, "READY")
        api.terminate(mine)
