"""A short GPU load for the `gpu` tests: bf16 matmuls on the first visible GPU for N seconds.

Run as a child process with CUDA_VISIBLE_DEVICES set, as `gpu-agent run` would start it.
"""

from __future__ import annotations

import sys
import time

import torch


def main(seconds: float) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    print(f"running on {torch.cuda.get_device_name(0)}", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0)
