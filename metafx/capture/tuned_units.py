"""Tuned units: anti-aliased curves of a pre-filtered input, fitted to one capture's support.

The Wiener bank's curve units (:mod:`metafx.wiener`) look along fixed random directions of x and
three fixed low-passes, through a plain ``tanh``. For an effect whose curve is driven hard through
a pre-filter (the tube clipper's +18 dB pre-emphasis shelf, the fuzz's input high-pass), two
things keep them from its output, measured on the shipped study's validation settings at 3 s of
support: the direction (units along the exact pre-filter, plain tanh: tube clipper 0.055 ->
0.036, fuzz 0.048 -> 0.026) and aliasing (the same units anti-aliased as the effects are, by the
first-order antiderivative method: 0.0036 and 0.0083). A plugin with anti-aliasing or an analog
device does not alias, and no linear combination of aliased curves cancels aliasing.

So a capture fits a pre-filter to its support: ``u = g (x - r lp_p(x))`` with a one-pole low-pass
``lp_p`` of corner ``fc`` (r = 0: no filter; 0 < r < 1: a first-order high shelf of ``1 / (1 - r)``;
r = 1: a high-pass), and offers :data:`TUNED_SCALES` x :data:`TUNED_OFFSETS` units ``ADAA tanh(s u +
c + o)`` (:func:`metafx.wiener.adaa_tanh`) to the head beside the bank. The four numbers ``(g, r,
fc, c)`` are found by Nelder-Mead on a variable-projection criterion: the equation error left after
the head's model channels (all their taps) and the output's autoregressive lags are projected out,
reduced by these units' first :data:`TUNED_SEARCH_LAGS` taps (validation settings at 3 s: 4 taps
find the same filters as 8 in two thirds of the time; 2 lose the fuzz's); on :data:`TUNED_RUNS` runs
of :data:`TUNED_RUN_LEN` samples drawn from the first :data:`TUNED_SPAN_S` seconds of the support
(seeded), so the search costs the same for any longer support. The criterion is the head's own
least-squares problem restricted to these rows, so units that do not help leave it near 1; the
capture's cross-validation then keeps the bank with the units, without them, or neither
(:func:`metafx.capture.adapt.ridge_fit_continuous`, ``n_tuned``).
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.linalg import solve_triangular
from scipy.optimize import OptimizeResult, minimize
from scipy.signal import lfilter

from metafx.blas_threads import one_blas_thread
from metafx.wiener import WienerBank, adaa_tanh, lowpass_pole

TUNED_SCALES = (0.7, 1.0, 1.4)  # unit gains relative to the fitted g
TUNED_OFFSETS = (-0.3, 0.0, 0.3)  # unit offsets relative to the fitted c
TUNED_UNITS = len(TUNED_SCALES) * len(TUNED_OFFSETS)  # units a capture adds
TUNED_SPAN_S = 3.0  # rows of the criterion: from the first seconds of the support ...
TUNED_RUNS = 24  # ... runs ...
TUNED_RUN_LEN = 256  # ... of this many samples
TUNED_STARTS = 2  # Nelder-Mead runs, from the best points of the start grid
TUNED_EVALS = 50  # criterion evaluations per Nelder-Mead run
TUNED_SEED = 0  # the runs' positions
TUNED_SEARCH_LAGS = 4  # taps of the units in the criterion (at most the head's nb); the fit gives them nb
TUNED_GRID_OFFSETS = (0.0, 0.5)  # the start grid's curve offsets (with g 3 / 20, r 0.5 / 0.95, fc 80 / 700 Hz)
FC_RANGE_HZ = (20.0, 20000.0)  # the pre-filter's corner is kept in this range
_STEP = np.array([0.5, 1.0, 0.5, 0.3])  # Nelder-Mead's first simplex: log g, logit r, log fc, c


@dataclass(frozen=True)
class PreFilter:
    """The fitted pre-filter and curve of the tuned units.

    Attributes:
        gain: g, the input gain.
        ratio: r in (0, 1): the low-pass share taken off (shelf of ``1 / (1 - r)``; 1: high-pass).
        fc: the low-pass corner, Hz.
        offset: c, the curve's offset (asymmetry).
        criterion: the equation error left after the units (1 = no better than without them).
        evaluations: criterion evaluations made.
        seconds: wall time of the fit.
    """

    gain: float
    ratio: float
    fc: float
    offset: float
    criterion: float
    evaluations: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        """The fields as plain numbers (results.json)."""
        return {"gain": self.gain, "ratio": self.ratio, "fc_hz": self.fc, "offset": self.offset,
                "criterion": self.criterion, "evaluations": self.evaluations, "seconds": self.seconds}


def _decode(th: np.ndarray) -> tuple[float, float, float, float]:
    """``(log g, logit r, log fc, c)`` -> ``(g, r, fc, c)`` with fc clamped to :data:`FC_RANGE_HZ`."""
    fc = min(max(math.exp(float(th[2])), FC_RANGE_HZ[0]), FC_RANGE_HZ[1])
    return math.exp(float(th[0])), 1.0 / (1.0 + math.exp(-float(th[1]))), fc, float(th[3])


def criterion_rows(y: np.ndarray, phi: np.ndarray, nb: int, na: int, lead: int, runs: int,
                   what: str, seed: int = TUNED_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The rows of a variable-projection criterion (this module's and :mod:`metafx.capture.cascade_units`'): up to
    ``runs`` seeded runs of :data:`TUNED_RUN_LEN` samples, none before ``lead``, and the part of ``y`` there that
    the head's channels ``phi`` (every tap) and the output's AR lags do not explain, projected out once.

    Args:
        y: the wet span (S,); phi: the head's channels over it (M, S); nb, na: the head's orders.
        lead: the first sample a run may start at (the lags and any filter warm-up before it).
        runs: runs wanted; what: the units' name for the error.
        seed: the runs' positions (another seed draws other runs: another criterion of the same units, which a
            cascade search's further tries use, :data:`metafx.capture.cascade_units.CASCADE_TRIES`).

    Returns:
        ``(starts (runs,), Q (rows, P) orthonormal basis of the projected columns, resid (rows,), e0 = |resid|^2)``.

    Raises:
        ValueError: a span shorter than one run after ``lead``.
    """
    S, L = y.shape[0], TUNED_RUN_LEN
    n_runs = min(runs, (S - lead) // L)
    if n_runs < 1:
        raise ValueError(f"a support of {S} samples is too short for the {what} (needs {lead + L})")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(np.arange(lead, S - L + 1, L), size=n_runs, replace=False))
    rows = (starts[:, None] + np.arange(L)[None]).reshape(-1)
    target = y[rows]
    # the model's channels at every tap and the output's AR lags, projected out once (Cholesky whitening)
    Xm = np.concatenate([phi[:, rows - k] for k in range(nb)] + [y[None, rows - k] for k in range(1, na + 1)], 0).T
    G = Xm.T @ Xm
    G[np.diag_indices_from(G)] += 1e-9 * np.trace(G) / G.shape[0] + 1e-300
    Q = solve_triangular(np.linalg.cholesky(G), Xm.T, lower=True).T  # (rows, P): Xm's column space, orthonormal
    resid = target - Q @ (Q.T @ target)
    return starts, Q, resid, float(resid @ resid) + 1e-300


