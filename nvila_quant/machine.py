"""A description of the machine a measurement ran on (named in every benchmark JSON and report)."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch

__all__ = ["cpu_has_bf16", "cpu_name", "machine_info", "peak_rss_mb"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX-BF16 in /proc/cpuinfo's flags): where bf16
    matmuls run about twice as fast as fp32 ones."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


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


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM (reset at exec), not ru_maxrss, which on Linux keeps
    the parent's resident size from before the fork (a child process would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
