"""Virtual-time evaluation: scenarios and trace replays through the real graph."""

# What `gpu-agent simulate` compares when no --policies is given: every baseline and
# gpu-agent (sim.simulate.POLICIES has them all). Here, so the CLI's --help needs no simulator.
DEFAULT_POLICIES = (
    "naive",
    "slurm-like",
    "slurm-cheapest",
    "slurm-batch",
    "cheapest-first",
    "cheapest-autostop",
    "gpu-agent",
)
