"""Dynamics units (metafx/capture/dynamics_units.py): gain units over one envelope fitted to the support.

* the envelope (a sliding peak hold, an attack one-pole, a release follower) by its running-maximum form
  equals the sample-by-sample recursion;
* a bank with dynamics units (and tuned and cascade units before them): the exported model's channels
  equal the reference computation and streaming over ragged blocks equals the whole file; bad units
  are refused;
* the search recovers a peak limiter's attack, release and hold (a numpy limiter of Faust's
  ``co.limiter_lad_mono`` form) and the capture with the units is far better held out than without;
* a search whose start grid finds nothing (a two-stage amp structure: no gain follows the level) stops there.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from metafx.capture.adapt import adapt_arx, score
from metafx.capture.dynamics_units import DYN_GIVE_UP, DYN_GRID, DYN_UNITS, fit_dynamics
from metafx.models.arx import MetaARX
from metafx.wiener import GAIN_FLOOR, dynamics_channels, dynamics_envelope, time_constant_pole
from test_cascade_units import cascade_bank_example, two_stage
from test_tuned_units import SR, assert_random_head_streams, exported_bank_channels, signal


def envelope_loop(x: np.ndarray, hold: int, attack: float, release: float) -> np.ndarray:
    """The detector sample by sample: the max of |x| over the last hold + 1 samples, the attack one-pole, then
    ``e = max(u, (1 - r) u + r e)`` (Faust's an.peak_envelope)."""
    a = np.abs(x)
    u = e = 0.0
    out = np.empty_like(a)
    for n in range(a.size):
        h = a[max(0, n - hold): n + 1].max()
        u = attack * u + (1 - attack) * h
        e = max(u, (1 - release) * u + release * e)
        out[n] = e
    return out


def pole(tau: float) -> float:
    return float(time_constant_pole(tau, SR))


@pytest.mark.parametrize("hold, attack_s, release_s", [(0, 0.0005, 0.01), (1, 0.002, 0.2), (7, 0.00002, 0.001),
                                                       (240, 0.01, 1.5)])
def test_the_envelope_equals_the_sample_recursion(hold, attack_s, release_s):
    x = signal(0.4, seed=hold)
    want = envelope_loop(x, hold, pole(attack_s), pole(release_s))
    got = dynamics_envelope(x, hold, pole(attack_s), pole(release_s))
    assert np.abs(got - want).max() < 1e-12 * max(1.0, np.abs(want).max())


def test_an_exported_bank_with_dynamics_units_equals_the_reference_and_streams():
    bank = cascade_bank_example().with_dynamics_units(37, pole(0.002), pole(0.05), np.array([0.02, 0.05, 0.1]))
    assert bank.n_dynamics == 3 and bank.n_gains == bank.n_grid_gains + 3 and bank.n_units == bank.n_framed + bank.n_gains
    st, x, got, ref = exported_bank_channels(bank, seconds=1.0)
    assert st.n_dyn == 3 and st.n_gain == bank.n_gains
    assert np.abs(got[-3:] - ref[-3:]).max() < 1e-10  # the dynamics units (float64)
    assert np.abs(got[-3:] - dynamics_channels(bank, x.numpy())).max() < 1e-10
    assert np.abs(got[-3:] - x.numpy()[None]).max() > 0.01  # they limit (not the identity)
    assert np.abs(got[5:9] - ref[5:9]).max() < 1e-10  # the tuned and cascade units before them, state intact
    assert np.abs(got[9:-3] - ref[9:-3]).max() < 1e-9  # the grid's gain units
    assert_random_head_streams(st, x)


def test_bad_dynamics_units_are_refused():
    bank = cascade_bank_example()
    for args in [(-1, 0.9, 0.99, [0.1]), (3, 1.0, 0.99, [0.1]), (3, 0.9, -0.1, [0.1]), (3, 0.9, 0.99, []),
                 (3, 0.9, 0.99, [0.1, 0.0]), (2.5, 0.9, 0.99, [0.1])]:
        with pytest.raises(ValueError, match="dynamics units need"):
            bank.with_dynamics_units(args[0], args[1], args[2], np.array(args[3], dtype=float))


def limiter(x: np.ndarray, ceiling_db: float, attack_s: float, release_s: float, hold_s: float) -> np.ndarray:
    """A peak limiter of co.limiter_lad_mono's form (a sliding hold), gain min(1, ceiling / envelope)."""
    e = envelope_loop(x, int(round(hold_s * SR)), pole(attack_s), pole(release_s))
    return x * np.minimum(1.0, 10 ** (ceiling_db / 20) / np.maximum(e, GAIN_FLOOR))


def test_the_search_recovers_a_limiter_and_the_units_beat_the_grid():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")  # the classical ARX head: [1, x]
    x = signal(5.0, seed=7)
    y = lfilter([0.9, 0.1], [1.0], limiter(x, -20.0, 0.003, 0.08, 0.003))  # a gentle output filter after it
    n = 3 * SR
    with torch.no_grad():
        dyn = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), n, SR, 0)
        grid = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), n, SR, 0, dynamics_units=False)
    d = dyn.dynamics
    assert d is not None and dyn.n_dyn == DYN_UNITS, "the dynamics units were not kept"
    assert abs(math.log(d.attack / 0.003)) < 0.4 and abs(math.log(d.release / 0.08)) < 0.4, d
    assert abs(d.hold - 0.003) < 0.001, d
    assert dyn.cascade is None  # the units explain the support: no cascade search
    esr = {k: score(s.process(torch.from_numpy(x.astype(np.float32))).numpy()[n:], y[n:])["esr"]
           for k, s in (("dynamics", dyn), ("grid", grid))}
    assert esr["dynamics"] < 0.2 * esr["grid"] and esr["dynamics"] < 0.01, esr


def test_a_search_whose_grid_finds_nothing_stops_there():
    x = signal(3.0, seed=2)
    y = two_stage(x)  # two curves with a tone filter between (the amp's structure): nothing a limiter does
    phi = np.stack([np.ones_like(x), x])
    d = fit_dynamics(x, y, phi, 8, 4, SR)
    assert d.criterion > DYN_GIVE_UP, d
    assert d.evaluations == math.prod(len(g) for g in DYN_GRID), d  # no Nelder-Mead evaluation
