"""The web page for the people who approve, watch and pay: pending reviews, the fleet, spend.

Server-rendered HTML that works without JavaScript (no build step, nothing downloaded): a
Starlette app that `gpu-agent ui` serves on 127.0.0.1 and that langgraph.json's `http.app`
mounts on the LangGraph server under /ui. Identity is the CLI's (fleet.access): with an access
file, a token entered once (kept in an HttpOnly, SameSite=Strict cookie) decides what the
page shows and allows; without one, the page is the local user's.

A decision is applied exactly as `gpu-agent resume THREAD --approve|--deny` applies it, after
claiming it in the ledger (Orchestrator._decision): a second click, a stale page or a second
approver gets a page saying who decided. Every form carries a token bound to the caller
(HMAC of their token), so a forged post from another site is refused.

Before any of that, every request passes `_Guard`: its Host must be a name the page serves
(loopback names, the bound address, the operator's --allow-host / GPU_AGENT_UI_HOSTS; the
check is graph.hosts', which the metrics server shares), so a page elsewhere that rebinds its
DNS name to 127.0.0.1 reads nothing; and a POST whose Origin (or, without one, Referer) is
another origin, or `null`, is refused. A POST with neither (curl, scripts) goes on: the
per-caller form token still has to match. A request that fails unexpectedly gets one line
(500) and its traceback goes to the server's log, never to the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import parse_qsl, quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from council.features import cheapest
from fleet import names
from fleet.access import ACCESS, LOCAL, Identity, identify, identities
from fleet.errors import Forbidden, GPUAgentError, InvalidInput, StateDirError
from fleet.models import CouncilDecision, GPURequest, ReleaseReason, RouteMode, Status
from fleet.routing import Refusal, guarded
from fleet.supervise import still_running
from graph.hosts import allowed_hosts, host_port, host_refusal, served_host
from graph.orchestrator import Orchestrator
from graph.outcome import RequestOutcome
from nodes.audit import ask_key, decision_key, recorded

COOKIE = "gpu_agent_token"
# Who the page's own orchestrator is: it acts for each caller through `acting_as`, and as itself
# only to carry a decided thread on (monitoring, release), as a worker does.
SERVER = Identity("web-ui", None, "admin")
# Host names the page answers to besides graph.hosts.LOOPBACK, comma-separated, where
# `gpu-agent ui` has no --allow-host (and always under the LangGraph server)
HOSTS_ENV = "GPU_AGENT_UI_HOSTS"
REFRESH_SECONDS = 15  # the pending reviews list reloads itself (a <meta> refresh, no script)
LIVE = ("queued", "active")
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;
 align-items:center}
header a{color:#e5e7eb;text-decoration:none}header .who{margin-left:auto;opacity:.8}
main{padding:1rem 1.2rem;max-width:90rem}
.when{white-space:nowrap}
table{border-collapse:collapse;background:#fff;margin:.5rem 0 1.2rem}
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;font-size:.92rem;
 vertical-align:top}
th{background:#eef1f4}.approve{background:#1a7f37;color:#fff}.deny{background:#cf222e;color:#fff}
.release{background:#9a6700;color:#fff;padding:.25rem .7rem}
button{border:0;padding:.45rem 1rem;border-radius:4px;cursor:pointer;margin-right:.5rem}
.note{background:#fff8c5;padding:.5rem .8rem;border:1px solid #d4a72c}
.error{background:#ffebe9;padding:.5rem .8rem;border:1px solid #cf222e}
.flag{background:#ffebe9;border-left:4px solid #cf222e;padding:.4rem .8rem;margin:.4rem 0}
.badge{background:#cf222e;color:#fff;border-radius:3px;padding:0 .35rem;font-size:.8rem;
 white-space:nowrap}
.decided{background:#ddf4ff;padding:.5rem .8rem;border:1px solid #54aeff}
.explain{max-width:60rem;line-height:1.45}
.id{font-family:ui-monospace,monospace;font-size:.85rem;overflow-wrap:anywhere}
.aid{white-space:nowrap}td.gpus{min-width:11rem}
div.note form{display:inline;margin-left:1rem}
.muted{color:#57606a}
textarea{width:28rem;height:3rem}
svg text{font-family:system-ui,sans-serif;fill:#1b1f24}
"""
# Every response: no framing (a framed page's buttons could be clicked through), no sniffing
# a text/plain error into HTML, no script at all, forms post only here.
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
]

# ---- labels: what the page shows for the models' field names and values ----------------------

FIELDS = {
    "project": "Project",
    "requested_by": "Requested by",
    "purpose": "Purpose",
    "gpu_type": "GPU type",
    "count": "GPUs",
    "duration_hours": "Duration",
    "priority": "Priority",
    "mode": "Routing",
    "budget_limit": "Budget limit",
    "min_memory_gb": "Minimum GPU memory",
    "max_wait_minutes": "Longest wait for GPUs",
    "workload": "Workload",
    "request_id": "Request id",
}
STATUS = {
    "pending": "not started",
    "invalid": "invalid",
    "denied": "denied",
    "pending_review": "waiting for a review",
    "queued": "queued for GPUs",
    "allocated": "GPUs allocated",
    "released": "finished (GPUs released)",
    "timed_out": "gave up waiting for GPUs",
}
STATE = {"queued": "queued", "active": "running", "released": "released"}
RELEASE_REASON = {
    "lease-expired": "lease ended",
    "idle": "released for idling",
    "budget": "budget reached",
    "explicit": "released by hand",
    "context-exit": "the program's block ended",
    "expired-while-down": "lease ended while nothing ran",
    "cancelled": "cancelled",
    "unhealthy": "a GPU became unhealthy",
    "command-exit": "the command ended",
    "cancelled-outside": "ended by the cluster's scheduler",
    "preempted": "yielded its GPUs after a checkpoint notice",
}
MODE = {
    "budget": "budget (cheapest per unit of work)",
    "performance": "performance (fastest within budget)",
}
VERDICT = {"approve": "approve", "deny": "deny", "abstain": "abstain"}


