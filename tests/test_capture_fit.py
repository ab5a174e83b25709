"""The capture's continuous ridge fit (metafx/capture/adapt.py) and the Wiener bank it may add (metafx/wiener.py).

* the normal equations built from lagged correlations equal ``A^T A`` and ``A^T y`` of the explicit
  regressors (the layout of MetaARX.fit_features) for several shapes and equation ranges;
* a second fit with channels inserted, reusing the first fit's correlations, equals a fit from scratch
  (correlations, normal equations and the chosen head); reuse that does not fit is refused;
* offered the bank, the fit keeps it for a filter before a nonlinearity (a Wiener system the
  classical ARX head cannot express) and the support's cross-validation error falls; it leaves it
  out for a linear filter, whose head is then the fit without the bank;
* offered the bank with its gain units, the fit keeps them for a peak limiter (a gain that follows
  the level with memory) and the left-out error falls far below the bank without them; gain units
  are fitted at lag 0 only;
* with meta-learned channels, classical ARX is a candidate too: kept for a linear filter (exact to float64
  rounding, where the learned channels beside x leave more), never for a nonlinearity;
* it is not offered on a support with fewer than WIENER_MIN_EQUATIONS equations per coefficient;
* the bank is seeded (the same for every capture) and its sizes are checked;
* the bank-rule benchmark's report renders from its JSON.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from metafx.bench.bank_rule import report_markdown
from metafx.capture.adapt import (adapt_arx, classical_arx_fit, lag_correlations, normal_equations, ridge_fit_continuous,
                                  simulate_head)
from metafx.capture.tuned_units import TUNED_UNITS
from metafx.export import ARXStream
from metafx.models.arx import MetaARX, lagged
from metafx.wiener import WIENER_MIN_EQUATIONS, WIENER_UNITS, bank_channels, make_bank

SR = 48000


def explicit_regressors(phi: torch.Tensor, y: torch.Tensor, s: int, e: int, nb: int, na: int) -> torch.Tensor:
    """``[1, phi lags 0..nb-1, -y lags 1..na]`` for the equations ``s <= t < e``, built from metafx.models.arx.lagged."""
    M = phi.shape[0]
    warm = max(nb - 1, na)
    ph, yy = phi[:, s - warm: e], y[s - warm: e]
    rows = e - s
    cols = [ph[0, warm:, None], lagged(ph[None, 1:], nb)[0, warm:].reshape(rows, (M - 1) * nb)]
    if na:
        cols.append(-lagged(yy[None, None], na, start=1)[0, warm:].reshape(rows, na))
    return torch.cat(cols, 1)


@pytest.mark.parametrize("M, S, nb, na, s, e, n_lag0", [(5, 400, 4, 6, 6, 400, 0), (5, 400, 8, 3, 100, 250, 0),
                                                        (3, 300, 1, 0, 0, 300, 0), (4, 300, 3, 0, 2, 150, 0),
                                                        (6, 500, 8, 12, 12, 499, 0), (6, 500, 8, 12, 12, 499, 2),
                                                        (5, 400, 4, 6, 6, 400, 4), (4, 300, 3, 0, 2, 150, 1)])
def test_normal_equations_equal_the_explicit_regressors(M, S, nb, na, s, e, n_lag0):
    g = torch.Generator().manual_seed(M * S + nb)
    phi = torch.randn(M, S, generator=g, dtype=torch.float64)
    phi[0] = 1.0
    y = torch.randn(S, generator=g, dtype=torch.float64)
    A = explicit_regressors(phi, y, s, e, nb, na)
    G, r = normal_equations(phi, y, s, e, nb, na, n_lag0)
    assert G.shape == (A.shape[1], A.shape[1])
    # the columns in use: every one but the lags >= 1 of the last n_lag0 channels (those are zero)
    used = torch.ones(A.shape[1], dtype=torch.bool)
    for c in range(M - 1 - n_lag0, M - 1):
        used[1 + c * nb + 1: 1 + (c + 1) * nb] = False
    want_G, want_r = A.T @ A, A.T @ y[s:e]
    assert torch.allclose(G[used][:, used], want_G[used][:, used], rtol=1e-12, atol=1e-9)
    assert torch.allclose(r[used], want_r[used], rtol=1e-12, atol=1e-9)
    assert not G[~used].any() and not G[:, ~used].any() and not r[~used].any()


@pytest.mark.parametrize("C, n_lag0, blocks", [(12, 3, [(4, 3)]), (12, 0, [(0, 2)]), (9, 2, [(7, 0)]), (9, 2, [(5, 2)]),
                                               (14, 5, [(3, 2), (11, 3)]), (10, 2, [(8, 2)])])
def test_correlations_with_inserted_channels_reuse_the_known_ones_exactly(C, n_lag0, blocks):
    """Inserted blocks among the lagged channels (cascade units) and among the lag-0-only ones (dynamics units)."""
    g = torch.Generator().manual_seed(C + n_lag0 + blocks[0][0])
    f = torch.randn(C, 900, generator=g, dtype=torch.float64)
    is_new = torch.zeros(C, dtype=torch.bool)
    for a, n in blocks:
        is_new[a:a + n] = True
    n_lag0_old = n_lag0 - int(is_new[C - n_lag0:].sum())
    known = lag_correlations(f[~is_new], 20, 800, 5, n_lag0_old)
    fresh = lag_correlations(f, 20, 800, 5, n_lag0)
    reused = lag_correlations(f, 20, 800, 5, n_lag0, known=known, added=blocks)
    assert [tuple(b.shape) for b in reused] == [(C, C)] + [(C, C - n_lag0)] * 4
    for a, b in zip(fresh, reused):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="added"):
        lag_correlations(f, 20, 800, 5, n_lag0, known=known)
    with pytest.raises(ValueError, match="do not fit|straddle"):
        lag_correlations(f, 20, 800, 5, n_lag0, known=known, added=[(blocks[0][0], blocks[0][1] + 1)])


def test_a_second_fit_with_inserted_channels_reuses_the_first_and_equals_a_fresh_one():
    """adapt_arx's second cross-validation (cascade units inserted before the gain units) computes only the new
    channels' correlations: the head it chooses and its left-out ESR are those of a fit from scratch."""
    torch.manual_seed(0)
    model = MetaARX(nb=6, na=3, features="none")
    x = signal(1.0)
    y = np.tanh(3 * lfilter([0.3], [1, -0.7], x)) + 0.1 * x
    bank = make_bank(16)
    with torch.no_grad():
        phi = ARXStream(model, bank=bank).features(torch.from_numpy(x))
    at = phi.shape[0] - bank.n_gains  # inserted before the gain units, as adapt_arx does
    new = torch.from_numpy(np.tanh(np.stack([2 * x, 5 * x - 0.2, lfilter([0.5], [1, -0.5], x)])))
    ph2 = torch.cat([phi[:at], new, phi[at:]])
    yt = torch.from_numpy(y)
    first = ridge_fit_continuous(model, phi, yt, n_bank=bank.n_units, n_gain=bank.n_gains)
    kw = dict(n_bank=bank.n_units + 3, n_gain=bank.n_gains, n_tuned=3, fitted_only=True, bank_min_equations=1.0)
    fresh = ridge_fit_continuous(model, ph2, yt, **kw)
    reused = ridge_fit_continuous(model, ph2, yt, known=first.correlations, added=[(at, 3)], **kw)
    assert reused.scale == fresh.scale and reused.bank and reused.tuned
    assert reused.cv_esr == pytest.approx(fresh.cv_esr, rel=1e-6)
    assert torch.allclose(reused.b, fresh.b, rtol=1e-6, atol=1e-9) and torch.allclose(reused.a, fresh.a, atol=1e-9)
    with pytest.raises(ValueError, match="added"):
        ridge_fit_continuous(model, ph2, yt, known=first.correlations, **kw)
    with pytest.raises(ValueError, match="do not fit"):
        ridge_fit_continuous(model, ph2, yt, known=first.correlations, added=[(at, 2)], **kw)


