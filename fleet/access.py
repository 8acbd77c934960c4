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
import re
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

    def problem(self) -> str | None:
        """Why nobody may act as this identity (None: one may): it is LOCAL, or one an access
        file could hold, as its name is stamped on requests and written to the audit log."""
        if self == LOCAL:
            return None
        return identity_problem(self.name, self.role, self.project)


LOCAL = Identity("local", None, "admin")


def _hash(token: str) -> str:
    """The token's SHA-256; an environment's bytes that are no UTF-8 (Python's surrogate
    escapes) hash as those bytes: an unknown token, not a traceback."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


_KEYS = ("name", "project", "role", "token_sha256")  # an [[identity]]'s, in _write's order
_SHA256 = re.compile(r"[0-9a-f]{64}")  # hashlib's hexdigest


# not "move it aside": without the file, anyone is the local admin of the state directory
_WAY_OUT = "fix it or restore it from a backup (without it, anyone acts as an admin)"


def _load(path: Path) -> list[dict[str, str]]:
    """The access file's identities, each checked as add_identity wrote it: a hand-edited one
    that is not (a hash that is no string) would fail every caller's identify, not just its own."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StateDirError(f"{path} is unreadable ({exc}); {_WAY_OUT}") from None
    entries = data.get("identity", [])
    why = _file_problem(data, entries)
    if why is not None:
        raise StateDirError(f"{path} is damaged: {why}; {_WAY_OUT}")
    return cast(list[dict[str, str]], entries)


def _file_problem(data: dict[str, object], entries: object) -> str | None:
    """Why the access file's `data` is not what _write writes (None: it is)."""
    unknown = sorted(set(data) - {"identity"})
    if unknown or not isinstance(entries, list):
        return "it holds [[identity]] tables and nothing else"
    seen: set[object] = set()
    for i, e in enumerate(entries, 1):
        name = e.get("name") if isinstance(e, dict) else None
        why = _entry_problem(e)
        if why is None and name in seen:
            why = f"identity {name!r} appears twice"
        if why is not None:
            return f"[[identity]] {i}: {why}"
        seen.add(name)
    return None


def _entry_problem(e: object) -> str | None:
    """Why one [[identity]] is not one add_identity could have written (None: it is)."""
    if not isinstance(e, dict):
        return "not a table"
    unknown = sorted(set(e) - set(_KEYS))
    if unknown:
        return f"unknown key {names.shown(unknown[0])} (keys: {', '.join(_KEYS)})"
    missing = [k for k in _KEYS if k != "project" and k not in e]
    if missing:
        return f"no {missing[0]}"
    digest = e["token_sha256"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return "token_sha256 is not 64 lower-case hex digits (a token's SHA-256)"
    return identity_problem(e["name"], e["role"], e.get("project"))


def identity_problem(name: object, role: object, project: object) -> str | None:
    """Why (name, role, project) is no identity (None: it is one): what add_identity refuses
    and what _load calls damage in a hand-edited file."""
    why = names.problem("identity", name)
    if why is not None:
        return why
    if name == LOCAL.name:
        return (
            f"identity name {LOCAL.name!r} is reserved (the user of a state directory "
            "without tokens)"
        )
    if role not in ROLES:
        return f"role must be one of {', '.join(ROLES)}, not {names.shown(role)}"
    if role == "admin" and project is not None:
        return "an admin acts on every project: give it none (--project)"
    if role != "admin" and project is None:
        return f"a {role} belongs to a project: give it one (--project)"
    return None if project is None else names.problem("project", project)


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
        keys = [k for k in _KEYS if e.get(k)]
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


def check_identity(name: str, role: str, project: str | None) -> Role:
    """The role of a valid new identity (name, role, project), else InvalidInput: what can be
    refused before anything is written or created."""
    why = identity_problem(name, role, project or None)
    if why is not None:
        raise InvalidInput(why)
    return cast(Role, role)


def add_identity(state_dir: Path, name: str, role: str, project: str | None) -> str:
    """Add an identity; its new token (shown once, stored only as a hash)."""
    role = check_identity(name, role, project)
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
