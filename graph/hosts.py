"""Which Host headers a gpu-agent server answers to: the web page (graph/ui.py) and the
metrics (graph/metrics.py) share this check.

Why: a page on another site can rebind its DNS name to 127.0.0.1 and read what a server on
this machine answers, since the browser thinks it talks to that site. The browser still sends
that site's name as Host, so a server that answers only to the names it serves (the loopback
names, the address it binds, the ones its operator adds) gives such a page nothing. Light on
purpose (no Starlette, no prometheus_client): both servers import it, and the CLI may too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from fleet import names
from fleet.errors import InvalidInput

# Host names every server answers to; the bound address and --allow-host names add others.
LOOPBACK = ("127.0.0.1", "localhost", "::1")

_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._-]+))(?::([0-9]{1,5}))?")
_NAME = re.compile(r"[a-z0-9._-]{1,253}|[0-9a-f:.]{2,45}")


def allowed_hosts(extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names a server answers to: the loopback names and `extra` (a name or an
    address, IPv6 with or without brackets, no port). InvalidInput for anything else."""
    out = set(LOOPBACK)
    for raw in extra:
        name = raw.strip().lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if not name:
            continue
        if not _NAME.fullmatch(name):
            raise InvalidInput(
                f"host name {raw!r}: a DNS name or an IP address, without a port or a scheme"
            )
        out.add(name)
    return frozenset(out)


def host_port(value: str) -> tuple[str, int | None] | None:
    """A Host header's (or an origin's authority's) name and port; None if it is malformed
    (user info, a path, spaces, a list: nothing but a name or address and a port)."""
    found = _HOST.fullmatch(value.strip().lower())
    if found is None:
        return None
    port = int(found[3]) if found[3] else None
    if port is not None and not 0 < port < 65536:
        return None
    return found[1] or found[2], port


def served_host(sent: Sequence[str], hosts: frozenset[str]) -> tuple[str, int | None] | None:
    """The (name, port) a request was sent to, given every Host header it carried, where it is
    exactly one naming one of `hosts`; None: refuse it (no browser sends none or two)."""
    host = host_port(sent[0]) if len(sent) == 1 else None
    return host if host is not None and host[0] in hosts else None


def host_refusal(sent: Sequence[str], what: str, how: str) -> str:
    """The one line a refused Host gets: `what` is not served under it; `how` adds names."""
    shown = names.shown(sent[0] if len(sent) == 1 else "")
    return f"gpu-agent: {what} not served under host {shown} (its operator adds names with {how})\n"
