"""Losses and evaluation metrics: ``(pred, target) -> scalar Tensor`` on (B, 1, T).

A leaf module: it imports nothing from metafx at run time (the loss config is a type
hint only). Every metric crops the target to the prediction's length first (aligned to
the end, :func:`crop_like`), so a TCN's shorter output is compared with the
last samples of the target. All are differentiable (the inner and outer MAML losses
are weighted sums of them, :func:`make_loss`), twice where the inner loop needs it.

* ``l1``: mean absolute error, the paper's training loss (section 3.1).
* ``esr``: error-to-signal ratio after first-order pre-emphasis ``1 - 0.95 z^-1``
  (Wright & Valimaki 2020, "Perceptual loss function for neural modelling of audio
  systems").
* ``stft``: ``auraloss.freq.STFTLoss()`` with its defaults (FFT 1024, hop 256, Hann
  1024; spectral convergence + L1 log magnitude), the paper's STFT loss (section 3.1).
* ``mrstft``: ``auraloss.freq.MultiResolutionSTFTLoss()`` with its default resolutions
  (FFT 1024/2048/512, hop 120/240/50, window 600/1200/240), keeping those that fit.
* :func:`hf_error`: the spectral error above a task's cutoff, in dB; not a training
  loss but the number that shows whether a model removes the high frequencies, which
  the paper's models did not (section 5).

Short slices: auraloss's STFT centers frames with reflection padding of FFT/2
samples, so an FFT needs ``T >= FFT``. ``stft`` uses its default resolution when
``T >= 1024`` (0.5 s slices in the paper, 2048 here); below that it falls back to
FFT = window = the largest power of two <= T, hop = FFT/4 (values are then not
comparable with the paper's). ``mrstft`` keeps the default resolutions with
``FFT <= T`` (all three at T >= 2048, 1024 and 512 at T = 1024, ...); if none fits it
uses one resolution scaled down from the (512, 50, 240) one. Each fallback is logged
once as a warning.

auraloss clamps the power spectrum at ``eps = 1e-8``, i.e. a 1e-4 floor on the
magnitude of an unnormalized STFT (docs/design.md); :func:`hf_error` uses the same floor.
The auraloss modules are created once per (resolution, device, dtype) and cached.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import auraloss
import torch
from torch import Tensor

if TYPE_CHECKING:  # a type hint only: metrics stays a leaf
    from metafx.config import LossConfig

log = logging.getLogger(__name__)

Metric = Callable[[Tensor, Tensor], Tensor]

PRE_EMPHASIS = 0.95  # Wright & Valimaki: H(z) = 1 - 0.95 z^-1
ESR_EPS = 1e-8  # keeps the ratio finite for a silent target slice
MAG_FLOOR_POWER = 1e-8  # auraloss's eps on |STFT|^2: a 1e-4 magnitude floor

STFT_DEFAULT = (1024, 256, 1024)  # auraloss.freq.STFTLoss defaults: (fft, hop, win)
MRSTFT_DEFAULT = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))  # MultiResolutionSTFTLoss defaults
MIN_FFT = 16

_MODULES: dict[tuple, torch.nn.Module] = {}
_WARNED: set[tuple] = set()


def crop_like(y: Tensor, pred: Tensor) -> Tensor:
    """Crop a target to a prediction's length, keeping its last samples.

    Causal models with valid convolutions (the TCN) predict the last ``T'`` samples
    of the slice, so the target keeps its last ``T'`` samples too (the paper crops the
    label "to the same size").

    Args:
        y: target, (B, 1, T).
        pred: prediction, (B, 1, T') with ``T' <= T``.

    Returns:
        ``y[..., T - T':]``, (B, 1, T'); ``y`` itself when the lengths match.

    Raises:
        ValueError: if the prediction is longer than the target.
    """
    T, Tp = y.shape[-1], pred.shape[-1]
    if Tp == T:
        return y
    if Tp > T:
        raise ValueError(f"crop_like: prediction has {Tp} samples, more than the target's {T}")
    return y[..., T - Tp :]


def _prepare(pred: Tensor, target: Tensor) -> Tensor:
    """Check shapes and crop the target to the prediction (end-aligned).

    Raises:
        ValueError: if either is not (B, 1, T) or batch sizes differ.
    """
    if pred.dim() != 3 or target.dim() != 3 or pred.shape[1] != 1 or target.shape[1] != 1:
        raise ValueError(f"metrics expect (B, 1, T) tensors, got pred {tuple(pred.shape)}, target {tuple(target.shape)}")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: pred {pred.shape[0]}, target {target.shape[0]}")
    return crop_like(target, pred)


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _warn_once(key: tuple, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def stft_resolution(T: int) -> tuple[int, int, int]:
    """(fft, hop, win) that :func:`stft` uses on slices of ``T`` samples (see module docstring).

    Args:
        T: slice length in samples.

    Returns:
        auraloss's default ``(1024, 256, 1024)`` when ``T >= 1024``, else a smaller power of two.

    Raises:
        ValueError: if ``T`` is shorter than 16 samples.
    """
    if T >= STFT_DEFAULT[0]:
        return STFT_DEFAULT
    n = _pow2_floor(T)
    if n < MIN_FFT:
        raise ValueError(f"stft: a slice of {T} samples is too short for a spectrum (need >= {MIN_FFT})")
    _warn_once(("stft", T), f"stft: {T} samples < FFT 1024; using FFT {n}, hop {n // 4} (not comparable with the paper's)")
    return (n, n // 4, n)


def mrstft_resolutions(T: int) -> tuple[tuple[int, int, int], ...]:
    """The (fft, hop, win) resolutions :func:`mrstft` uses on slices of ``T`` samples.

    Args:
        T: slice length in samples.

    Returns:
        auraloss's default resolutions with ``fft <= T``, else one scaled-down resolution.

    Raises:
        ValueError: if ``T`` is shorter than 16 samples.
    """
    fit = tuple(r for r in MRSTFT_DEFAULT if r[0] <= T)
    if len(fit) < len(MRSTFT_DEFAULT):
        _warn_once(("mrstft", T), f"mrstft: {T} samples; dropping FFT sizes > {T} from auraloss's defaults")
    if fit:
        return fit
    n = _pow2_floor(T)
    if n < MIN_FFT:
        raise ValueError(f"mrstft: a slice of {T} samples is too short for a spectrum (need >= {MIN_FFT})")
    return ((n, max(1, round(50 * n / 512)), max(2, round(240 * n / 512))),)


class _STFTLoss(auraloss.freq.STFTLoss):
    """auraloss's ``STFTLoss`` that computes the phase spectrum only when its loss term has a weight.

    auraloss 0.4 computes ``torch.angle`` of every STFT in ``stft`` and uses it only when
    ``w_phs`` is non-zero (its default is 0): over half the time of a whole-file MR-STFT on CPU.
    The magnitudes, and so every loss value, are auraloss's own (tested against the stock class: an
    auraloss release that changes its ``stft`` fails tests/test_metrics.py before it changes a metric).
    """

    def stft(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """auraloss's ``stft``: ``(magnitude, phase)``, the phase None when ``w_phs`` is 0."""
        if self.w_phs:
            return super().stft(x)
        X = torch.stft(x, self.fft_size, self.hop_size, self.win_length, self.window, return_complex=True)
        return torch.sqrt(torch.clamp(X.real ** 2 + X.imag ** 2, min=self.eps)), None