def label(table: dict[str, str], key: object) -> str:
    """A readable label (a raw value not in the map: its underscores and dashes as spaces)."""
    text = str(key)
    return table.get(text, text.replace("_", " ").replace("-", " "))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _q(value: str) -> str:
    """A checked id as one URL path segment (quoted anyway)."""
    return quote(value, safe="")


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _axis_money(x: float) -> str:
    return "$0" if x == 0 else f"${x:,.0f}" if x >= 100 else f"${x:,.2f}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M} UTC"


def _iso(value: str | None) -> str:
    """An ISO timestamp from the status JSON, as the page shows times."""
    if not value:
        return "-"
    try:
        return f"{datetime.fromisoformat(value).astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    except ValueError:
        return value


def _span(seconds: float) -> str:
    """A duration in words: '45 s', '12 min', '3 h 05 min', '2 d 4 h'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _reading(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{round(value):d} {unit}"


def _hours(h: float) -> str:
    return f"{h:g} h" if float(h).is_integer() else f"{h:.2f} h"


def _value(field: str, value: object) -> str:
    """A request field's value as the page shows it."""
    if field == "duration_hours" and isinstance(value, int | float):
        return _hours(float(value))
    if field == "budget_limit" and isinstance(value, int | float):
        return _money(float(value))
    if field == "min_memory_gb":
        return f"{value:g} GB" if isinstance(value, int | float) else str(value)
    if field == "max_wait_minutes":
        return f"{value:g} min" if isinstance(value, int | float) else str(value)
    if field == "mode":
        return label(MODE, value)
    return str(value)


def bars(
    values: list[float],
    labels: list[str],
    *,
    oldest: str = "",
    newest: str = "",
    width: int = 560,
    height: int = 170,
) -> str:
    """A small inline SVG bar chart of dollar amounts with its scale: the top and zero of the
    y axis in dollars, the x axis from oldest to newest with their dates (no script)."""
    if not values:
        return "<p>no history yet</p>"
    left, right, top_pad, bottom = 72, 12, 10, 38
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    top = max(max(values), 0.0)
    scale = top if top > 0 else 1.0
    base = top_pad + plot_h
    w = plot_w / len(values)
    bw = min(max(w - 2, 1), 48)  # a bar, centred in its slot
    rects = "".join(
        f'<rect x="{left + i * w + (w - bw) / 2:.1f}" y="{base - (v / scale) * plot_h:.1f}" '
        f'width="{bw:.1f}" height="{(max(v, 0.0) / scale) * plot_h:.1f}" '
        f'fill="#0969da"><title>{_e(lab)}: {_e(_money(v))}</title></rect>'
        for i, (v, lab) in enumerate(zip(values, labels, strict=True))
    )
    axes = (
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base}" stroke="#57606a"/>'
        f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" '
        'stroke="#57606a"/>'
        f'<line x1="{left - 4}" y1="{top_pad}" x2="{left}" y2="{top_pad}" '
        'stroke="#57606a"/>'
        f'<text x="{left - 6}" y="{top_pad + 4}" font-size="11" text-anchor="end">'
        f"{_e(_axis_money(top))}</text>"
        f'<text x="{left - 6}" y="{base + 4}" font-size="11" text-anchor="end">$0</text>'
        f'<text x="{left}" y="{base + 15}" font-size="11">oldest</text>'
        f'<text x="{left}" y="{base + 29}" font-size="10" class="muted">{_e(oldest)}</text>'
        f'<text x="{width - right}" y="{base + 15}" font-size="11" text-anchor="end">'
        "newest</text>"
        f'<text x="{width - right}" y="{base + 29}" font-size="10" text-anchor="end">'
        f"{_e(newest)}</text>"
    )
    return (
        f'<svg role="img" aria-label="cost per bar, $0 to {_e(_axis_money(top))}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"{axes}{rects}</svg>"
    )


# ---- host names and origins ------------------------------------------------------------------

_DEFAULT_PORT = {"http": 80, "https": 443}


def hosts_from_env() -> list[str]:
    """GPU_AGENT_UI_HOSTS, comma-separated."""
    return [h for h in os.environ.get(HOSTS_ENV, "").split(",") if h.strip()]


def _same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """Whether `origin` (scheme://authority, or a Referer URL) names the host the request was
    sent to: same name, same port (an absent port is the scheme's default on both sides)."""
    found = re.fullmatch(r"(https?)://([^/?#]+)(?:[/?#].*)?", origin.strip(), re.S)
    if found is None:
        return False
    theirs = host_port(found[2])
    if theirs is None:
        return False
    default = _DEFAULT_PORT[found[1].lower()]
    return theirs[0] == host[0] and (theirs[1] or default) == (host[1] or default)


def _internal_error() -> Response:
    """What a request that failed unexpectedly gets: one line, never the exception's text (a
    path, a token) nor a traceback, which go to the server's log."""
    return PlainTextResponse(
        "gpu-agent: internal error: the page could not answer; see the server's log\n", 500
    )


class _Guard:
    """ASGI middleware: the Host check on every request, the Origin check on every POST, the
    security headers on every response, and one line for a request that failed unexpectedly."""

    def __init__(self, app: Any, ui: WebUI, hosts: frozenset[str]) -> None:
        self.app, self.ui, self.hosts = app, ui, hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            await refused(scope, receive, send_with_headers)
            return
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if not started:
                await _internal_error()(scope, receive, send_with_headers)
            raise  # on to the server, which logs the traceback (uvicorn under `gpu-agent ui`)

    def refusal(self, scope: Any) -> Response | None:
        headers = Headers(scope=scope)
        sent = headers.getlist("host")
        host = served_host(sent, self.hosts)
        if host is None:
            how = f"`gpu-agent ui --allow-host NAME` or {HOSTS_ENV}"
            return PlainTextResponse(host_refusal(sent, "this page is", how), 421)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        origins, referers = headers.getlist("origin"), headers.getlist("referer")
        if len(origins) > 1 or len(referers) > 1:  # as two Hosts are: no browser sends them
            return self.ui.error(
                Request(scope), None, 403, "this form came with two origins: nothing changed"
            )
        origin = origins[0] if origins else None
        referer = referers[0] if referers else None
        if origin is not None:
            why = (
                None
                if _same_origin(origin, host)
                else f"its Origin {names.shown(origin)} is not this page"
            )
        elif referer is not None:
            why = (
                None
                if _same_origin(referer, host)
                else "it was sent from another page (its Referer is not this page)"
            )
        else:  # not a browser (curl, a script): the form token alone decides
            why = None
        if why is None:
            return None
        return self.ui.error(
            Request(scope),
            None,
            403,
            f"this form was posted from elsewhere ({why}): nothing changed",
        )


