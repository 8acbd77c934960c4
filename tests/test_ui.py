"""The web page over HTTP (Starlette's TestClient): login, pending reviews, decisions exactly
once, the fleet and spend pages, and bad input (forged and replayed posts, unknown threads,
threads not waiting, the wrong role): an error page and nothing changed. Also: a forged Host
(a DNS-rebinding page) and a foreign Origin are refused, malformed ids are a one-line 404,
what a reviewer reads (who asked, how long it waited, the cost explained, who decided), the
release button, the unmonitored flag and the readable labels."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from fleet.access import Identity, add_identity
from fleet.errors import InvalidInput
from fleet.models import ReleaseReason, Status
from graph.orchestrator import Orchestrator
from graph.ui import SERVER, create_app
from tests.conftest import run_cli, small_config

COUNCIL = {
    "policy": "reference",
    "approve_threshold": 0.99,
    "deny_threshold": 0.01,
    "auto_approve_max_gpus": 1,
    "auto_approve_max_usd": 100_000,
}
ALICE = Identity("alice", "vision", "member")
TWO = {
    "project": "vision",
    "purpose": "training",
    "count": 2,
    "duration_hours": 1,
    "gpu_type": "A100",
}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The page over a state directory with identities and two vision requests waiting."""
    state = tmp_path / "s"
    state.mkdir()
    tokens = {
        n: add_identity(state, n, r, p)
        for n, r, p in [
            ("root", "admin", None),
            ("alice", "member", "vision"),
            ("dave", "approver", "vision"),
            ("erin", "approver", "vision"),
            ("bob", "member", "speech"),
        ]
    }
    config = small_config(council=COUNCIL, clock={"time_scale": 3600})
    orch = Orchestrator(state, config, identity=SERVER)
    asker = orch.acting_as(ALICE)  # requests carry who asked
    for tid in ("r1", "r2"):
        assert (
            asker.request(TWO | {"requested_by": "alice"}, thread_id=tid).status
            is Status.PENDING_REVIEW
        )
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


def test_a_damaged_access_file_is_a_page_saying_so(site: dict[str, Any]) -> None:
    """access.toml damaged by a hand edit while the page runs: no caller can be known, so
    every page (and a log-in) says what the CLI says, in one line (503), not a traceback and
    not "unknown token"; nothing changes. A visitor without a cookie is told the same, not
    sent to a log-in form that cannot work."""
    orch: Orchestrator = site["orch"]
    dave = login(site, "dave")
    token = csrf(dave.get("/reviews/r1").text)
    access = orch.services.state_dir / "access.toml"
    access.write_text(access.read_text().replace('role = "member"', 'role = "boss"', 1))
    before = orch.services.ledger.dump()
    damaged = f"{access} is damaged: [[identity]] 2: role must be one of"
    anonymous = TestClient(site["app"], base_url="http://127.0.0.1")
    for r in (
        dave.get("/reviews"),
        dave.get("/reviews/r1"),
        dave.get("/fleet"),
        dave.post("/reviews/r1/decide", data={"csrf": token, "decision": "approve"}),
        anonymous.post("/login", data={"token": site["tokens"]["root"]}, follow_redirects=False),
        anonymous.get("/reviews", follow_redirects=False),
        anonymous.get("/login"),
    ):
        assert r.status_code == 503, r.text[-400:]
        shown = re.findall(r'<p class="error">(.*?)</p>', r.text)
        assert len(shown) == 1 and shown[0].startswith(_html(damaged)), shown
        assert "restore it from a backup" in shown[0] and "unknown token" not in r.text
        assert "set-cookie" not in r.headers
    assert orch.services.ledger.dump() == before
    assert orch.outcome("r1").status is Status.PENDING_REVIEW


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
    assert r.status_code == 404 and "no thread &#x27;r1&#x27;" in r.text  # as if none


def test_approve_and_deny_resume_the_threads(site: dict[str, Any]) -> None:
    dave = login(site, "dave")
    token = csrf(dave.get("/reviews/r1").text)
    r = dave.post(
        "/reviews/r1/decide", data={"csrf": token, "decision": "approve", "comment": "go"}
    )
    assert r.status_code == 200 and ("allocated" in r.text or "released" in r.text)
    r = dave.post(
        "/reviews/r2/decide", data={"csrf": token, "decision": "deny", "comment": "not now"}
    )
    assert r.status_code == 200 and "denied by dave (not now)" in r.text
    root = site["orch"]
    assert root.outcome("r2").status is Status.DENIED
    decided = {(e.target, e.action, e.who) for e in root.audit() if e.key.startswith("decide")}
    assert decided == {("r1", "approve", "dave"), ("r2", "deny", "dave")}
    assert "r1" not in dave.get("/reviews").text


