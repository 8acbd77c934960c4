"""The web page over HTTP (Starlette's TestClient): login, pending reviews, decisions exactly
once, the fleet and spend pages, and bad input (forged and replayed posts, unknown threads,
threads not waiting, the wrong role): an error page and nothing changed."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from fleet.access import add_identity
from fleet.models import Status
from graph.orchestrator import Orchestrator
from graph.ui import SERVER, create_app
from tests.conftest import small_config

COUNCIL = {"policy": "reference", "approve_threshold": 0.99, "deny_threshold": 0.01,
           "auto_approve_max_gpus": 1}
TWO = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 1,
       "gpu_type": "A100"}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The page over a state directory with identities and two vision requests waiting."""
    state = tmp_path / "s"
    state.mkdir()
    tokens = {n: add_identity(state, n, r, p) for n, r, p in [
        ("root", "admin", None), ("alice", "member", "vision"), ("dave", "approver", "vision"),
        ("erin", "approver", "vision"), ("bob", "member", "speech")]}
    config = small_config(council=COUNCIL, clock={"time_scale": 3600})
    orch = Orchestrator(state, config, identity=SERVER)
    asker = orch.acting_as(orch.identity)
    for tid in ("r1", "r2"):
        assert asker.request(TWO, thread_id=tid).status is Status.PENDING_REVIEW
    placed = asker.request(TWO | {"count": 1}, thread_id="placed", wait=False)
    assert placed.status is Status.ALLOCATED and placed.allocation is not None
    asker.release(placed.allocation.id)  # some history for the review page's chart
    app = create_app(orch)
    yield {"orch": orch, "tokens": tokens, "app": app}
    for thread in app.state.ui.background:  # decided threads run to their lease's end
        thread.join(timeout=60)
    orch.close()


def login(site: dict[str, Any], name: str) -> TestClient:
    client = TestClient(site["app"], base_url="http://127.0.0.1")
    r = client.post("/login", data={"token": site["tokens"][name]}, follow_redirects=False)
    assert r.status_code == 303
    return client


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page
    return found.group(1)


def test_login_is_required_and_checked(site: dict[str, Any]) -> None:
    client = TestClient(site["app"], base_url="http://127.0.0.1")
    r = client.get("/reviews", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("/login")
    assert client.post("/login", data={"token": "forged"}).status_code == 403
    r = login(site, "dave").get("/reviews")
    assert r.status_code == 200 and "dave (approver of vision)" in r.text


def test_pending_reviews_and_what_a_reviewer_sees(site: dict[str, Any]) -> None:
    dave = login(site, "dave")
    listing = dave.get("/reviews").text
    assert "r1" in listing and "r2" in listing and "placed" not in listing
    page = dave.get("/reviews/r1").text
    for shown in ("cost", "fairness", "capacity", "risk", "0.95", "worst case $10.24"):
        assert shown in page
    assert "<svg" in page and "If approved" in page and "$10.24" in page  # 2 x $5.12 x 1 h
    assert 'name="decision" value="approve"' in page
    bob = login(site, "bob")
    assert "r1" not in bob.get("/reviews").text
    r = bob.get("/reviews/r1")
    assert r.status_code == 403 and "may not read threads of project vision" in r.text


def test_approve_and_deny_resume_the_threads(site: dict[str, Any]) -> None:
    dave = login(site, "dave")
    token = csrf(dave.get("/reviews/r1").text)
    r = dave.post("/reviews/r1/decide", data={"csrf": token, "decision": "approve",
                                               "comment": "go"})
    assert r.status_code == 200 and ("allocated" in r.text or "released" in r.text)
    r = dave.post("/reviews/r2/decide", data={"csrf": token, "decision": "deny",
                                               "comment": "not now"})
    assert r.status_code == 200 and "denied by dave (not now)" in r.text
    root = site["orch"]
    assert root.outcome("r2").status is Status.DENIED
    decided = {(e.target, e.action, e.who) for e in root.audit() if e.key.startswith("decide")}
    assert decided == {("r1", "approve", "dave"), ("r2", "deny", "dave")}
    assert "r1" not in dave.get("/reviews").text


def test_bad_posts_change_nothing(site: dict[str, Any]) -> None:
    orch: Orchestrator = site["orch"]
    dave, alice = login(site, "dave"), login(site, "alice")
    token = csrf(dave.get("/reviews/r1").text)
    before = orch.services.ledger.dump()
    cases = [
        (dave, "/reviews/r1/decide", {"csrf": "0" * 64, "decision": "approve"}, 403),
        (dave, "/reviews/r1/decide", {"decision": "approve"}, 403),
        (alice, "/reviews/r1/decide", {"csrf": csrf(alice.get("/reviews/r1").text)
                                       if "csrf" in alice.get("/reviews/r1").text else "x",
                                       "decision": "approve"}, 403),
        (dave, "/reviews/r1/decide", {"csrf": token, "decision": "maybe"}, 400),
        (dave, "/reviews/nope/decide", {"csrf": token, "decision": "approve"}, 404),
        (dave, "/reviews/placed/decide", {"csrf": token, "decision": "approve"}, 409),
    ]
    for client, path, form, status in cases:
        r = client.post(path, data=form)
        assert r.status_code == status, (path, form, r.text[-400:])
        assert 'class="error"' in r.text
    assert orch.services.ledger.dump() == before
    ok = dave.post("/reviews/r1/decide", data={"csrf": token, "decision": "approve"})
    assert ok.status_code == 200
    replay = dave.post("/reviews/r1/decide", data={"csrf": token, "decision": "deny"})
    assert replay.status_code == 409 and "approve by dave" in replay.text


def test_two_approvers_at_once_one_decision(site: dict[str, Any]) -> None:
    clients = [login(site, "dave"), login(site, "erin")]
    tokens = [csrf(c.get("/reviews/r1").text) for c in clients]
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def post(i: int) -> None:
        barrier.wait()
        r = clients[i].post("/reviews/r1/decide",
                            data={"csrf": tokens[i], "decision": ["approve", "deny"][i]})
        codes.append(r.status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 409]
    decided = [e for e in site["orch"].audit() if e.key.startswith("decide:")]
    assert len(decided) == 1


def test_fleet_and_spend(site: dict[str, Any], tmp_path: Path) -> None:
    root = login(site, "root")
    fleet = root.get("/fleet").text
    assert "a100-0" in fleet and "Allocations" in fleet and "vision" in fleet
    spend = root.get("/spend").text
    assert "vision" in spend and "No simulation report" in spend
    bob = login(site, "bob").get("/fleet").text
    assert "a-" not in re.sub(r"<th>.*?</th>", "", bob.split("Allocations")[1])


def test_spend_shows_the_latest_simulation(site: dict[str, Any], tmp_path: Path) -> None:
    """The cost figures of a report written by the simulator's own writer."""
    from sim.report import dump

    report = tmp_path / "simulation"
    report.mkdir()
    (report / "metrics.json").write_text(dump(
        {"naive": {"total_cost_usd": 1000.0, "cost_per_useful_gpu_hour": 2.5},
         "gpu-agent": {"total_cost_usd": 640.0, "cost_per_useful_gpu_hour": 1.6}}, {}, {}))
    app = create_app(site["orch"], simulation=report)
    client = TestClient(app, base_url="http://127.0.0.1")
    client.post("/login", data={"token": site["tokens"]["root"]})
    page = client.get("/spend").text
    assert "Latest simulation" in page and "36.0 %" in page and "$640.00" in page