class WebUI:
    """The pages over one Orchestrator; each request acts as the caller's identity."""

    def __init__(self, orch: Orchestrator, *, simulation: Path | None = None) -> None:
        self.orch = orch
        self.simulation = simulation
        self.state_dir = orch.services.state_dir
        self.secret = os.urandom(32)  # binds form tokens to this server's life
        self.background: list[threading.Thread] = []  # decided threads carried on here

    # ---- identity ------------------------------------------------------------------------

    def _identity(self, request: Request) -> Identity | None:
        """The caller (None: not logged in where tokens are required). StateDirError where the
        access file is damaged, with a token or without one."""
        if not (self.state_dir / ACCESS).exists():
            return LOCAL
        token = request.cookies.get(COOKIE)
        if not token:
            self._check_access()
            return None
        try:
            return identify(self.state_dir, token)
        except Forbidden:
            return None

    def _check_access(self) -> None:
        """StateDirError where the access file cannot be read: no token can be checked, so a
        visitor without one is told so (503), not sent to a log-in that cannot work."""
        identities(self.state_dir)

    def _csrf(self, request: Request) -> str:
        basis = request.cookies.get(COOKIE, "local").encode()
        return hmac.new(self.secret, basis, hashlib.sha256).hexdigest()

    def _check_csrf(self, request: Request, form: dict[str, str]) -> None:
        if not hmac.compare_digest(form.get("csrf", ""), self._csrf(request)):
            raise Forbidden(
                "this form was not issued to you (a stale or forged post): nothing changed"
            )

    def _as(self, who: Identity) -> Orchestrator:
        return self.orch.acting_as(who)

    def _deciders(self, project: str) -> str:
        """Who may decide a review of `project`, in words."""
        if not (self.state_dir / ACCESS).exists():
            return "the local user"
        people = identities(self.state_dir)
        approvers = sorted(i.name for i in people if i.role == "approver" and i.project == project)
        admins = sorted(i.name for i in people if i.admin)
        who = (
            f"an approver of {project} ({', '.join(approvers)})"
            if approvers
            else f"an approver of {project} (there is none yet)"
        )
        return who + (f" or an admin ({', '.join(admins)})" if admins else " or an admin")

    # ---- pages ----------------------------------------------------------------------------

    def page(
        self,
        request: Request,
        who: Identity | None,
        title: str,
        body: str,
        status: int = 200,
        refresh: int | None = None,
    ) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        nav = "".join(
            f'<a href="{_e(root)}/{p}">{lab}</a>'
            for p, lab in (("reviews", "Pending reviews"), ("fleet", "Fleet"), ("spend", "Spend"))
        )
        whom = (
            ""
            if who is None
            else f'<span class="who">{_e(who.name)} ({_e(who.role)}'
            + (f" of {_e(who.project)}" if who.project else "")
            + ")</span>"
        )
        meta = "" if refresh is None else f'<meta http-equiv="refresh" content="{int(refresh)}">'
        return HTMLResponse(
            f"<!doctype html><html lang=en><head><meta charset=utf-8>{meta}"
            f"<title>{_e(title)} - gpu-agent</title><style>{STYLE}</style></head>"
            f"<body><header><strong>gpu-agent</strong>{nav}{whom}</header>"
            f"<main><h1>{_e(title)}</h1>{body}</main></body></html>",
            status_code=status,
        )

    def error(
        self,
        request: Request,
        who: Identity | None,
        status: int,
        message: str,
        title: str | None = None,
    ) -> HTMLResponse:
        more = ""
        tid = request.path_params.get("thread") if "path_params" in request.scope else None
        if status == 409 and isinstance(tid, str) and names.valid("thread id", tid):
            root = request.scope.get("root_path", "")
            more = f'<p><a href="{_e(root)}/reviews/{_q(tid)}">See the review</a></p>'
        return self.page(
            request,
            who,
            title
            or {
                403: "Not allowed",
                404: "Not found",
                409: "Already decided",
                503: "Unavailable",
            }.get(status, "Bad request"),
            f'<p class="error">{_e(message)}</p>{more}',
            status,
        )

    def guarded(self, fn: Callable[[Request, Identity], Response]) -> Callable[[Request], Response]:
        """Ids in the path checked first (a malformed one: a one-line 404); then log in where
        tokens are required; GPUAgentError -> an error page (a damaged access file too: the
        caller cannot be known, so the page says why instead)."""

        def endpoint(request: Request) -> Response:
            for param, kind in (("thread", "thread id"), ("allocation", "allocation id")):
                if param in request.path_params:
                    why = names.problem(kind, request.path_params[param])
                    if why is not None:
                        return PlainTextResponse(f"not found: {why}\n", 404)
            try:
                who = self._identity(request)
            except StateDirError as exc:
                return self.error(request, None, _status(exc), str(exc))
            if who is None:
                root = request.scope.get("root_path", "")
                return RedirectResponse(f"{root}/login", status_code=303)
            try:
                return fn(request, who)
            except (Forbidden, InvalidInput) as exc:
                return self.error(request, who, _status(exc), str(exc))

        return endpoint

    def login(self, request: Request) -> Response:
        """The log-in form; a damaged access file instead says so (503), as every page does."""
        if request.method == "POST":
            return self._log_in(request)
        try:
            self._check_access()
        except StateDirError as exc:
            return self.error(request, None, _status(exc), str(exc))
        return self.page(request, None, "Log in", _login_form(request.scope.get("root_path", "")))

    def _log_in(self, request: Request) -> Response:
        """A posted token: the cookie and on to the reviews, or the form again saying why not."""
        root = request.scope.get("root_path", "")
        token = _form(request).get("token", "")
        try:
            identify(self.state_dir, token)
        except StateDirError as exc:  # no token can be checked: not the token's fault
            return self._login_refused(request, _status(exc), str(exc))
        except GPUAgentError:
            return self._login_refused(request, 403, "unknown token")
        response = RedirectResponse(f"{root}/reviews", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=root or "/")
        return response

    def _login_refused(self, request: Request, status: int, message: str) -> HTMLResponse:
        """The log-in page again, saying why the token was not taken."""
        root = request.scope.get("root_path", "")
        body = f'<p class="error">{_e(message)}</p>{_login_form(root)}'
        return self.page(request, None, "Log in", body, status)

    # ---- reviews ----------------------------------------------------------------------------

    def reviews(self, request: Request, who: Identity) -> Response:
        orch = self._as(who)
        root = request.scope.get("root_path", "")
        now = orch.services.clock.now()
        rows = []
        for tid, ask in orch.pending_review_entries():
            if not names.valid("thread id", tid):  # never a link from an unchecked id
                continue
            out = orch.outcome(tid)
            req = out_request(out)
            rows.append(
                f'<tr><td><a class="id" href="{_e(root)}/reviews/{_q(tid)}">{_e(tid)}</a></td>'
                f"<td>{_e(req.get('project'))}</td>"
                f"<td>{_e(req.get('requested_by') or 'unknown')}</td>"
                f"<td>{_e(req.get('count'))} x {_e(req.get('gpu_type') or 'any type')}</td>"
                f"<td>{_e(_value('duration_hours', req.get('duration_hours')))}</td>"
                f"<td>{_e(_span(now - ask.at) if ask else '-')}</td>"
                f"<td>{_e(out.council.summary if out.council else '')}</td></tr>"
            )
        body = (
            (
                "<table><tr><th>Thread</th><th>Project</th><th>Requested by</th><th>GPUs</th>"
                "<th>Duration</th><th>Waiting for</th><th>Council</th></tr>"
                + "".join(rows)
                + "</table>"
            )
            if rows
            else "<p>No request is waiting for a decision.</p>"
        )
        body += (
            f'<p class="muted">This list reloads itself every {REFRESH_SECONDS} s. '
            "Open a request to decide it.</p>"
        )
        return self.page(request, who, "Pending reviews", body, refresh=REFRESH_SECONDS)

    def review(self, request: Request, who: Identity) -> Response:
        tid = request.path_params["thread"]
        root = request.scope.get("root_path", "")
        orch = self._as(who)
        out = orch.outcome(tid)
        req = out_request(out)
        project = str(req.get("project", "default"))
        svc = orch.services
        now = svc.clock.now()
        ask, decided = (
            (None, None)
            if out.request is None
            else (
                svc.ledger.audit_entry(ask_key({"thread_id": tid}, out.request)),
                svc.ledger.audit_entry(decision_key({"thread_id": tid}, out.request)),
            )
        )
        parts = [
            f'<p>Thread <code class="id">{_e(tid)}</code>: '
            f"<strong>{_e(label(STATUS, out.status.value))}</strong>"
            f" ({_e(out.reason)})</p>"
        ]
        asker = req.get("requested_by") or "unknown"
        if ask is not None:
            waited = (decided.at if decided else now) - ask.at
            parts.append(
                f"<p>Asked by <strong>{_e(asker)}</strong>; the council asked for a "
                f"review at {_e(_when(ask.at))}, "
                + (
                    f"decided after {_e(_span(waited))}."
                    if decided
                    else f"waiting for <strong>{_e(_span(waited))}</strong>."
                )
                + "</p>"
            )
        else:
            parts.append(f"<p>Asked by <strong>{_e(asker)}</strong>.</p>")
        if decided is not None:
            human = recorded(decided)
            verb = "Approved" if human.approve else "Denied"
            parts.append(
                f'<p class="decided"><strong>{verb} by {_e(decided.who)}</strong> '
                f"at {_e(_when(decided.at))}: "
                + (f"&ldquo;{_e(human.comment)}&rdquo;" if human.comment else "no comment")
                + "</p>"
            )
        if out.allocation is not None:
            parts.append(self._allocation_note(request, who, out, tid))
        parts.append(
            "<h2>Request</h2><table>"
            + "".join(
                f"<tr><th>{_e(label(FIELDS, k))}</th><td>{_e(_value(k, v))}</td></tr>"
                for k, v in req.items()
                if v is not None and k not in ("request_id", "requested_by")
            )
            + "</table>"
        )
        if out.council is not None:
            parts.append(
                f"<h2>Council: {_e(out.council.summary)}</h2><table><tr><th>Member"
                "</th><th>Vote</th><th>Probability of approval</th>"
                "<th>What moved it most</th></tr>"
            )
            for v in out.council.votes:
                top = sorted(v.reasons, key=lambda r: -abs(r.effect))[:3]
                parts.append(
                    f"<tr><td>{_e(v.member)}</td>"
                    f"<td>{_e(label(VERDICT, v.verdict.value))}</td>"
                    f"<td>{v.probability:.2f}</td><td>"
                    + "; ".join(_e(r.text) for r in top)
                    + "</td></tr>"
                )
            parts.append("</table>")
            shown = out.guardrails()
            if shown is not None:
                parts.append(
                    f'<p class="guardrails">Guardrails ({_e(shown[0])}): '
                    f"{_e(shown[1].outlook())}.</p>"
                )
        pending = out.status is Status.PENDING_REVIEW
        if pending and out.request is not None:
            parts.append(self._costs(orch, out.request, out.council))
        elif out.route is not None:
            r = out.route
            parts.append(
                f"<h2>Routed</h2><p>{_e(req.get('count'))} x {_e(r.gpu_type)} at "
                f"{_money(r.price_per_hour)}/GPU-h, "
                f"estimated {_hours(round(r.est_hours, 2))}: "
                f"{_money(r.est_cost_usd)} ({_e(r.reason)})"
                + (
                    f"; charged {_money(out.release.cost_usd)} for "
                    f"{_hours(round(out.release.hours, 2))} held"
                    if out.release is not None
                    else ""
                )
                + ".</p>"
            )
        history = list(reversed(orch.history(project)[:20]))
        parts.append(
            f"<h2>{_e(project)}: cost of its last {len(history)} allocations</h2>"
            + bars(
                [h.cost_usd for h in history],
                [f"{h.ended_at:%Y-%m-%d} {label(RELEASE_REASON, h.reason.value)}" for h in history],
                oldest=f"{history[0].ended_at:%Y-%m-%d %H:%M}" if history else "",
                newest=f"{history[-1].ended_at:%Y-%m-%d %H:%M}" if history else "",
            )
        )
        if pending and decided is None:
            rails = out.council is not None and out.council.guardrails is not None
            parts.append(self._decide_form(request, who, tid, project, rails))
        parts.append(f'<p><a href="{_e(root)}/reviews">Back to the pending reviews</a></p>')
        return self.page(request, who, f"Review of {project}'s request", "".join(parts))

    def _decide_form(
        self, request: Request, who: Identity, tid: str, project: str, rails: bool
    ) -> str:
        """The decision form; where the council chose guardrails, a box to approve without."""
        root = request.scope.get("root_path", "")
        try:
            who.check_decide(project)
        except Forbidden:
            mine = (
                f"You ({who.name}, {who.role}"
                + (f" of {who.project}" if who.project else "")
                + ") may read this review "
            )
            return (
                f'<p class="note">{_e(mine)}but not decide it: '
                f"{_e(self._deciders(project))} decides it.</p>"
            )
        return (
            f'<h2>Decide</h2><form method="post" '
            f'action="{_e(root)}/reviews/{_q(tid)}/decide">'
            f'<input type="hidden" name="csrf" value="{self._csrf(request)}">'
            '<p><textarea name="comment" placeholder="why (recorded in the audit log)">'
            "</textarea></p>"
            + (
                '<p><label><input type="checkbox" name="guardrails" value="drop"> '
                "approve without the council's guardrails</label></p>"
                if rails
                else ""
            )
            + '<button class="approve" name="decision" value="approve">'
            'Approve</button><button class="deny" name="decision" value="deny">Deny'
            "</button></form>"
        )

    def _allocation_note(
        self, request: Request, who: Identity, out: RequestOutcome, tid: str
    ) -> str:
        a = out.allocation
        assert a is not None
        try:
            row = self.orch.services.ledger.get(a.id)
        except InvalidInput:
            row = None
        state = row.state if row is not None else "active"
        text = (
            f'<div class="note">Allocation <span class="id aid">{_e(a.id)}</span> '
            f"({_e(label(STATE, state))}): {a.count} x {_e(a.gpu_type)} on {_e(a.node)}, "
            f"lease until {a.lease_end:%Y-%m-%d %H:%M} UTC"
        )
        if row is not None and row.state == "released":
            text += (
                f"; {_e(label(RELEASE_REASON, row.release_reason or ''))}, "
                f"charged {_money(row.cost_usd)}"
            )
        if state in LIVE and who.may_act_on(a.project):
            text += self._release_form(request, a.id, f"reviews/{tid}")
        return text + "</div>"

    def _costs(
        self, orch: Orchestrator, request: GPURequest, decision: CouncilDecision | None
    ) -> str:
        """The cost the council judged beside what the route would place now, under the
        guardrails a human's approval carries, and why they differ: the council prices the
        request at its worst case (all its GPUs for the whole requested time) on the route it
        would take when the council voted (before 2026-12-04 on the cheapest type that does
        the work); the fleet's load or the project's budget may have moved the route since."""
        judged = decision.priced if decision is not None else None
        svc = orch.services
        config = svc.config
        types = [
            t
            for t in ([request.gpu_type] if request.gpu_type else config.pool(request.purpose))
            if t in config.catalog
        ]
        ref = request.gpu_type or next(iter(config.pool(request.purpose)), None)
        if not types or ref not in config.catalog:  # the fleet file changed since it asked
            return (
                '<h2>If approved now</h2><p class="error">this fleet no longer prices '
                "the GPU types the request may run on</p>"
            )
        on = "the route it would take when it voted"
        if judged is None:
            judged, on = cheapest(request, config), "the cheapest type that does the work"
        n = request.count
        work = _hours(request.duration_hours)
        of_work = "" if judged.gpu_type == ref else f", {work} of work at {ref} speed"
        council = (
            f"the council judged the cost at its worst case on {on} ({n} x {judged.gpu_type} "
            f"for {_hours(round(judged.hours, 2))}{of_work}: {_money(judged.cost_usd)})"
        )
        asked = guarded(request, decision.guardrails if decision else None)
        route = svc.route(asked)
        if isinstance(route, Refusal):
            return (
                f'<h2>If approved now</h2><p class="error">refused: {_e(route.reason)}'
                f'</p><p class="explain">{_e(council.capitalize())}; routed now the '
                "request would be refused.</p>"
            )
        queued = svc.starts_in_hours([route.gpu_type], n)[route.gpu_type] > 0
        if route.gpu_type == judged.gpu_type:
            why = ("the request names its type, which" if request.gpu_type else "the same type") + (
                f" has no {n} GPUs free: it would wait in the queue for"
                if queued
                else " has the GPUs free now:"
            )
        else:
            why_not = next(
                (o.why_not for o in route.alternatives if o.gpu_type == judged.gpu_type),
                None,
            )
            if route.mode is RouteMode.PERFORMANCE:
                why = "performance mode takes the fastest type within budget:"
            elif why_not:
                why = f"{judged.gpu_type} does not fit ({why_not}), so it takes"
            elif "free now" in route.reason:
                why = f"{route.gpu_type} is the cheapest type free now:"
            else:
                why = "the cheapest type per unit of work now:"
            if queued:
                why += " (no type has the GPUs free now: it would wait in the queue)"
        if asked is not request:
            why = f"with the council's guardrail (the cheaper type, not the fastest), {why}"
        same = (
            route.gpu_type == judged.gpu_type and abs(route.est_cost_usd - judged.cost_usd) < 0.005
        )
        routed = (
            f"routed now, {why} {route.gpu_type} at {_money(route.price_per_hour)}/GPU-h"
            f" for {_hours(round(route.est_hours, 2))}: {_money(route.est_cost_usd)}"
        )
        table = (
            "<table><tr><th></th><th>The council judged</th><th>If approved now</th></tr>"
            f"<tr><th>GPU type</th><td>{_e(judged.gpu_type)}</td><td>{_e(route.gpu_type)}</td></tr>"
            f"<tr><th>GPUs</th><td>{n}</td><td>{n}</td></tr>"
            f"<tr><th>Price</th><td>{_money(judged.price_per_hour)}/GPU-h</td>"
            f"<td>{_money(route.price_per_hour)}/GPU-h</td></tr>"
            f"<tr><th>Hours</th><td>{_e(_hours(round(judged.hours, 2)))}</td>"
            f"<td>{_e(_hours(round(route.est_hours, 2)))}</td></tr>"
            f"<tr><th>Cost</th><td><strong>{_money(judged.cost_usd)}</strong> (worst case)</td>"
            f"<td><strong>{_money(route.est_cost_usd)}</strong></td></tr></table>"
        )
        tail = (" The same figure." if same else "") + (
            " Both are worst cases: every GPU held for the whole requested time; an allocation"
            " released earlier (its work done, idle) is charged only for the time it held."
        )
        return (
            f"<h2>Cost: what the council judged, and if approved now</h2>{table}"
            f'<p class="explain">{_e(council[0].upper() + council[1:])}; '
            f"{_e(routed)}.{_e(tail)}</p>"
        )

    def _release_form(self, request: Request, aid: str, back: str) -> str:
        root = request.scope.get("root_path", "")
        return (
            f'<form method="post" action="{_e(root)}/allocations/{_q(aid)}/release" '
            'style="display:inline">'
            f'<input type="hidden" name="csrf" value="{self._csrf(request)}">'
            f'<input type="hidden" name="back" value="{_e(back)}">'
            '<button class="release">Release</button></form>'
        )

    def decide(self, request: Request, who: Identity) -> Response:
        tid = request.path_params["thread"]
        form = _form(request)
        self._check_csrf(request, form)
        choice = form.get("decision")
        if choice not in ("approve", "deny"):
            raise InvalidInput("the decision must be approve or deny")
        comment = form.get("comment", "")  # too long: refused as elsewhere (nodes.review)
        orch = self._as(who)
        answer = {
            "approve": choice == "approve",
            "by": who.name,
            "comment": comment,
            "guardrails": choice == "deny" or form.get("guardrails") != "drop",
        }
        outcome = orch.resume(tid, answer, wait=False)
        if outcome.next:  # placed or queued: monitoring goes on in this process
            self.background.append(self.orch.continue_in_background(tid))
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}/reviews/{_q(tid)}", status_code=303)

    def release(self, request: Request, who: Identity) -> Response:
        """Release a live allocation (cancel a queued one) for a caller who may."""
        aid = request.path_params["allocation"]
        root = request.scope.get("root_path", "")
        form = _form(request)
        self._check_csrf(request, form)
        back = form.get("back", "fleet")
        if back != "fleet":
            tid = back.removeprefix("reviews/")
            back = (
                f"reviews/{_q(tid)}"
                if back.startswith("reviews/") and names.valid("thread id", tid)
                else "fleet"
            )
        done, here, gave_up = self._as(who).release_checked(aid)
        if not here:  # before, or meanwhile (the lease, the monitor, another click, the CLI)
            return self.error(
                request,
                who,
                409,
                f"allocation {aid} was already released "
                f"({label(RELEASE_REASON, done.reason.value)}, at "
                f"{_when(done.released_at.timestamp())}, charged {_money(done.cost_usd)}): "
                "nothing changed",
                title="Already released",
            )
        verb = "Cancelled" if done.reason is ReleaseReason.CANCELLED else "Released"
        row = self.orch.services.ledger.get(aid)
        body = (
            f'<p class="decided">{verb} allocation <span class="id aid">{_e(aid)}</span> '
            f"({row.count} x {_e(row.gpu_type)} of {_e(row.project)}): held "
            f"{_hours(round(done.hours, 2))}, charged {_money(done.cost_usd)}.</p>"
            + (f'<p class="flag">Warning: {_e(still_running(aid))}.</p>' if gave_up else "")
            + f'<p><a href="{_e(root)}/{_e(back)}">Back</a></p>'
        )
        return self.page(request, who, f"{verb} {aid}", body)

    # ---- fleet and spend ------------------------------------------------------------------

    def fleet(self, request: Request, who: Identity) -> Response:
        root = request.scope.get("root_path", "")
        data = self._as(who).status()
        gpus = "".join(
            f'<tr><td class="id">{_e(g["uuid"])}</td><td>{_e(g["type"])}</td>'
            f"<td>{_e(g['node'])}</td><td>{_e(g['project'] or '-')}</td>"
            f'<td class="id aid">{_e(g["allocation_id"] or "-")}</td>'
            f"<td>{_e(_reading(g['util_pct'], '%'))}</td>"
            f"<td>{_e(_reading(g['temp_c'], '°C'))}</td>"
            f"<td>{_e(g['condition'])}</td></tr>"
            for g in data["gpus"]
        )
        allocations = data["allocations"]
        live = [a for a in allocations if a["state"] in LIVE]
        done = [a for a in allocations if a["state"] not in LIVE][-100:]
        flags, rows = [], []
        for a in [*live, *reversed(done)]:
            aid, tid = str(a["id"]), str(a.get("thread_id") or "")
            thread = (
                f'<a class="id" href="{_e(root)}/reviews/{_q(tid)}">{_e(tid)}</a>'
                if names.valid("thread id", tid)
                else _e(tid or "-")
            )
            unmonitored = a.get("monitored") is False
            if unmonitored:
                resume = tid if names.valid("thread id", tid) else "THREAD"
                flags.append(
                    f'<p class="flag"><span class="id aid">{_e(aid)}</span> ({_e(a["project"])})'
                    f": no process is monitoring this allocation: idle release and lease end"
                    f" are not enforced until a worker or <code>gpu-agent resume "
                    f"{_e(resume)}</code> adopts it.</p>"
                )
            monitor = (
                '<span class="badge">not monitored</span>'
                if unmonitored
                else _e(a.get("monitor") or "-")
            )
            action = (
                self._release_form(request, aid, "fleet")
                if (
                    a["state"] in LIVE
                    and names.valid("allocation id", aid)
                    and who.may_act_on(str(a["project"]))
                )
                else ""
            )
            rows.append(
                f'<tr><td class="id aid">{_e(aid)}</td><td>{_e(a["project"])}</td>'
                f"<td>{thread}</td><td>{_e(label(STATE, a['state']))}</td>"
                f"<td>{a['count']} x {_e(a['gpu_type'])}</td>"
                f'<td class="id gpus">{"<br>".join(_e(g) for g in a.get("gpu_ids") or [])}</td>'
                f'<td class="when">{_e(_iso(a["lease_end"]))}</td>'
                f"<td>{_e(label(RELEASE_REASON, a['reason']) if a['reason'] else '-')}</td>"
                f"<td>{_money(a['cost_usd'])}</td><td>{monitor}</td><td>{action}</td></tr>"
            )
        problems = "".join(f'<p class="error">{_e(p)}</p>' for p in data["problems"])
        body = (
            f"{problems}<p>Backend: {_e(data['backend'])}</p><h2>GPUs</h2><table><tr>"
            "<th>GPU id</th><th>Type</th><th>Node</th><th>Project</th><th>Allocation</th>"
            "<th>Utilisation</th><th>Temperature</th><th>Condition</th></tr>"
            f"{gpus}</table><h2>Allocations</h2>{''.join(flags)}"
            "<table><tr><th>Allocation</th><th>Project</th><th>Thread</th><th>State</th>"
            "<th>GPUs</th><th>GPU ids</th><th>Lease end</th><th>Release reason</th>"
            "<th>Cost</th><th>Monitored by</th><th></th></tr>"
            f"{''.join(rows)}</table>"
        )
        return self.page(request, who, "Fleet", body)

    def spend(self, request: Request, who: Identity) -> Response:
        orch = self._as(who)
        rows, charts = [], []
        for c in orch.costs():
            left = None if c.budget_usd is None else c.budget_usd - c.spent_usd - c.committed_usd
            rows.append(
                f"<tr><td>{_e(c.project)}</td><td>{_money(c.spent_usd)}</td>"
                f"<td>{_money(c.accrued_usd)}</td><td>{_money(c.budget_usd)}</td>"
                f"<td>{_money(left)}</td></tr>"
            )
            history = list(reversed(orch.history(c.project)[:30]))
            total, cumulative = 0.0, []
            for h in history:
                total += h.cost_usd
                cumulative.append(total)
            charts.append(
                f"<h3>{_e(c.project)}: spend over its last {len(history)} allocations "
                "(cumulative)</h3>"
                + bars(
                    cumulative,
                    [f"{h.ended_at:%Y-%m-%d %H:%M}" for h in history],
                    oldest=f"{history[0].ended_at:%Y-%m-%d %H:%M}" if history else "",
                    newest=f"{history[-1].ended_at:%Y-%m-%d %H:%M}" if history else "",
                )
            )
        body = (
            "<table><tr><th>Project</th><th>Spent</th><th>Running now</th><th>Budget</th>"
            "<th>Left (worst case)</th></tr>"
            + "".join(rows)
            + "</table>"
            + "".join(charts)
            + self._simulation()
        )
        return self.page(request, who, "Spend", body)

    def _simulation(self) -> str:
        """The cost figures of the latest `gpu-agent simulate` report, if there is one; one
        that cannot be used (damaged, hand-edited, another tool's) is a line saying why."""
        path = (self.simulation or Path("simulation")) / "metrics.json"
        try:
            report = _simulation_report(path)
        except InvalidInput as exc:
            why = f"The simulation report {path} cannot be read: {exc}"
            return f'<p class="error">{_e(why)}</p>'
        if report is None:
            return "<p>No simulation report (gpu-agent simulate writes one).</p>"
        naive = next((total for name, total, _ in report if name == "naive"), None)

        def saving(cost: float) -> str:
            return "-" if not naive else f"{100.0 * (1.0 - cost / naive):.1f} %"

        rows = "".join(
            f"<tr><td>{_e(name)}</td><td>{_money(total)}</td><td>{saving(total)}</td>"
            f"<td>{_money(per_hour)}</td></tr>"
            for name, total, per_hour in report
        )
        return (
            f"<h2>Latest simulation ({_e(path)})</h2><table><tr><th>Policy</th>"
            "<th>Total cost</th><th>Saved against naive</th>"
            f"<th>Cost per useful GPU-hour</th></tr>{rows}</table>"
        )


