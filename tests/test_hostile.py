"""Hostile answers (issue 14, the client's side): the real simulator, reached through a
rewriting proxy in the client's own HTTP session, which replaces chosen answers' bodies or
headers before the client reads them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import requests.adapters

from pytest_rerobots import retry
from pytest_rerobots.client import RerobotsClient
from pytest_rerobots.ending import end
from pytest_rerobots.errors import MalformedResponse, ServerError, UnreadableNewAnswer
from pytest_rerobots.instance import Instance
from pytest_rerobots.outcome import Outcome
from pytest_rerobots.sim import Simulator

Rewrite = Callable[[requests.PreparedRequest, requests.Response], None]


class RewritingProxy(requests.adapters.HTTPAdapter):
    """Sends every request on to the simulator, then lets ``rewrite`` change the answer;
    ``sent`` lists ``(method, path)`` of everything that went out."""

    def __init__(self, rewrite: Rewrite) -> None:
        super().__init__()
        self.rewrite = rewrite
        self.sent: list[tuple[str, str]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        path = requests.utils.urlparse(request.url or "").path
        self.sent.append((request.method or "", path))
        response = super().send(request, **kwargs)
        assert response.content is not None  # read it all before the rewrite replaces it
        self.rewrite(request, response)
        return response


def _client(sim: Simulator, rewrite: Rewrite) -> tuple[RerobotsClient, RewritingProxy]:
    proxy = RewritingProxy(rewrite)
    session = requests.Session()
    session.mount("http://", proxy)
    return RerobotsClient(sim.token, sim.url, session=session), proxy


def _on_new(body: Callable[[bytes], bytes]) -> Rewrite:
    def rewrite(request: requests.PreparedRequest, response: requests.Response) -> None:
        if request.method == "POST" and "/new" in (request.url or ""):
            response._content = body(response.content)
    return rewrite


def _with_id(value: Any) -> Callable[[bytes], bytes]:
    def body(content: bytes) -> bytes:
        payload = json.loads(content)
        payload["id"] = value
        return json.dumps(payload).encode()
    return body


def _without_id(content: bytes) -> bytes:
    payload = json.loads(content)
    del payload["id"]
    return json.dumps(payload).encode()


@pytest.mark.parametrize("body", [
    pytest.param(lambda c: b"<html><body>502 Bad Gateway</body></html>", id="html"),
    pytest.param(lambda c: c[: len(c) // 2], id="truncated"),
    pytest.param(_without_id, id="no-id"),
    pytest.param(_with_id(12345), id="int-id"),
    pytest.param(_with_id("../new/basic_kobuki"), id="path-id"),
])
def test_unreadable_new_answer_is_reconciled_and_ended(fast_sim: Simulator, body: Any) -> None:
    client, proxy = _client(fast_sim, _on_new(body))
    inst = Instance.build(client, "basic_kobuki", connect=False, fast_polling=True,
                          notfound_grace=2.0, ready_timeout=10.0)
    begun = time.monotonic()
    with pytest.raises(UnreadableNewAnswer) as caught:
        inst.start()
    took = time.monotonic() - begun
    made = caught.value.made
    assert made is not None and made == inst.id, str(caught.value)
    assert "which is ended" in str(caught.value)
    assert inst.outcome == Outcome.TERMINATED  # not "never rented"
    assert fast_sim.live_instances() == []  # ended at once, not by keepalive
    # One rental only: the id never went into a path, so no second POST /new.
    assert [p for m, p in proxy.sent if m == "POST" and p.startswith("/new")] == [
        "/new/basic_kobuki"]
    assert not any("/new/" in p and not p.startswith("/new") for _, p in proxy.sent)
    assert took < 10


def test_bad_id_never_reaches_a_path(fast_sim: Simulator) -> None:
    client, proxy = _client(fast_sim, lambda q, r: None)
    for bad in ("../new/basic_kobuki", "x" * 36, "", "00000000-0000-4000-8000-00000000000/"):
        with pytest.raises(MalformedResponse, match="not an instance id"):
            client.terminate(bad)
        with pytest.raises(MalformedResponse, match="not an instance id"):
            client.instance(bad)
    assert proxy.sent == []


@pytest.mark.parametrize("reset", ["nan", "garbage", "-5", "inf", ""])
def test_rate_limit_headers_read_defensively(fast_sim: Simulator, reset: str) -> None:
    def rewrite(request: requests.PreparedRequest, response: requests.Response) -> None:
        response.headers["X-RateLimit-Reset"] = reset
        response.headers["X-RateLimit-Remaining"] = "0"
    client, _ = _client(fast_sim, rewrite)
    assert "basic_kobuki" in client.workspace_types()
    assert client.workspace_types()  # a second call: no pacing on a budget it cannot read
    assert client.rate_limit is None


def test_terminate_that_keeps_failing_is_bounded(fast_sim: Simulator) -> None:
    fast_sim.set_not_found_window(0)
    client = RerobotsClient(fast_sim.token, fast_sim.url)
    new = client.new_instance("basic_kobuki", keepalive=True)
    deadline = time.monotonic() + 5
    while client.instance(new.id)["status"] != "READY" and time.monotonic() < deadline:
        time.sleep(0.02)

    def rewrite(request: requests.PreparedRequest, response: requests.Response) -> None:
        if "/terminate/" in (request.url or ""):
            response.status_code = 503
            response._content = b'{"error_message": "service unavailable"}'
    hostile, proxy = _client(fast_sim, rewrite)
    naps: list[float] = []
    with pytest.raises(ServerError):
        end(hostile, new.id, deadline=120.0, sleep=naps.append)
    sent = [p for m, p in proxy.sent if p.startswith("/terminate/")]
    assert len(sent) == retry.TERMINATE_ERRORS
    assert sum(naps) < 30  # not minutes of backoff
    # The proxy hid the simulator's answer: the first terminate did end it.
    assert client.terminate(new.id) is False


def test_no_token_in_repr_or_vars_of_what_holds_it(fast_sim: Simulator) -> None:
    from pytest_rerobots.settings import resolve
    from pytest_rerobots.watchdog import Watchdog

    token = fast_sim.token
    client = RerobotsClient(token, fast_sim.url)
    settings = resolve({}, {"REROBOTS_API_TOKEN": token}, {})
    watchdog = Watchdog(fast_sim.url, token)
    inst = Instance.build(client, "basic_kobuki")
    for held in (client, settings, watchdog, inst, client._auth):
        assert token not in repr(held)
        assert token not in repr(vars(held)), type(held).__name__
    assert settings.token == token and client.has_token  # still there, for the one use
    assert client.workspace_types()  # and the client still authenticates
    assert client.instances()["workspace_instances"] == []


def test_spent_budget_is_shown_and_bounded_by_the_ready_timeout(fast_sim: Simulator) -> None:
    far = float(int(time.time()) + 3600)  # whole seconds, as the header carries them

    def rewrite(request: requests.PreparedRequest, response: requests.Response) -> None:
        if request.method == "GET" and "/instance/" in (request.url or ""):
            response.headers["X-RateLimit-Limit"] = "3600"
            response.headers["X-RateLimit-Remaining"] = "0"
            response.headers["X-RateLimit-Reset"] = f"{far:.0f}"
            if response.status_code == 200:  # still starting, as far as the client knows
                payload = json.loads(response.content)
                payload["status"] = "INIT"
                response._content = json.dumps(payload).encode()
    client, proxy = _client(fast_sim, rewrite)
    inst = Instance.build(client, "basic_kobuki", connect=False, fast_polling=True,
                          ready_timeout=3.0, init_retries=0)
    seen: list[str | None] = []

    class Listener:
        def __getattr__(self, name: str) -> Any:
            return lambda *args: seen.append(inst.busy_reason) if name == "progress" else None
    inst.listeners.append(Listener())
    begun = time.monotonic()
    with pytest.raises(Exception, match=r"not READY after 3 s"):
        inst.start()
    assert time.monotonic() - begun < 10  # not one sleep of the whole wait (or an hour)
    at = time.strftime("%H:%M:%S", time.gmtime(far))
    assert any(r and f"rate limit spent: waiting for its reset at {at} UTC" in r for r in seen)
    polls = [p for m, p in proxy.sent if m == "GET" and p.startswith("/instance/")]
    assert len(polls) == 1  # no call sent into a spent budget
    assert inst.outcome == Outcome.TERMINATED


def test_connect_timeout_under_rules_that_exclude_this_runner_says_why(
        fast_sim: Simulator) -> None:
    from pytest_rerobots.errors import SSHConnectError

    client = RerobotsClient(fast_sim.token, fast_sim.url)
    inst = Instance.build(client, "basic_kobuki", fast_polling=True, allow=("192.0.2.0/24",),
                          connect_timeout=1.5, init_retries=0)
    begun = time.monotonic()
    with pytest.raises(SSHConnectError) as caught:
        inst.start()
    assert time.monotonic() - begun < 15
    message = str(caught.value)
    assert "admits only 192.0.2.0/24 (--rerobots-allow)" in message
    assert "excludes this runner's address 127.0.0.1" in message
    assert inst.outcome == Outcome.TERMINATED
