"""The web page in a real headless browser (Debian's chromium and chromium-driver, driven by
Selenium): log in, see a pending review a test request made, approve it and see the allocation
appear, deny another and see its thread end denied, two approvers clicking at once (one
decision), the cost the council judged explained beside the route's, a member's view (no
buttons), the fleet page's release button and its flag for an allocation nobody monitors.
Screenshots of each view (the whole page) are kept in artifacts/ui/ for a reviewer to open.

Skipped where chromium is not installed, unless GPU_AGENT_REQUIRE_BROWSER=1 (.ci/run sets it
and installs the packages)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.access import Identity, add_identity
from fleet.models import Status
from graph.orchestrator import Orchestrator
from graph.ui import SERVER, create_app
from tests.conftest import ROOT, small_config

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = ROOT / "artifacts" / "ui"
TWO = {
    "project": "vision",
    "purpose": "training",
    "count": 2,
    "duration_hours": 1,
    "gpu_type": "A100",
}

if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    if os.environ.get("GPU_AGENT_REQUIRE_BROWSER"):
        raise RuntimeError("GPU_AGENT_REQUIRE_BROWSER: install chromium and chromium-driver")
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`gpu-agent ui`'s app under uvicorn on loopback, three vision requests waiting."""
    import uvicorn

    state = tmp_path_factory.mktemp("ui") / "s"
    state.mkdir()
    tokens = {
        n: add_identity(state, n, r, p)
        for n, r, p in [
            ("dave", "approver", "vision"),
            ("erin", "approver", "vision"),
            ("root", "admin", None),
            ("alice", "member", "vision"),
        ]
    }
    config = small_config(
        council={
            "policy": "reference",
            "approve_threshold": 0.99,
            "deny_threshold": 0.01,
            "auto_approve_max_gpus": 1,
            "auto_approve_max_usd": 100_000,
        },
        clock={"time_scale": 60},
    )  # a one-hour lease lasts a minute
    orch = Orchestrator(state, config, identity=SERVER)
    alice = orch.acting_as(Identity("alice", "vision", "member"))
    for held in (0.3, 0.9, 0.6):  # some history for the charts (bars of different heights)
        one = alice.request(TWO | {"count": 1}, wait=False)
        assert one.allocation is not None
        time.sleep(held)
        alice.release(one.allocation.id)
    for tid in ("r1", "r2", "r3", "r4"):
        assert (
            alice.request(TWO | {"requested_by": "alice"}, thread_id=tid).status
            is Status.PENDING_REVIEW
        )
    # both H100s held (approved, placed, nobody monitoring: 100 h last 100 minutes here), so
    # a request of any training type is routed to A100s while the council priced H100s
    assert (
        alice.request(TWO | {"gpu_type": "H100", "duration_hours": 100}, thread_id="h100s").status
        is Status.PENDING_REVIEW
    )
    assert (
        orch.resume(
            "h100s", {"approve": True, "by": "root", "comment": "benchmarks"}, wait=False
        ).status
        is Status.ALLOCATED
    )
    assert (
        alice.request(
            {
                "project": "vision",
                "purpose": "training",
                "count": 2,
                "duration_hours": 8,
                "requested_by": "alice",
            },
            thread_id="cheap",
        ).status
        is Status.PENDING_REVIEW
    )
    live = alice.request(
        {
            "project": "vision",
            "purpose": "research",
            "count": 1,
            "duration_hours": 200,
            "gpu_type": "RTX4090",
        },
        thread_id="live",
        wait=False,
    )  # placed; unmonitored once the call returned
    assert live.status is Status.ALLOCATED and live.allocation is not None
    app = create_app(orch)
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    yield {
        "url": f"http://127.0.0.1:{port}",
        "tokens": tokens,
        "orch": orch,
        "live": live.allocation.id,
    }
    server.should_exit = True
    thread.join(timeout=30)
    for row in orch.services.ledger.live():  # the monitors carried on here hear it at once
        orch.release(row.id)
    for t in app.state.ui.background:
        t.join(timeout=90)
    orch.close()


def press(driver: Any, css: str) -> None:
    """Click a submit button and wait for the page it leads to."""
    button = driver.find_element(By.CSS_SELECTOR, css)
    button.click()

    def left(_: Any) -> bool:  # the old page's button is gone: the next page is there
        try:
            button.is_enabled()
        except WebDriverException:  # stale, or "does not belong to the document"
            return True
        return False

    WebDriverWait(driver, 60).until(left)
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def browser(site: dict[str, Any], name: str) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)
    driver.get(site["url"] + "/login")
    driver.find_element(By.NAME, "token").send_keys(site["tokens"][name])
    press(driver, "button")
    return driver


