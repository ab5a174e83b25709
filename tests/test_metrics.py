"""Metrics: shared contract, known values and scales, the high-frequency error."""
from __future__ import annotations

import math

import pytest
import scipy.signal
import torch

from metafx.config import LOSS_TERMS, LossConfig
from metafx.metrics import (
    METRICS,
    crop_like,
    esr,
    esr_pe,
    hf_error,
    l1,
    make_loss,
    mrstft,
    mrstft_resolutions,
    stft,
    stft_resolution,
)


# One torch thread: set for the whole suite in conftest.py.

SR = 48000


def _noise(B=2, T=4096, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (0.125 * torch.randn(B, 1, T, generator=g, dtype=torch.float64)).to(dtype)


def _lowpass(x: torch.Tensor, cutoff: float, order: int = 8) -> torch.Tensor:
    sos = scipy.signal.butter(order, cutoff, fs=SR, output="sos")
    return torch.from_numpy(scipy.signal.sosfilt(sos, x.double().numpy(), axis=-1)).to(x.dtype)


def test_registry_matches_config_terms():
    assert set(METRICS) == set(LOSS_TERMS)


def test_metrics_is_a_leaf():
    """metrics imports nothing from metafx at run time (the loss config is a type hint only)."""
    import ast
    import inspect

    import metafx.metrics

    tree = ast.parse(inspect.getsource(metafx.metrics))
    runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in runtime if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in runtime if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "metafx"], names


def test_crop_like_keeps_the_end():
    y = torch.arange(10.0).view(1, 1, 10)
    pred = torch.zeros(1, 1, 4)
    torch.testing.assert_close(crop_like(y, pred), torch.tensor([[[6.0, 7.0, 8.0, 9.0]]]))
    assert crop_like(y, y) is y
    with pytest.raises(ValueError, match="more than"):
        crop_like(pred, y)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_contract(name):
    fn = METRICS[name]
    y = _noise()
    zero = fn(y, y)
    assert zero.dim() == 0 and float(zero) == pytest.approx(0.0, abs=1e-6)
    pred = (0.5 * y).requires_grad_(True)
    v = fn(pred, y)
    assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0
    v.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # A shorter prediction is compared with the end of the target.
    short = y[..., 1000:]
    assert float(fn(short, y)) == pytest.approx(0.0, abs=1e-6)
    # float64 works too (auraloss windows follow the dtype).
    y64 = y.double()
    assert float(fn(y64, y64)) == pytest.approx(0.0, abs=1e-9)


def test_metric_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, 1, T\)"):
        l1(torch.zeros(2, 4096), torch.zeros(2, 4096))
    with pytest.raises(ValueError, match="batch sizes"):
        l1(torch.zeros(2, 1, 64), torch.zeros(3, 1, 64))


def test_l1_and_esr_values():
    y = _noise(dtype=torch.float64)
    assert float(l1(y + 0.1, y)) == pytest.approx(0.1)
    assert float(esr(torch.zeros_like(y), y)) == pytest.approx(1.0, rel=1e-6)
    assert float(esr(0.5 * y, y)) == pytest.approx(0.25, rel=1e-6)
    # Pre-emphasis 1 - 0.95 z^-1 weights high frequencies: a low-frequency error costs less
    # than a high-frequency error of the same energy; plain ESR weighs them the same.
    t = torch.arange(y.shape[-1], dtype=torch.float64)
    lo, hi = torch.sin(2 * math.pi * 100 * t / SR), torch.sin(2 * math.pi * 10000 * t / SR)
    assert float(esr_pe(y + 0.05 * lo, y)) < 0.1 * float(esr_pe(y + 0.05 * hi, y))
    assert float(esr(y + 0.05 * lo, y)) == pytest.approx(float(esr(y + 0.05 * hi, y)), rel=0.05)


