"""Dynamics units: gain units over one envelope fitted to a capture's support (peak limiters).

The Wiener bank's gain units (:mod:`metafx.wiener`) follow a seeded grid of envelopes: instant-attack peak
followers of three release times, each smoothed by three attack times. A peak limiter's detector is
another order of the same parts with its own times: Faust's ``co.limiter_lad_mono`` holds the peak of
|x| for a few milliseconds, smooths it by the attack one-pole, then follows it by a release follower
(instant rise, one-pole fall), and the gain is ``min(1, ceiling / envelope)``. Measured on the shipped
study's limiter settings (validation and test, 3 s of support): a capture with the grid reached
held-out ESRs 0.011 - 0.053; a least-squares fit of ``x min(1, l / e)`` on that detector's exact
envelope with the true times explains the output to 1e-12, with a sliding-window hold in place of
Faust's peak holder to 3e-4 - 3e-3, and with no hold only to 0.05 - 0.14.

So a capture whose tuned units fall short (the rule of the cascade units, in
:func:`metafx.capture.adapt.adapt_arx`) fits one such envelope (:func:`metafx.wiener.dynamics_envelope`:
a sliding hold, an attack one-pole, a release follower) and offers :data:`DYN_UNITS` units
``x min(1, s l / e)`` (``s`` in :data:`DYN_SCALES`) to the head at lag 0, beside the grid's. The four
numbers (attack, release, hold, level) are fitted by Nelder-Mead on the variable-projection criterion
of the tuned units (:func:`metafx.capture.tuned_units.criterion_rows`: the equation error of
:data:`DYN_RUNS` runs after the head's own channels, the tuned units and the AR lags are projected
out, reduced by the units), from the best of a grid of starts (:data:`DYN_GRID`), unless that best is above
:data:`DYN_GIVE_UP` (the effect is not a limiter: the search would not help).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from metafx.capture.tuned_units import (TUNED_RUN_LEN, TUNED_SPAN_S, EvalCounter, criterion_rows, nelder_mead_from_best,
                                        unexplained)
from metafx.wiener import GAIN_FLOOR, WienerBank, dynamics_envelope, time_constant_pole

DYN_SCALES = (0.5, 0.71, 1.0, 1.41, 2.0)  # unit levels relative to the fitted level
DYN_UNITS = len(DYN_SCALES)  # units a capture adds
DYN_RUNS = 16  # runs of the criterion (TUNED_RUN_LEN samples each, from the first TUNED_SPAN_S seconds)
# start grid: attack times (s), release times (s), holds (ms), levels (dBFS)
DYN_GRID = ((0.0003, 0.003, 0.03), (0.005, 0.05, 0.5), (0.0, 5.0), (-30.0, -18.0, -6.0))
DYN_STARTS = 2  # Nelder-Mead runs, from the best points of the grid
DYN_EVALS = 80  # criterion evaluations per Nelder-Mead run
DYN_RANGES = ((2e-5, 0.5), (5e-4, 5.0), (0.0, 20.0), (-80.0, 0.0))  # attack s, release s, hold ms, level dBFS
_STEP = (0.7, 0.7, 2.0, 0.5)  # initial simplex steps: log attack, log release, hold (ms), log level
# Validation settings of the shipped study at 3 s (the families where the rule lets the search run): the best start
# of the grid scored 0.003-0.33 on the limiter and the compressor, 0.89-0.99 on the amp, the Oberheim, the Korg 35 and
# the diode ladder; after Nelder-Mead 6e-5 - 0.034 and 0.84-0.99. A grid whose best start is above this stops there
DYN_GIVE_UP = 0.6
DYN_MAX_CRITERION = 0.5  # a fit above this is not cross-validated
DYN_EXPLAINS = 0.1  # a fit at most this explains the support: no cascade search (metafx.capture.adapt.adapt_arx)


@dataclass(frozen=True)
class Dynamics:
    """A fitted envelope of the dynamics units (see the module docstring).

    Attributes:
        attack, release: the attack one-pole's and the release follower's time constants, s.
        hold: the peak hold, s (a whole number of samples).
        level: the units' middle level (linear; the units are at :data:`DYN_SCALES` times it).
        criterion: the equation error left after the units (relative to that after the tuned units).
        evaluations: criterion evaluations.
        seconds: wall time of the fit.
    """

    attack: float
    release: float
    hold: float
    level: float
    criterion: float
    evaluations: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        """The fields as plain numbers (results.json)."""
        return {"attack_s": self.attack, "release_s": self.release, "hold_s": self.hold,
                "level_dbfs": 20 * math.log10(self.level), "criterion": self.criterion,
                "evaluations": self.evaluations, "seconds": self.seconds}


def _decode(th: np.ndarray, sr: int) -> tuple[float, float, int, float]:
    """(attack s, release s, hold samples, level) of a search point ``[log attack, log release, hold ms, log level]``,
    clamped to :data:`DYN_RANGES`."""
    (a0, a1), (r0, r1), (h0, h1), (l0, l1) = DYN_RANGES
    att = min(max(math.exp(float(th[0])), a0), a1)
    rel = min(max(math.exp(float(th[1])), r0), r1)
    hold = int(round(min(max(float(th[2]), h0), h1) * 1e-3 * sr))
    lev = min(max(float(th[3]), l0 * math.log(10) / 20), l1 * math.log(10) / 20)
    return att, rel, hold, math.exp(lev)


def fit_dynamics(x: np.ndarray, y: np.ndarray, phi: np.ndarray, nb: int, na: int, sr: int) -> Dynamics:
    """Fit the dynamics units' envelope to a support (see the module docstring).

    Args:
        x: the dry support, (S,), float64.
        y: the aligned wet support, (S,), float64.
        phi: the channels the head already has over the support (the model's and the tuned units'), (M, S), float64.
        nb: the head's taps per channel; na: its autoregressive order.
        sr: sample rate, Hz.

    Returns:
        The :class:`Dynamics`.

    Raises:
        ValueError: a support shorter than one run after the head's lags.
        numpy.linalg.LinAlgError: degenerate rows (a support silent where the runs are).
    """
    t0 = time.perf_counter()
    S = min(x.shape[0], int(TUNED_SPAN_S * sr))
    x, y, phi = x[:S], y[:S], phi[:, :S]
    starts, Q, resid, e0 = criterion_rows(y, phi, nb, na, max(nb, na, 1), DYN_RUNS, "dynamics units")
    rows = (starts[:, None] + np.arange(TUNED_RUN_LEN)[None]).reshape(-1)
    xs = x[: int(rows.max()) + 1]  # the envelope up to the last row
    xr = x[rows]
    scales = np.asarray(DYN_SCALES)
    evals = EvalCounter()

    def criterion(th: np.ndarray) -> float:
        evals()
        att, rel, hold, lev = _decode(th, sr)
        e = dynamics_envelope(xs, hold, float(time_constant_pole(att, sr)), float(time_constant_pole(rel, sr)))[rows]
        L = xr[:, None] * np.minimum(1.0, lev * scales[None] / np.maximum(e, GAIN_FLOOR)[:, None])  # (rows, K)
        return unexplained(L, Q, resid, e0, 1e-9)

    at, rt, ht, lt = DYN_GRID
    grid = [np.array([math.log(a), math.log(r), h, l * math.log(10) / 20]) for a in at for r in rt for h in ht
            for l in lt]
    vals = [criterion(th) for th in grid]
    if min(vals) > DYN_GIVE_UP:
        att, rel, hold, lev = _decode(grid[int(np.argmin(vals))], sr)
        return Dynamics(att, rel, hold / sr, lev, float(min(vals)), evals.n, time.perf_counter() - t0)
    best = nelder_mead_from_best(criterion, grid, vals, DYN_STARTS, _STEP, DYN_EVALS, 1e-5)
    att, rel, hold, lev = _decode(best.x, sr)
    return Dynamics(att, rel, hold / sr, lev, float(best.fun), evals.n, time.perf_counter() - t0)


def dynamics_bank(bank: WienerBank, dyn: Dynamics, sr: int) -> WienerBank:
    """``bank`` plus the dynamics units of ``dyn``: :data:`DYN_UNITS` units at :data:`DYN_SCALES` times its level."""
    return bank.with_dynamics_units(int(round(dyn.hold * sr)), float(time_constant_pole(dyn.attack, sr)),
                                    float(time_constant_pole(dyn.release, sr)), dyn.level * np.asarray(DYN_SCALES))


__all__ = ["DYN_EVALS", "DYN_EXPLAINS", "DYN_GIVE_UP", "DYN_GRID", "DYN_MAX_CRITERION", "DYN_RANGES", "DYN_RUNS", "DYN_SCALES", "DYN_STARTS",
           "DYN_UNITS", "Dynamics", "dynamics_bank", "fit_dynamics"]