def _auraloss_module(resolutions: tuple[tuple[int, int, int], ...], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Cached auraloss STFTLoss (one resolution) or MultiResolutionSTFTLoss on a device/dtype.

    Their resolution losses are :class:`_STFTLoss` (auraloss's defaults otherwise, as the
    multi-resolution class builds them), which skip the unused phase spectrum.
    """
    key = (resolutions, str(device), dtype)
    mod = _MODULES.get(key)
    if mod is None:
        if len(resolutions) == 1:
            f, h, w = resolutions[0]
            mod = _STFTLoss(fft_size=f, hop_size=h, win_length=w)
            subs = [mod]
        else:
            ffts, hops, wins = (list(x) for x in zip(*resolutions))
            mod = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins)
            mod.stft_losses = torch.nn.ModuleList(_STFTLoss(fft_size=f, hop_size=h, win_length=w)
                                                  for f, h, w in resolutions)
            subs = list(mod.stft_losses)
        for s in subs:  # auraloss keeps the window as a plain attribute; match device and dtype once
            s.window = s.window.to(device=device, dtype=dtype)
        _MODULES[key] = mod
    return mod


# --------------------------------------------------------------------------- metrics


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error (the paper's MAE / L1 loss).

    Args:
        pred: prediction, (B, 1, T').
        target: target, (B, 1, T >= T'); its last T' samples are compared.

    Returns:
        Scalar tensor: the mean of ``|pred - target|`` over every sample.

    Raises:
        ValueError: if either is not (B, 1, T), the batch sizes differ or the target is shorter.
    """
    target = _prepare(pred, target)
    return (pred - target).abs().mean()


def esr(pred: Tensor, target: Tensor) -> Tensor:
    """Error-to-signal ratio over the whole signal: error energy over target energy (Wright et al. 2019).

    ``ESR = sum (y - p)^2 / (sum y^2 + 1e-8)`` with both sums over every sample of every slice of
    the batch: for the query slices of one episode, the ESR of that task's held-out audio. It is
    never a mean of per-slice ratios, which near-silent slices dominate. 0 for a perfect
    prediction, 1 for silence; Neural Amp Modeler calls < 0.01 "great" and < 0.035 "not bad".

    Args:
        pred: prediction, (B, 1, T').
        target: target, (B, 1, T >= T'); its last T' samples are compared.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: if either is not (B, 1, T), the batch sizes differ or the target is shorter.
    """
    target = _prepare(pred, target)
    return (target - pred).pow(2).sum() / (target.pow(2).sum() + ESR_EPS)


def esr_pe(pred: Tensor, target: Tensor) -> Tensor:
    """:func:`esr` after first-order pre-emphasis ``1 - 0.95 z^-1`` (Wright & Valimaki 2020).

    ``x_p[n] = x[n] - 0.95 x[n-1]`` within each slice (``n >= 1``: no sample before a slice is
    assumed), then error energy over target energy summed over every slice of the batch. The
    pre-emphasis weighs high frequencies more, where the ear hears the error.

    Args:
        pred: prediction, (B, 1, T').
        target: target, (B, 1, T >= T'); its last T' samples are compared.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: if either is not (B, 1, T), the batch sizes differ or the target is shorter.
    """
    target = _prepare(pred, target)
    yp = target[..., 1:] - PRE_EMPHASIS * target[..., :-1]  # (B, 1, T'-1)
    pp = pred[..., 1:] - PRE_EMPHASIS * pred[..., :-1]
    return (yp - pp).pow(2).sum() / (yp.pow(2).sum() + ESR_EPS)


def stft(pred: Tensor, target: Tensor) -> Tensor:
    """auraloss ``STFTLoss()`` with its defaults: spectral convergence + L1 log magnitude.

    The paper's STFT loss (section 3.1). Scale on this setup (docs/design.md): identical
    signals 0, half gain 1.19, white noise against its low-passed copy about 8.6.

    Args:
        pred: prediction, (B, 1, T').
        target: target, (B, 1, T >= T'); its last T' samples are compared.

    Returns:
        Scalar tensor: auraloss's spectral convergence + log-magnitude distance.

    Raises:
        ValueError: if either is not (B, 1, T), the batch sizes differ, the target is
            shorter, or a slice is shorter than 16 samples.
    """
    target = _prepare(pred, target)
    mod = _auraloss_module((stft_resolution(pred.shape[-1]),), pred.device, pred.dtype)
    return mod(pred, target)


def mrstft(pred: Tensor, target: Tensor) -> Tensor:
    """auraloss ``MultiResolutionSTFTLoss()`` defaults, keeping resolutions with FFT <= T.

    Args:
        pred: prediction, (B, 1, T').
        target: target, (B, 1, T >= T'); its last T' samples are compared.

    Returns:
        Scalar tensor: the mean of the STFT losses over the resolutions used.

    Raises:
        ValueError: if either is not (B, 1, T), the batch sizes differ, the target is
            shorter, or a slice is shorter than 16 samples.
    """
    target = _prepare(pred, target)
    mod = _auraloss_module(mrstft_resolutions(pred.shape[-1]), pred.device, pred.dtype)
    return mod(pred, target)


METRICS: dict[str, Metric] = {"l1": l1, "esr": esr, "esr_pe": esr_pe, "stft": stft, "mrstft": mrstft}


def make_loss(cfg: LossConfig) -> Metric:
    """A weighted sum of metrics, e.g. ``{"l1": 1.0, "mrstft": 0.1}``.

    Args:
        cfg: ``maml.inner_loss`` or ``maml.outer_loss``.

    Returns:
        ``loss(pred, target) -> scalar Tensor``.

    Raises:
        ValueError: an unknown term or an empty sum.
    """
    terms = tuple(cfg.terms)
    if not terms:
        raise ValueError("make_loss: a loss needs at least one term")
    for name, _ in terms:
        if name not in METRICS:
            raise ValueError(f"make_loss: unknown loss term {name!r}; known: {', '.join(METRICS)}")

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        total = None
        for name, w in terms:
            v = METRICS[name](pred, target)
            v = v if w == 1.0 else w * v
            total = v if total is None else total + v
        return total

    loss.__name__ = "+".join(f"{w:g}*{n}" for n, w in terms)
    return loss


# --------------------------------------------------------------------------- high-frequency error


def hf_error(
    pred: Tensor,
    target: Tensor,
    cutoff_hz: float | Sequence[float] | Tensor,
    sample_rate: int,
    margin: float = 1.0,
) -> Tensor:
    """Spectral error above the task's cutoff, in dB ("hf_error").

    The paper's adapted models kept the high frequencies a low-pass filter removes
    (section 5, Figures 4-5). This measures exactly that. Definition:

    1. STFT of prediction and (cropped) target: Hann window of ``n`` samples, hop
       ``n/4``, no centering or padding (only frames fully inside the slice), with
       ``n = 1024`` or, for slices shorter than 1024, the largest power of two <= T.
    2. Log magnitude in dB with auraloss's floor: ``L = 10 log10(max(|X|^2, 1e-8))``
       (unnormalized STFT, so the floor is a magnitude of 1e-4, -80 dB).
    3. Keep the bins whose centre frequency ``k * sample_rate / n`` is
       ``>= margin * cutoff_hz``.
    4. ``hf_error`` = mean over those bins and all frames of ``|L_pred - L_target|``,
       averaged over the batch.

    It is auraloss's log-magnitude term restricted to the stop band and expressed
    in dB (multiply auraloss's natural-log distance by 20 / ln 10 = 8.69). 0 when the
    prediction matches the target above the cutoff whatever it does below; for
    unfiltered input against a steep low-pass it is tens of dB.

    Args:
        pred: prediction, (B, 1, T').
        target: target, (B, 1, T >= T'), cropped to the end like every metric.
        cutoff_hz: the task's cutoff in Hz; a float, or one per batch item (B,).
        sample_rate: sample rate in Hz.
        margin: count bins above ``margin * cutoff_hz`` (``eval.hf_margin``).

    Returns:
        Scalar tensor, dB.

    Raises:
        ValueError: bad shapes, a slice shorter than 16 samples, or no STFT bin above
            ``margin * cutoff_hz`` (the cutoff is at or above Nyquist).
    """
    target = _prepare(pred, target)
    B, _, T = pred.shape
    n = 1024 if T >= 1024 else _pow2_floor(T)
    if n < MIN_FFT:
        raise ValueError(f"hf_error: a slice of {T} samples is too short for a spectrum (need >= {MIN_FFT})")
    window = torch.hann_window(n, dtype=pred.dtype, device=pred.device)

    def level_db(x: Tensor) -> Tensor:  # (B, 1, T) -> (B, n/2+1, frames)
        X = torch.stft(x.reshape(B, T), n, n // 4, n, window, center=False, return_complex=True)
        return 10.0 * torch.log10(X.abs().pow(2).clamp_min(MAG_FLOOR_POWER))

    diff = (level_db(pred) - level_db(target)).abs().mean(dim=-1)  # (B, F): mean over frames
    freqs = torch.arange(n // 2 + 1, device=pred.device, dtype=torch.float64) * (sample_rate / n)  # (F,)
    cut = torch.as_tensor(cutoff_hz, dtype=torch.float64, device=pred.device).reshape(-1).expand(B) * margin  # (B,)
    mask = (freqs[None, :] >= cut[:, None]).to(diff.dtype)  # (B, F)
    count = mask.sum(dim=1)  # (B,)
    if bool((count == 0).any()):
        raise ValueError(
            f"hf_error: no STFT bin at or above margin * cutoff = {cut.max().item():g} Hz "
            f"(Nyquist {sample_rate / 2:g} Hz); lower eval.hf_margin"
        )
    return ((diff * mask).sum(dim=1) / count).mean()


__all__ = ["METRICS", "crop_like", "esr", "esr_pe", "hf_error", "l1", "make_loss", "mrstft", "mrstft_resolutions", "stft", "stft_resolution"]