def shot(driver: Any, name: str) -> None:
    """The whole page: the window grown to the document's height first."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, max(1000, min(height + 120, 6000)))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 1000)


def text(driver: Any) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_approve_see_the_allocation_then_deny(site: dict[str, Any]) -> None:
    dave = browser(site, "dave")
    try:
        assert "Pending reviews" in dave.title and "r1" in dave.page_source
        shot(dave, "1-pending-reviews")
        dave.find_element(By.LINK_TEXT, "r1").click()
        assert "If approved" in dave.page_source and "fairness" in dave.page_source
        shot(dave, "2-review")
        dave.find_element(By.NAME, "comment").send_keys("deadline on friday")
        press(dave, "button.approve")
        assert "Allocation a-" in text(dave), text(dave)
        assert "Approved by dave" in text(dave) and "deadline on friday" in text(dave)
        allocation = dave.find_element(By.CLASS_NAME, "note").text.split()[1]
        shot(dave, "3-approved")
        dave.find_element(By.LINK_TEXT, "Fleet").click()
        assert allocation in dave.page_source
        shot(dave, "4-fleet")
        dave.get(site["url"] + "/reviews/r2")
        dave.find_element(By.NAME, "comment").send_keys("no budget left this quarter")
        press(dave, "button.deny")
        assert "denied by dave" in dave.page_source
        assert "Denied by dave" in text(dave) and "no budget left this quarter" in text(dave)
        shot(dave, "5-denied")
        assert site["orch"].outcome("r2").status is Status.DENIED
        dave.find_element(By.LINK_TEXT, "Spend").click()
        assert "vision" in dave.page_source
        shot(dave, "6-spend")
    finally:
        dave.quit()


def test_two_approvers_click_at_once(site: dict[str, Any]) -> None:
    drivers = [browser(site, "dave"), browser(site, "erin")]
    try:
        for d in drivers:
            d.get(site["url"] + "/reviews/r3")
        barrier = threading.Barrier(2)

        def click(d: Any, css: str) -> None:
            barrier.wait()
            press(d, css)

        clicks = [
            threading.Thread(target=click, args=(d, css))
            for d, css in zip(drivers, ("button.approve", "button.deny"), strict=True)
        ]
        for c in clicks:
            c.start()
        for c in clicks:
            c.join()
        titles = sorted(d.title for d in drivers)
        assert titles[0].startswith("Already decided"), titles
        assert titles[1].startswith("Review of vision"), titles
        loser = next(d for d in drivers if d.title.startswith("Already decided"))
        assert "already decided" in loser.page_source
        shot(loser, "7-already-decided")
        decided = [
            e for e in site["orch"].audit() if e.key.startswith("decide:") and e.target == "r3"
        ]
        assert len(decided) == 1
    finally:
        for d in drivers:
            d.quit()


def test_the_cost_explained_and_a_members_view(site: dict[str, Any]) -> None:
    dave = browser(site, "dave")
    try:
        dave.get(site["url"] + "/reviews/cheap")
        page = text(dave)
        assert (
            "The council judged the cost at its worst case on the route it would take when it "
            "voted (2 x A100 for 8 h: $81.92); routed now, the same type has the GPUs free "
            "now: A100 at $5.12/GPU-h for 8 h: $81.92. The same figure."
        ) in page, page
        assert "Asked by alice" in page and "waiting for" in page
        shot(dave, "8-review-cost-explained")
    finally:
        dave.quit()
    alice = browser(site, "alice")
    try:
        alice.get(site["url"] + "/reviews/cheap")
        page = text(alice)
        assert "may read this review but not decide it" in page
        assert "an approver of vision (dave, erin) or an admin (root) decides it" in page
        assert not alice.find_elements(By.CSS_SELECTOR, "button.approve, button.deny")
        shot(alice, "9-member-view")
    finally:
        alice.quit()


def test_release_from_the_fleet_page(site: dict[str, Any]) -> None:
    aid = site["live"]
    root = browser(site, "root")
    try:
        root.find_element(By.LINK_TEXT, "Fleet").click()
        WebDriverWait(root, 60).until(lambda d: "Allocations" in d.page_source)
        shot(root, "10-fleet-release-unmonitored")
        fleet = text(root)
        flagged = "no process is monitoring this allocation" in fleet
        press(root, f'form[action="/allocations/{aid}/release"] button')
        assert "Released allocation " + aid in text(root)
        shot(root, "11-released")
        assert site["orch"].services.ledger.get(aid).state == "released"
        releases = [e for e in site["orch"].audit() if e.target == aid]
        assert [e.action for e in releases] == ["release"]
        # an allocation placed with wait=False has nobody monitoring it (status()'s
        # "monitored" key, which the page flags)
        assert flagged, "no unmonitored flag (does status() carry 'monitored'?): " + fleet
    finally:
        root.quit()


def test_the_screenshots_are_kept() -> None:
    names = sorted(p.name for p in SHOTS.glob("*.png"))
    assert len(names) == 11 and all((SHOTS / n).stat().st_size > 5000 for n in names), names


def test_a_forged_post_from_another_page(site: dict[str, Any], tmp_path: Path) -> None:
    """A page elsewhere posting a decision with the victim's cookie but no form token."""
    dave = browser(site, "dave")
    try:
        dave.get(site["url"] + "/reviews/r4")  # the cookie is set for this origin
        forged = tmp_path / "forged.html"
        forged.write_text(
            f'<form id=f method=post action="{site["url"]}/reviews/r4/decide">'
            "<input name=decision value=deny></form>"
            '<script>document.getElementById("f").submit()</script>'
        )
        dave.get(forged.as_uri())
        WebDriverWait(dave, 30).until(lambda d: "gpu-agent" in d.title)
        # refused: the SameSite=Strict cookie is not sent from another site (the log-in
        # page), and had it been, the form token would be missing (the not-allowed page)
        assert dave.title.split(" - ")[0] in ("Log in", "Not allowed")
        assert site["orch"].outcome("r4").status is Status.PENDING_REVIEW
        assert not [e for e in site["orch"].audit() if e.target == "r4" and e.action != "ask"]
    finally:
        dave.quit()