def test_an_approver_may_drop_the_guardrails_the_page_shows(tmp_path: Path) -> None:
    """Where the fleet opts in to guardrails, a split shows them "if approved" with a box to
    approve without them; ticked, the thread runs as asked and the page says who dropped
    them."""
    state = tmp_path / "s"
    state.mkdir()
    token = add_identity(state, "dave", "approver", "vision")
    guarded = COUNCIL | {"guard_share": 0.99}  # guard at 0.98, above the request's 0.95
    config = small_config(council=guarded, clock={"time_scale": 3600})  # its hour: a second
    orch = Orchestrator(state, config, identity=SERVER)
    try:
        asked = orch.acting_as(ALICE).request(TWO, thread_id="g1")
        assert asked.status is Status.PENDING_REVIEW and asked.guardrails() is not None
        app = create_app(orch)
        dave = TestClient(app, base_url="http://127.0.0.1")
        assert dave.post("/login", data={"token": token}, follow_redirects=False).is_redirect
        page = dave.get("/reviews/g1").text
        assert "Guardrails (if approved)" in page and 'name="guardrails" value="drop"' in page
        form = {"csrf": csrf(page), "decision": "approve", "guardrails": "drop"}
        r = dave.post("/reviews/g1/decide", data=form)
        assert r.status_code == 200 and "Guardrails (dropped by dave)" in r.text
        shown = orch.outcome("g1").guardrails()
        assert shown is not None and shown[0] == "dropped by dave"
        for thread in app.state.ui.background:
            thread.join(timeout=60)
    finally:
        orch.close()


def test_bad_posts_change_nothing(site: dict[str, Any]) -> None:
    orch: Orchestrator = site["orch"]
    dave, alice = login(site, "dave"), login(site, "alice")
    token = csrf(dave.get("/reviews/r1").text)
    before = orch.services.ledger.dump()
    cases = [
        (dave, "/reviews/r1/decide", {"csrf": "0" * 64, "decision": "approve"}, 403),
        (dave, "/reviews/r1/decide", {"decision": "approve"}, 403),
        (
            alice,
            "/reviews/r1/decide",
            {
                "csrf": csrf(alice.get("/reviews/r1").text)
                if "csrf" in alice.get("/reviews/r1").text
                else "x",
                "decision": "approve",
            },
            403,
        ),
        (dave, "/reviews/r1/decide", {"csrf": token, "decision": "maybe"}, 400),
        (  # refused, not cut to fit (the limit nodes.review gives every other caller)
            dave,
            "/reviews/r1/decide",
            {"csrf": token, "decision": "deny", "comment": "x" * 501},
            400,
        ),
        (dave, "/reviews/nope/decide", {"csrf": token, "decision": "approve"}, 404),
        (dave, "/reviews/placed/decide", {"csrf": token, "decision": "approve"}, 409),
    ]
    for client, path, form, status in cases:
        r = client.post(path, data=form)
        assert r.status_code == status, (path, form, r.text[-400:])
        assert 'class="error"' in r.text
    anonymous = TestClient(site["app"], base_url="http://127.0.0.1")
    huge = anonymous.post("/reviews/r1/decide", content=b"x" * (64 * 1024 + 1))
    assert huge.status_code == 413  # read before anyone is known: never more than a form
    assert orch.services.ledger.dump() == before
    ok = dave.post(
        "/reviews/r1/decide",
        data={"csrf": token, "decision": "approve", "comment": "ok \U0001f468\u200d\U0001f469"},
    )  # a joiner is text (an emoji's, Persian's), not a control character
    assert ok.status_code == 200
    replay = dave.post("/reviews/r1/decide", data={"csrf": token, "decision": "deny"})
    assert replay.status_code == 409 and "approve by dave" in replay.text


FORM = "application/x-www-form-urlencoded"