def test_esr_is_error_energy_over_target_energy_over_the_whole_signal():
    """Hand-computed: one loud slice and one near-silent slice, the same small error on both.

    A mean of per-slice ratios would be dominated by the silent slice (about 5e3 here); the
    field's ESR sums both energies over everything first.
    """
    target = torch.tensor([[[1.0, -1.0, 1.0, -1.0]], [[1e-3, -1e-3, 1e-3, -1e-3]]], dtype=torch.float64)
    pred = target + torch.tensor([[[0.1, 0.1, 0.1, 0.1]], [[0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64)
    err = 8 * 0.1**2  # 0.08
    energy = 4 * 1.0 + 4 * 1e-6
    assert float(esr(pred, target)) == pytest.approx(err / energy, rel=1e-6)  # about 0.02
    per_slice_mean = ((0.04 / 4.0) + (0.04 / 4e-6)) / 2
    assert per_slice_mean > 1e3 * float(esr(pred, target))
    # Pre-emphasized, by hand: y_p[n] = y[n] - 0.95 y[n-1] within each slice.
    yp = target[..., 1:] - 0.95 * target[..., :-1]
    pp = pred[..., 1:] - 0.95 * pred[..., :-1]
    assert float(esr_pe(pred, target)) == pytest.approx(float(((yp - pp) ** 2).sum() / (yp**2).sum()), rel=1e-6)


def test_stft_scale_matches_design_notes():
    """auraloss STFTLoss defaults: half gain 0.5 + ln 2 = 1.19; white noise vs low-passed copy large."""
    y = _noise(T=8192)
    assert float(stft(0.5 * y, y)) == pytest.approx(0.5 + math.log(2), abs=0.01)
    lp = _lowpass(y, 1000.0)
    assert float(stft(y, lp)) > 6.0
    assert float(mrstft(y, lp)) > 6.0


def test_stft_losses_equal_stock_auraloss():
    """metafx skips auraloss's unused phase spectrum; values and gradients stay auraloss's own."""
    import auraloss

    torch.manual_seed(3)
    y = _noise(T=8192)
    pred = (0.7 * y + 0.05 * torch.randn_like(y)).requires_grad_(True)
    ref = pred.detach().clone().requires_grad_(True)
    for ours, stock in ((stft, auraloss.freq.STFTLoss()), (mrstft, auraloss.freq.MultiResolutionSTFTLoss())):
        a, b = ours(pred, y), stock(ref, y)
        assert float(a) == pytest.approx(float(b), rel=1e-6)
        a.backward()
        b.backward()
        assert torch.allclose(pred.grad, ref.grad, rtol=1e-5, atol=1e-9)
        pred.grad = ref.grad = None


def test_short_slices_fall_back_to_fitting_resolutions():
    assert stft_resolution(2048) == (1024, 256, 1024)
    assert stft_resolution(700) == (512, 128, 512)
    assert [r[0] for r in mrstft_resolutions(2048)] == [1024, 2048, 512]
    assert [r[0] for r in mrstft_resolutions(1024)] == [1024, 512]
    assert [r[0] for r in mrstft_resolutions(300)] == [256]
    y = _noise(T=300)
    assert float(stft(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(mrstft(0.5 * y, y)) > 0.5
    with pytest.raises(ValueError, match="too short"):
        stft(y[..., :8], y[..., :8])


def test_make_loss_weighted_sum():
    y = _noise()
    pred = 0.7 * y + 0.01
    fn = make_loss(LossConfig(terms=(("l1", 1.0), ("mrstft", 0.1), ("esr", 2.0))))
    expected = l1(pred, y) + 0.1 * mrstft(pred, y) + 2.0 * esr(pred, y)
    assert float(fn(pred, y)) == pytest.approx(float(expected), rel=1e-6)
    assert float(make_loss(LossConfig())(pred, y)) == pytest.approx(float(l1(pred, y)))
    with pytest.raises(ValueError, match="unknown loss term"):
        make_loss(LossConfig(terms=(("sisdr", 1.0),)))


def test_hf_error_sees_only_the_band_above_the_cutoff():
    cutoff = 2000.0
    y = _lowpass(_noise(T=8192, dtype=torch.float64), cutoff)
    t = torch.arange(y.shape[-1], dtype=torch.float64)
    # Differences far below the cutoff do not count ...
    low_diff = y + 0.2 * torch.sin(2 * math.pi * 60 * t / SR)
    assert float(hf_error(low_diff, y, cutoff, SR)) < 0.1
    assert float(l1(low_diff, y)) > 0.05
    # ... keeping the high frequencies (the paper's failure) is tens of dB.
    x = _noise(T=8192, dtype=torch.float64)
    assert float(hf_error(x, _lowpass(x, cutoff), cutoff, SR)) > 20.0
    assert float(hf_error(y, y, cutoff, SR)) == 0.0
    # One cutoff per batch item; the margin moves the band edge.
    v = hf_error(x, _lowpass(x, cutoff), torch.tensor([cutoff, 4 * cutoff]), SR, margin=1.5)
    assert torch.isfinite(v)
    with pytest.raises(ValueError, match="no STFT bin"):
        hf_error(x, x, 30000.0, SR)


def test_hf_error_short_slices_and_float32():
    x = _noise(T=600)
    v = hf_error(x, _lowpass(x, 1000.0), 1000.0, SR)
    assert v.dtype == torch.float32 and float(v) > 10.0
