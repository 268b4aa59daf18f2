"""The official Python client, ``rerobots==0.11.0``, works unchanged against the simulator."""

from __future__ import annotations

import importlib.util
import secrets
import time
from collections.abc import Iterator

import pytest
import requests
from rerobots.api import (
    APIClient,
    BusyWorkspaceDeployment,
    Error,
    InstanceNotFound,
    WrongAuthToken,
)
from rerobots.instances import Instance

from pytest_rerobots.sim import Simulator

KOBUKI_US = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
MISTY = "38496d28-386c-4cad-8daf-ef8a86616687"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


# rerobots 0.11 reads the private key from the POST /new answer, as the seed describes, and
# does not retry the 404s right after it: the seed's variant, and no 404 window.
SEED_SHAPES = dict(sshkey_in_new_response=True, not_found_window=0.0)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(ssh_backend="none", ready_delay=0.05, terminate_delay=0.05,
                   **SEED_SHAPES) as running:
        yield running
        running.check()


@pytest.fixture
def client(sim: Simulator) -> APIClient:
    return APIClient(api_token=sim.token, base_uri=sim.url)


def _wait_status(client: APIClient, iid: str, status: str, timeout: float = 3.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_instance_info(iid)
        if info["status"] == status or time.monotonic() > deadline:
            assert info["status"] == status, info
            return info
        time.sleep(0.01)


def test_listing(client: APIClient) -> None:
    assert client.get_wtypes() == ["basic_kobuki", "fixed_crazyflie", "fixed_misty2"]
    kobukis = client.get_wdeployments(types=["basic_kobuki"])
    assert {d["region"] for d in kobukis} == {"us:cali", "eu:de"}
    assert all(d["type"] == "basic_kobuki" and d["queuelen"] == 0 for d in kobukis)
    page, page_count = client.get_wdeployments(max_per_page=1, page=2)
    assert len(page) == 1
    assert page_count == 4
    assert [d["id"] for d in client.get_wdeployments(query="misty")] == [MISTY]
    info = client.get_wdeployment_info(MISTY)
    assert info["type"] == "fixed_misty2"
    assert info["online"] is True


def test_instance_lifecycle(client: APIClient) -> None:
    payload = client.request_instance("fixed_misty2", duration=600)
    assert payload["success"] is True
    iid = payload["id"]
    assert payload["sshkey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    info = _wait_status(client, iid, "READY")
    assert info["fwd"]["ipv4"] == "127.0.0.1"
    assert "expires" in info
    assert client.get_instances() == [iid]
    assert client.get_instances(max_per_page=5, page=1) == ([iid], 1)
    assert client.get_firewall_rules(iid) == []
    client.add_firewall_rule(iid, "ACCEPT")
    client.add_firewall_rule(iid, "REJECT", source_address="10.0.0.0/8")
    assert client.get_firewall_rules(iid) == [["127.0.0.1", "ACCEPT"], ["10.0.0.0/8", "REJECT"]]
    client.flush_firewall_rules(iid)
    assert client.get_firewall_rules(iid) == []
    client.terminate_instance(iid)
    _wait_status(client, iid, "TERMINATED")
    assert client.get_instances() == []
    assert client.get_instances(include_terminated=True) == [iid]
    with pytest.raises(Error, match="instance already terminated"):
        client.terminate_instance(iid)


def test_errors_it_maps(client: APIClient, sim: Simulator) -> None:
    with pytest.raises(InstanceNotFound):
        client.get_instance_info(UNKNOWN)
    for bad in (APIClient(api_token=secrets.token_hex(8), base_uri=sim.url),
                APIClient(ignore_env=True, base_uri=sim.url)):
        with pytest.raises(WrongAuthToken):
            bad.get_instances()
    client.request_instance(MISTY)
    with pytest.raises(BusyWorkspaceDeployment):
        client.request_instance(MISTY)
    # By workspace type the server answers 404 "All feasible ...": not the client's Busy.
    with pytest.raises(Error, match="All feasible workspace deployments are busy"):
        client.request_instance("fixed_misty2")
    with pytest.raises(Error, match="no matching wdeployment found"):
        client.request_instance("no_such_type")
    iid = client.request_instance(KOBUKI_US)["id"]
    with pytest.raises(Error, match="cannot terminate instance that is init"):
        client.terminate_instance(iid)


def test_reservations(client: APIClient) -> None:
    holder = client.request_instance(MISTY, reserve=True)
    assert holder["success"] is True
    reservation = client.request_instance(MISTY, reserve=True)
    assert reservation["success"] is False
    listed = client.get_reservations()
    assert [r["id"] for r in listed] == [reservation["id"]]
    assert listed[0]["desc"] == f"wd:{MISTY}"
    client.cancel_reservation(reservation["id"])
    assert client.get_reservations() == []
    with pytest.raises(Error, match="reservation not found"):
        client.cancel_reservation(reservation["id"])


def test_vpn_ci_and_tokens(client: APIClient, sim: Simulator) -> None:
    iid = client.request_instance(MISTY, vpn=True)["id"]
    _wait_status(client, iid, "READY")
    assert set(client.get_vpn_newclient(iid)) == {"client_id", "ovpn"}
    pid = client.create_ci_project("https://example.org/fw.git")
    assert pid in client.get_ci_projects()
    assert client.submit_ci_job(pid, "main", "0123abc") == 1
    token = sim.add_user("temp")
    temp = APIClient(api_token=token, base_uri=sim.url)
    temp.revoke_token(token=token)
    with pytest.raises(WrongAuthToken):
        temp.get_instances()
    other = APIClient(api_token=sim.add_user("temp2"), base_uri=sim.url)
    other.purge()
    with pytest.raises(WrongAuthToken):
        other.get_instances()


def test_instance_class(client: APIClient) -> None:
    robot = Instance(workspace_types=["fixed_misty2"], apic=client)
    deadline = time.monotonic() + 3
    while robot.get_status() == "INIT" and time.monotonic() < deadline:
        time.sleep(0.01)
    details = robot.get_details()
    assert details["status"] == "READY"
    assert details["type"] == "fixed_misty2"
    assert details["conn"]["type"] == "sshtun"
    assert isinstance(details["conn"]["port"], int)
    attached = Instance(instance_id=robot._id, apic=client)
    assert attached.get_status() == "READY"
    robot.terminate()
    deadline = time.monotonic() + 3
    while robot.get_status() != "TERMINATED" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert robot.get_status() == "TERMINATED"


@pytest.mark.skipif(importlib.util.find_spec("pytest_rerobots.sim.hosts") is None,
                    reason="pytest_rerobots.sim.hosts is not there yet")
def test_instance_class_over_ssh() -> None:
    """The whole official flow: rent, wait, open the firewall, ssh with the returned key."""
    with Simulator(ready_delay=0.05, terminate_delay=0.05, **SEED_SHAPES) as sim:
        client = APIClient(api_token=sim.token, base_uri=sim.url)
        robot = Instance(workspace_types=["basic_kobuki"], apic=client)
        try:
            deadline = time.monotonic() + 5
            while robot.get_status() == "INIT" and time.monotonic() < deadline:
                time.sleep(0.02)
            robot.add_firewall_rule("ACCEPT")
            robot.start_sshclient()
            assert robot.exec_ssh("bin/robot-status", timeout=10) == (
                b"battery=97 fw=none base=ok\n")
        finally:
            robot.terminate()
        sim.check()


def test_no_server_means_requests_error() -> None:
    with Simulator(ssh_backend="none") as sim:
        url = sim.url
    with pytest.raises(requests.ConnectionError):
        APIClient(api_token=secrets.token_hex(8), base_uri=url).get_wtypes()