def test_a_body_that_is_not_one_utf8_form_is_refused(site: dict[str, Any]) -> None:
    """Every form the page takes (log in, decide, release): another content type (415), a
    field given twice, bytes that are not UTF-8 or a field without "=" (400) are one line and
    change nothing, where they were read as the first value, with U+FFFD, or as a form."""
    orch: Orchestrator = site["orch"]
    aid = live_allocation(site)
    dave = login(site, "dave")
    token = csrf(dave.get("/reviews/r1").text)
    before = orch.services.ledger.dump()
    decide, release = "/reviews/r1/decide", f"/allocations/{aid}/release"
    root = site["tokens"]["root"]
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        (decide, f"csrf={token}&decision=deny&decision=approve".encode(), {}, 400, "twice"),
        (decide, f"csrf={token}&decision=deny&comment=a&comment=b".encode(), {}, 400, "twice"),
        (decide, f"csrf={token}&decision=deny&decisio%6E=approve".encode(), {}, 400, "twice"),
        (decide, f"csrf={token}&decision=deny&comment=caf%E9".encode(), {}, 400, "not UTF-8"),
        (
            decide,
            f"csrf={token}&decision=deny&comment=caf\xe9".encode("latin-1"),
            {},
            400,
            "not UTF-8",
        ),
        (decide, f"csrf={token}&decision=deny&oops".encode(), {}, 400, "malformed"),
        (release, f"csrf={token}&csrf={token}".encode(), {}, 400, "twice"),
        (
            decide,
            f"csrf={token}&decision=deny".encode(),
            {"Content-Type": "text/plain"},
            415,
            "'text/plain'",
        ),
        (decide, f"csrf={token}&decision=deny".encode(), {"Content-Type": ""}, 415, "''"),
        (
            decide,
            f"csrf={token}&decision=deny".encode(),
            {"Content-Type": f"{FORM}; charset=latin-1"},
            415,
            "latin-1",
        ),
        (
            release,
            f"csrf={token}".encode(),
            {"Content-Type": "multipart/form-data; boundary=x"},
            415,
            "multipart",
        ),
        ("/login", f"token={root}&token={root}".encode(), {}, 400, "twice"),
        ("/login", f"token={root}".encode(), {"Content-Type": "application/json"}, 415, "json"),
    ]
    anonymous = TestClient(site["app"], base_url="http://127.0.0.1")
    for path, body, headers, status, why in cases:
        client = anonymous if path == "/login" else dave
        r = client.post(path, content=body, headers={"Content-Type": FORM} | headers)
        assert r.status_code == status and one_line(r), (path, body, headers, r.text)
        assert why in r.text and r.text.endswith(": nothing changed\n"), r.text
        assert "set-cookie" not in r.headers
    assert orch.services.ledger.dump() == before
    assert orch.outcome("r1").status is Status.PENDING_REVIEW
    ok = dave.post(  # what a browser sends, with a charset named
        decide,
        content=f"csrf={token}&decision=deny&comment=caf%C3%A9&guardrails=".encode(),
        headers={"Content-Type": "Application/X-WWW-Form-Urlencoded; charset=UTF-8"},
    )
    assert ok.status_code == 200 and "caf\u00e9" in ok.text, ok.text[-400:]


def test_two_approvers_at_once_one_decision(site: dict[str, Any]) -> None:
    clients = [login(site, "dave"), login(site, "erin")]
    tokens = [csrf(c.get("/reviews/r1").text) for c in clients]
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def post(i: int) -> None:
        barrier.wait()
        r = clients[i].post(
            "/reviews/r1/decide", data={"csrf": tokens[i], "decision": ["approve", "deny"][i]}
        )
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
    (report / "metrics.json").write_text(
        dump(
            {
                "naive": {"total_cost_usd": 1000.0, "cost_per_useful_gpu_hour": 2.5},
                "gpu-agent": {"total_cost_usd": 640.0, "cost_per_useful_gpu_hour": 1.6},
            },
            {},
            {},
        )
    )
    app = create_app(site["orch"], simulation=report)
    client = TestClient(app, base_url="http://127.0.0.1")
    client.post("/login", data={"token": site["tokens"]["root"]})
    page = client.get("/spend").text
    assert "Latest simulation" in page and "36.0 %" in page and "$640.00" in page


def test_spend_says_why_it_cannot_read_a_simulation_report(
    site: dict[str, Any], tmp_path: Path
) -> None:
    """A report the page cannot use (hand-edited, damaged, another tool's): the Spend page
    still renders, with one line saying so and why; every field it reads is checked."""
    report = tmp_path / "simulation"
    report.mkdir()
    client = TestClient(create_app(site["orch"], simulation=report), base_url="http://127.0.0.1")
    client.post("/login", data={"token": site["tokens"]["root"]})
    naive = '{"policies": {"naive": %s}}'
    for content, why in (
        ('{"policies": []}', '"policies" is not an object'),
        ("[1, 2]", '"policies" is not an object'),
        ("{}", '"policies" is not an object'),
        ('{"policies": {"naive": 3}}', "policy 'naive' is not an object"),
        (naive % '{"total_cost_usd": "12.5"}', "total_cost_usd is not a number"),
        (naive % '{"total_cost_usd": true}', "total_cost_usd is not a number"),
        (naive % '{"total_cost_usd": NaN}', "total_cost_usd is not a number"),
        (naive % f'{{"total_cost_usd": 1{"0" * 400}}}', "total_cost_usd is not a number"),
        (naive % "{}", "total_cost_usd is not a number"),
        (
            naive % '{"total_cost_usd": 1, "cost_per_useful_gpu_hour": "x"}',
            "cost_per_useful_gpu_hour is not a number or null",
        ),
        ('{"policies": ', "Expecting value"),
        ("\udcff", "can't decode byte 0xff"),  # a byte that is no UTF-8
    ):
        (report / "metrics.json").write_text(content, errors="surrogateescape")
        r = client.get("/spend")
        assert r.status_code == 200, (content, r.text[-300:])
        shown = re.findall(r'<p class="error">(.*?)</p>', r.text)
        assert len(shown) == 1 and "metrics.json cannot be read: " in shown[0], (content, shown)
        assert _html(why) in shown[0], (content, shown)
        assert "vision" in r.text and "Latest simulation" not in r.text
    (report / "metrics.json").write_text(
        naive % '{"total_cost_usd": 12.5, "cost_per_useful_gpu_hour": null}'
    )
    page = client.get("/spend").text
    assert "<td>naive</td><td>$12.50</td><td>0.0 %</td><td>-</td>" in page, page