def signal(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Noise with a slowly varying level (-30..-6 dBFS): the nonlinearity is driven over its whole curve."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    level = 10 ** (np.interp(np.arange(n), np.linspace(0, n, 9), rng.uniform(-30, -6, 9)) / 20)
    return (rng.standard_normal(n) * level).astype(np.float64)


def fit(model: MetaARX, x: np.ndarray, y: np.ndarray, units: int, dynamics: bool = True):
    bank = make_bank(units, dynamics=dynamics) if units else None
    st = ARXStream(model, bank=bank)
    with torch.no_grad():
        phi = st.features(torch.from_numpy(x))
        return ridge_fit_continuous(model, phi, torch.from_numpy(y), n_bank=st.n_bank, n_gain=st.n_gain), phi


def peak_limiter(x: np.ndarray, ceiling: float, attack_s: float, release_s: float) -> np.ndarray:
    """A feed-forward peak limiter unlike the bank's grid: a one-pole attack on the rise, release on the fall."""
    ra, rr = np.exp(-1 / (attack_s * SR)), np.exp(-1 / (release_s * SR))
    env, out = 0.0, np.empty_like(x)
    for n, v in enumerate(np.abs(x)):
        env = ra * env + (1 - ra) * v if v > env else rr * env
        out[n] = x[n] * min(1.0, ceiling / max(env, 1e-9))
    return out


def test_the_gain_units_fit_a_peak_limiter():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")
    x = signal(seed=2)
    y = peak_limiter(x, 10 ** (-20 / 20), attack_s=0.001, release_s=0.1)
    gains, phi = fit(model, x, y, 24)
    curves, _ = fit(model, x, y, 24, dynamics=False)
    assert gains.bank and gains.cv_esr < 0.25 * curves.cv_esr, (gains.cv_esr, curves.cv_esr)
    n_gain = make_bank(24).n_gains
    assert n_gain == 54 and torch.all(gains.b[-n_gain:, 1:] == 0)  # lag 0 only
    assert torch.any(gains.b[-n_gain:, 0] != 0)


def test_the_bank_is_kept_for_a_filter_before_a_nonlinearity_and_left_out_for_a_linear_filter():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")  # the classical ARX head: [1, x]
    x = signal()
    # a pre-emphasis (+12 dB high shelf, one pole at 1 kHz) into an asymmetric clipper, then a gentle low-pass
    lp = lfilter([1 - 0.877], [1, -0.877], x)
    wiener = lfilter([0.5], [1, -0.5], np.tanh(8 * (4 * x - 3 * lp) + 0.3) - np.tanh(0.3))
    with_bank, phi = fit(model, x, wiener, 24)
    without, _ = fit(model, x, wiener, 0)
    assert with_bank.bank and not without.bank
    assert with_bank.cv_esr < 0.5 * without.cv_esr, (with_bank.cv_esr, without.cv_esr)
    pred = simulate_head(phi, with_bank.b, with_bank.a)
    esr = np.sum((wiener - pred) ** 2) / np.sum(wiener ** 2)
    assert esr < with_bank.cv_esr * 2  # the final fit is at least as good as its left-out folds said

    linear = lfilter([0.2, 0.1], [1, -0.7], x)
    res, phi = fit(model, x, linear, 24)
    M = model.phi.channels
    assert not res.bank and torch.all(res.b[M:] == 0)
    # the head is the fit without the bank at the scale chosen (the same model: this exact fit's coefficients are
    # ill-conditioned, so its outputs are compared)
    ref = ridge_fit_continuous(model, phi[:M], torch.from_numpy(linear), scales=(res.scale,))
    got, want = simulate_head(phi[:M], res.b[:M], res.a), simulate_head(phi[:M], ref.b, ref.a)
    assert np.sum((got - want) ** 2) <= 1e-12 * np.sum(want ** 2)
    assert np.sum((got - linear) ** 2) <= 1e-10 * np.sum(linear ** 2)


def test_classical_arx_is_kept_for_a_linear_filter_and_never_for_a_nonlinearity():
    """A linear family left out of meta-training was captured to ~1e-7 against classical ARX's ~1e-11: the
    learned channels fitted beside x cost a little. Classical ARX as a candidate of the support's cross-validation
    takes it back; on a nonlinearity the meta-model's head stays, unchanged."""
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=12, features="learned")  # untrained learned channels beside [1, x]
    assert model.channels > 2
    x = signal()
    n = x.size // 2
    linear = lfilter([0.2, 0.1, -0.05], [1, -1.2, 0.5], x)
    lin = adapt_arx(model, x, linear, n, SR, 0, wiener_units=0)
    full = adapt_arx(model, x, linear, n, SR, 0, wiener_units=0, classical=False)
    assert lin.classical_arx and not full.classical_arx
    assert lin.channels == 2 and lin.nb == 13 and lin.na == 12  # classical ARX's own stream, on [1, x]
    handed = classical_arx_fit(x, linear, n, SR)  # fitted once by a capture, handed to the choice
    pre = adapt_arx(model, x, linear, n, SR, 0, wiener_units=0, classical=handed)
    assert pre is handed and all(torch.equal(u, v) for u, v in zip(pre.head(), lin.head()))
    with torch.no_grad():
        out_lin = lin.process(torch.from_numpy(x)).double().numpy()[n:]
        out_full = full.process(torch.from_numpy(x)).double().numpy()[n:]
    target = linear[n:]
    e_lin = np.sum((target - out_lin) ** 2) / np.sum(target ** 2)
    e_full = np.sum((target - out_full) ** 2) / np.sum(target ** 2)
    assert e_lin < 1e-12 and e_lin < e_full, (e_lin, e_full)  # held out: the second half

    curve = np.tanh(6 * lfilter([0.3], [1, -0.7], x))
    res = adapt_arx(model, x, curve, n, SR, 0, wiener_units=0)
    ref = adapt_arx(model, x, curve, n, SR, 0, wiener_units=0, classical=False)
    assert not res.classical_arx and res.channels == model.channels
    assert all(torch.equal(u, v) for u, v in zip(res.head(), ref.head()))