def _simulation_report(path: Path) -> list[tuple[str, float, float | None]] | None:
    """A simulate report's (policy, total cost, cost per useful GPU-hour), sorted by policy,
    each field checked for the type the page shows it as; None where there is no report.
    InvalidInput (why, briefly) for a file that is no report the page can show."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON
        raise InvalidInput(str(exc) or type(exc).__name__) from None
    policies = doc.get("policies") if isinstance(doc, dict) else None
    if not isinstance(policies, dict):
        raise InvalidInput('its "policies" is not an object of policy names')
    report = []
    for name, m in sorted(policies.items()):
        if not isinstance(m, dict):
            raise InvalidInput(f"policy {names.shown(name)} is not an object")
        total, per_hour = m.get("total_cost_usd"), m.get("cost_per_useful_gpu_hour")
        if not _number(total):
            raise InvalidInput(f"policy {names.shown(name)}: total_cost_usd is not a number")
        if per_hour is not None and not _number(per_hour):
            raise InvalidInput(
                f"policy {names.shown(name)}: cost_per_useful_gpu_hour is not a number or null"
            )
        report.append((name, float(total), None if per_hour is None else float(per_hour)))
    return report


def _number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number that fits a float (JSON's true and false are no numbers, nor NaN,
    Infinity or an integer of 400 digits)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _status(exc: GPUAgentError) -> int:
    """The HTTP status of an error a page raised: a state directory it cannot read (a
    damaged access file) is the server's trouble until its operator mends it (503), not the
    caller's."""
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, StateDirError):
        return 503
    text = str(exc)
    if text.startswith(("no thread", "no allocation")):
        return 404
    if "already decided" in text or "not waiting" in text:
        return 409
    return 400


