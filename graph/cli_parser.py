"""The `gpu-agent` command line: every subcommand, its options and their defaults, and the
one-line (or JSON) error a bad command line gets. graph/cli.py hands what it parses to the
command's handler (graph/cli_requests.py, cli_ledger.py, cli_servers.py, cli_offline.py)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from fleet.choose_backend import BACKENDS
from fleet.errors import flat
from fleet.supervise import GRACE_S
from graph.cli_json import error_object
from sim import DEFAULT_POLICIES  # a name only: the simulator is imported when it runs


class Parser(argparse.ArgumentParser):
    json_errors = False  # --json was on the command line: errors go to stdout as JSON too

    def error(self, message: str) -> NoReturn:
        """One line, exit 2: argparse's default prints the whole usage first."""
        error_json(message, 2, "InvalidInput", Parser.json_errors)
        self.exit(2, f"gpu-agent: error: {flat(message)}\n")


def error_json(message: str, code: int, kind: str, wanted: bool) -> None:
    """With --json, an error is also one JSON object on stdout (scripts read only stdout)."""
    if wanted:
        print(error_object(flat(message), code, kind), flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="state directory (env GPU_AGENT_HOME, default ./.gpu-agent)")
    p.add_argument("--fleet", help="fleet TOML file (env GPU_AGENT_FLEET; default: built-in fleet)")
    p.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="inventory backend (env GPU_AGENT_BACKEND; default simulated): nvml "
        "reads this host's GPUs, replay plays a recording, auto picks nvml where "
        "a driver is, ray and slurm govern a cluster (slurm: the one SLURM_CONF names)",
    )
    p.add_argument(
        "--replay",
        metavar="FILE",
        help="the recording --backend replay plays (env GPU_AGENT_REPLAY)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster --backend ray uses (default: env RAY_ADDRESS, else the local one)",
    )
    p.add_argument(
        "--allow-power-cap",
        action="store_true",
        help="on overheating, lower the GPU's power limit (root; it changes the "
        "card for everyone; restored on release). Default: a warning and an event "
        "(env GPU_AGENT_ALLOW_POWER_CAP=1)",
    )
    p.add_argument(
        "--database",
        metavar="URL",
        help="a postgresql:// database for the ledger and the checkpoints, shared by "
        "every worker and host (env GPU_AGENT_DATABASE; default: SQLite in "
        "--state-dir)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _token_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="state directory (env GPU_AGENT_HOME)")
    p.add_argument("--json", action="store_true")


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", help="who pays (default: the project of your token)")
    p.add_argument("--purpose", required=True, help="training, inference or research")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--hours", type=float, required=True)
    p.add_argument("--gpu-type")
    p.add_argument(
        "--workload",
        metavar="NAME",
        help="what the job is (e.g. resnet50): its speed on each type is the fleet file's "
        "[speeds.NAME] row, or what this project's earlier runs of it measured",
    )
    p.add_argument("--budget", type=float, help="this request's budget limit in USD")
    p.add_argument("--priority", default="normal", choices=["low", "normal", "high", "critical"])
    p.add_argument("--min-memory-gb", type=float)
    p.add_argument("--mode", default="budget", choices=["budget", "performance"])
    p.add_argument("--thread-id")
    p.add_argument(
        "--max-wait",
        type=float,
        metavar="MINUTES",
        help="give up (exit 4) if not placed within this many minutes",
    )
    p.add_argument(
        "--resumes",
        metavar="ALLOCATION",
        help="the released allocation whose work this goes on with (its idle "
        "release was a pause, not hoarding)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpu-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("request", help="request GPUs (stays to monitor unless --no-wait)")
    _common(p)
    _request_args(p)
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once placed or queued; a worker or `resume` carries the "
        "thread on (until then `status` shows the allocation unmonitored)",
    )

    p = sub.add_parser(
        "submit",
        help="queue a request for `gpu-agent worker` (prints its "
        "thread id); any worker on the same --database runs it",
    )
    _common(p)
    _request_args(p)

    p = sub.add_parser(
        "worker",
        help="serve submitted requests, N at a time, beside other "
        "workers; SIGTERM hands running ones back to the others",
    )
    _common(p)
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="requests decided and run at once, on turns (4); one that waits for GPUs lets its "
        "turn go, and runs on beside them once placed",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        help="requests that wait for GPUs in the fair queue beside them, each letting its "
        "turn go to the next job (64; 0: a waiting request keeps its turn)",
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="a dead worker's requests are taken over after this long (30)",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="how often an idle worker looks for work (1)",
    )
    p.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit once no request is pending or running on any worker",
    )

    p = sub.add_parser(
        "audit", help="who approved, denied, decided, released and set budgets, and why"
    )
    _common(p)
    p.add_argument("--project")
    p.add_argument("--limit", type=int, help="the last N entries")

    p = sub.add_parser("token", help="identities: tokens mapped to a project and a role")
    tsub = p.add_subparsers(dest="token_command", required=True, parser_class=Parser)
    tp = tsub.add_parser(
        "add",
        help="add an identity and print its new token (shown once); "
        "the first must be an admin, later ones need an admin's token",
    )
    tp.add_argument("name")
    tp.add_argument("--role", required=True, choices=["member", "approver", "admin"])
    tp.add_argument("--project", help="the project a member or approver belongs to")
    _token_opts(tp)
    _token_opts(
        tsub.add_parser("list", help="who has a token: names, roles, projects (admins only)")
    )
    tp = tsub.add_parser(
        "revoke",
        help="remove an identity: its token stops working at once "
        "(admins only; the last admin stays)",
    )
    tp.add_argument("name")
    _token_opts(tp)

    p = sub.add_parser(
        "reviews",
        help="requests waiting for a human decision (approve with "
        "`gpu-agent resume THREAD --approve`)",
    )
    _common(p)

    p = sub.add_parser(
        "ui", help="the web page: pending reviews (approve or deny), the fleet, spend; on 127.0.0.1"
    )
    _common(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to bind (default "
        "127.0.0.1); the page answers to it and to the loopback names",
    )
    p.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        dest="allow_host",
        help="another host name the page answers to (repeatable; env "
        "GPU_AGENT_UI_HOSTS, comma-separated): requests with any other Host are "
        "refused",
    )
    p.add_argument("--port", type=int, default=8750)
    p.add_argument(
        "--simulation",
        metavar="DIR",
        default="simulation",
        help="the `gpu-agent simulate` report whose cost figures the spend page "
        "shows (default ./simulation)",
    )

    p = sub.add_parser("jobs", help="submitted requests: pending, running (where), done (how)")
    _common(p)
    p.add_argument("thread_id", nargs="?", help="one job")

    p = sub.add_parser("status", help="every GPU and every allocation")
    _common(p)

    p = sub.add_parser("release", help="release an allocation now (or cancel a queued one)")
    _common(p)
    p.add_argument("allocation_id")

    p = sub.add_parser(
        "preempt",
        help="ask a running allocation to yield its GPUs after its checkpoint notice "
        "(administrators; its `gpu-agent run --requeue` resumes it)",
    )
    _common(p)
    p.add_argument("allocation_id")
    p.add_argument("--why", required=True, help="one line for the audit log")

    p = sub.add_parser(
        "resume",
        help="continue a thread from its last checkpoint (and "
        "monitor its allocation), or adopt every unmonitored one (--orphans)",
    )
    _common(p)
    p.add_argument("thread_id", nargs="?")
    decision = p.add_mutually_exclusive_group()
    decision.add_argument("--approve", action="store_true", help="approve a pending review")
    decision.add_argument("--deny", action="store_true", help="deny a pending review")
    p.add_argument(
        "--by", default="cli", help="who decides (recorded; with tokens, the token's name)"
    )
    p.add_argument("--comment", default="", help="why (recorded)")
    p.add_argument(
        "--without-guardrails",
        action="store_true",
        help="with --approve: grant the request as asked, without the guardrails the council "
        "chose (recorded)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the decision is applied and the request placed or "
        "queued; a worker or a later `resume` monitors it",
    )
    p.add_argument(
        "--orphans",
        action="store_true",
        help="adopt every live allocation you may act on that no process monitors "
        "(its monitor died, or it was left with --no-wait) and monitor them here "
        "until they end",
    )

    p = sub.add_parser("history", help="finished allocations")
    _common(p)
    p.add_argument("--project")

    p = sub.add_parser("costs", help="spend and remaining budget per project")
    _common(p)

    p = sub.add_parser(
        "serve-metrics",
        help="serve Prometheus metrics (DCGM names for the "
        "GPUs, gpu_agent_* for the ledger) until SIGINT/SIGTERM",
    )
    _common(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1); the metrics answer to it and to the "
        "loopback names",
    )
    p.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        dest="allow_host",
        help="another host name the metrics answer to (repeatable), e.g. the one Prometheus "
        "scrapes: requests with any other Host are refused",
    )
    p.add_argument(
        "--port", type=int, default=9400, help="port to bind (default 9400; 0: any free port)"
    )

    p = sub.add_parser(
        "run",
        help="run a command on an allocation's GPUs "
        "(CUDA_VISIBLE_DEVICES = their UUIDs); stop it when the allocation ends",
        usage="gpu-agent run (--allocation ID | --project P --count N --hours H)"
        " [options] -- COMMAND...\n       gpu-agent run --resume ID",
    )
    _common(p)
    p.add_argument(
        "--allocation",
        help="an active allocation (its thread's monitor must be "
        "running: gpu-agent request, or resume)",
    )
    p.add_argument("--project", help="request GPUs for this project, then run")
    p.add_argument("--purpose", default="training")
    p.add_argument("--count", type=int)
    p.add_argument("--hours", type=float)
    p.add_argument("--gpu-type")
    p.add_argument(
        "--workload",
        metavar="NAME",
        help="with --project: what the job is (e.g. resnet50); a run that exits 0 measures "
        "its speed on the type it ran on, for the project's next requests of it",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=GRACE_S,
        metavar="SECONDS",
        help=f"between SIGTERM and SIGKILL (default {GRACE_S:g})",
    )
    p.add_argument(
        "--notice",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="send --notice-signal this long before the allocation's deadline, "
        "for the command to checkpoint (default 0: none; a command that does not "
        "handle the signal ends by it, so it is opt-in, as Slurm's --signal)",
    )
    p.add_argument(
        "--notice-signal",
        default="USR1",
        metavar="NAME",
        help="USR1 (default), USR2, HUP, INT or TERM",
    )
    p.add_argument(
        "--requeue",
        type=int,
        default=0,
        metavar="N",
        help="with --project: when the allocation ends before the command (lease "
        "ran out, a GPU failed), ask again resuming it (ahead of new work) and "
        "start the command again to go on from its checkpoint, at most N times "
        "(default 0); recorded in the ledger, so that --resume carries it on if this "
        "process dies",
    )
    p.add_argument(
        "--resume",
        metavar="ID",
        help="carry on a `run` whose process died (ID: any allocation it ran on): adopt "
        "its command, or with --requeue requeue it once where its allocation was yielded "
        "or lost; the recorded command, directory and options, this shell's environment",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND...")

    p = sub.add_parser(
        "studio",
        help="start the LangGraph dev server (langgraph dev) on "
        "127.0.0.1 for Studio, the SDK, RemoteGraph and MCP; no browser",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2024)
    p.add_argument(
        "--config", help="langgraph.json (default: ./langgraph.json, else the project's own)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=4,
        help="runs served at once (default 4; "
        "`langgraph dev` alone ran one at a time here, so a status call waited "
        "for a monitored allocation to end)",
    )

    p = sub.add_parser("health", help="GPUs taken out of placement (XID errors, lost GPUs)")
    _common(p)
    p.add_argument("--clear", metavar="UUID", help="put a repaired GPU back into placement")

    p = sub.add_parser("nvml", help="NVML tools")
    nsub = p.add_subparsers(dest="nvml_command", required=True, parser_class=Parser)
    np_ = nsub.add_parser(
        "record",
        help="record this host's GPUs through NVML (getters "
        "only) in the format --backend replay plays",
    )
    np_.add_argument("--out", required=True, help="the recording (JSON) to write")
    np_.add_argument("--seconds", type=float, default=10.0)
    np_.add_argument("--period", type=float, default=0.25, help="seconds between samples")
    np_.add_argument("--phase", default="recorded", help="label every sample with this phase")

    p = sub.add_parser("budget", help="manage project budgets")
    bsub = p.add_subparsers(dest="budget_command", required=True, parser_class=Parser)
    bp = bsub.add_parser("set", help="set a project's budget in USD")
    _common(bp)
    bp.add_argument("project")
    bp.add_argument("usd", type=float)

    p = sub.add_parser("demo", help="a short story on the simulated fleet in virtual time")
    p.add_argument(
        "--state-dir", help="a new state directory to keep it in (default: a temporary one)"
    )
    p.add_argument("--fleet", help="fleet TOML file (env GPU_AGENT_FLEET; default: built-in fleet)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser(
        "simulate",
        help="replay a cluster trace through several policies in "
        "virtual time and report cost, utilisation, JCT, fairness, hoarding "
        "and budget violations side by side",
    )
    p.add_argument(
        "--trace",
        required=True,
        help="trace CSV (submit time, duration, GPUs, project), e.g. ../shared/traces/philly.csv",
    )
    p.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="comma-separated: naive, slurm-like, slurm-cheapest, slurm-batch, cheapest-first, "
        "cheapest-autostop, "
        "slurm-cheapest-borrow, "
        "gpu-agent, gpu-agent-no-autorelease, gpu-agent-rules, gpu-agent-no-council, "
        "gpu-agent-borrow, gpu-agent-no-council-borrow, gpu-agent-no-move, "
        "gpu-agent-no-council-no-move, gpu-agent-maxmin, gpu-agent-no-council-maxmin, "
        "gpu-agent-las, gpu-agent-no-council-las "
        f"(default: {','.join(DEFAULT_POLICIES)})",
    )
    p.add_argument(
        "--jobs", type=int, help="only the earliest N jobs of the trace (of --vc when given)"
    )
    p.add_argument(
        "--vc",
        metavar="NAME",
        help="only the jobs of this virtual cluster (project) of the trace, e.g. vc-b436b2",
    )
    p.add_argument(
        "--workload",
        choices=("normal", "pure"),
        default="normal",
        help="normal (default): jobs idle, users pad their leases, projects have budgets; "
        "pure: the trace's durations are all work, no job names a type, every job "
        "checkpoints, leases are not padded and there are no budgets, as in a pure-work "
        "scheduler's simulator (sim/workload.py)",
    )
    p.add_argument("--fleet", help="fleet TOML file (default: the built-in 1,024-GPU trace fleet)")
    p.add_argument(
        "--out",
        default="simulation",
        metavar="DIR",
        help="where report.md, metrics.json, the plots and each gpu-agent policy's "
        "ledger go (default: ./simulation)",
    )
    p.add_argument("--seed", type=int, default=0, help="the workload's seed (default 0)")
    p.add_argument(
        "--habits",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="projects with habits that differ and drift: the sd of their idle shift, from 0 "
        "(projects alike, the default) to 4; 1.5 spreads the projects' idle shares from about "
        "3 %% to 93 %% on Philly (sim/workload.py)",
    )
    p.add_argument(
        "--run-compliance",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="the share of owners who, told by the council's guardrails to run their work "
        "under `gpu-agent run`, do so (a seeded draw per job; from 0, the default: none, to 1; "
        "sim/workload.py)",
    )
    p.add_argument(
        "--models",
        metavar="FILE",
        help="a file of [speeds.NAME] tables (the fleet file's format), added to the fleet "
        "file: each job is one of these workloads (a seeded, uniform draw) and runs at its "
        "speed on each type, e.g. benchmarks/gavel_speeds.toml; without it every job runs "
        "at the types' average speeds",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser(
        "analyze",
        help="usage patterns of the allocation history: demand "
        "against capacity, queueing, idle and hoarded GPU-hours, bottlenecks, "
        "recommendations and plots",
    )
    p.add_argument(
        "--state-dir",
        help="state directory (env GPU_AGENT_HOME, default ./.gpu-agent); its ledger is only read",
    )
    p.add_argument(
        "--fleet",
        help="fleet TOML file (default: the state directory's fleet.toml "
        "if there is one, else env GPU_AGENT_FLEET, else the built-in fleet)",
    )
    p.add_argument(
        "--since",
        metavar="DATE",
        help="keep allocations enqueued at or after this ISO date or datetime (UTC)",
    )
    p.add_argument(
        "--until",
        metavar="DATE",
        help="keep allocations enqueued before this ISO date or datetime (UTC)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="directory for the PNG plots (default: <state-dir>/analysis)"
    )
    p.add_argument("--no-plots", action="store_true", help="write no plots")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("council", help="the neural council's weights: train, evaluate")
    csub = p.add_subparsers(dest="council_command", required=True, parser_class=Parser)
    cp = csub.add_parser(
        "train",
        help="build the data, train, calibrate, evaluate and write "
        "weights plus a model card (deterministic given --seed)",
    )
    cp.add_argument("--fleet", help="fleet TOML file (default: built-in fleet)")
    cp.add_argument(
        "--out",
        default="council-weights",
        help="directory for council.pt, metrics.json and MODEL_CARD.md (checked before "
        "training starts); point the fleet file's [council] weights at council.pt to use them",
    )
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument(
        "--worlds",
        type=int,
        help="synthetic worlds (3 to 1000; default 16, with --target outcome 32)",
    )
    cp.add_argument(
        "--days",
        type=float,
        help="each world's span in days, from 7 to 3650 (default 60, with --target outcome 120)",
    )
    cp.add_argument(
        "--steps",
        type=int,
        help="training steps, 1 to 1,000,000 (default 2000, with --target outcome 4000)",
    )
    cp.add_argument(
        "--trace",
        help="also replay this trace (Philly CSV shape), e.g. ../shared/traces/philly.csv",
    )
    cp.add_argument("--trace-jobs", type=int, default=30000)
    cp.add_argument("--no-ablations", action="store_true")
    cp.add_argument(
        "--target",
        choices=("reference", "outcome"),
        default="reference",
        help="what the members learn: the reference rules (the shipped weights) or whether "
        "requests that ran ended without waste (worlds split by time; no ablations yet)",
    )
    cp.add_argument(
        "--explore",
        type=float,
        default=None,
        help="with --target outcome only: the share of the requests the rules deny that run "
        "anyway, so their outcomes are learned; above 0, at most 0.5 (default 0.05)",
    )
    cp.add_argument(
        "--core",
        choices=("cfc", "gru"),
        default="cfc",
        help="the members' recurrent cell (default cfc), to compare families on the same data",
    )
    cp.add_argument(
        "--time",
        choices=("gate", "input", "none"),
        default="gate",
        help="how elapsed time enters it: the CfC's time gate (default), log(1+dt) as an "
        "input (a GRU's), or not at all",
    )
    cp.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ep = csub.add_parser(
        "evaluate",
        help="a council's decisions against what requests went on to do, on the last 30 %% "
        "of fresh simulated worlds, beside the reference rules, a logistic regression on "
        'outcomes, a heuristic of the projects\' true habits ("oracle") and approving everything',
    )
    ep.add_argument("--fleet", help="fleet TOML file (default: built-in fleet)")
    ep.add_argument(
        "--weights",
        action="append",
        metavar="[FAMILY=]PATH",
        help="a council.pt, or `outcome` for the shipped council trained on outcomes, to "
        "evaluate (repeatable; default: both shipped councils); councils "
        "given one FAMILY name (trained alike but for --seed) are reported as one, mean ± sd "
        "over their training seeds",
    )
    ep.add_argument("--seeds", default="0,1,2,3,4", help="worlds, comma-separated (default 0-4)")
    ep.add_argument(
        "--days",
        type=float,
        default=120,
        help="each world's span, from 7 (so that every slice holds requests) to 3650 (default 120)",
    )
    ep.add_argument("--projects", type=int, default=24, help="projects per world (default 24)")
    ep.add_argument(
        "--card",
        action="store_true",
        help="write the figures into the model card beside the one --weights evaluated (its "
        "section on fresh worlds, replaced where it has one)",
    )
    ep.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser
