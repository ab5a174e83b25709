"""What a benchmark report says of the machine it ran on (the parts several reports share)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from metafx.blas_threads import one_blas_thread


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


def speed_probe() -> dict[str, float]:
    """CPU seconds of two fixed workloads on this thread: a reference for a report's speed figures.

    Why: the model name says nothing of the speed a virtual machine gets; the same CPU string measured the
    same exports 3x apart in CPU time within one day (benchmarks/export_rtf.md and export_rtf_rerun/). A
    report that carries these two figures can be compared with another: ratios of its speeds scale with them.

    Returns:
        ``{"python_loop_s": CPU seconds of 3 million interpreted additions, "numpy_matmul_s": CPU seconds of
        50 float64 512 x 512 products on one BLAS thread}`` (the best of three runs each).
    """
    def loop() -> float:
        t, s = time.process_time(), 0
        for i in range(3_000_000):
            s += i
        return time.process_time() - t

    a = np.random.default_rng(0).standard_normal((512, 512))

    def matmul() -> float:
        t = time.process_time()
        for _ in range(50):
            a @ a
        return time.process_time() - t

    with one_blas_thread():
        return {"python_loop_s": round(min(loop() for _ in range(3)), 4),
                "numpy_matmul_s": round(min(matmul() for _ in range(3)), 4)}


def probe_sentence(probe: dict[str, float] | None) -> str:
    """A report's sentence for :func:`speed_probe`'s figures (" Machine speed probe ..."), or "" without them
    (a report written before the probe existed)."""
    if not probe:
        return ""
    return (f" Machine speed probe (CPU s, lower is faster; `metafx.bench.machine.speed_probe`): Python loop "
            f"{probe['python_loop_s']:.3f}, numpy matmul {probe['numpy_matmul_s']:.3f}.")
