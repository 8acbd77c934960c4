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
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from fleet.access import ACCESS, LOCAL, Identity, identify
from fleet.errors import Forbidden, GPUAgentError, InvalidInput
from fleet.models import Status
from fleet.routing import Refusal
from fleet.routing import route as choose_route
from graph.orchestrator import Orchestrator
from graph.outcome import RequestOutcome

COOKIE = "gpu_agent_token"
# Who the page's own orchestrator is: it acts for each caller through `acting_as`, and as itself
# only to carry a decided thread on (monitoring, release), as a worker does.
SERVER = Identity("web-ui", None, "admin")
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;
 align-items:center}
header a{color:#e5e7eb;text-decoration:none}header .who{margin-left:auto;opacity:.8}
main{padding:1rem 1.2rem;max-width:70rem}
table{border-collapse:collapse;background:#fff;margin:.5rem 0 1.2rem}
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;font-size:.92rem}
th{background:#eef1f4}.approve{background:#1a7f37;color:#fff}.deny{background:#cf222e;color:#fff}
button{border:0;padding:.45rem 1rem;border-radius:4px;cursor:pointer;margin-right:.5rem}
.note{background:#fff8c5;padding:.5rem .8rem;border:1px solid #d4a72c}
.error{background:#ffebe9;padding:.5rem .8rem;border:1px solid #cf222e}
textarea{width:28rem;height:3rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M} UTC"


def bars(values: list[float], labels: list[str], width: int = 420, height: int = 120) -> str:
    """A small inline SVG bar chart (no script, no library)."""
    if not values:
        return "<p>no history yet</p>"
    top = max(max(values), 1e-9)
    w = width / len(values)
    rects = "".join(
        f'<rect x="{i * w + 2:.1f}" y="{height - 18 - (v / top) * (height - 30):.1f}" '
        f'width="{max(w - 4, 1):.1f}" height="{(v / top) * (height - 30):.1f}" fill="#0969da">'
        f"<title>{_e(label)}: {v:,.2f}</title></rect>"
        for i, (v, label) in enumerate(zip(values, labels, strict=True)))
    return (f'<svg role="img" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{rects}'
            f'<text x="0" y="{height - 4}" font-size="10">oldest</text>'
            f'<text x="{width - 40}" y="{height - 4}" font-size="10">newest</text></svg>')


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
        """The caller (None: not logged in where tokens are required)."""
        if not (self.state_dir / ACCESS).exists():
            return LOCAL
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        try:
            return identify(self.state_dir, token)
        except Forbidden:
            return None

    def _csrf(self, request: Request) -> str:
        basis = request.cookies.get(COOKIE, "local").encode()
        return hmac.new(self.secret, basis, hashlib.sha256).hexdigest()

    def _as(self, who: Identity) -> Orchestrator:
        return self.orch.acting_as(who)

    # ---- pages ----------------------------------------------------------------------------

    def page(self, request: Request, who: Identity | None, title: str, body: str,
             status: int = 200) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        nav = "".join(f'<a href="{root}/{p}">{label}</a>' for p, label in
                      (("reviews", "Pending reviews"), ("fleet", "Fleet"), ("spend", "Spend")))
        whom = "" if who is None else \
            f'<span class="who">{_e(who.name)} ({_e(who.role)}' + \
            (f" of {_e(who.project)}" if who.project else "") + ")</span>"
        return HTMLResponse(
            f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{_e(title)} - gpu-agent</title><style>{STYLE}</style></head>"
            f"<body><header><strong>gpu-agent</strong>{nav}{whom}</header>"
            f"<main><h1>{_e(title)}</h1>{body}</main></body></html>", status_code=status)

    def error(self, request: Request, who: Identity | None, status: int,
              message: str) -> HTMLResponse:
        return self.page(request, who, {403: "Not allowed", 404: "Not found",
                                        409: "Already decided"}.get(status, "Bad request"),
                         f'<p class="error">{_e(message)}</p>', status)

    def guarded(self, fn: Callable[[Request, Identity], Response]
                ) -> Callable[[Request], Response]:
        """Log in first where tokens are required; GPUAgentError -> an error page."""
        def endpoint(request: Request) -> Response:
            who = self._identity(request)
            if who is None:
                root = request.scope.get("root_path", "")
                return RedirectResponse(f"{root}/login", status_code=303)
            try:
                return fn(request, who)
            except Forbidden as exc:
                return self.error(request, who, 403, str(exc))
            except InvalidInput as exc:
                status = 404 if "no thread" in str(exc) else \
                    409 if "already decided" in str(exc) or "not waiting" in str(exc) else 400
                return self.error(request, who, status, str(exc))
        return endpoint

    def login(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")
        if request.method == "POST":
            token = _form(request).get("token", "")
            try:
                identify(self.state_dir, token)
            except GPUAgentError:
                return self.page(request, None, "Log in",
                                 '<p class="error">unknown token</p>' + _login_form(root), 403)
            response = RedirectResponse(f"{root}/reviews", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                path=root or "/")
            return response
        return self.page(request, None, "Log in", _login_form(root))

    def reviews(self, request: Request, who: Identity) -> Response:
        orch = self._as(who)
        rows = []
        for tid in orch.pending_reviews():
            out = orch.outcome(tid)
            req = out_request(out)
            rows.append(f'<tr><td><a href="reviews/{_e(tid)}">{_e(tid)}</a></td>'
                        f"<td>{_e(req.get('project'))}</td><td>{_e(req.get('count'))} x "
                        f"{_e(req.get('gpu_type') or 'any')}</td>"
                        f"<td>{_e(req.get('duration_hours'))} h</td>"
                        f"<td>{_e(out.council.summary if out.council else '')}</td></tr>")
        body = ("<table><tr><th>thread</th><th>project</th><th>GPUs</th><th>for</th>"
                "<th>council</th></tr>" + "".join(rows) + "</table>") if rows else \
            "<p>No request is waiting for a decision.</p>"
        return self.page(request, who, "Pending reviews", body)

    def review(self, request: Request, who: Identity) -> Response:
        tid = request.path_params["thread"]
        orch = self._as(who)
        out = orch.outcome(tid)
        req = out_request(out)
        parts = [f"<p>Thread <code>{_e(tid)}</code>: <strong>{_e(out.status.value)}</strong>"
                 f" ({_e(out.reason)})</p>"]
        if out.allocation is not None:
            a = out.allocation
            parts.append(f'<p class="note">allocation {_e(a.id)}: {a.count} x '
                         f"{_e(a.gpu_type)} on {_e(a.node)}, lease until "
                         f"{a.lease_end:%Y-%m-%d %H:%M} UTC</p>")
        parts.append("<h2>Request</h2><table>" + "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in req.items()
            if v is not None and k != "request_id") + "</table>")
        if out.council is not None:
            parts.append(f"<h2>Council: {_e(out.council.summary)}</h2><table><tr><th>member"
                         "</th><th>vote</th><th>probability</th><th>what moved it</th></tr>")
            for v in out.council.votes:
                top = sorted(v.reasons, key=lambda r: -abs(r.effect))[:3]
                parts.append(f"<tr><td>{_e(v.member)}</td><td>{_e(v.verdict.value)}</td>"
                             f"<td>{v.probability:.2f}</td><td>"
                             + "; ".join(_e(r.text) for r in top) + "</td></tr>")
            parts.append("</table>")
        project = str(req.get("project", "default"))
        history = list(reversed(orch.history(project)[:20]))
        parts.append(f"<h2>{_e(project)}: its last {len(history)} allocations (cost)</h2>"
                     + bars([h.cost_usd for h in history],
                            [f"{h.ended_at:%Y-%m-%d} {h.reason.value}" for h in history]))
        if out.status is Status.PENDING_REVIEW:
            parts.append(self._route(orch, out))
            parts.append(f'<form method="post" action="{_e(tid)}/decide">'
                         f'<input type="hidden" name="csrf" value="{self._csrf(request)}">'
                         '<p><textarea name="comment" placeholder="why (recorded)"></textarea>'
                         '</p><button class="approve" name="decision" value="approve">Approve'
                         '</button><button class="deny" name="decision" value="deny">Deny'
                         "</button></form>")
        return self.page(request, who, f"Review of {project}'s request", "".join(parts))

    def _route(self, orch: Orchestrator, out: RequestOutcome) -> str:
        """Where the request would go if approved now, and what it would cost."""
        svc, request = orch.services, out.request
        if request is None:
            return ""
        route = choose_route(request, svc.config, svc.ledger.remaining_usd(request.project),
                             svc.available_by_type())
        if isinstance(route, Refusal):
            return f'<p class="error">if approved now: refused ({_e(route.reason)})</p>'
        return (f"<h2>If approved</h2><p>{request.count} x {_e(route.gpu_type)} "
                f"({_e(route.pool)} pool) at {_money(route.price_per_hour)}/GPU-h, about "
                f"{route.est_hours:.2f} h: <strong>{_money(route.est_cost_usd)}</strong></p>")

    def decide(self, request: Request, who: Identity) -> Response:
        tid = request.path_params["thread"]
        form = _form(request)
        if not hmac.compare_digest(form.get("csrf", ""), self._csrf(request)):
            raise Forbidden("this form was not issued to you (a stale or forged post): "
                            "nothing changed")
        choice = form.get("decision")
        if choice not in ("approve", "deny"):
            raise InvalidInput("the decision must be approve or deny")
        comment = form.get("comment", "")[:500]
        orch = self._as(who)
        outcome = orch.resume(tid, {"approve": choice == "approve", "by": who.name,
                                    "comment": comment}, wait=False)
        if outcome.next:  # placed or queued: monitoring goes on in this process
            self.background.append(self.orch.continue_in_background(tid))
        return RedirectResponse(str(request.url_for("review", thread=tid)), status_code=303)

    def fleet(self, request: Request, who: Identity) -> Response:
        data = self._as(who).status()
        gpus = "".join(
            f"<tr><td>{_e(g['uuid'][:14])}</td><td>{_e(g['type'])}</td><td>{_e(g['node'])}"
            f"</td><td>{_e(g['project'] or '-')}</td><td>{_e(g['allocation_id'] or '-')}</td>"
            f"<td>{_e('-' if g['util_pct'] is None else round(g['util_pct']))}</td>"
            f"<td>{_e('-' if g['temp_c'] is None else g['temp_c'])}</td>"
            f"<td>{_e(g['condition'])}</td></tr>" for g in data["gpus"])
        allocs = "".join(
            f"<tr><td>{_e(a['id'])}</td><td>{_e(a['project'])}</td><td>{_e(a['state'])}</td>"
            f"<td>{a['count']} x {_e(a['gpu_type'])}</td><td>{_e(a['lease_end'] or '-')}</td>"
            f"<td>{_e(a['reason'] or '-')}</td><td>{_money(a['cost_usd'])}</td></tr>"
            for a in data["allocations"][-200:])
        problems = "".join(f'<p class="error">{_e(p)}</p>' for p in data["problems"])
        body = (f"{problems}<p>backend {_e(data['backend'])}</p><table><tr><th>GPU</th>"
                "<th>type</th><th>node</th><th>project</th><th>allocation</th><th>util %</th>"
                f"<th>temp C</th><th>condition</th></tr>{gpus}</table><h2>Allocations</h2>"
                "<table><tr><th>id</th><th>project</th><th>state</th><th>GPUs</th>"
                "<th>lease end</th><th>release reason</th><th>cost</th></tr>"
                f"{allocs}</table>")
        return self.page(request, who, "Fleet", body)

    def spend(self, request: Request, who: Identity) -> Response:
        orch = self._as(who)
        rows, charts = [], []
        for c in orch.costs():
            left = None if c.budget_usd is None else \
                c.budget_usd - c.spent_usd - c.committed_usd
            rows.append(f"<tr><td>{_e(c.project)}</td><td>{_money(c.spent_usd)}</td>"
                        f"<td>{_money(c.accrued_usd)}</td><td>{_money(c.budget_usd)}</td>"
                        f"<td>{_money(left)}</td></tr>")
            history = list(reversed(orch.history(c.project)[:30]))
            total, cumulative = 0.0, []
            for h in history:
                total += h.cost_usd
                cumulative.append(total)
            charts.append(f"<h3>{_e(c.project)}: spend over its last {len(history)} "
                          "allocations</h3>" + bars(cumulative, [
                              f"{h.ended_at:%Y-%m-%d %H:%M}" for h in history]))
        body = ("<table><tr><th>project</th><th>spent</th><th>running</th><th>budget</th>"
                "<th>left (worst case)</th></tr>" + "".join(rows) + "</table>"
                + "".join(charts) + self._simulation())
        return self.page(request, who, "Spend", body)

    def _simulation(self) -> str:
        """The cost figures of the latest `gpu-agent simulate` report, if there is one."""
        path = (self.simulation or Path("simulation")) / "metrics.json"
        try:
            policies = json.loads(path.read_text())["policies"]
        except (OSError, ValueError, KeyError, TypeError):
            return "<p>No simulation report (gpu-agent simulate writes one).</p>"
        naive = (policies.get("naive") or {}).get("total_cost_usd")

        def saving(cost: Any) -> str:
            if not naive or not isinstance(cost, int | float):
                return "-"
            return f"{100.0 * (1.0 - cost / naive):.1f} %"

        rows = "".join(
            f"<tr><td>{_e(name)}</td><td>{_money(m.get('total_cost_usd'))}</td>"
            f"<td>{saving(m.get('total_cost_usd'))}</td>"
            f"<td>{_e(m.get('cost_per_useful_gpu_hour'))}</td></tr>"
            for name, m in sorted(policies.items()) if isinstance(m, dict))
        return (f"<h2>Latest simulation ({_e(path)})</h2><table><tr><th>policy</th>"
                "<th>total cost</th><th>saved against naive</th>"
                f"<th>cost per useful GPU-hour</th></tr>{rows}</table>")


def out_request(out: RequestOutcome) -> dict[str, Any]:
    """The request a thread was made from, as plain values."""
    return dict(out.request.model_dump(mode="json")) if out.request is not None else {}


def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (no multipart parser needed)."""
    body = request.state.body if hasattr(request.state, "body") else b""
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def _login_form(root: str) -> str:
    return (f'<form method="post" action="{root}/login"><p>Your gpu-agent token '
            '(GPU_AGENT_TOKEN):</p><input type="password" name="token" size="40">'
            "<button>Log in</button></form>")


def create_app(orch: Orchestrator, *, simulation: Path | None = None) -> Starlette:
    ui = WebUI(orch, simulation=simulation)
    lock = threading.Lock()  # one decision at a time in this process (the ledger claims too)

    def with_body(fn: Callable[[Request], Response]) -> Any:
        async def endpoint(request: Request) -> Response:
            request.state.body = await request.body()

            def call() -> Response:
                if request.method == "POST":
                    with lock:
                        return fn(request)
                return fn(request)
            return await run_in_threadpool(call)
        return endpoint

    routes = [
        Route("/", lambda r: RedirectResponse(f"{r.scope.get('root_path', '')}/reviews")),
        Route("/login", with_body(ui.login), methods=["GET", "POST"]),
        Route("/reviews", with_body(ui.guarded(ui.reviews))),
        Route("/reviews/{thread}", with_body(ui.guarded(ui.review)), name="review"),
        Route("/reviews/{thread}/decide", with_body(ui.guarded(ui.decide)), methods=["POST"]),
        Route("/fleet", with_body(ui.guarded(ui.fleet))),
        Route("/spend", with_body(ui.guarded(ui.spend))),
    ]
    web = Starlette(routes=routes)
    web.state.ui = ui
    return web


class _OnFirstRequest:
    """The page for the LangGraph server (langgraph.json `http.app`), built on first use from
    the environment the server was started with (GPU_AGENT_HOME, GPU_AGENT_FLEET,
    GPU_AGENT_BACKEND, GPU_AGENT_DATABASE), so that importing it opens nothing."""

    def __init__(self) -> None:
        self._app: Starlette | None = None
        self._lock = threading.Lock()

    def _build(self) -> Starlette:
        from nodes.context import Context

        with self._lock:
            if self._app is None:
                ctx = Context()
                self._app = create_app(Orchestrator(
                    ctx.state_dir, ctx.fleet_file, backend=ctx.backend,
                    database=ctx.database, identity=SERVER))
            return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        web = self._app
        if web is None:
            web = await run_in_threadpool(self._build)  # it opens files: off the event loop
        await web(scope, receive, send)


# langgraph.json: "http": {"app": "./graph/ui.py:app"}: the page under /ui on the server.
app = Starlette(routes=[Mount("/ui", app=_OnFirstRequest())])
