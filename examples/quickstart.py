"""Quickstart: ask for two GPUs, use them in a block, and see what it cost.

    .venv/bin/python examples/quickstart.py

Runs on the default simulated fleet with a state directory of its own, in wall time: the
block below holds the GPUs for a few seconds, and leaving it releases and charges them.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from fleet.models import GPURequest
from graph.orchestrator import Orchestrator


def train(gpu_ids: list[str]) -> None:
    """Stand-in for a training job: a real one would read CUDA_VISIBLE_DEVICES."""
    print(f"training on {len(gpu_ids)} GPU(s): CUDA_VISIBLE_DEVICES={','.join(gpu_ids)}")


async def main(state_dir: str) -> None:
    orchestrator = Orchestrator(state_dir, project="vision")
    try:
        allocation = await orchestrator.allocate_gpu(
            GPURequest(
                gpu_type="A100",
                count=2,
                duration_hours=4,
                purpose="model_training",
                budget_limit=50.0,
            )
        )
        print(
            f"allocated {allocation.id} on {allocation.allocation.node} "
            f"until {allocation.allocation.lease_end:%H:%M} UTC"
        )
        async with allocation:
            train(gpu_ids=allocation.gpu_ids)
            await asyncio.sleep(2)
        # released, charged and recorded here, also when the block raises
        [record] = orchestrator.history()
        print(
            f"released ({record.reason.value}) after {record.hours * 3600:.1f} s, "
            f"charged ${record.cost_usd:.4f}"
        )
        for cost in orchestrator.costs():
            print(f"{cost.project}: spent ${cost.spent_usd:.4f}")
    finally:
        orchestrator.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="gpu-agent-quickstart-") as tmp:
        asyncio.run(main(os.environ.get("GPU_AGENT_HOME") or tmp))