def out_request(out: RequestOutcome) -> dict[str, Any]:
    """The request a thread was made from, as plain values."""
    return dict(out.request.model_dump(mode="json")) if out.request is not None else {}


def _form(request: Request) -> dict[str, str]:
    """A POST's form, as create_app read and checked it (_parse_form)."""
    form: dict[str, str] = request.state.form
    return form


FORM_TYPE = "application/x-www-form-urlencoded"  # what the page's forms send (no enctype)


class FormRefused(InvalidInput):
    """A POST body unlike what the page's own forms send, with the status its refusal gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _parse_form(content_types: list[str], body: bytes) -> dict[str, str]:
    """A POST body as the page's forms send it: urlencoded UTF-8, each field once. Anything
    else is refused (FormRefused), never guessed at: a field sent twice would be read as one
    of its values, bytes that are not UTF-8 replaced, another content type parsed as this."""
    sent = content_types[0] if len(content_types) == 1 else ""
    media, *params = (part.strip().lower() for part in sent.split(";"))
    charsets = [v.strip('" ') for k, _, v in (p.partition("=") for p in params) if k == "charset"]
    if media != FORM_TYPE or any(c not in ("utf-8", "utf8") for c in charsets):
        got = {0: "missing", 1: names.shown(sent)}.get(len(content_types), "given twice")
        raise FormRefused(f"a form is sent as {FORM_TYPE} (UTF-8); its Content-Type is {got}", 415)
    try:
        fields = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, errors="strict"
        )
    except UnicodeDecodeError:
        raise FormRefused("the form is not UTF-8 (a field's bytes are no UTF-8 text)") from None
    except ValueError as exc:  # a field with no "=" (strict_parsing)
        raise FormRefused(f"the form is malformed ({exc})") from None
    form: dict[str, str] = {}
    for name, value in fields:
        if name in form:
            raise FormRefused(f"the form gives the field {names.shown(name)} twice")
        form[name] = value
    return form


def _login_form(root: str) -> str:
    return (
        f'<form method="post" action="{_e(root)}/login"><p>Your gpu-agent token '
        '(GPU_AGENT_TOKEN):</p><input type="password" name="token" size="40">'
        "<button>Log in</button></form>"
    )


# The most a POST may carry: a decision, a comment of fleet.names.TEXT_MAX characters (up
# to 4 bytes each, percent-encoded: 12) and the form's token, with room to spare
BODY_MAX = 64 * 1024


async def _bounded_body(request: Request) -> bytes | None:
    """The request's body, or None where it is (or says it is) longer than BODY_MAX: read
    before the caller is known, so an anonymous sender cannot fill the memory."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > BODY_MAX):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > BODY_MAX:
            return None
    return body


