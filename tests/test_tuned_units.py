"""Tuned units (metafx/capture/tuned_units.py) and the anti-aliased curve they use (metafx/wiener.py).

* ``adaa_tanh`` is the mean of tanh over each step: hand-computed values from ``log cosh``, and the
  midpoint branch for steps below ADAA_EPS;
* the pre-filter search recovers a known first-order shelf (corner, shelf ratio) before an
  anti-aliased curve, and a capture's fit with the tuned units is far better on that system than
  with the random bank alone;
* a bank with tuned units: the exported model's channels equal the reference computation, and
  streaming over ragged blocks equals the whole-file output; bad tuned units are refused.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from metafx.capture.adapt import adapt_arx, score
from metafx.capture.tuned_units import EvalCounter, fit_prefilter, nelder_mead_from_best
from metafx.export import ARXStream, script
from metafx.models.arx import MetaARX
from metafx.wiener import ADAA_EPS, adaa_tanh, bank_channels, make_bank

SR = 48000


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with a slowly varying level (-30..-6 dBFS)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    level = 10 ** (np.interp(np.arange(n), np.linspace(0, n, 9), rng.uniform(-30, -6, 9)) / 20)
    return rng.standard_normal(n) * level


def shelf_clipper(x: np.ndarray) -> np.ndarray:
    """+18 dB high shelf (one-pole low-pass at 700 Hz, r = 0.874), drive 16 dB, anti-aliased asymmetric tanh, a
    gentle low-pass after: the tube clipper's structure."""
    p = math.exp(-2 * math.pi * 700 / SR)
    u = 6.3 * (x - 0.874 * lfilter([1 - p], [1, -p], x)) / (1 - 0.874)
    return lfilter([0.6], [1, -0.4], adaa_tanh((u + 0.3)[None], np.array([[0.3]]))[0] - math.tanh(0.3))


def exported_bank_channels(bank, seconds: float = 0.5, seed: int = 3):
    """A classical ARX head's export with ``bank``, its bank channels over noise and the reference computation.

    Returns:
        ``(stream, x (T,) float64 Tensor, exported bank channels (n_units, T), reference (n_units, T))``.
    """
    model = MetaARX(nb=8, na=4, features="none")
    st = ARXStream(model, bank=bank)
    x = torch.from_numpy(signal(seconds, seed=seed))
    with torch.no_grad():
        phi = st.features(x)
    return st, x, phi[st.channels - bank.n_units:].numpy(), bank_channels(bank, x.numpy())


def assert_random_head_streams(st: ARXStream, x: torch.Tensor) -> None:
    """With a random stable head, the scripted stream over ragged blocks (1 to 5000 samples, state carried) equals
    ``process`` to 1e-5."""
    b = torch.randn(st.channels, st.nb, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.05
    b[0, 1:] = 0
    b[st.n_framed:, 1:] = 0
    st.set_head(b, torch.tensor([1.0, -0.5, 0.1, 0.0, 0.0], dtype=torch.float64))
    sm = script(st)
    xf = x.to(torch.float32)
    whole = sm.process(xf)
    state, outs, i = sm.initial_state(), [], 0
    for k in [1, 7, 32, 256, 2048, 33, 5000] * 10:
        if i >= xf.numel():
            break
        yb, state = sm(xf[i:i + k], state)
        outs.append(yb)
        i += k
    if i < xf.numel():
        yb, state = sm(xf[i:], state)
        outs.append(yb)
    assert torch.allclose(torch.cat(outs), whole, atol=1e-5)


def test_adaa_tanh_is_the_mean_of_tanh_over_each_step():
    z = np.array([[0.5, 2.0, 2.0 + ADAA_EPS / 10, -3.0]])
    got = adaa_tanh(z, np.array([[0.0]]))[0]
    lc = lambda v: math.log(math.cosh(v))  # noqa: E731
    assert got[0] == pytest.approx((lc(0.5) - lc(0.0)) / 0.5, rel=1e-12)
    assert got[1] == pytest.approx((lc(2.0) - lc(0.5)) / 1.5, rel=1e-12)
    assert got[2] == pytest.approx(math.tanh(2.0 + ADAA_EPS / 20), rel=1e-12)  # a step below ADAA_EPS: the midpoint
    assert got[3] == pytest.approx((lc(-3.0) - lc(2.0 + ADAA_EPS / 10)) / (-5.0 - ADAA_EPS / 10), rel=1e-12)
    t = np.linspace(-3.0, 2.0 + ADAA_EPS / 10, 200001)
    assert got[3] == pytest.approx(np.trapezoid(np.tanh(t), t) / (t[-1] - t[0]), rel=1e-8)  # the mean, integrated


def test_the_search_recovers_a_shelf_before_an_antialiased_curve():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")  # the classical ARX head: [1, x]
    x = signal(4.0)
    y = shelf_clipper(x)
    n = 3 * SR
    with torch.no_grad():
        phi = ARXStream(model).features(torch.from_numpy(x[:n])).numpy()
    pf = fit_prefilter(x[:n], y[:n], phi, model.nb, model.na, SR)
    assert abs(math.log(pf.fc / 700)) < 0.1 and abs(pf.ratio - 0.874) < 0.03, pf
    assert pf.criterion < 0.05, pf
    # the capture's fit: held out on the last second, with the tuned units and with the random bank alone
    tuned = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), n, SR, 0)
    plain = adapt_arx(model, x.astype(np.float32), y.astype(np.float32), n, SR, 0, tuned_units=False)
    assert tuned.n_aa and tuned.prefilter is not None
    esr = {k: score(s.process(torch.from_numpy(x.astype(np.float32))).numpy()[n:], y[n:])["esr"]
           for k, s in (("tuned", tuned), ("plain", plain))}
    assert esr["tuned"] < 0.1 * esr["plain"], esr


