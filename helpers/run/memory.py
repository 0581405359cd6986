"""Memory probes: the CUDA allocator's peak on a GPU, the process's resident set (RSS) on a CPU.

Runs record their peak with these, and ``bench/`` measures with the same functions.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

GIB = 1 << 30
MIB = 1 << 20


def _status(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (``None`` where ``/proc`` is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident bytes of this process now (0 where ``/proc`` is missing)."""
    return _status("VmRSS") or 0


def reset_peak(device: torch.device | str = "cpu") -> None:
    """Start measuring peak memory here (CUDA allocator, or the process's peak RSS on Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass  # elsewhere the process-wide peak is reported


def current_memory(device: torch.device | str = "cpu") -> int:
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()


def peak_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(peak bytes since :func:`reset_peak`, ``"cuda"`` or ``"rss"``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    peak = _status("VmHWM")
    return (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "rss"
