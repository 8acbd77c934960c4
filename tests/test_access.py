"""Identities (tokens mapped to a project and a role) and the audit log.

Every action one project's identity tries on another project's requests, allocations and
records is refused (Forbidden, exit 5) and changes nothing; the audit log says who approved,
denied, decided, released and set budgets."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.access import ACCESS, LOCAL, add_identity, identify
from fleet.clock import VirtualClock
from fleet.errors import Forbidden, InvalidInput, StateDirError
from fleet.faults import ENV, InjectedFault
from fleet.models import HumanDecision, Status
from graph.orchestrator import Orchestrator
from nodes import audit
from nodes.state import request_of
from tests.conftest import fleet_toml, run_cli, small_config

COUNCIL = {
    "policy": "reference",
    "approve_threshold": 0.99,
    "deny_threshold": 0.01,
    "auto_approve_max_gpus": 1,
}
ONE = {"purpose": "training", "count": 1, "duration_hours": 1, "gpu_type": "A100"}
TWO = ONE | {"count": 2}  # to the (always split) council: a human review


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A state directory with identities, a placed vision allocation and a vision review."""
    state = tmp_path / "s"
    state.mkdir()
    tokens = {
        name: add_identity(state, name, role, project)
        for name, role, project in [
            ("root", "admin", None),
            ("alice", "member", "vision"),
            ("dave", "approver", "vision"),
            ("bob", "member", "speech"),
            ("carol", "approver", "speech"),
        ]
    }
    opened: list[Orchestrator] = []
    clock = VirtualClock()

    def as_(name: str | None) -> Orchestrator:
        o = Orchestrator(
            state, small_config(council=COUNCIL), clock=clock, token=tokens[name] if name else None
        )
        opened.append(o)
        return o

    alice = as_("alice")
    placed = alice.request(ONE, thread_id="placed", wait=False)
    assert placed.status is Status.ALLOCATED and placed.allocation is not None
    assert alice.request(TWO, thread_id="review").status is Status.PENDING_REVIEW
    as_("bob").request(ONE, thread_id="bobs", wait=False)
    yield {"as": as_, "tokens": tokens, "state": state, "allocation": placed.allocation.id}
    for o in opened:
        o.close()


def test_identities_come_from_tokens(world: dict[str, Any], tmp_path: Path) -> None:
    as_: Callable[[str | None], Orchestrator] = world["as"]
    assert as_("alice").identity.project == "vision"
    with pytest.raises(Forbidden, match="requires a token"):
        as_(None)
    with pytest.raises(Forbidden, match="unknown token"):
        Orchestrator(world["state"], small_config(), clock=VirtualClock(), token="forged")
    other = tmp_path / "open"  # no access file: one user, every right
    with Orchestrator(other, small_config(), clock=VirtualClock()) as o:
        assert o.identity is LOCAL
    assert "token_sha256" in (world["state"] / ACCESS).read_text()
    assert world["tokens"]["alice"] not in (world["state"] / ACCESS).read_text()


def cross_project_attempts(
    world: dict[str, Any],
) -> list[tuple[str, Callable[[], object], str | None]]:
    """Everything bob (speech) and carol (speech's approver) might try on vision, and what a
    member may not do even in their own project; each with what it answers where it names
    another project's allocation or thread by its id (as if there were none), else None
    (Forbidden, naming who may not do what)."""
    bob, carol, alice = world["as"]("bob"), world["as"]("carol"), world["as"]("alice")
    aid = world["allocation"]
    no_allocation, no_thread = f"no allocation {aid!r}", "no thread {!r}".format
    return [
        ("bob releases vision's allocation", lambda: bob.release(aid), no_allocation),
        ("carol releases vision's allocation", lambda: carol.release(aid), no_allocation),
        (
            "bob resumes vision's thread",
            lambda: bob.resume("placed", wait=False),
            no_thread("placed"),
        ),
        ("bob reads vision's thread", lambda: bob.outcome("placed"), no_thread("placed")),
        (
            "bob approves vision's review",
            lambda: bob.resume("review", True),
            no_thread("review"),
        ),
        (
            "carol approves vision's review",
            lambda: carol.resume("review", True),
            no_thread("review"),
        ),
        (
            "carol denies vision's review",
            lambda: carol.resume("review", False),
            no_thread("review"),
        ),
        (
            "alice (a member) approves her own review",
            lambda: alice.resume("review", True),
            None,
        ),
        ("bob requests GPUs for vision", lambda: bob.request(ONE | {"project": "vision"}), None),
        ("bob submits for vision", lambda: bob.submit(ONE | {"project": "vision"}), None),
        ("bob reads vision's history", lambda: bob.history("vision"), None),
        ("bob reads vision's audit", lambda: bob.audit("vision"), None),
        ("bob sets vision's budget", lambda: bob.set_budget("vision", 100.0), None),
        ("carol sets speech's budget", lambda: carol.set_budget("speech", 100.0), None),
        ("alice sets her own budget", lambda: alice.set_budget("vision", 1000.0), None),
    ]