def create_app(
    orch: Orchestrator, *, simulation: Path | None = None, allowed: Iterable[str] = ()
) -> Starlette:
    """The page over `orch`. It answers to the loopback names and the host names in `allowed`
    (`gpu-agent ui` passes its --host and --allow-host names): any other Host is refused."""
    ui = WebUI(orch, simulation=simulation)
    hosts = allowed_hosts(allowed)
    lock = threading.Lock()  # one decision at a time in this process (the ledger claims too)

    def with_body(fn: Callable[[Request], Response]) -> Any:
        async def endpoint(request: Request) -> Response:
            body = await _bounded_body(request)
            if body is None:  # read before anyone is known: never more than a form holds
                return PlainTextResponse(f"a form is at most {BODY_MAX} bytes\n", 413)
            if request.method == "POST":  # every form the page takes is read here, once
                try:
                    request.state.form = _parse_form(request.headers.getlist("content-type"), body)
                except FormRefused as exc:
                    return PlainTextResponse(f"{exc}: nothing changed\n", exc.status)

            def call() -> Response:
                if request.method == "POST":
                    with lock:
                        return fn(request)
                return fn(request)

            return await run_in_threadpool(call)

        return endpoint

    async def not_found(request: Request, exc: Exception) -> Response:
        """Starlette's 404 and 405 as one line, with the headers it gave them (a 405's Allow,
        which RFC 9110 requires)."""
        http = exc if isinstance(exc, HTTPException) else HTTPException(500)
        text = "not found\n" if http.status_code == 404 else f"error {http.status_code}\n"
        return PlainTextResponse(text, http.status_code, headers=http.headers)

    routes = [
        Route("/", lambda r: RedirectResponse(f"{r.scope.get('root_path', '')}/reviews")),
        Route("/login", with_body(ui.login), methods=["GET", "POST"]),
        Route("/reviews", with_body(ui.guarded(ui.reviews))),
        Route("/reviews/{thread}", with_body(ui.guarded(ui.review)), name="review"),
        Route("/reviews/{thread}/decide", with_body(ui.guarded(ui.decide)), methods=["POST"]),
        Route(
            "/allocations/{allocation}/release", with_body(ui.guarded(ui.release)), methods=["POST"]
        ),
        Route("/fleet", with_body(ui.guarded(ui.fleet))),
        Route("/spend", with_body(ui.guarded(ui.spend))),
    ]
    web = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    web.state.ui = ui
    web.add_middleware(_Guard, ui=ui, hosts=hosts)
    return web


class _OnFirstRequest:
    """The page for the LangGraph server (langgraph.json `http.app`), built on first use from
    the environment the server was started with (GPU_AGENT_HOME, GPU_AGENT_FLEET,
    GPU_AGENT_BACKEND, GPU_AGENT_DATABASE; GPU_AGENT_UI_HOSTS: host names besides the loopback
    ones), so that importing it opens nothing."""

    def __init__(self) -> None:
        self._app: Starlette | None = None
        self._lock = threading.Lock()

    def _build(self) -> Starlette:
        from nodes.context import Context

        with self._lock:
            if self._app is None:
                ctx = Context()
                self._app = create_app(
                    Orchestrator(
                        ctx.state_dir,
                        ctx.fleet_file,
                        backend=ctx.backend,
                        database=ctx.database,
                        identity=SERVER,
                        monitor_kind="page",
                    ),
                    allowed=hosts_from_env(),
                )
            return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        web = self._app
        if web is None:
            web = await run_in_threadpool(self._build)  # it opens files: off the event loop
        await web(scope, receive, send)


# langgraph.json: "http": {"app": "./graph/ui.py:app"}: the page under /ui on the server.
app = Starlette(routes=[Mount("/ui", app=_OnFirstRequest())])
