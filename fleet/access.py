"""Who is asking: tokens mapped to a project and a role, in the state directory's access.toml.

Without an access file the state directory belongs to one user, who may do everything (the
single-machine default, identity `local`). Once `gpu-agent token add` writes one, every caller
needs a token (env GPU_AGENT_TOKEN): a member acts on their own project's requests and
allocations, an approver also decides their project's reviews, an admin may do anything
(set budgets, act on any project, run workers). Only a hash of each token is stored.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from fleet import names
from fleet.errors import Forbidden, InvalidInput, StateDirError

ACCESS = "access.toml"
LOCK = ".access.lock"
Role = Literal["member", "approver", "admin"]
ROLES: tuple[Role, ...] = ("member", "approver", "admin")


@dataclass(frozen=True)
class Identity:
    name: str
    project: str | None  # None: every project (an admin)
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_act_on(self, project: str) -> bool:
        return self.admin or project == self.project

    def asker(self, named: str | None) -> str:
        """Who asked, for a request that names `named`: an admin may act for whom it names
        (a worker for a job's submitter); anyone else asks as themselves."""
        return named if self.admin and named else self.name

    def check_project(self, project: str, what: str) -> None:
        if not self.may_act_on(project):
            raise Forbidden(
                f"{self.name} ({self.role} of {self.project}) may not {what} of project {project}"
            )

    def check_sees(self, project: str, missing: str) -> None:
        """Something named by its id (an allocation, a thread, a job) that is another
        project's is answered as if there were none (`missing`, what a wrong id gets): its
        id tells a caller nothing of other projects, as the server's 404 does."""
        if not self.may_act_on(project):
            raise InvalidInput(missing)

    def check_decide(self, project: str) -> None:
        self.check_project(project, "decide reviews")
        if self.role == "member":
            raise Forbidden(
                f"{self.name} is a member of {project}, not an approver: only an "
                "approver or an admin decides reviews"
            )

    def check_admin(self, what: str) -> None:
        if not self.admin:
            raise Forbidden(f"{self.name} ({self.role}) may not {what}: admins only")


LOCAL = Identity("local", None, "admin")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _load(path: Path) -> list[dict[str, str]]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StateDirError(f"{path} is unreadable ({exc}); fix it or move it aside") from None
    entries = data.get("identity", [])
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"name", "role", "token_sha256"} <= set(e) and e["role"] in ROLES
        for e in entries
    ):
        raise StateDirError(
            f"{path}: each [[identity]] needs name, role ({', '.join(ROLES)}), "
            "token_sha256 and, unless an admin, project"
        )
    return cast(list[dict[str, str]], entries)


def identify(state_dir: Path, token: str | None) -> Identity:
    """The caller's identity: LOCAL without an access file, else the token's."""
    path = state_dir / ACCESS
    if not path.exists():
        return LOCAL
    if not token:
        raise Forbidden(f"{path} requires a token: set GPU_AGENT_TOKEN")
    digest = _hash(token)
    for e in _load(path):
        if hmac.compare_digest(e["token_sha256"], digest):
            return Identity(e["name"], e.get("project"), cast(Role, e["role"]))
    raise Forbidden("unknown token (GPU_AGENT_TOKEN)")


@contextmanager
def _locked(state_dir: Path) -> Iterator[Path]:
    """The access file, with every other writer of it kept out (add and revoke rewrite it)."""
    fd = os.open(state_dir / LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield state_dir / ACCESS
    finally:
        os.close(fd)


def _write(path: Path, entries: list[dict[str, str]]) -> None:
    """Replace the access file at once (0600): a crash leaves the old one or the new one."""
    blocks = []
    for e in entries:
        keys = [k for k in ("name", "project", "role", "token_sha256") if e.get(k)]
        # json.dumps quotes as a TOML basic string does for these characters
        blocks.append("[[identity]]\n" + "".join(f"{k} = {json.dumps(e[k])}\n" for k in keys))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(blocks))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def role_of(value: str) -> Role:
    """`value` as a Role, or one line naming the roles."""
    for role in ROLES:
        if value == role:
            return role
    raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {value!r}")


def add_identity(state_dir: Path, name: str, role: str, project: str | None) -> str:
    """Add an identity; its new token (shown once, stored only as a hash)."""
    names.check("identity", name)
    if name == LOCAL.name:
        raise InvalidInput(
            f"identity name {LOCAL.name!r} is reserved (the user of a state "
            "directory without tokens)"
        )
    role = role_of(role)
    if role != "admin" and not project:
        raise InvalidInput(f"a {role} belongs to a project: pass --project")
    if role == "admin" and project:
        raise InvalidInput("an admin acts on every project: leave --project out")
    if project:
        names.check("project", project)
    with _locked(state_dir) as path:
        entries = _load(path) if path.exists() else []
        if any(e["name"] == name for e in entries):
            raise InvalidInput(f"identity {name!r} exists already")
        token = secrets.token_urlsafe(24)
        entry = {"name": name, "role": role, "token_sha256": _hash(token)}
        _write(path, [*entries, entry | ({"project": project} if project else {})])
    return token


def identities(state_dir: Path) -> list[Identity]:
    """Who has a token (never the tokens: only their hashes are kept)."""
    path = state_dir / ACCESS
    if not path.exists():
        return []
    return [Identity(e["name"], e.get("project"), cast(Role, e["role"])) for e in _load(path)]


def revoke_identity(state_dir: Path, name: str) -> Identity:
    """Remove an identity: its token stops working at once. The last admin stays (nobody
    could add identities or set budgets again)."""
    names.check("identity", name)
    with _locked(state_dir) as path:
        entries = _load(path) if path.exists() else []
        gone = [e for e in entries if e["name"] == name]
        if not gone:
            raise InvalidInput(f"no identity {name!r}")
        kept = [e for e in entries if e["name"] != name]
        if gone[0]["role"] == "admin" and not any(e["role"] == "admin" for e in kept):
            raise InvalidInput(f"{name} is the last admin: add another admin first")
        _write(path, kept)
    e = gone[0]
    return Identity(e["name"], e.get("project"), cast(Role, e["role"]))