def unexplained(L: np.ndarray, Q: np.ndarray, resid: np.ndarray, e0: float, ridge: float) -> float:
    """The variable-projection criterion of a search's units: the share of the equation error ``resid`` (already
    free of the span of ``Q``) that the unit columns ``L`` leave, after their own part in that span is taken out.

    The columns less their part in the span are formed explicitly: units are often nearly in it (the pointwise
    channels), and ``L^T L - (Q^T L)^T (Q^T L)`` would lose the digits a search steers by.

    Args:
        L: the units' columns over the criterion's rows, (rows, K).
        Q: orthonormal basis of the head's span over the rows (:func:`criterion_rows`), (rows, P).
        resid: the equation error after that span, (rows,); e0: its energy.
        ridge: relative ridge of the units' normal equations (to their mean diagonal).

    Returns:
        The error energy left over ``e0`` (1: the units explain nothing).

    Raises:
        numpy.linalg.LinAlgError: singular normal equations (all-zero columns).
    """
    Lp = L - Q @ (Q.T @ L)
    G = Lp.T @ Lp
    G[np.diag_indices_from(G)] += ridge * np.trace(G) / G.shape[0] + 1e-300
    e = resid - Lp @ np.linalg.solve(G, Lp.T @ resid)
    return float(e @ e) / e0