def test_no_cross_project_action_is_allowed(world: dict[str, Any]) -> None:
    ledger = world["as"]("root").services.ledger
    before = ledger.dump()
    attempts = cross_project_attempts(world)
    for what, attempt, as_if_none in attempts:
        with pytest.raises(Forbidden if as_if_none is None else InvalidInput) as exc:
            attempt()
        assert "\n" not in str(exc.value), what
        if as_if_none is not None:  # word for word what an id that does not exist gets
            assert str(exc.value) == as_if_none and not isinstance(exc.value, Forbidden), what
    assert ledger.dump() == before
    assert world["as"]("root").outcome("review").status is Status.PENDING_REVIEW
    assert len(attempts) == 15  # the count in docs/reliability.md
    bob = world["as"]("bob")
    for missing, attempt in [  # what ids that do not exist get
        ("no allocation 'a-000000000000'", lambda: bob.release("a-000000000000")),
        ("no thread 'none'", lambda: bob.outcome("none")),
        ("no thread 'none'", lambda: bob.resume("none", True)),
        ("no submitted thread 'none'", lambda: bob.job("none")),
    ]:
        with pytest.raises(InvalidInput) as exc:
            attempt()
        assert str(exc.value) == missing


def test_what_each_role_may_do(world: dict[str, Any]) -> None:
    as_ = world["as"]
    bob = as_("bob")
    assert {r.project for r in bob.costs()} <= {"speech"}
    assert [a["project"] for a in bob.status()["allocations"]] == ["speech"]
    vision_gpus = [g for g in bob.status()["gpus"] if g.get("project") == "vision"]
    assert vision_gpus and all(g["allocation_id"] is None for g in vision_gpus)
    out = as_("dave").resume("review", {"approve": True, "by": "mallory"})
    assert out.status is Status.RELEASED and out.reason == "released: lease-expired"
    assert as_("alice").outcome("review").status is Status.RELEASED
    assert as_("root").set_budget("speech", 50.0) == []
    assert as_("alice").release(world["allocation"]).allocation_id == world["allocation"]


def test_the_audit_log_says_who_and_why(world: dict[str, Any]) -> None:
    as_ = world["as"]
    as_("alice").release(world["allocation"])
    as_("dave").resume("review", {"approve": True, "comment": "deadline friday"})
    as_("root").set_budget("vision", 30.0)
    denied = as_("alice").request(TWO | {"duration_hours": 10}, thread_id="pricey")
    assert denied.status is Status.DENIED
    log = as_("root").audit()
    seen = [(e.action, e.who, e.target) for e in log]
    assert ("approve", "auto-approval", "placed") in seen
    assert ("approve", "dave", "review") in seen  # the token's name, not the payload's
    assert ("decide", "dave", "review") not in seen
    decided = [e for e in log if e.key.startswith("decide:")]
    assert [(e.action, e.who, e.detail) for e in decided] == [
        ("approve", "dave", "human review: deadline friday")
    ]
    assert seen.count(("approve", "dave", "review")) == 1  # one row per decision
    assert ("release", "alice", world["allocation"]) in seen
    assert any(a == "release" and who == "monitor" for a, who, _ in seen)  # the review's
    assert any(e.action == "budget" and e.who == "root" and "-> $30.00" in e.detail for e in log)
    assert any(e.action == "deny" and e.target == "pricey" and "budget" in e.detail for e in log)
    assert len({e.key for e in log}) == len(log)
    mine = as_("bob").audit()
    assert mine and {e.project for e in mine} == {"speech"}


