"""Non-learned baselines evaluated on the same episodes as the meta-learned models.

* :func:`identity_predict`: the unprocessed input as the prediction (the floor any
  model must beat).
* :func:`lsfir_fit` / :func:`lsfir_predict`: classical system identification, a
  least-squares FIR filter fitted on the support slices of a task and applied to its
  query slices. The Moog ladder in ``ve.moog_vcf`` is linear, so a few hundred taps
  approximate it well; docs/design.md records a 256-tap fit on 4 x 2048 support samples
  at MAE 0.014 / STFT 2.2 on held-out Moog tasks, better than the paper's best
  meta-learned LSTM (0.031 / 2.353). It is the bar a meta-learned model has to clear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def identity_predict(x: Tensor) -> Tensor:
    """The dry input as the prediction.

    Shape:
        (B, 1, T) -> (B, 1, T) (the same tensor).
    """
    return x


def _check_slices(x: Tensor, name: str) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (K, 1, L), got {tuple(x.shape)}")


def lsfir_fit(support_x: Tensor, support_y: Tensor, taps: int, ridge: float = 1e-6) -> Tensor:
    """Least-squares FIR filter from the support slices of one task (float64 solve).

    Model: ``y[n] = sum_{j=0}^{taps-1} h[j] x[n-j]``. Each support slice contributes the
    equations for ``n = taps-1 .. L-1`` only, where the whole input history of the
    filter lies inside the slice (the first ``taps - 1`` outputs of a slice depend on
    input before it and are left out of the fit). All K slices are fitted jointly:

        h = argmin_h ||X h - y||^2 + lam ||h||^2,   lam = ridge * trace(X^T X) / taps

    i.e. the ridge is relative to the mean diagonal of the normal matrix (the mean
    input energy per tap), so it does not depend on the signal level. Solved through
    the normal equations in float64 (Cholesky-stable for ridge > 0); with ``ridge = 0``
    a least-squares solver handles rank deficiency.

    Args:
        support_x: dry support slices, (K, 1, L).
        support_y: wet support slices, (K, 1, L).
        taps: FIR length (``eval.lsfir_taps``).
        ridge: relative ridge (``eval.lsfir_ridge``), >= 0.

    Returns:
        The impulse response ``h``, (taps,), float64, on the input's device.

    Raises:
        ValueError: shapes differ, ``taps < 1``, ``ridge < 0``, slices not longer than
            ``taps - 1`` (no equation left) or fewer equations than taps.
    """
    _check_slices(support_x, "support_x")
    _check_slices(support_y, "support_y")
    if support_x.shape != support_y.shape:
        raise ValueError(f"support_x {tuple(support_x.shape)} and support_y {tuple(support_y.shape)} differ")
    if taps < 1:
        raise ValueError(f"lsfir_fit: taps must be >= 1, got {taps}")
    if ridge < 0:
        raise ValueError(f"lsfir_fit: ridge must be >= 0, got {ridge}")
    K, _, L = support_x.shape
    rows = L - taps + 1  # equations per slice
    if rows < 1 or K * rows < taps:
        raise ValueError(
            f"lsfir_fit: {K} slices of {L} samples give {max(rows, 0) * K} equations for {taps} taps; "
            f"use fewer taps (eval.lsfir_taps) or longer/more support slices"
        )
    x = support_x[:, 0].detach().to(torch.float64)  # (K, L)
    y = support_y[:, 0].detach().to(torch.float64)  # (K, L)
    if ridge == 0:
        # windows[k, r, :] = x[k, r : r + taps]; reversed it is (x[n], ..., x[n-taps+1]) for n = r + taps - 1.
        X = x.unfold(-1, taps, 1).flip(-1).reshape(K * rows, taps)  # (K*rows, taps)
        t = y[:, taps - 1 :].reshape(K * rows)  # (K*rows,)
        return torch.linalg.lstsq(X, t.unsqueeze(-1)).solution[:, 0]
    A, r = fir_normal_equations(x, y, taps)
    lam = ridge * torch.diagonal(A).mean()
    A = A + lam * torch.eye(taps, dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, r)  # (taps,)


def fir_normal_equations(x: Tensor, y: Tensor, taps: int) -> tuple[Tensor, Tensor]:
    """``X^T X`` and ``X^T t`` of :func:`lsfir_fit`'s equations, without forming ``X``.

    ``X`` has a row ``(x[n], x[n-1], .., x[n-taps+1])`` per slice and ``n = taps-1 .. L-1``: for
    a capture's support (K x L = 220 000 rows of 256 taps) it is 450 MB and its product
    15 GFLOP, seconds on a CPU. Its normal matrix is nearly Toeplitz instead:
    ``A[0, d] = sum_n x[n] x[n-d]`` (one FFT correlation per slice), and stepping down a
    diagonal only trades the equation at one end for the one at the other,
    ``A[i+1, j+1] = A[i, j] + x[taps-2-i] x[taps-2-j] - x[L-1-i] x[L-1-j]``, so the rest is a
    cumulative sum of ``(taps-1)^2`` edge products. The same sums in another order (float64).

    Args:
        x, y: dry and wet slices, (K, L), float64, ``L >= taps``.
        taps: FIR length.

    Returns:
        ``(A (taps, taps), r (taps,))``: ``A = X^T X``, ``r = X^T t`` with ``t[n] = y[n]``.
    """
    K, L = x.shape
    n = 1
    while n < L + taps:  # correlation lags 0 .. taps-1 of length-L signals without wrap-around
        n *= 2
    head = torch.zeros_like(x)
    head[:, taps - 1:] = 1.0  # the rows' outputs: n >= taps - 1
    Xf = torch.fft.rfft(x, n=n).conj()
    # sum_n w[n] x[n-d] = irfft(conj(F x) F w)[d], summed over slices in the frequency domain
    A0 = torch.fft.irfft((Xf * torch.fft.rfft(x * head, n=n)).sum(0), n=n)[:taps]
    r = torch.fft.irfft((Xf * torch.fft.rfft(y * head, n=n)).sum(0), n=n)[:taps]
    if taps == 1:
        return A0.reshape(1, 1), r
    a = x[:, : taps - 1].flip(-1)  # a[t] = x[taps-2-t]
    b = x[:, L - taps + 1:].flip(-1)  # b[t] = x[L-1-t]
    R = a.T @ a - b.T @ b  # (taps-1, taps-1): the step corrections
    D = torch.zeros(taps, taps, dtype=x.dtype, device=x.device)
    for i in range(1, taps):  # D[i, j] = D[i-1, j-1] + R[i-1, j-1], upper triangle
        D[i, i:] = D[i - 1, i - 1: taps - 1] + R[i - 1, i - 1:]
    idx = torch.arange(taps, device=x.device)
    lag = (idx[None] - idx[:, None]).abs()
    A = A0[lag] + torch.triu(D) + torch.triu(D, 1).T
    return A, r


def lsfir_predict(h: Tensor, x: Tensor) -> Tensor:
    """Apply an FIR filter causally from a zero initial state.

    ``y[n] = sum_j h[j] x[n-j]`` with ``x[n] = 0`` for ``n < 0``; computed in float64.

    Args:
        h: impulse response, (taps,).
        x: input, (B, 1, T).

    Returns:
        (B, 1, T) in ``x``'s dtype.

    Raises:
        ValueError: if ``h`` is not 1-D or ``x`` is not (B, 1, T).
    """
    _check_slices(x, "x")
    if h.dim() != 1:
        raise ValueError(f"lsfir_predict: h must be 1-D (taps,), got {tuple(h.shape)}")
    taps = h.shape[0]
    xd = F.pad(x.to(torch.float64), (taps - 1, 0))  # (B, 1, T + taps - 1), zero history
    w = h.to(device=x.device, dtype=torch.float64).flip(0).view(1, 1, taps)  # conv1d correlates: flip for convolution
    return F.conv1d(xd, w).to(x.dtype)  # (B, 1, T)


__all__ = ["identity_predict", "lsfir_fit", "lsfir_predict"]