def test_the_bank_is_not_offered_on_a_support_too_short_for_it():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")
    x = signal()
    lp = lfilter([1 - 0.877], [1, -0.877], x)
    y = np.tanh(8 * (4 * x - 3 * lp) + 0.3)
    bank = make_bank(24)
    st = ARXStream(model, bank=bank)
    with torch.no_grad():
        phi = st.features(torch.from_numpy(x))
    P = model.n_coef + 24 * model.nb + bank.n_gains  # coefficients of the head with the bank (gain units: one each)
    assert P == model.n_coef + bank.head_coefficients(model.nb)
    n = 40 * P  # below WIENER_MIN_EQUATIONS (64) equations per coefficient
    assert n < WIENER_MIN_EQUATIONS * P
    kw = {"n_bank": bank.n_units, "n_gain": bank.n_gains}
    short = ridge_fit_continuous(model, phi[:, :n], torch.from_numpy(y[:n]), **kw)
    offered = ridge_fit_continuous(model, phi[:, :n], torch.from_numpy(y[:n]), bank_min_equations=0, **kw)
    assert not short.bank and offered.bank  # the same support: only the rule keeps the bank out


def test_adapt_arx_exports_the_bank_only_when_kept():
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")
    x = signal(seed=1).astype(np.float32)
    lp = lfilter([1 - 0.877], [1, -0.877], x)
    y = np.tanh(8 * (4 * x - 3 * lp)).astype(np.float32)
    kept = adapt_arx(model, x, y, x.size, SR, 0, wiener_units=24, cascade_units=False)  # (cascade: its own tests)
    n = make_bank(24).n_units + TUNED_UNITS  # 24 curve units, the tuned and gain units
    assert kept.bank_offered and kept.n_bank == n and kept.n_curve == 24 and kept.channels == model.phi.channels + n
    assert kept.prefilter is not None and kept.n_aa == TUNED_UNITS
    plain = adapt_arx(model, x, y, x.size, SR, 0, wiener_units=24, tuned_units=False)
    assert plain.n_aa == 0 and plain.prefilter is None and plain.n_bank == make_bank(24).n_units
    left = adapt_arx(model, x, lfilter([0.3], [1, -0.5], x).astype(np.float32), x.size, SR, 0, wiener_units=24)
    assert left.n_bank == 0 and left.channels == model.phi.channels
    none = adapt_arx(model, x, y, x.size, SR, 0, wiener_units=0)
    assert none.n_bank == 0 and not none.bank_offered
    short = adapt_arx(model, x, y, 4000, SR, 0, wiener_units=24)  # too short for the bank: not offered
    assert short.n_bank == 0 and not short.bank_offered


