"""Cascade units (metafx/capture/cascade_units.py): a second curve after a filtered first one.

* the search recovers the first stage (gain, high-pass corner, offset) of a two-stage system (a
  high-passed driven curve, a tone filter, a second curve, an output filter: an amp's structure),
  and a capture with the cascade is far better held out than one with the tuned units alone;
* a bank with cascade units: the exported model's channels equal the reference computation, and
  streaming over ragged blocks equals the whole-file output; bad cascade units are refused;
* the offer rule: a system the tuned units already explain gets no cascade search; a search whose short runs
  find nothing (a tremolo: no static cascade explains it) stops before its long run.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from metafx.capture.adapt import adapt_arx, score
from metafx.capture.cascade_units import (CASCADE_GIVE_UP, CASCADE_GRID, CASCADE_MIN_CRITERION, CASCADE_PRESELECT,
                                          CASCADE_SHORT_ITERS, fit_cascade, vpoles)
from metafx.capture.tuned_units import fit_prefilter
from metafx.export import ARXStream
from metafx.models.arx import MetaARX
from metafx.wiener import adaa_tanh, cascade_channels, lowpass_pole, make_bank
from test_tuned_units import SR, assert_random_head_streams, exported_bank_channels, shelf_clipper, signal


def two_stage(x: np.ndarray) -> np.ndarray:
    """30 Hz high-pass, +24 dB, anti-aliased tanh with offset 0.3, a tone filter (two one-poles' mix: a mid
    scoop), x 4, a second anti-aliased tanh, a low-pass after: the amp family's structure in numpy."""
    p30 = float(lowpass_pole(30.0, SR))
    u = 15.8 * (x - lfilter([1 - p30], [1, -p30], x)) + 0.3
    v = adaa_tanh(u[None], np.array([[0.3]]))[0] - math.tanh(0.3)
    lp = lambda f, s: lfilter([1 - float(lowpass_pole(f, SR))], [1, -float(lowpass_pole(f, SR))], s)  # noqa: E731
    w = 4 * (0.2 * v + 0.6 * lp(150.0, v) - 0.5 * lp(1500.0, v))
    return lfilter([0.3, 0.3], [1, -0.4], adaa_tanh(w[None], np.zeros((1, 1)))[0])


def test_the_search_recovers_the_first_stage_of_two_and_the_cascade_beats_the_tuned_units():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")  # the classical ARX head: [1, x]
    x = signal(4.0, seed=5)
    y = two_stage(x)
    n = 3 * SR
    with torch.no_grad():
        cas = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), n, SR, 0)
        tuned = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), n, SR, 0, cascade_units=False)
    assert cas.prefilter is not None and cas.prefilter.criterion > CASCADE_MIN_CRITERION  # the tuned units fall short
    c = cas.cascade
    assert c is not None and cas.n_cas, "the cascade was not kept"
    assert abs(math.log(c.gain / 15.8)) < 0.2 and c.ratio > 0.95 and abs(math.log(c.fc / 30.0)) < 0.5, c
    assert abs(c.offset - 0.3) < 0.1, c
    esr = {k: score(s.process(torch.from_numpy(x.astype(np.float32))).numpy()[n:], y[n:])["esr"]
           for k, s in (("cascade", cas), ("tuned", tuned))}
    assert esr["cascade"] < 0.2 * esr["tuned"], esr


def test_no_cascade_is_searched_where_the_tuned_units_explain_the_support():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")
    x = signal(4.0)
    y = shelf_clipper(x)
    with torch.no_grad():
        st = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), 3 * SR, SR, 0)
    assert st.prefilter is not None and st.prefilter.criterion < CASCADE_MIN_CRITERION, st.prefilter
    assert st.cascade is None and st.n_cas == 0


def test_a_search_whose_short_runs_find_nothing_skips_its_long_run():
    x = signal(3.0, seed=2)
    y = x * (1 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(x.size) / SR))  # a tremolo: time-varying, no static curve
    phi = np.stack([np.ones_like(x), x])  # the classical ARX head's channels
    pf = fit_prefilter(x, y, phi, 8, 4, SR)
    cas = fit_cascade(x, y, phi, 8, 4, SR, pf)
    assert cas.criterion > CASCADE_GIVE_UP, cas
    starts = 1 + math.prod(len(g) for g in CASCADE_GRID)
    assert cas.evaluations <= starts + CASCADE_PRESELECT * 2 * CASCADE_SHORT_ITERS, cas  # no evaluation of a long run


def cascade_bank_example():
    bank = make_bank(5, 2).with_tuned_units(0.9, np.array([[3.0, 0.1, 0.2, -2.5]]), np.array([0.3]))
    w = np.zeros(bank.n_lowpass + 2)
    w[0], w[-1] = 8.0, -8.0 * 0.99
    beta = np.r_[1.0, np.linspace(-0.5, 0.5, 8)]
    return bank.with_cascade_units(float(lowpass_pole(30.0, SR)), w, 0.3, vpoles(SR), beta, np.array([0.7, 1.0, 1.4]),
                                   np.array([-0.3, 0.0, 0.3]))


def test_an_exported_bank_with_cascade_units_equals_the_reference_and_streams():
    bank = cascade_bank_example()
    assert bank.n_cascade == 3 and bank.n_aa == 1 and bank.n_lowpass == 4 and bank.n_framed == 9
    assert bank.weights.shape == (5, 5) and bank.aa_weights.shape == (1, 5) and bank.cas_weights.shape == (5,)
    st, x, got, ref = exported_bank_channels(bank)
    assert np.abs(got[:5] - ref[:5]).max() < 1e-5  # the curve units run in float32
    assert np.abs(got[5:9] - ref[5:9]).max() < 1e-10  # the tuned and the cascade units in float64
    assert np.abs(got[6:9] - cascade_channels(bank, x.numpy())).max() < 1e-10
    assert np.abs(got[6:9]).max() > 0.1  # the cascade units are not trivially zero
    assert np.abs(got[9:] - ref[9:]).max() < 1e-9  # the gain units
    assert_random_head_streams(st, x)


def test_bad_cascade_units_are_refused():
    bank = make_bank(5, 2)
    w = np.ones(bank.n_lowpass + 2)
    with pytest.raises(ValueError, match="cascade units need"):
        bank.with_cascade_units(0.9, np.ones(3), 0.0, vpoles(SR), np.ones(9), np.ones(3), np.zeros(3))  # weights F + 2
    with pytest.raises(ValueError, match="cascade units need"):
        bank.with_cascade_units(0.9, w, 0.0, vpoles(SR), np.ones(8), np.ones(3), np.zeros(3))  # beta: J + 1
    with pytest.raises(ValueError, match="cascade units need"):
        bank.with_cascade_units(1.0, w, 0.0, vpoles(SR), np.ones(9), np.ones(3), np.zeros(3))  # input pole
    with pytest.raises(ValueError, match="cascade units need"):
        bank.with_cascade_units(0.9, w, math.nan, vpoles(SR), np.ones(9), np.ones(3), np.zeros(3))


def test_a_second_cross_validation_needs_fitted_units():
    from metafx.capture.adapt import ridge_fit_continuous

    model = MetaARX(nb=8, na=4, features="none")
    x = signal(2.0)
    bank = make_bank(5, 2)
    with torch.no_grad():
        phi = ARXStream(model, bank=bank).features(torch.from_numpy(x))
    with pytest.raises(ValueError, match="fitted_only"):
        ridge_fit_continuous(model, phi, torch.from_numpy(np.tanh(3 * x)), n_bank=bank.n_units, n_gain=bank.n_gains,
                             fitted_only=True)
