"""The one place that says what a name or an id may look like: projects, identities, thread
ids, allocation ids, request ids, workloads, and the fleet file's node and GPU type names; and
what free text a person writes into the audit log may hold (a review's comment, a preemption's
reason).

Every entry (CLI, Python API, LangGraph server, tools, the web page) checks with a full match
of these patterns: `re.match(... $)` lets a final newline through, which made "vision\\n" an
unbudgeted twin of "vision" and wrote unreadable access files. The patterns leave out
everything that could break a line, a path, a URL or a TOML string: control characters,
spaces, '/', '?', '#', quotes and ':' (the audit log's key separator).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from fleet.errors import InvalidInput

_WORD = r"[A-Za-z0-9][A-Za-z0-9_.-]"
PROJECT = re.compile(_WORD + r"{0,63}")
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
THREAD_ID = re.compile(_WORD + r"{0,127}")
REQUEST_ID = THREAD_ID
ALLOCATION_ID = re.compile(r"a-[0-9a-f]{12}")
WORKLOAD = PROJECT  # a job's name for its speeds: a key of the fleet file's [speeds] table
NODE = re.compile(_WORD + r"{0,252}")  # a host name's characters, as long as a host name
GPU_TYPE = PROJECT  # a catalog's type ("A100", "RTX4090"): printed in every table and route

_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_HOST_RULE = "1-253 letters, digits, '.', '_' or '-', starting with a letter or digit"
RULES = {
    "project": (PROJECT, _NAME_RULE),
    "identity": (
        IDENTITY,
        "1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
    ),
    "thread id": (
        THREAD_ID,
        "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
    "request id": (
        REQUEST_ID,
        "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
    "allocation id": (ALLOCATION_ID, "'a-' and 12 hex digits, as `gpu-agent status` shows"),
    "workload": (WORKLOAD, _NAME_RULE),
    "GPU type": (GPU_TYPE, _NAME_RULE),
    "node": (NODE, _HOST_RULE),
    "rack": (NODE, _HOST_RULE),
}


def valid(kind: str, value: object) -> bool:
    pattern, _ = RULES[kind]
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def problem(kind: str, value: object) -> str | None:
    """Why `value` is not a valid `kind`, in one line (None: it is)."""
    if valid(kind, value):
        return None
    _, rule = RULES[kind]
    return f"{kind} {shown(value)}: {rule}"


def check(kind: str, value: Any) -> str:
    """`value` if it is a valid `kind`, else InvalidInput saying what is allowed."""
    why = problem(kind, value)
    if why is not None:
        raise InvalidInput(why)
    return str(value)


def shown(value: object) -> str:
    """Something a caller sent, as a short, printable, quoted string (repr escapes control
    characters)."""
    if not isinstance(value, str):
        return f"of type {type(value).__name__}"
    return repr(value if len(value) <= 80 else value[:77] + "...")


TEXT_MAX = 500  # characters of free text: a review's comment, a preemption's reason
# What may reorder how a line reads (embeddings, overrides, isolates): refused with the
# control characters; other format characters (a joiner in an emoji, Persian's non-joiner)
# are text
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def text_problem(what: str, text: str) -> str | None:
    """Why `text` may not be written as `what` (None: it may): control characters and bidi
    overrides would garble the audit log's lines and the page, and it is at most TEXT_MAX."""
    if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in text):
        return f"{what} may not hold control characters"
    if len(text) > TEXT_MAX:
        return f"{what} is at most {TEXT_MAX} characters, not {len(text)}"
    return None