def test_the_bank_is_seeded_and_checked():
    a, b = make_bank(), make_bank()
    assert a.n_curves == WIENER_UNITS and torch.equal(a.weights, b.weights) and torch.equal(a.biases, b.biases)
    assert not torch.equal(make_bank(seed=1).weights, a.weights)
    # every unit sees x itself, along both signs of the gain (the curves and their mirror images)
    assert bool((a.weights[0::2, 0] > 0).all()) and bool((a.weights[1::2, 0] < 0).all())
    assert bool(((a.poles > 0) & (a.poles < 1)).all())
    ch = bank_channels(a, signal(0.1))
    assert ch.shape == (a.n_units, int(0.1 * SR)) and np.all(np.abs(ch[: a.n_curves]) <= 1)
    assert a.n_units == WIENER_UNITS + a.n_gains and a.n_gains == 54
    assert make_bank(dynamics=False).n_units == WIENER_UNITS
    # a gain unit: x times a gain in (0, 1], the gain falling as the level rises over the unit's level
    x = signal(0.1)
    gain = ch[a.n_curves:] / np.where(x == 0, 1, x)[None]
    assert np.all(gain <= 1 + 1e-12) and np.all(gain > 0)
    with pytest.raises(ValueError, match="n_units >= 1"):
        make_bank(0)