# ---- hosts and origins ---------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The page in single-user mode (no access file: every caller is the local user), one
    request waiting: what a page elsewhere would like to decide through DNS rebinding."""
    state = tmp_path / "s"
    state.mkdir()
    orch = Orchestrator(
        state, small_config(council=COUNCIL, clock={"time_scale": 3600}), identity=SERVER
    )
    assert orch.request(TWO, thread_id="r1").status is Status.PENDING_REVIEW
    app = create_app(orch)
    yield {"orch": orch, "app": app}
    for thread in app.state.ui.background:
        thread.join(timeout=60)
    orch.close()


def one_line(r: Any) -> bool:
    return bool(r.text.endswith("\n") and r.text.count("\n") == 1)


def test_a_forged_host_is_refused_and_changes_nothing(local: dict[str, Any]) -> None:
    """A page on evil.example that rebinds its name to 127.0.0.1: the browser sends
    Host: evil.example[:port]; it may neither read a form token nor post a decision."""
    orch: Orchestrator = local["orch"]
    good = TestClient(local["app"], base_url="http://127.0.0.1")
    token = csrf(good.get("/reviews/r1").text)
    before = orch.services.ledger.dump()
    for host in (
        "evil.example",
        "evil.example:8750",
        "127.0.0.1.evil.example",
        "127.0.0.1@evil.example",
        "evil.example:80, 127.0.0.1",
        "",
    ):
        forged = TestClient(local["app"], base_url="http://127.0.0.1", headers={"Host": host})
        for path in ("/reviews", "/reviews/r1", "/fleet", "/", "/nope"):
            r = forged.get(path, follow_redirects=False)
            assert r.status_code == 421 and one_line(r), (host, path, r.text)
            assert "csrf" not in r.text and "r1" not in r.text
        r = forged.post("/reviews/r1/decide", data={"csrf": token, "decision": "approve"})
        assert r.status_code == 421 and one_line(r)
    assert orch.services.ledger.dump() == before
    assert orch.outcome("r1").status is Status.PENDING_REVIEW
    for host in ("127.0.0.1:8750", "localhost", "LOCALHOST:8750", "[::1]:8750"):
        ok = TestClient(local["app"], base_url="http://127.0.0.1", headers={"Host": host})
        assert ok.get("/reviews").status_code == 200, host


def test_an_unexpected_failure_is_one_line_and_goes_to_the_log(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something no page expects raises (a bug, a disk gone): the caller gets one line (500)
    with the page's headers, never the exception's text (a path, a token) nor a traceback;
    the exception goes on to the server, which logs it with its traceback."""
    secret = "/home/op/.gpu-agent/access.toml: token s3cr3t"

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(secret)

    monkeypatch.setattr(Orchestrator, "pending_review_entries", fail)
    client = TestClient(local["app"], base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.get("/reviews")
    assert r.status_code == 500 and one_line(r), r.text
    assert "internal error" in r.text and "see the server's log" in r.text
    assert "s3cr3t" not in r.text and "RuntimeError" not in r.text and "Traceback" not in r.text
    assert r.headers["x-frame-options"] == "DENY" and "content-security-policy" in r.headers
    with pytest.raises(RuntimeError, match="s3cr3t"):  # what uvicorn logs, traceback and all
        TestClient(local["app"], base_url="http://127.0.0.1").get("/reviews")
    assert client.get("/fleet").status_code == 200  # the next request is served as ever


def test_a_foreign_origin_is_refused_and_changes_nothing(local: dict[str, Any]) -> None:
    orch: Orchestrator = local["orch"]
    client = TestClient(local["app"], base_url="http://127.0.0.1")
    token = csrf(client.get("/reviews/r1").text)
    before = orch.services.ledger.dump()
    form = {"csrf": token, "decision": "approve", "comment": "forged"}
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:9999"},  # another service on this machine
        {"Origin": "https://127.0.0.1.evil.example"},
        {"Origin": "http://evil@127.0.0.1"},
        {"Origin": ""},
        {"Referer": "http://evil.example/page"},
        {"Referer": "http://127.0.0.1:9999/reviews/r1"},
    ):
        r = client.post("/reviews/r1/decide", data=form, headers=headers)
        assert r.status_code == 403, (headers, r.text[-300:])
        assert "posted from elsewhere" in r.text and "nothing changed" in r.text
        assert "Not allowed - gpu-agent" in r.text
    two = [("Origin", "http://127.0.0.1"), ("Origin", "http://evil.example")]
    r = client.post("/reviews/r1/decide", data=form, headers=two)
    assert r.status_code == 403 and "two origins" in r.text
    assert orch.services.ledger.dump() == before
    # the page's own origin (a browser), then a client that sends none (curl): both go on
    ok = client.post(
        "/reviews/r1/decide",
        headers={"Origin": "http://127.0.0.1"},
        data=form | {"comment": "from the page"},
    )
    assert ok.status_code == 200 and "Approved by local" in ok.text
    decided = [e for e in orch.audit() if e.key.startswith("decide:")]
    assert [(e.who, e.action) for e in decided] == [("local", "approve")]
    again = client.post("/reviews/r1/decide", data=form)  # no Origin, no Referer
    assert again.status_code == 409 and "already decided" in again.text
    assert '<a href="/reviews/r1">See the review</a>' in again.text


