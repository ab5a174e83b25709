"""What a benchmark report says of the machine it ran on (the parts several reports share)."""
from __future__ import annotations

from pathlib import Path


def cpu_model() -> str:
    """The processor's model name from ``/proc/cpuinfo``, or "" where there is none (not Linux).

    Why: timings and the results of the capture's searches depend on it (float rounding differs between
    instruction sets), and machines here differ by up to 2.5x from day to day.

    Returns:
        The first ``model name`` line's value, stripped; "" if the file or the line is missing.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
