"""Least-squares FIR system identification and the identity baseline."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch

from metafx.baselines import fir_normal_equations, identity_predict, lsfir_fit, lsfir_predict


def _slices(signal: np.ndarray, K: int, L: int) -> torch.Tensor:
    """K consecutive, non-overlapping slices of one long signal, (K, 1, L)."""
    return torch.from_numpy(signal[: K * L].reshape(K, 1, L).copy())


def test_recovers_a_known_fir_exactly():
    rng = np.random.default_rng(0)
    h0 = rng.standard_normal(24)
    x = rng.standard_normal(4 * 300)
    y = scipy.signal.lfilter(h0, [1.0], x)  # continuous signal: slices start with state
    sx, sy = _slices(x, 4, 300), _slices(y, 4, 300)
    for ridge in (0.0, 1e-12):
        h = lsfir_fit(sx, sy, taps=24, ridge=ridge)
        assert h.dtype == torch.float64 and h.shape == (24,)
        np.testing.assert_allclose(h.numpy(), h0, atol=1e-8)


@pytest.mark.parametrize("K,L,taps", [(3, 300, 24), (2, 64, 64), (1, 10, 1), (4, 2048, 256)])
def test_normal_equations_equal_the_explicit_product(K, L, taps):
    """The FFT-and-edges normal equations are X^T X and X^T t of the explicit regressor matrix."""
    g = torch.Generator().manual_seed(K * L + taps)
    x = torch.randn(K, L, generator=g, dtype=torch.float64)
    y = torch.randn(K, L, generator=g, dtype=torch.float64)
    X = x.unfold(-1, taps, 1).flip(-1).reshape(-1, taps)  # rows (x[n], .., x[n-taps+1]), n >= taps-1
    t = y[:, taps - 1:].reshape(-1)
    A, r = fir_normal_equations(x, y, taps)
    scale = float((X.T @ X).abs().max())
    assert torch.allclose(A, X.T @ X, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(r, X.T @ t, rtol=0, atol=1e-12 * scale)


def test_predict_is_causal_convolution_from_zero_state():
    rng = np.random.default_rng(1)
    h = torch.from_numpy(rng.standard_normal(16))
    x = torch.from_numpy(rng.standard_normal((3, 1, 200))).float()
    y = lsfir_predict(h, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = scipy.signal.lfilter(h.numpy(), [1.0], x.double().numpy(), axis=-1)
    np.testing.assert_allclose(y.double().numpy(), ref, atol=1e-5)


def test_fits_a_one_pole_iir_well():
    rng = np.random.default_rng(2)
    fc, sr = 1000.0, 48000
    a = np.exp(-2 * np.pi * fc / sr)  # pole; a^128 ~ 5e-8: 128 taps hold the impulse response
    x = 0.2 * rng.standard_normal(5 * 1024)
    y = scipy.signal.lfilter([1 - a], [1, -a], x)
    sx, sy = _slices(x, 5, 1024), _slices(y, 5, 1024)
    h = lsfir_fit(sx[:4], sy[:4], taps=128, ridge=1e-6)
    pred = lsfir_predict(h, sx[4:])
    # Held-out slice; the first taps-1 outputs lack the input history (zero initial state).
    err = (pred - sy[4:])[..., 127:]
    rel = err.pow(2).sum().sqrt() / sy[4:, :, 127:].pow(2).sum().sqrt()
    assert float(rel) < 1e-2


def test_errors():
    x = torch.zeros(2, 1, 64)
    with pytest.raises(ValueError, match="equations"):
        lsfir_fit(x, x, taps=100)
    with pytest.raises(ValueError, match="differ"):
        lsfir_fit(x, torch.zeros(2, 1, 65), taps=8)
    with pytest.raises(ValueError, match="ridge"):
        lsfir_fit(x, x, taps=8, ridge=-1.0)
    with pytest.raises(ValueError, match="1-D"):
        lsfir_predict(torch.zeros(2, 3), x)


def test_identity():
    x = torch.randn(2, 1, 16)
    assert identity_predict(x) is x
