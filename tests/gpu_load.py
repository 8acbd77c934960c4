"""GPU loads for the `gpu` tests and tests/gpu_check.sh, run as children the way `gpu-agent run`
starts them (CUDA_VISIBLE_DEVICES set):

    python tests/gpu_load.py [SECONDS]        bf16 matmuls on the first visible GPU
    python tests/gpu_load.py hoard GIB        hold GIB of GPU memory and run nothing, forever
"""

from __future__ import annotations

import sys
import time

import torch


def matmuls(seconds: float) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    print(f"running on {torch.cuda.get_device_name(0)}", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()


def hoard(gib: float) -> None:
    held = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    print(f"holding {held.numel() / 2**30:.0f} GiB on {torch.cuda.get_device_name(0)}", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["hoard"]:
        hoard(float(sys.argv[2]))
    else:
        matmuls(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0)