def test_an_exported_bank_with_tuned_units_equals_the_reference_and_streams():
    bank = make_bank(5, 2).with_tuned_units(0.9, np.array([[3.0, 0.1, 0.2, -2.5], [20.0, 0.0, 0.0, -17.0]]),
                                            np.array([0.3, -0.2]))
    assert bank.n_aa == 2 and bank.n_lowpass == 3 and bank.n_framed == 7 and bank.weights.shape == (5, 4)
    st, x, got, ref = exported_bank_channels(bank)
    assert np.abs(got[:5] - ref[:5]).max() < 1e-5  # the curve units run in float32
    assert np.abs(got[5:7] - ref[5:7]).max() < 1e-10  # the anti-aliased units in float64
    assert np.abs(got[7:] - ref[7:]).max() < 1e-9  # the gain units
    assert_random_head_streams(st, x)


def test_bad_tuned_units_are_refused():
    bank = make_bank(5, 2)
    with pytest.raises(ValueError, match="tuned units need weights"):
        bank.with_tuned_units(0.9, np.ones((2, 3)), np.zeros(2))  # F + 2 = 4 columns needed
    with pytest.raises(ValueError, match="pole in"):
        bank.with_tuned_units(1.0, np.ones((2, 4)), np.zeros(2))


def test_nelder_mead_starts_run_on_threads_and_give_what_one_after_another_gives():
    """The starts of :func:`nelder_mead_from_best` run on threads: the best of them is the one the runs one after
    another give (the same point, the same value, the better start's), and the calls of every thread are counted."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    A = rng.standard_normal((400, 4))

    def make():
        count = EvalCounter()

        def crit(th: np.ndarray) -> float:  # two basins: th[0] near +1 or -1 (the -1 one deeper)
            count()
            r = A @ th
            return float(np.mean(np.tanh(r) ** 2) + (th[0] ** 2 - 1) ** 2 + 0.1 * (th[0] + 1) ** 2 + np.sum(th[1:] ** 2))
        return crit, count

    grid = [np.array([s, 0.3, -0.2, 0.1]) for s in (1.2, -0.4, 0.8, -1.3)]
    steps = (0.2, 0.1, 0.1, 0.1)
    crit_p, count_p = make()
    vals = [crit_p(g) for g in grid]
    best = nelder_mead_from_best(crit_p, grid, vals, 3, steps, 120, 1e-10)

    crit_s, count_s = make()
    vals_s = [crit_s(g) for g in grid]
    runs = []
    for i in np.argsort(vals_s)[:3]:
        th0 = grid[int(i)]
        simplex = np.stack([th0] + [th0 + np.eye(4)[j] * steps[j] for j in range(4)])
        runs.append(minimize(crit_s, th0, method="Nelder-Mead",
                             options={"maxfev": 120, "xatol": 1e-2, "fatol": 1e-10, "initial_simplex": simplex}))
    want = min(runs, key=lambda r: r.fun)
    assert len({round(r.fun, 6) for r in runs}) > 1  # the starts end in different places: the choice matters
    assert best.x[0] < 0 and np.allclose(best.x, want.x, rtol=0, atol=1e-12) and abs(best.fun - want.fun) < 1e-12
    assert count_p.n == count_s.n == len(grid) + sum(r.nfev for r in runs)
