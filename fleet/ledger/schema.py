"""The ledger's tables: what every ledger database is created with, and the version its
migrations (fleet/ledger.py) bring an older one up to."""

from __future__ import annotations

# 1: allocations, holds, charges, spend, history, budgets, records, usage, unhealthy
# 2: jobs (the queue `gpu-agent worker` serves), freed (when each GPU was last released),
#    audit (who approved, denied, decided, released, set a budget, and why)
# 3: monitors (which process runs each live allocation's thread, and its last heartbeat)
# 4: commands and the hoarding record; 5: indexes; 6: scheduler_jobs (a Slurm job per allocation)
# 7: runs (what `gpu-agent run --requeue` must outlive its process for)
# 8: threads (the request each caller-named thread was started for, and by whom)
# 9: allocations.renew_hours (a lease held a term at a time, renewed while its GPUs work)
# 10: commands.beat_at (the `gpu-agent run` in charge of a command beats while it supervises it)
# 11: runs.given (`run --allocation` is recorded too, so that its command is stopped if it dies)
SCHEMA_VERSION = 11

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (
    id TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    project TEXT NOT NULL,
    purpose TEXT NOT NULL,
    priority TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    price_per_hour REAL NOT NULL,
    hours REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'released')),
    enqueued_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    started_at REAL,
    lease_end REAL,
    deadline REAL,
    deadline_reason TEXT,
    released_at REAL,
    release_reason TEXT,
    cost_usd REAL,
    util_sum REAL NOT NULL DEFAULT 0,
    util_n INTEGER NOT NULL DEFAULT 0,
    ticks INTEGER NOT NULL DEFAULT 0,
    util_last REAL,
    busy_at_start REAL,
    idle_since REAL,
    resumes TEXT,
    renew_hours REAL,
    gpu_ids TEXT NOT NULL DEFAULT '[]',
    nodes TEXT NOT NULL DEFAULT '[]',
    request TEXT NOT NULL,
    UNIQUE (thread_id, request_id)
);
CREATE INDEX IF NOT EXISTS allocations_by_state ON allocations (state, gpu_type);
CREATE INDEX IF NOT EXISTS allocations_by_project ON allocations (project, state);
CREATE TABLE IF NOT EXISTS holds (
    gpu_uuid TEXT PRIMARY KEY,
    allocation_id TEXT NOT NULL REFERENCES allocations (id)
);
CREATE TABLE IF NOT EXISTS charges (
    allocation_id TEXT PRIMARY KEY REFERENCES allocations (id),
    project TEXT NOT NULL,
    amount_usd REAL NOT NULL,
    charged_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_project ON charges (project);
CREATE TABLE IF NOT EXISTS spend (
    project TEXT PRIMARY KEY,
    usd REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    allocation_id TEXT PRIMARY KEY REFERENCES allocations (id),
    thread_id TEXT NOT NULL,
    project TEXT NOT NULL,
    purpose TEXT NOT NULL,
    priority TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    count INTEGER NOT NULL,
    gpu_ids TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    hours REAL NOT NULL,
    requested_hours REAL NOT NULL,
    cost_usd REAL NOT NULL,
    reason TEXT NOT NULL,
    mean_util_pct REAL,
    hoarded_hours REAL NOT NULL DEFAULT 0,
    resumed_by TEXT,
    pause_s REAL
);
CREATE INDEX IF NOT EXISTS history_by_project ON history (project, ended_at);
CREATE INDEX IF NOT EXISTS history_by_end ON history (ended_at);
CREATE TABLE IF NOT EXISTS budgets (
    project TEXT PRIMARY KEY,
    budget_usd REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    project TEXT PRIMARY KEY,
    at REAL NOT NULL,
    events INTEGER NOT NULL,
    gpu_hours REAL NOT NULL,
    idle_gpu_hours REAL NOT NULL,  -- hoarded GPU-hours (RecordSummary.hoarded_gpu_hours)
    budget_gpu_hours REAL NOT NULL,
    rated_gpu_hours REAL NOT NULL,
    util_gpu_hours REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    project TEXT PRIMARY KEY,
    gpu_hours REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS unhealthy (
    gpu_uuid TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL
);
"""

V2 = """
CREATE TABLE IF NOT EXISTS freed (
    gpu_uuid TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    thread_id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    submitted_at REAL NOT NULL,
    worker TEXT,
    claimed_at REAL,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    error TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, submitted_at);
CREATE TABLE IF NOT EXISTS audit (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    project TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
"""

V3 = """
CREATE TABLE IF NOT EXISTS monitors (
    allocation_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    beat_at REAL NOT NULL,
    since REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS monitors_by_owner ON monitors (owner);
"""

V4 = """
CREATE TABLE IF NOT EXISTS commands (
    allocation_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    beat_at REAL
);
"""
V4_COLUMNS = {
    "allocations": ["idle_since REAL", "resumes TEXT"],
    "history": ["hoarded_hours REAL NOT NULL DEFAULT 0", "resumed_by TEXT", "pause_s REAL"],
}
# a resumed allocation looks up what its resumer had learned (Ledger.resume); the running
# allocations' usage and expected cost are summed from an index alone (Ledger._active,
# EXPECTED, UNCUT, COMMITTED), without reading their rows
V5 = """
CREATE INDEX IF NOT EXISTS history_by_resumer ON history (resumed_by);
CREATE INDEX IF NOT EXISTS allocations_running ON allocations (state, project, count,
    started_at, price_per_hour, lease_end, deadline);
"""
# the job that holds an allocation's GPUs where the cluster's scheduler holds them (Slurm):
# its id, its node and the GPU indices the scheduler chose there, and when it started
V6 = """
CREATE TABLE IF NOT EXISTS scheduler_jobs (
    allocation_id TEXT PRIMARY KEY REFERENCES allocations (id),
    scheduler TEXT NOT NULL,
    job_id TEXT NOT NULL,
    node TEXT NOT NULL,
    gpus TEXT NOT NULL,
    started_at REAL NOT NULL
);
"""
# `gpu-agent run`, per allocation its command ran (or will run) on: the `run` process in charge
# (fleet.monitors.new_owner), the command (JSON), the requeues left, the command's process
# group, whether its checkpoint notice was sent, the allocation that resumes this one, set
# once, and whether the allocation was given to the run (fleet.ledger.runs)
V7 = """
CREATE TABLE IF NOT EXISTS runs (
    allocation_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    command TEXT NOT NULL,
    requeues_left INTEGER NOT NULL CHECK (requeues_left >= 0),
    pgid INTEGER,
    noticed_at REAL,
    successor TEXT UNIQUE,
    given INTEGER NOT NULL DEFAULT 0
);
"""
# a thread named by its caller (`--thread-id`), claimed before its request runs: the process
# that claimed it (fleet.monitors.new_owner, or "job" once submitted), the one request that may
# be placed on it, and when (fleet.ledger.threads)
V8 = """
CREATE TABLE IF NOT EXISTS threads (
    thread_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    request_id TEXT NOT NULL,
    at REAL NOT NULL
);
"""
# an approval with guardrails' term (council.guardrails): its lease ends `renew_hours` after it
# began or was last renewed, short of `hours`; NULL once the last term is under way, or where
# the lease runs whole (Ledger.renew)
V9_COLUMNS = {"allocations": ["renew_hours REAL"]}
# the wall-clock time the `run` in charge of an allocation's command last said it lives: seen
# from another host, where its PID says nothing, its beats do (fleet.commands.run_lives)
V10_COLUMNS = {"commands": ["beat_at REAL"]}
# a run on an allocation it was given (`run --allocation`), not requested: recorded only so that
# whoever ends the allocation after it died stops its command; nothing to resume or requeue
V11_COLUMNS = {"runs": ["given INTEGER NOT NULL DEFAULT 0"]}
TABLES = (
    "meta",
    "allocations",
    "holds",
    "charges",
    "spend",
    "history",
    "budgets",
    "records",
    "usage",
    "unhealthy",
    "freed",
    "jobs",
    "audit",
    "monitors",
    "commands",
    "scheduler_jobs",
    "runs",
    "threads",
)