class EvalCounter:
    """Calls of a criterion, counted across the threads of :func:`nelder_mead_from_best` (``n``)."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:  # ``n += 1`` is not atomic between threads
            self.n += 1


def nelder_mead_from_best(criterion: Callable[[np.ndarray], float], grid: list[np.ndarray], values: list[float],
                          starts: int, steps: tuple[float, ...], max_evals: int, fatol: float) -> OptimizeResult:
    """Nelder-Mead runs of ``criterion`` from the ``starts`` best points of a start grid, each with an initial simplex
    of ``steps`` along the axes; the best result (scipy's ``OptimizeResult``: ``x``, ``fun``; the first start's on a
    tie).

    The runs are independent: they run on threads, one per start, each with one BLAS thread (numpy's products and
    scipy's filters release the GIL; a run is a sequence of small products that a second BLAS thread barely
    speeds up). On two cores the tuned units' search took 0.95-1.07 s instead of 1.22-1.60 s, the same points
    found (its criterion differs in the 13th digit: one BLAS thread sums in another order). ``criterion`` must be
    safe to call from several threads (count its calls with an :class:`EvalCounter`).
    """
    def run(i: int) -> OptimizeResult:
        th0 = grid[i]
        simplex = np.stack([th0] + [th0 + np.eye(th0.size)[j] * steps[j] for j in range(th0.size)])
        return minimize(criterion, th0, method="Nelder-Mead",
                        options={"maxfev": max_evals, "xatol": 1e-2, "fatol": fatol, "initial_simplex": simplex})

    order = [int(i) for i in np.argsort(values)[:starts]]
    with one_blas_thread(), ThreadPoolExecutor(max(1, len(order)), thread_name_prefix="metafx-nelder-mead") as pool:
        results = list(pool.map(run, order))
    best = None
    for res in results:  # in start order: a tie keeps the earlier start, as one run after another did
        if best is None or res.fun < best.fun:
            best = res
    return best


def fit_prefilter(x: np.ndarray, y: np.ndarray, phi: np.ndarray, nb: int, na: int, sr: int) -> PreFilter:
    """Fit the tuned units' pre-filter and curve to a support (see the module docstring).

    Args:
        x: the dry support, (S,), float64.
        y: the aligned wet support, (S,), float64.
        phi: the model's own channels over the support (as the head sees them), (M, S), float64.
        nb: the head's taps per channel; na: its autoregressive order.
        sr: sample rate, Hz.

    Returns:
        The :class:`PreFilter`.

    Raises:
        ValueError: a support shorter than one run plus the head's lags.
    """
    t0 = time.perf_counter()
    S = min(x.shape[0], int(TUNED_SPAN_S * sr))  # the criterion's rows come from here (its cost: the pre-filter)
    x, y, phi = x[:S], y[:S], phi[:, :S]
    starts, Q, resid, e0 = criterion_rows(y, phi, nb, na, max(nb, na, 1), TUNED_RUNS, "tuned units")
    n_runs = starts.size
    win = starts[:, None] + np.arange(-nb, TUNED_RUN_LEN)[None]  # (runs, nb + L): the units' lags and previous input
    n_u = TUNED_UNITS
    evals = EvalCounter()

    def criterion(th: np.ndarray) -> float:
        evals()
        g, r, fc, c = _decode(th)
        p = float(lowpass_pole(fc, sr))
        u = g * (x - r * lfilter([1.0 - p], [1.0, -p], x))
        uw = u[win].reshape(-1)
        z = np.stack([s * uw + c + o for s in TUNED_SCALES for o in TUNED_OFFSETS]).reshape(n_u, n_runs, -1)
        a = adaa_tanh(z[:, :, 1:], z[:, :, :1])  # (K, runs, nb - 1 + L)
        L = np.concatenate([a[:, :, nb - 1 - k: nb - 1 - k + TUNED_RUN_LEN].reshape(n_u, -1)
                            for k in range(min(nb, TUNED_SEARCH_LAGS))], 0).T
        return unexplained(L, Q, resid, e0, 1e-6)

    grid = [np.array([math.log(g), rho, math.log(fc), c]) for g in (3.0, 20.0) for rho in (0.0, 3.0)
            for fc in (80.0, 700.0) for c in TUNED_GRID_OFFSETS]
    vals = [criterion(th) for th in grid]
    best = nelder_mead_from_best(criterion, grid, vals, TUNED_STARTS, _STEP, TUNED_EVALS, 1e-4)
    g, r, fc, c = _decode(best.x)
    return PreFilter(g, r, fc, c, float(best.fun), evals.n, time.perf_counter() - t0)


def tuned_bank(bank: WienerBank, pf: PreFilter, sr: int) -> WienerBank:
    """``bank`` plus the tuned units of ``pf``: a low-pass at ``pf.fc`` and :data:`TUNED_SCALES` x
    :data:`TUNED_OFFSETS` anti-aliased units ``ADAA tanh(s g (x - r lp) + c + o)``."""
    F = bank.n_lowpass
    d = np.zeros(F + 2)
    d[0], d[F + 1] = 1.0, -pf.ratio
    w = np.stack([s * pf.gain * d for s in TUNED_SCALES for _ in TUNED_OFFSETS])
    b = np.array([pf.offset + o for _ in TUNED_SCALES for o in TUNED_OFFSETS])
    return bank.with_tuned_units(float(lowpass_pole(pf.fc, sr)), w, b)


__all__ = ["EvalCounter", "FC_RANGE_HZ", "PreFilter", "criterion_rows", "TUNED_EVALS", "TUNED_OFFSETS", "TUNED_RUNS", "TUNED_RUN_LEN", "TUNED_SCALES",
           "TUNED_SEARCH_LAGS", "TUNED_SPAN_S", "TUNED_STARTS", "TUNED_UNITS", "fit_prefilter", "nelder_mead_from_best", "tuned_bank", "unexplained"]