def test_the_cli_with_tokens(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml())
    opts = ["--state-dir", str(tmp_path / "s")]
    first = run_cli(
        "token", "add", "alice", "--role", "member", "--project", "vision", *opts, cwd=tmp_path
    )
    assert first.returncode == 2 and "first identity must be an admin" in first.stderr
    root = json.loads(
        run_cli("token", "add", "root", "--role", "admin", "--json", *opts, cwd=tmp_path).stdout
    )["token"]
    refused = run_cli(
        "token", "add", "alice", "--role", "member", "--project", "vision", *opts, cwd=tmp_path
    )
    assert refused.returncode == 5 and refused.stderr.count("\n") == 1
    alice = json.loads(
        run_cli(
            "token",
            "add",
            "alice",
            "--role",
            "member",
            "--project",
            "vision",
            "--json",
            *opts,
            cwd=tmp_path,
            env={"GPU_AGENT_TOKEN": root},
        ).stdout
    )["token"]
    opts += ["--fleet", str(fleet)]
    r = run_cli(
        "request",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--no-wait",
        "--json",
        "--project",
        "vision",
        *opts,
        cwd=tmp_path,
        env={"GPU_AGENT_TOKEN": alice},
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "budget", "set", "vision", "10", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": alice}
    )
    assert r.returncode == 5 and "admins only" in r.stderr
    r = run_cli("status", *opts, cwd=tmp_path)
    assert r.returncode == 5 and "GPU_AGENT_TOKEN" in r.stderr
    r = run_cli("audit", "--json", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": root})
    assert [e["action"] for e in json.loads(r.stdout)["entries"]] == ["approve"]


def test_two_decisions_at_once_exactly_one_wins(world: dict[str, Any]) -> None:
    """Two approvers answer one review at the same moment (and one clicks twice): one
    decision is applied, the others are told who decided, and nothing else changes."""
    deciders = [
        (world["as"]("dave"), False),
        (world["as"]("root"), True),
        (world["as"]("dave"), True),
    ]
    barrier = threading.Barrier(len(deciders))
    results: list[object] = []

    def decide(o: Orchestrator, approve: bool) -> None:
        barrier.wait()
        try:
            results.append(o.resume("review", approve, wait=False))
        except Exception as exc:  # the losers
            results.append(exc)

    threads = [threading.Thread(target=decide, args=d) for d in deciders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 2
    assert all("already decided" in str(e) for e in lost)
    log = [e for e in world["as"]("root").audit() if e.key.startswith("decide:")]
    assert len(log) == 1
    outcome = world["as"]("root").outcome("review")
    assert outcome.status is (Status.DENIED if log[0].action == "deny" else Status.ALLOCATED)


def test_a_claimed_decision_a_crash_left_unapplied_is_applied_on_resume(
    world: dict[str, Any],
) -> None:
    root = world["as"]("root")
    snap = root.graph.get_state(root._config("review"))
    entry = audit.decision_entry(
        root.services,
        snap.values,
        request_of(snap.values),
        HumanDecision(approve=False, by="dave", comment="no"),
    )
    assert root.services.ledger.claim(entry)[0]  # claimed, then the process died
    out = root.resume("review")
    assert out.status is Status.DENIED and out.reason == "denied by dave (no)"


@pytest.mark.parametrize("point", ["before:validate", "after:validate"])
def test_who_asked_survives_a_resume_by_another_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """alice's request stops in validate (it raised; its update never checkpointed) and ann,
    of the same project, carries the thread on: validate runs again for ann, yet the request,
    its record and what resume returns still say alice asked."""
    state = tmp_path / "s"
    state.mkdir()
    tokens = {n: add_identity(state, n, "member", "vision") for n in ("alice", "ann")}
    monkeypatch.setenv(ENV, "nowhere,raise")  # the nodes wrapped, nothing armed yet
    clock = VirtualClock()
    alice, ann = (
        Orchestrator(state, small_config(), clock=clock, token=tokens[n]) for n in ("alice", "ann")
    )
    try:
        monkeypatch.setenv(ENV, f"{point},raise")
        with pytest.raises(InjectedFault):
            alice.request(ONE, thread_id="t")
        monkeypatch.setenv(ENV, "nowhere,raise")
        assert ann.outcome("t").next == ("validate",)
        out = ann.resume("t")
        assert out.status is Status.RELEASED
        assert out.request is not None and out.request.requested_by == "alice"
        [record] = ann.history()
        assert record.request is not None and record.request.requested_by == "alice"
    finally:
        alice.close()
        ann.close()


GOOD_HASH = "0" * 64


def identity_block(**fields: str | int) -> str:
    """One [[identity]] table of the access file, its values as TOML writes them."""
    return "[[identity]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


ROOT: dict[str, str | int] = {"name": "root", "role": "admin", "token_sha256": GOOD_HASH}


@pytest.mark.parametrize(
    "text,needle",
    [
        # a hand-edited file (session 29): a hash that was no ASCII string passed _load and
        # failed every command in identify's hmac.compare_digest (a traceback)
        (identity_block(**ROOT | {"token_sha256": 5}), "token_sha256"),
        (identity_block(**ROOT | {"token_sha256": "é"}), "token_sha256"),
        (identity_block(**ROOT | {"token_sha256": "A" * 64}), "64 lower-case hex digits"),
        (identity_block(**ROOT | {"name": 7}), "identity of type int"),
        (identity_block(**ROOT | {"name": "eve\x1b[2J"}), "identity 'eve\\x1b[2J'"),
        (identity_block(**ROOT | {"role": "root"}), "role must be one of"),
        (identity_block(**ROOT | {"project": "vision"}), "an admin acts on every project"),
        (identity_block(**ROOT | {"role": "member"}), "a member belongs to a project"),
        (identity_block(**ROOT | {"role": "member", "project": 3}), "project of type int"),
        (identity_block(**ROOT | {"name": "local"}), "is reserved"),
        (identity_block(**ROOT | {"tokne_sha256": GOOD_HASH}), "unknown key 'tokne_sha256'"),
        (identity_block(name="root", role="admin"), "no token_sha256"),
        (identity_block(**ROOT) + identity_block(**ROOT), "[[identity]] 2: identity 'root'"),
        ("identity = 5\n", "[[identity]] tables and nothing else"),
        (identity_block(**ROOT) + "[extra]\n", "[[identity]] tables and nothing else"),
    ],
    ids=lambda v: "file" if "\n" in str(v) else str(v),
)
def test_a_damaged_access_file_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    """What identify reads of access.toml is checked as add_identity writes it: anything
    else is one StateDirError line naming the file and the way out, never a TypeError."""
    (tmp_path / ACCESS).write_text(text)
    with pytest.raises(StateDirError) as err:
        identify(tmp_path, "anything")
    line = str(err.value)
    assert line.startswith(f"{tmp_path / ACCESS} is damaged: ") and needle in line, line
    assert (
        line.endswith("fix it or restore it from a backup (without it, anyone acts as an admin)")
        and "\n" not in line
    )


def test_a_damaged_access_file_through_the_cli(tmp_path: Path) -> None:
    """The session-29 reproducer: `token list`, `budget set` and `health` on a state directory
    whose access.toml has a number for a hash exit 2 with one line (a JSON error with
    --json), not a traceback."""
    state = tmp_path / "st"
    state.mkdir()
    (state / ACCESS).write_text(identity_block(**ROOT | {"token_sha256": 5}))
    env = {"GPU_AGENT_TOKEN": "abc"}
    for command in (["token", "list"], ["budget", "set", "ads", "5"], ["health"]):
        r = run_cli(*command, "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (command, r.stderr)
        error = json.loads(r.stdout)
        assert error["type"] == "StateDirError" and "is damaged" in error["error"], error
    r = run_cli("token", "list", "--state-dir", str(state), cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.startswith("gpu-agent: ") and r.stderr.count("\n") == 1


def test_a_token_that_is_no_utf8_is_unknown(tmp_path: Path) -> None:
    """GPU_AGENT_TOKEN holding bytes that are no UTF-8 (Python's surrogate escapes) is an
    unknown token, not a UnicodeEncodeError."""
    add_identity(tmp_path, "root", "admin", None)
    with pytest.raises(Forbidden, match="unknown token"):
        identify(tmp_path, "\udcff")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["alice", "--role", "member", "--project", "vision"], "first identity must be an admin"),
        (["bad name", "--role", "admin"], "identity 'bad name'"),
        (["root", "--role", "admin", "--project", "vision"], "an admin acts on every project"),
        (["alice", "--role", "member", "--project", "a/b"], "project 'a/b'"),
    ],
)
def test_a_refused_token_add_creates_no_state_directory(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    """A `token add` that is refused exits 2 and changes nothing: it leaves no new state
    directory behind (it made one, empty, before it checked)."""
    state = tmp_path / "new"
    r = run_cli("token", "add", *args, "--state-dir", str(state), "--json", cwd=tmp_path)
    assert r.returncode == 2 and needle in json.loads(r.stdout)["error"], r.stderr
    assert not state.exists()
