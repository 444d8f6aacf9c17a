"""Facts about the machine a run uses: CPU model and flags, cores, free memory, the compute device.

Read at run time (``/proc/cpuinfo``, the process's CPU set, cgroup memory limits, torch's CUDA
probe), never configured: results record them (:mod:`unet_pipe.provenance`,
:mod:`unet_pipe.precision`) and the block planner sizes its work by them.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

from unet_pipe.errors import ConfigError


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # every processor repeats the same model and flags
        key, sep, value = line.partition(":")
        if sep:
            entries[key.strip()] = value.strip()
    return entries


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def available_memory(device: str) -> int:
    """Free memory in bytes on ``device`` (CPU: RAM, bounded by a cgroup limit such as SLURM's)."""
    if device.startswith("cuda"):
        import torch  # only when a GPU is asked about: this module stays light (provenance reads it)

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    free = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            free = min(free, max(0, int(limit) - usage))
        break
    return int(free)


def available_cores() -> int:
    """Cores this process may run on (respects SLURM/cgroup CPU sets where the OS reports them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str | None) -> str:
    """The device a run computes on: ``auto`` (or None) = the GPU when present, else the CPU;
    ``cpu`` or ``cuda[:N]`` as given; ``cuda`` without a visible GPU is an error."""
    import torch  # only for the CUDA probe: this module stays light (provenance reads it)

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(None, f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(None, f"--device {device}: no CUDA device is available (use --device cpu)")
    return device