def test_the_bank_rule_report_renders_from_its_json():
    rows = [{"family": "f", "task_id": f"f:{i}", "support_seconds": S, "equations_per_coefficient": S * 78,
             "bank_kept": i == 0, "esr_without": 0.1, "esr_offered": 0.005 if i == 0 else 0.1}
            for S in (0.5, 1.0) for i in range(2)]
    rep = {"command": "python launch/bench.py bank", "date": "2026-11-30T00:00:00", "seconds": 1.0,
           "study": "metafx/shipped/capture_arx.yaml", "heldout_from_seconds": 10.0, "head_coefficients_with_bank": 613,
           "wiener_units": 48, "wiener_min_equations": 64, "rows": rows}
    md = report_markdown(rep)
    assert "| 0.5 | 39 | 1 of 2 | -0.651 | 1 | 0 | 0 / 1 |" in md, md
    assert "| 1 | 78 | 1 of 2 |" in md and "from 64 equations per coefficient" in md
    assert "| f | 2 | 1 | 0.1 | 0.0525 |" in md, md  # per family at the longest support


def test_units_that_do_not_help_cannot_cost_the_bank():
    """With ``n_tuned`` the bank is also tried without its tuned units: noise channels in their place leave the
    bank kept and their rows zero."""
    torch.manual_seed(0)
    model = MetaARX(nb=8, na=4, features="none")
    x = signal()
    lp = lfilter([1 - 0.877], [1, -0.877], x)
    y = lfilter([0.5], [1, -0.5], np.tanh(8 * (4 * x - 3 * lp) + 0.3) - np.tanh(0.3))
    bank = make_bank(24)
    with torch.no_grad():
        phi = ARXStream(model, bank=bank).features(torch.from_numpy(x))
    noise = torch.from_numpy(np.random.default_rng(5).standard_normal((6, x.size)))
    M0 = phi.shape[0] - bank.n_gains
    ph = torch.cat([phi[:M0], noise, phi[M0:]])
    res = ridge_fit_continuous(model, ph, torch.from_numpy(y), n_bank=bank.n_units + 6, n_gain=bank.n_gains, n_tuned=6)
    assert res.bank and not res.tuned
    assert torch.all(res.b[M0:M0 + 6] == 0)


def test_the_classical_arx_baseline_is_its_exported_module_run_by_lfilter():
    from metafx.capture.adapt import baseline_predictions, classical_arx_fit, classical_arx_model
    from metafx.capture.meta_model import load_meta_model

    cfg = load_meta_model(None).cfg
    x = signal(seed=3).astype(np.float32)
    y = (0.3 + lfilter([0.5, 0.2], [1.0, -0.9], np.tanh(2 * x))).astype(np.float32)  # an offset too (channel 1)
    n_sup = x.size // 2
    base = baseline_predictions(cfg, x, y, n_sup, SR)
    arx = classical_arx_fit(x, y, n_sup, SR)
    # the same head as every ARX capture's continuous fit of the classical model, and the same baseline when a
    # capture hands its classical fit on (run_capture fits it once)
    own = adapt_arx(classical_arx_model(), x, y, n_sup, SR, 0, wiener_units=0)
    for u, v in zip(arx.head(), own.head()):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert arx.classical_arx and not own.classical_arx
    np.testing.assert_array_equal(baseline_predictions(cfg, x, y, n_sup, SR, arx=arx)["arx"], base["arx"])
    b, a = arx.head()
    assert b.shape[0] == 2 and float(a[0]) == 1.0 and bool(b[0].abs().sum() > 0)
    with torch.no_grad():
        ref = arx.process(torch.from_numpy(x)).numpy()
    assert base["arx"].dtype == np.float32 and base["arx"].shape == x.shape
    assert np.max(np.abs(base["arx"] - ref)) <= 1e-5 * np.max(np.abs(ref))
