"""NVML: reading GPUs (reader), the inventory backend on it (backend), recording a GPU
through phases (record) and replaying a recording as a fake pynvml (replay)."""
