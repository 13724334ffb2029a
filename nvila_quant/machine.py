"""A description of the machine a measurement ran on (named in every benchmark JSON and report)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_name", "machine_info"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict:
    """CPU, core count, torch version/threads and, on CUDA, the GPU name."""
    info = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device) if device else 0)
    return info
