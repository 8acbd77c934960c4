"""The thresholds of the analysis, each with the reason for its value."""

from __future__ import annotations

# A demand excess shorter than a quarter hour in all is the scheduler's polling latency (a
# poll every minute by default), not a shortage worth buying GPUs for.
SUSTAINED_HOURS = 0.25
# A project is a hoarder when at least a quarter of its GPU-hours were provably idle: above
# the share a well-behaved job loses to start-up, checkpoints and evaluation.
HOARD_SHARE = 0.25
# Below one GPU-hour (about $5 on an A100) a pattern is noise, not worth a change of habit.
MIN_EVIDENCE_GPU_HOURS = 1.0
# A quota or budget whose busiest use stayed under a quarter of it could be cut by three
# quarters without ever having refused anything.
UNUSED_SHARE = 0.25
# A pool holding under a quarter of its capacity on average has GPUs that mostly sit unused.
IDLE_POOL_SHARE = 0.25
# How many edges and nodes the report names as bottlenecks.
TOP_N = 5
