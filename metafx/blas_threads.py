"""One BLAS thread for a block of numpy/scipy work: the one module that imports threadpoolctl.

Why: numpy's and scipy's OpenBLAS start a thread per core; between calls their idle threads spin, and on
two cores they took half of the CPU torch's criterion needed in the capture's cascade search (6.0 s, 2.8 s
held to one thread), and two Python threads that each run BLAS (the Nelder-Mead starts of the tuned and dynamics
units' searches) ran slower side by side than one after the other until each had one BLAS thread. A benchmark's
speed probe holds BLAS to one thread too, so its figure does not depend on the core count.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

from threadpoolctl import threadpool_limits


def one_blas_thread() -> AbstractContextManager:
    """A context manager that holds every loaded BLAS library to one thread, restoring it on exit.

    Returns:
        threadpoolctl's limiter (a context manager).
    """
    return threadpool_limits(limits=1, user_api="blas")
