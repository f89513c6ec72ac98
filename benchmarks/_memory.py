"""Reading a process's memory from ``/proc/self`` (Linux): resident size and its peak."""

from __future__ import annotations

from pathlib import Path


def status(field: str) -> int:
    """A VmXXX field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM (the peak resident size) to the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")