def test_an_allowed_host_and_its_https_origin(local: dict[str, Any]) -> None:
    """An operator's --allow-host name behind a TLS proxy that keeps the Host header."""
    app = create_app(local["orch"], allowed=["GPU.example.com", "[fd00::7]"])
    client = TestClient(app, base_url="https://gpu.example.com")
    page = client.get("/reviews/r1")
    assert page.status_code == 200
    assert client.get("/reviews", headers={"Host": "[fd00::7]:8750"}).status_code == 200
    r = client.post(
        "/reviews/r1/decide",
        headers={"Origin": "https://gpu.example.com"},
        data={"csrf": csrf(page.text), "decision": "deny", "comment": "no"},
    )
    assert r.status_code == 200 and "Denied by local" in r.text
    assert TestClient(app, base_url="https://evil.example").get("/reviews").status_code == 421
    with pytest.raises(InvalidInput):
        create_app(local["orch"], allowed=["http://gpu.example.com/"])


def test_the_cli_passes_its_host_names(
    local: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpu-agent ui --allow-host NAME` (or GPU_AGENT_UI_HOSTS): the app uvicorn gets answers
    to those names, the bound address and the loopback names, and to nothing else."""
    import uvicorn

    from graph.cli import main
    from graph.cli_parser import build_parser

    args = build_parser().parse_args(["ui", "--allow-host", "a.example", "--allow-host", "b"])
    assert args.allow_host == ["a.example", "b"]
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    # 10.1.2.3 is no address of this machine: its bind check stands aside here (the next test)
    monkeypatch.setattr("graph.cli_servers._bind", lambda host, port: port)
    monkeypatch.setenv("GPU_AGENT_UI_HOSTS", "env.example, other.example")
    state = str(tmp_path / "cli")
    Orchestrator(state).close()  # the page opens a state directory that is there, never makes one
    assert (
        main(["ui", "--state-dir", state, "--host", "10.1.2.3", "--allow-host", "gpu.example.com"])
        == 0
    )
    assert main(["ui", "--state-dir", state]) == 0
    assert main(["ui", "--state-dir", state, "--allow-host", "bad/name"]) == 2
    assert len(served) == 2
    (flagged, kw), (from_env, _) = served
    assert kw["host"] == "10.1.2.3"

    def code(app: Any, host: str) -> int:
        client = TestClient(app, base_url="http://127.0.0.1", headers={"Host": host})
        return int(client.get("/login").status_code)

    assert [
        code(flagged, h)
        for h in ("gpu.example.com", "10.1.2.3:8750", "localhost", "env.example", "evil.example")
    ] == [200, 200, 200, 421, 421]
    assert [code(from_env, h) for h in ("env.example", "other.example", "gpu.example.com")] == [
        200,
        200,
        421,
    ]


# ---- ids -------------------------------------------------------------------------------------


def test_a_method_not_allowed_says_which_are(site: dict[str, Any]) -> None:
    """A 405 carries Allow (RFC 9110 requires it) beside the page's one-line body."""
    client = login(site, "dave")
    for method, path, allowed in (
        ("GET", "/reviews/r1/decide", {"POST"}),
        ("PUT", "/reviews/r1/decide", {"POST"}),
        ("POST", "/fleet", {"GET", "HEAD"}),
        ("DELETE", "/login", {"GET", "HEAD", "POST"}),
        ("GET", "/allocations/a-000000000000/release", {"POST"}),
    ):
        r = client.request(method, path)
        assert r.status_code == 405 and one_line(r), (method, path, r.text)
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, r.headers
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "allow" not in client.get("/nope").headers


def test_malformed_ids_are_a_one_line_404(site: dict[str, Any]) -> None:
    orch: Orchestrator = site["orch"]
    dave = login(site, "dave")
    token = csrf(dave.get("/reviews/r1").text)
    before = orch.services.ledger.dump()
    for tid in (
        "..%2Ffleet",
        "x%3Fy%3D1%23z",
        "r1%0A",
        "a%0Ab",
        "%2E%2E",
        "-r1",
        "r%201",
        "r1%22%3E%3Cscript%3E",
    ):
        for method, path in (("GET", f"/reviews/{tid}"), ("POST", f"/reviews/{tid}/decide")):
            r = dave.request(
                method,
                path,
                data={"csrf": token, "decision": "approve"} if method == "POST" else None,
            )
            assert r.status_code == 404 and one_line(r), (path, r.text)
            assert r.headers["content-type"].startswith("text/plain")  # never read as HTML
            assert r.headers["x-content-type-options"] == "nosniff"
    for aid in ("..%2Ffleet", "a-XYZ", "a-0123456789ab%0A", "x%3Fy%3D1%23z"):
        r = dave.post(f"/allocations/{aid}/release", data={"csrf": token})
        assert r.status_code == 404 and one_line(r), (aid, r.text)
    r = dave.post("/allocations/a-000000000000/release", data={"csrf": token})
    assert r.status_code == 404 and "no allocation" in r.text  # well formed, unknown
    assert orch.services.ledger.dump() == before


# ---- what a reviewer reads -------------------------------------------------------------------


def test_who_asked_and_how_long_it_waited(site: dict[str, Any]) -> None:
    dave = login(site, "dave")
    listing = dave.get("/reviews").text
    assert '<meta http-equiv="refresh" content="15">' in listing
    assert "<th>Requested by</th>" in listing and "<td>alice</td>" in listing
    assert re.search(r"<td>\d+ (s|min|h \d\d min|d \d+ h)</td>", listing), listing
    page = dave.get("/reviews/r1").text
    assert "Asked by <strong>alice</strong>" in page
    assert re.search(r"waiting for <strong>\d+ (s|min|h \d\d min|d \d+ h)</strong>", page)
    assert "http-equiv" not in page  # a page with a comment box never reloads itself


def test_a_member_sees_no_buttons_but_who_decides(site: dict[str, Any]) -> None:
    page = login(site, "alice").get("/reviews/r1").text
    assert 'name="decision"' not in page and "<textarea" not in page
    assert "may read this review" in page and "but not decide it" in page
    assert "an approver of vision (dave, erin) or an admin (root) decides it" in page
    for approver in ("dave", "erin", "root"):
        assert 'value="approve"' in login(site, approver).get("/reviews/r1").text


def test_after_a_decision_the_page_says_who_and_why(site: dict[str, Any]) -> None:
    dave = login(site, "dave")
    token = csrf(dave.get("/reviews/r2").text)
    r = dave.post(
        "/reviews/r2/decide",
        data={"csrf": token, "decision": "deny", "comment": 'not now <b>"sorry"</b>'},
    )
    assert r.status_code == 200
    assert "<strong>Denied by dave</strong>" in r.text
    assert "not now &lt;b&gt;&quot;sorry&quot;&lt;/b&gt;" in r.text
    assert re.search(r"decided after \d+ (s|min|h \d\d min|d \d+ h)", r.text)
    assert 'name="decision"' not in r.text
    alice = login(site, "alice").get("/reviews/r2").text  # members read it too
    assert "Denied by dave" in alice and "sorry" in alice


def test_the_cost_the_council_judged_and_the_route_explained(site: dict[str, Any]) -> None:
    """The council prices the route the request would take when it votes: with both H100s
    held (twice as fast, so cheaper per unit of work), A100s, the same figure as the route
    now; its cost member's reason names that price (it once judged $64.00 on the H100s
    beside the route's $81.92)."""
    orch: Orchestrator = site["orch"]
    alice = orch.acting_as(ALICE)
    held = alice.request(
        {
            "project": "vision",
            "purpose": "training",
            "count": 2,
            "duration_hours": 300,
            "gpu_type": "H100",
        },
        thread_id="h100s",
    )
    assert held.status is Status.PENDING_REVIEW
    held = orch.resume("h100s", {"approve": True, "by": "root"}, wait=False)
    assert held.status is Status.ALLOCATED  # 300 h: five minutes at this clock's scale
    asked = alice.request(
        {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 8},
        thread_id="cheap",
    )
    assert asked.status is Status.PENDING_REVIEW and asked.council is not None
    priced = asked.council.priced
    assert priced is not None and (priced.gpu_type, priced.cost_usd) == ("A100", 81.92)
    cost = next(v for v in asked.council.votes if v.member == "cost")
    assert any("(2 x A100 at $5.12/GPU-h for 8.00 h)" in r.text for r in cost.reasons), cost
    page = login(site, "dave").get("/reviews/cheap").text
    text = re.sub(r"<[^>]+>", "", page)
    assert (
        "The council judged the cost at its worst case on the route it would take when it "
        "voted (2 x A100 for 8 h: $81.92); routed now, the same type has the GPUs free "
        "now: A100 at $5.12/GPU-h for 8 h: $81.92. The same figure."
    ) in text, text
    assert "The council judged" in page and "If approved now" in page
    # a request that names its type: the same figure, said so
    same = re.sub(r"<[^>]+>", "", login(site, "dave").get("/reviews/r1").text)
    assert (
        "(2 x A100 for 1 h: $10.24); routed now, the request names its type, which has "
        "the GPUs free now: A100 at $5.12/GPU-h for 1 h: $10.24. The same figure." in same
    ), same


def test_readable_labels_everywhere(site: dict[str, Any]) -> None:
    orch: Orchestrator = site["orch"]
    orch.acting_as(ALICE).request(
        TWO | {"max_wait_minutes": 30, "budget_limit": 50, "min_memory_gb": 40, "priority": "high"},
        thread_id="full",
    )
    root = login(site, "root")
    pages = {
        p: root.get(p).text
        for p in ("/reviews", "/reviews/full", "/reviews/placed", "/fleet", "/spend")
    }
    for path, page in pages.items():
        for raw in (
            "pending_review",
            "duration_hours",
            "max_wait_minutes",
            "gpu_type",
            "min_memory_gb",
            "budget_limit",
            "requested_by",
            "util %",
            "temp C",
            "lease-expired",
            ">explicit<",
            ">active<",
            "timed_out",
        ):
            assert raw not in page, (path, raw)
    full = pages["/reviews/full"]
    for shown in (
        "<th>Longest wait for GPUs</th><td>30 min</td>",
        "<th>Budget limit</th><td>$50.00</td>",
        "<th>Minimum GPU memory</th><td>40 GB</td>",
        "<th>Duration</th><td>1 h</td>",
        "<th>GPU type</th><td>A100</td>",
        "waiting for a review",
    ):
        assert shown in full, shown
    assert "released by hand" in pages["/fleet"]  # the placed thread's release reason


def test_full_gpu_ids_and_charts_with_a_scale(site: dict[str, Any]) -> None:
    root = login(site, "root")
    fleet = root.get("/fleet").text
    uuids = site["orch"].services.gpus
    assert all(f'<td class="id">{_html(g.uuid)}</td>' in fleet for g in uuids)
    for page in (root.get("/reviews/r1").text, root.get("/spend").text):
        svg = page[page.index("<svg") : page.index("</svg>")]
        assert re.search(r'text-anchor="end">\$[\d,]+(\.\d\d)?</text>', svg), svg
        assert ">$0</text>" in svg and ">oldest</text>" in svg and ">newest</text>" in svg
        assert re.search(r">\d{4}-\d\d-\d\d \d\d:\d\d</text>", svg)


# ---- release and monitoring ------------------------------------------------------------------


def live_allocation(site: dict[str, Any], tid: str = "live") -> str:
    """A long allocation placed with wait=False: nobody monitors it once the call returned
    (one cheap GPU: the council approves it alone; 700 h: over ten minutes at 3600x)."""
    out = (
        site["orch"]
        .acting_as(ALICE)
        .request(
            {
                "project": "vision",
                "purpose": "research",
                "count": 1,
                "duration_hours": 700,
                "gpu_type": "RTX4090",
            },
            thread_id=tid,
            wait=False,
        )
    )
    assert out.status is Status.ALLOCATED and out.allocation is not None
    return str(out.allocation.id)


def release_form(page: str, aid: str) -> bool:
    return f'action="/allocations/{aid}/release"' in page


def test_the_release_button_releases_once(site: dict[str, Any]) -> None:
    orch: Orchestrator = site["orch"]
    aid = live_allocation(site)
    dave, bob = login(site, "dave"), login(site, "bob")
    fleet = dave.get("/fleet").text
    assert release_form(fleet, aid)
    assert release_form(dave.get("/reviews/live").text, aid)  # a review whose allocation lives
    assert release_form(login(site, "alice").get("/fleet").text, aid)  # members: their project
    assert not release_form(bob.get("/fleet").text, aid)
    token = csrf(fleet)
    before = orch.services.ledger.dump()
    refused = [
        (dave, {"csrf": token}, {"Origin": "http://evil.example"}, 403),
        (dave, {"csrf": token}, {"Origin": "null"}, 403),
        (dave, {"csrf": "0" * 64}, {}, 403),
        (bob, {"csrf": form_token(site, "bob")}, {}, 404),  # his own token; as if none
    ]
    for client, form, headers, status in refused:
        r = client.post(f"/allocations/{aid}/release", data=form, headers=headers)
        assert r.status_code == status, r.text[-300:]
    assert orch.services.ledger.dump() == before
    assert orch.services.ledger.get(aid).state == "active"
    r = dave.post(
        f"/allocations/{aid}/release",
        data={"csrf": token, "back": "fleet"},
        headers={"Origin": "http://127.0.0.1"},
    )
    assert r.status_code == 200
    assert f"Released allocation {aid}" in re.sub(r"<[^>]+>", "", r.text)
    assert orch.services.ledger.get(aid).state == "released"
    again = dave.post(f"/allocations/{aid}/release", data={"csrf": token})
    assert again.status_code == 409 and "already released" in again.text
    assert "Already released - gpu-agent" in again.text
    releases = [e for e in orch.audit() if e.target == aid and e.action == "release"]
    assert len(releases) == 1
    assert not release_form(dave.get("/fleet").text, aid)
    assert "released by hand" in dave.get("/reviews/live").text


def released_from_page(
    site: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    aid: str,
    method: str,
    raced: Callable[..., Any],
) -> tuple[int, str]:
    """dave releases `aid` on the page, read before the ledger's `method` was replaced by
    `raced` (a race set up; put back after the post): the status and the page's text."""
    dave = login(site, "dave")
    token = csrf(dave.get("/fleet").text)
    monkeypatch.setattr(site["orch"].services.ledger, method, raced)
    r = dave.post(f"/allocations/{aid}/release", data={"csrf": token})
    monkeypatch.undo()
    return r.status_code, re.sub(r"<[^>]+>", "", r.text)


def test_a_lease_that_ends_while_the_release_is_asked_is_not_reported_as_it(
    site: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page read the allocation live, then its lease ended before the page's release
    ran: the page says it was already released, by what, and charges nothing more."""
    orch: Orchestrator = site["orch"]
    aid = live_allocation(site, "race")
    ledger = orch.services.ledger
    read = ledger.get

    def read_then_expire(allocation_id: str) -> Any:
        row = read(allocation_id)
        if allocation_id == aid and row.state == "active":
            ledger.release(aid, ReleaseReason.LEASE_EXPIRED, orch.services.clock.now())
        return row

    status, text = released_from_page(site, monkeypatch, aid, "get", read_then_expire)
    assert status == 409, text[-300:]
    assert f"allocation {aid} was already released (lease ended" in text, text[-400:]
    assert "Released allocation" not in text
    assert [(e.action, e.who) for e in orch.audit() if e.target == aid] == [
        ("release", "gpu-agent")
    ]  # the lease's end, not dave


def test_a_release_by_hand_meanwhile_is_not_reported_as_the_pages(
    site: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another click (or `gpu-agent release`) released the allocation between the page's
    read and its release: the page says it was already released, not that it released it."""
    orch: Orchestrator = site["orch"]
    aid = live_allocation(site, "race2")
    ledger = orch.services.ledger
    release_once = ledger.release_once

    def another_first(allocation_id: str, *args: Any, **kwargs: Any) -> Any:
        if allocation_id == aid and ledger.get(aid).state == "active":
            release_once(aid, ReleaseReason.EXPLICIT, orch.services.clock.now(), "alice")
        return release_once(allocation_id, *args, **kwargs)

    status, text = released_from_page(site, monkeypatch, aid, "release_once", another_first)
    assert status == 409, text[-300:]
    assert f"allocation {aid} was already released (released by hand" in text, text[-400:]
    assert [(e.action, e.who) for e in orch.audit() if e.target == aid] == [("release", "alice")]


def test_an_unmonitored_allocation_is_flagged(site: dict[str, Any]) -> None:
    """`status()["allocations"]` says whether a process monitors each one ("monitored",
    "monitor"); an allocation placed with wait=False has nobody once the call returned."""
    aid = live_allocation(site)
    allocations = {a["id"]: a for a in site["orch"].status()["allocations"]}
    assert allocations[aid]["monitored"] is False
    fleet = login(site, "root").get("/fleet").text
    flag = re.search(r'<p class="flag">(.*?)</p>', fleet, re.S)
    assert flag is not None and aid in flag.group(1)
    assert (
        "no process is monitoring this allocation: idle release and lease end are not "
        "enforced until a worker or <code>gpu-agent resume live</code> adopts it"
    ) in flag.group(1)
    assert '<span class="badge">not monitored</span>' in fleet


def form_token(site: dict[str, Any], name: str) -> str:
    """The form token the page issues to `name` (bob never sees a form of vision's)."""
    return hmac.new(
        site["app"].state.ui.secret, site["tokens"][name].encode(), hashlib.sha256
    ).hexdigest()


def _html(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_a_page_that_cannot_bind_is_one_line_before_anything_opens(tmp_path: Path) -> None:
    """A port taken (or an address that is not this machine's): exit 2 with one line (a JSON
    error with --json), and no state directory made, not uvicorn's own error after it."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = tmp_path / "never"
        done = run_cli("ui", "--state-dir", str(state), "--port", str(port), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert f"cannot serve the page on 127.0.0.1:{port}" in done.stderr
        assert done.stderr.count("\n") == 1
        as_json = run_cli(
            "ui", "--state-dir", str(state), "--port", str(port), "--json", cwd=tmp_path
        )
        assert (
            as_json.returncode == 2
            and "cannot serve the page" in json.loads(as_json.stdout)["error"]
        )
        assert not state.exists()


def test_a_missing_state_directory_is_refused_not_made(tmp_path: Path) -> None:
    """As `status` and the other commands that read: one line, exit 2, nothing created."""
    import socket

    missing = tmp_path / "nonexistent"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = run_cli("ui", "--state-dir", str(missing), "--port", str(port), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "does not exist" in done.stderr and not missing.exists()
