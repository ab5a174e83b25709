"""MetaARX: meta-learned causal features and a per-task linear ARX head fitted in closed form.

"Closed-form ANIL": the body of the network (a causal feature map ``Phi_theta``) is
meta-learned, and the head is re-fitted for every task by ridge regression on the
support slices, with no gradient steps in the inner loop. The meta-gradient flows
through the linear solve into ``theta``, the per-coefficient log-ridge and the ridge's
prior mean.

References:

* ANIL: Raghu, Raghu, Bengio & Vinyals 2020, "Rapid learning or feature reuse? Towards
  understanding the effectiveness of MAML" (ICLR): adapt only the head.
* R2-D2: Bertinetto, Henriques, Torr & Vedaldi 2019, "Meta-learning with differentiable
  closed-form solvers" (ICLR): the head is a ridge regression solved in closed form,
  backpropagated through.
* ALPaCA: Harrison, Sharma & Pavone 2018, "Meta-learning priors for efficient online
  Bayesian regression" (WAFR): Bayesian linear regression on meta-learned features with
  a meta-learned prior mean and precision (here: the ridge prior mean ``w0`` and the
  per-coefficient ridge, the MAP version of that prior).
* ARX system identification: Ljung 1999, "System Identification: Theory for the User",
  chapters 4 and 7 (ARX model structure, equation-error least squares). With
  ``features: none`` and no meta-training the model *is* classical ARX(nb, na) with an
  input and a DC regressor.

Definitions (one task; ``phi[m, n]`` = channel ``m`` of ``Phi_theta(x)`` at sample ``n``,
computed per slice from a zero initial state; the same for support and query):

Head (ARX, "equation error" form)::

    y[n] = sum_{m<M} sum_{j<nb} b[m, j] phi[m, n - j]  -  sum_{i=1..na} a_i y[n - i]
    i.e.  A(z) y = sum_m B_m(z) phi_m,   A(z) = 1 + a_1 z^-1 + ... + a_na z^-na

Equation-error fit (:meth:`MetaARX.fit`): the *measured* support target supplies the
past outputs ``y[n - i]``, so the fit is linear least squares. Each support slice
contributes the rows ``n = w .. L-1`` with ``w = max(nb - 1, na)`` (all lags inside the
slice). Channel 0 is the constant 1; its lags are identical inside those rows, so it gets
one tap (``b[0, j>0] = 0``). With ``A`` the (rows, P) regressor matrix, ``t`` the targets,
``P = 1 + (M - 1) nb + na`` coefficients ``w = (b[0, 0], vec b[1:], a_1..a_na)``, ``G = A^T A``::

    w = argmin ||A w - t||^2 + sum_p D_p (w_p - w0_p)^2,    D_p = lambda_p * mean(diag G)
      = (G + diag D)^-1 (A^T t + D w0)                       (float64 normal equations)

``lambda_p = exp(log_ridge_p)`` is meta-learned per coefficient (relative to the mean
Gram diagonal, so it does not depend on the signal level) and ``w0`` (the prior mean)
is meta-learned too.

Simulation (:meth:`MetaARX.predict`): the fitted head is run from a zero state on the
query features. The moving-average part ``u[n] = sum_m sum_j b[m, j] phi[m, n - j]`` is
a causal FIR; the recursion ``y = u / A(z)`` is computed by FFT: with ``N = fft_pad T``,
``y = irfft(rfft(u, N) / rfft(a, N))[:T]``. That is the circular (period N) solution
``y_circ[n] = sum_{k>=0} y_lin[n + kN]`` where ``y_lin`` is the causal zero-state output;
``u`` is zero after T, so ``y_lin`` decays like ``r^(t - T)`` there and the wrap-around
error is about ``rmax^((fft_pad - 1) T)`` relative (0.2 % for T = 2048, pad 4, rmax 0.999;
negligible for the usual, better damped, fits).

Pole clamping: if the largest root radius ``r`` of ``A(z)`` (eigenvalues of its companion
matrix) exceeds ``rmax``, every coefficient is scaled ``a_i <- a_i (rmax / r)^i``, which
scales every root by ``rmax / r``; the factor is not differentiated. An unstable
equation-error fit therefore still simulates to a finite (stable) output, and the
FFT division never divides by zero.

The pre-adaptation model (``forward``) is the head at the prior mean ``w0`` (the
registry contract: ``forward(x) (B, 1, T) -> (B, 1, T)``); ``w0`` starts as the identity
(``b[x, 0] = 1``), so the untrained model passes the input through.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafx.config import ARXConfig

SAMPLE_RATE = 48000  # only sets the initial envelope time constants (in samples)
TAU_MS = (0.2, 200.0)  # initial envelope time constants, log-spaced
START_TAU_MS = (1.0, 100.0)  # time constants of the "time since slice start" gate inputs
FILTER_HZ = (100.0, 6000.0)  # initial corners of the pointwise MLP's input low-passes, log-spaced
ENV_FLOOR = 1e-4  # log envelope floor (-80 dB)


# --------------------------------------------------------------------------- signal helpers


def onepole_fft(u: Tensor, alphas: Tensor) -> Tensor:
    """Bank of one-pole low-passes ``y[n] = (1 - a) u[n] + a y[n-1]``, zero state, exact by FFT.

    Args:
        u: input, (N, T).
        alphas: pole of each filter in [0, 1), (J,).

    Returns:
        (N, J, T): the linear convolution with the length-T impulse responses (2T FFT).
    """
    N, T = u.shape
    n = torch.arange(T, dtype=u.dtype, device=u.device)
    ker = (1 - alphas)[:, None] * alphas[:, None] ** n[None]  # (J, T)
    L = 2 * T
    return torch.fft.irfft(torch.fft.rfft(u, L)[:, None] * torch.fft.rfft(ker, L)[None], L)[..., :T]


def lagged(u: Tensor, n: int, start: int = 0) -> Tensor:
    """Lag matrix: ``out[..., t, c, k] = u[..., c, t - start - k]`` (zero before sample 0).

    Args:
        u: (N, C, T).
        n: number of lags ``k = 0 .. n-1``.
        start: first lag (1 for the AR regressors ``y[t-1], ..., y[t-n]``).

    Returns:
        (N, T, C, n).
    """
    up = F.pad(u, (n - 1 + start, 0))
    return up.unfold(-1, n, 1)[..., : u.shape[-1], :].flip(-1).permute(0, 2, 1, 3)


def pole_radius(a: Tensor) -> Tensor:
    """Largest root radius of ``A(z) = a[0] + a[1] z^-1 + ... + a[na] z^-na`` (a[0] = 1).

    Eigenvalues of the companion matrix, float64, no gradient.

    Args:
        a: (..., na + 1).

    Returns:
        (...,) radii (zeros when na = 0; NaN for a polynomial with a non-finite coefficient).
    """
    na = a.shape[-1] - 1
    if na == 0:
        return torch.zeros(a.shape[:-1], dtype=torch.float64, device=a.device)
    with torch.no_grad():
        ad = a.detach().double()
        comp = torch.zeros(*a.shape[:-1], na, na, dtype=torch.float64, device=a.device)
        comp[..., 0, :] = -ad[..., 1:] / ad[..., :1]
        if na > 1:
            idx = torch.arange(na - 1, device=a.device)
            comp[..., idx + 1, idx] = 1.0
        # a non-finite polynomial (a NaN in the task's audio) has no radius: NaN, and no eigenvalue call (LAPACK's
        # eigenvalue routine on a NaN matrix crashed the process with a segmentation fault on this stack)
        finite = torch.isfinite(comp).all(-1).all(-1)
        r = torch.linalg.eigvals(torch.where(finite[..., None, None], comp, 0.0)).abs().amax(-1)
        return torch.where(finite, r, torch.full_like(r, float("nan")))


def stabilize(a: Tensor, rmax: float) -> tuple[Tensor, Tensor]:
    """Pole clamping: ``a_i <- a_i s^i`` with ``s = min(1, rmax / r)``, ``r`` = largest pole radius.

    Scaling ``a_i`` by ``s^i`` maps every root ``p`` of ``A`` to ``s p``; ``s`` is a constant
    for autograd (only the coefficients are differentiated).

    Args:
        a: (..., na + 1), ``a[..., 0] = 1``.
        rmax: largest allowed pole radius, in (0, 1).

    Returns:
        (clamped a, radii before clamping (...,)).
    """
    r = pole_radius(a)
    if a.shape[-1] == 1:
        return a, r
    s = torch.clamp(rmax / r.clamp_min(1e-300), max=1.0).to(a.dtype)  # (...,)
    powers = torch.arange(a.shape[-1], dtype=a.dtype, device=a.device)
    return a * s[..., None] ** powers, r


def iir_fft(u: Tensor, a: Tensor, pad: int) -> Tensor:
    """Zero-state all-pole filter ``A(z) y = u`` by FFT division over ``pad * T`` samples.

    Args:
        u: (B, K, T) inputs; a: (B, na + 1) denominators (``a[:, 0] = 1``), stable.
        pad: FFT length in multiples of T (>= 2).

    Returns:
        (B, K, T).
    """
    T = u.shape[-1]
    L = pad * T
    return torch.fft.irfft(torch.fft.rfft(u, L) / torch.fft.rfft(a, L)[:, None], L)[..., :T]


# --------------------------------------------------------------------------- features


@runtime_checkable
class FeatureNetwork(Protocol):
    """A network whose hidden sequence can feed the ARX head (``model.arx.features: lstm | tcn | transformer``).

    Contract (tests/test_models.py runs it over every member of
    :data:`metafx.models.FEATURE_NETWORKS`): ``features(x)`` maps ``(B, 1, T)`` to
    ``(B, feature_channels, T)``, causally (sample ``t`` depends on input samples up to ``t``)
    and from a zero state, and every parameter it uses gets a gradient.
    """

    feature_channels: int

    def features(self, x: Tensor) -> Tensor: ...


class Features(nn.Module):
    """Causal feature map ``Phi_theta``: x (N, T) -> (N, M, T), zero initial state per slice.

    Channels, in order: ``1`` (DC), ``x``; then, with learned features: ``n_point`` pointwise
    channels ``MLP(x)`` (1 -> hidden -> n_point, tanh; input gains log-spaced 1..100 with
    alternating sign so drives up to 40 dB are covered at initialization; with ``n_filter``
    the MLP also sees ``n_filter`` one-pole low-passes of x with meta-learned corners,
    initialized log-spaced over 100 Hz..6 kHz, half the hidden units then looking along a random
    direction of (x, lp_1(x), ..): ``tanh(g (x + c hp(x)))``, a filter before the
    nonlinearity such as a pre-emphasis into a clipper, is in reach of the basis), ``n_gate``
    gated copies ``x * sigmoid(2 MLP(log envelopes [, start indicators]))``, and the
    ``n_env`` log one-pole envelopes of ``|x|`` themselves (scaled by 1/4; their time
    constants are meta-learned, initialized log-spaced over 0.2..200 ms). With a ``trunk``
    network instead (:class:`FeatureNetwork`): ``n_trunk`` channels, a learned 1x1 projection
    of its hidden sequence (the network does the nonlinear work, the head the per-task fit).
    """

    def __init__(self, learned: bool, hidden: int = 32, n_point: int = 12, n_env: int = 6, n_gate: int = 8,
                 n_start: int = 0, trunk: nn.Module | None = None, n_trunk: int = 8, n_filter: int = 0):
        super().__init__()
        if trunk is not None and learned:
            raise ValueError("Features: a trunk network replaces the learned channels; pass learned=False with it")
        self.n_trunk = n_trunk if trunk is not None else 0
        if trunk is not None:
            if not isinstance(trunk, FeatureNetwork):
                raise TypeError(f"Features: {type(trunk).__name__} has no features() / feature_channels")
            self.trunk = trunk
            self.proj = nn.Conv1d(trunk.feature_channels, n_trunk, 1)
        self.n_point = n_point if learned else 0
        self.n_env = n_env if learned else 0
        self.n_gate = n_gate if learned and n_env else 0
        self.n_start = n_start if self.n_gate else 0
        self.n_filter = n_filter if self.n_point else 0
        if self.n_point:
            self.p1 = nn.Conv1d(1 + self.n_filter, hidden, 1)
            with torch.no_grad():
                g = torch.logspace(0, 2, hidden) * torch.where(torch.arange(hidden) % 2 == 0, 1.0, -1.0)
                d = torch.zeros(hidden, 1 + self.n_filter)  # each unit's unit direction over (x, lp_1, ..)
                d[:, 0] = 1.0  # x alone
                if self.n_filter:
                    # Every other pair of units (gains across the whole range, both signs) looks along a random
                    # direction, x's component kept > 0; the rest see x alone, as without filters, so a memoryless
                    # curve keeps its exact basis (measured: with every unit mixed, a cubic clipper's capture ESR
                    # rose from 1e-4 to 0.015).
                    v = torch.randn(hidden, 1 + self.n_filter)
                    v[:, 0] = v[:, 0].abs() + 0.5
                    mixed = (torch.arange(hidden) // 2) % 2 == 1
                    d[mixed] = v[mixed] / v[mixed].norm(dim=1, keepdim=True)
                self.p1.weight.copy_((g[:, None] * d)[:, :, None])
                self.p1.bias.uniform_(-1, 1)
            self.p2 = nn.Conv1d(hidden, self.n_point, 1)
        if self.n_filter:
            fc = torch.logspace(math.log10(FILTER_HZ[0]), math.log10(FILTER_HZ[1]), self.n_filter)
            alpha = torch.exp(-2 * math.pi * fc / SAMPLE_RATE)
            self.filt_logit = nn.Parameter(torch.log(alpha / (1 - alpha)))  # sigmoid -> pole in (0, 1)
        if self.n_env:
            taus = torch.logspace(math.log10(TAU_MS[0]), math.log10(TAU_MS[1]), self.n_env) * 1e-3 * SAMPLE_RATE
            alpha = torch.exp(-1 / taus)
            self.env_logit = nn.Parameter(torch.log(alpha / (1 - alpha)))  # sigmoid -> pole in (0, 1)
        if self.n_gate:
            self.g1 = nn.Conv1d(self.n_env + self.n_start, hidden, 1)
            self.g2 = nn.Conv1d(hidden, self.n_gate, 1)

    @property
    def channels(self) -> int:
        """M: number of output channels."""
        return 2 + self.n_point + self.n_gate + self.n_env + self.n_trunk

    def forward(self, x: Tensor) -> Tensor:
        """The feature channels of a batch of slices, each from a zero state.

        Args:
            x: slices, (N, T).

        Returns:
            (N, M, T), M = :attr:`channels`.
        """
        N, T = x.shape
        xi = x[:, None]  # (N, 1, T)
        chans = [torch.ones_like(xi), xi]
        if self.n_point:
            pin = xi
            if self.n_filter:
                pin = torch.cat([xi, onepole_fft(x, torch.sigmoid(self.filt_logit))], 1)  # (N, 1 + n_filter, T)
            chans.append(self.p2(torch.tanh(self.p1(pin))))  # (N, n_point, T)
        if self.n_env:
            env = onepole_fft(x.abs(), torch.sigmoid(self.env_logit))  # (N, n_env, T)
            le = torch.log10(env.clamp_min(0) + ENV_FLOOR) + 2  # about [-2, 2]
            if self.n_gate:
                gin = le
                if self.n_start:  # zero state is known: the gates may see the time since slice start
                    taus = torch.logspace(math.log10(START_TAU_MS[0]), math.log10(START_TAU_MS[1]), self.n_start,
                                          dtype=x.dtype, device=x.device) * 1e-3 * SAMPLE_RATE
                    st = torch.exp(-torch.arange(T, dtype=x.dtype, device=x.device)[None] / taus[:, None])
                    gin = torch.cat([le, st[None].expand(N, -1, -1)], 1)
                chans.append(xi * torch.sigmoid(2 * self.g2(torch.tanh(self.g1(gin)))))  # (N, n_gate, T)
            chans.append(0.25 * le)
        if self.n_trunk:
            chans.append(self.proj(self.trunk.features(xi)))  # (N, n_trunk, T)
        return torch.cat(chans, 1)  # (N, M, T)


# Candidate multipliers of the meta-learned ridge for the per-task selection (``cv_ridge``): from a
# hundredth (more data than the ridge was learned for) to a million (the head stays near the prior
# mean, the meta-learned "average effect", when the support cannot pin the coefficients down).
CV_RIDGE_SCALES = (1e-2, 1.0, 1e2, 1e4, 1e6)

# --------------------------------------------------------------------------- head


def ridge_solve(A: Tensor, b: Tensor) -> Tensor:
    """Solve ridged normal equations ``A x = b`` (symmetric positive definite), batched, differentiably.

    By Cholesky (half an LU's products), with an LU solve of each matrix alone where rounding
    makes one not positive definite. Why not one batched ``torch.linalg.solve``: on the CPU builds of
    torch (2.13, MKL) a batch of two or more float64 systems of ~200 unknowns or more fails inside
    MKL's LU as soon as torch runs on more than one thread (``Intel oneMKL ERROR: Parameter 6 was
    incorrect on entry to DLASWP``, then ``RuntimeError: Pivots given to lu_solve ...``): the ridge
    engine's per-slice fits of the universal study's head (4 x 364 x 364) stopped a meta-training at
    its first validation. A single matrix's LU does not fail.

    Args:
        A: (..., P, P), symmetric positive definite up to rounding.
        b: (..., P, R).

    Returns:
        x: (..., P, R), ``A``'s dtype.

    Raises:
        torch.linalg.LinAlgError: a matrix that is singular (not positive definite, and its LU fails too).
    """
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b, L)
    if bool((info != 0).any()):
        flat_A, flat_b = A.reshape(-1, *A.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        x = x.reshape(flat_b.shape).clone()
        for i in torch.nonzero(info.reshape(-1)).flatten().tolist():
            x[i] = torch.linalg.solve(flat_A[i], flat_b[i])
        x = x.reshape(b.shape)
    return x


def ridge_fit_arx(feats: Tensor, y: Tensor, nb: int, na: int, lam: Tensor, prior: Tensor,
                  ridge_scale: float = 1.0) -> Tensor:
    """Equation-error ridge fit of ARX heads on feature channels (the module docstring's normal equations).

    Channel 0 is the constant (one tap); every other channel gets ``nb`` lags; the measured past
    outputs supply the ``na`` AR regressors. Rows ``n >= max(nb - 1, na)`` of every slice.

    Args:
        feats: (B, K, M, L) features; y: (B, K, L) targets.
        nb, na: MA taps per channel, AR order.
        lam: (P,) relative ridges, ``P = 1 + (M - 1) nb + na``; prior: (P,) prior mean ``w0``.
        ridge_scale: multiplier of ``lam``.

    Returns:
        (B, P) coefficients ``(b_dc, vec b[1:], a_1..a_na)``, float64.

    Raises:
        ValueError: slices too short for the orders.
        torch.linalg.LinAlgError: singular normal equations (non-finite features).
    """
    B, K, M, L = feats.shape
    warm = max(nb - 1, na)  # rows whose lags all lie inside the slice
    if warm >= L:
        raise ValueError(f"MetaARX.fit: slices of {L} samples are too short for nb={nb}, na={na}")
    fd = feats.double()
    # The constant channel gets one tap: its lags are all 1 inside the rows (collinear, unidentified).
    cols = [fd[:, :, :1].transpose(2, 3),  # (B, K, L, 1)
            lagged(fd[:, :, 1:].reshape(B * K, M - 1, L), nb).reshape(B, K, L, (M - 1) * nb)]  # phi[m, n-j]
    if na:
        cols.append(-lagged(y.double().reshape(B * K, 1, L), na, start=1).reshape(B, K, L, na))  # -y[n-i]
    P = 1 + (M - 1) * nb + na
    A = torch.cat(cols, -1)[:, :, warm:].reshape(B, -1, P)  # (B, rows, P)
    t = y.double()[:, :, warm:].reshape(B, -1, 1)  # (B, rows, 1)
    G = A.transpose(1, 2) @ A  # (B, P, P)
    r = (A.transpose(1, 2) @ t)[..., 0]  # (B, P)
    D = torch.diagonal(G, dim1=1, dim2=2).mean(-1, keepdim=True) * (lam.double() * ridge_scale)[None]  # (B, P)
    r = r + D * prior.double()[None]
    return ridge_solve(G + torch.diag_embed(D), r[..., None])[..., 0]  # (B, P)


@dataclass
class ARXHead:
    """Fitted head of one task (or a batch of tasks: leading dimension B).

    Attributes:
        b: MA coefficients, (M, nb) or (B, M, nb).
        a: AR polynomial ``[1, a_1, ..., a_na]``, (na + 1,) or (B, na + 1).
        classical: True for a classical ARX head (:meth:`MetaARX.fit_classical`: the learned channels' b zero).
    """

    b: Tensor
    a: Tensor
    classical: bool = False


class MetaARX(nn.Module):
    """Meta-learned features + closed-form ARX head (see the module docstring for the math).

    Args:
        nb, na: MA taps per channel and AR order.
        features: "none" (channels [1, x]: classical ARX) or "learned".
        hidden, n_point, n_env, n_gate, n_start, n_filter: sizes of the learned feature map (:class:`Features`).
        ridge, ridge_a, ridge_feat: initial relative ridges of the b of [1, x], of the AR
            coefficients and of the learned channels' b (None = ``ridge``).
        per_coef_ridge: one meta-learned ridge per coefficient, else one for b and one for a.
        ridge_lr_scale: the log-ridges are ``log(init) + ridge_lr_scale * delta`` with a
            trained ``delta`` (zero at start): Adam then moves them ``ridge_lr_scale`` times
            faster than the other parameters (0 = fixed ridge).
        rmax: pole radius clamp; fft_pad: FFT length of the simulation in multiples of T.
        cosine_lr: read by :mod:`metafx.engines.ridge` (outer learning-rate annealing).
        cv_ridge: adaptation (:meth:`fit_selected`, what :mod:`metafx.engines.ridge` evaluates)
            multiplies the meta-learned ridge by the one of :data:`CV_RIDGE_SCALES` that predicts
            left-out support slices best; meta-training's fits are unchanged.
        cv_classical: with ``cv_ridge``, that cross-validation also scores classical ARX (the head on
            ``[1, x]`` alone, the learned channels' coefficients zero, the initial ridge and an identity prior:
            what :func:`metafx.evaluate.classical_arx` fits) and adapts with it where it predicts the left-out
            support slices better (:meth:`fit_selected`).

    Shape:
        forward: (B, 1, T) -> (B, 1, T) with the prior-mean head (pre-adaptation).
        fit: support (K, 1, L) x2 -> ARXHead; or a batch of tasks (B, K, 1, L) x2.
        predict: query (K, 1, T) [or (B, K, 1, T)] and a head -> same shape.
    """

    def __init__(self, nb: int = 13, na: int = 12, features: str = "none", hidden: int = 32, n_point: int = 12,
                 n_env: int = 6, n_gate: int = 8, n_start: int = 0, ridge: float = 1e-8, ridge_a: float = 1e-8,
                 ridge_feat: float | None = None, per_coef_ridge: bool = True, ridge_lr_scale: float = 16.0,
                 rmax: float = 0.999, fft_pad: int = 4, cosine_lr: bool = True, trunk: nn.Module | None = None,
                 n_trunk: int = 8, n_filter: int = 0, cv_ridge: bool = False, cv_classical: bool = False):
        super().__init__()
        if features not in ("none", "learned") and trunk is None:
            raise ValueError(f"MetaARX: features must be 'none' or 'learned', or a network's name with that network "
                             f"as trunk; got {features!r} and no trunk")
        if nb < 1 or na < 0:
            raise ValueError(f"MetaARX: need nb >= 1 and na >= 0, got nb={nb}, na={na}")
        self.nb, self.na, self.rmax, self.fft_pad = int(nb), int(na), float(rmax), int(fft_pad)
        self.features, self.cosine_lr, self.ridge_lr_scale = features, bool(cosine_lr), float(ridge_lr_scale)
        self.cv_ridge = bool(cv_ridge)
        self.cv_classical = bool(cv_classical)
        if self.cv_classical and not self.cv_ridge:
            raise ValueError("MetaARX: cv_classical is a candidate of the cross-validation; it needs cv_ridge=True")
        self.phi = Features(features == "learned", hidden, n_point, n_env, n_gate, n_start, trunk, n_trunk, n_filter)
        if per_coef_ridge:
            lb = torch.full((self.n_b,), math.log(ridge))  # (DC, x lags, learned channels' lags)
            lb[1 + nb:] = math.log(ridge if ridge_feat is None else ridge_feat)
            la = torch.full((na,), math.log(ridge_a))
        else:
            if ridge_feat is not None:
                raise ValueError("MetaARX: ridge_feat needs per_coef_ridge=True")
            lb, la = torch.tensor(math.log(ridge)), torch.tensor(math.log(ridge_a))
        # log-ridge = constant initial value + ridge_lr_scale * trained offset (see Args).
        self.register_buffer("log_ridge_b_init", lb)
        self.register_buffer("log_ridge_a_init", la)
        self.ridge_b_delta = nn.Parameter(torch.zeros_like(lb))
        self.ridge_a_delta = nn.Parameter(torch.zeros_like(la))
        w0 = torch.zeros(self.n_coef)
        w0[1] = 1.0  # b[x, 0] = 1: the prior head passes the input through
        self.prior = nn.Parameter(w0)  # the ridge's prior mean w0 = (b_dc, vec b[x, learned], a_1..a_na)

    @classmethod
    def from_config(cls, cfg: ARXConfig, trunk: nn.Module | None = None) -> "MetaARX":
        """Build from the ``model.arx`` section; ``trunk``: the network of ``features: lstm | tcn | transformer``.

        Raises:
            ValueError: ``cfg.features`` names a network and no ``trunk`` is given
                (:func:`metafx.models.build_model` builds it from that network's section).
        """
        return cls(nb=cfg.nb, na=cfg.na, features=cfg.features, hidden=cfg.hidden, n_point=cfg.n_point,
                   n_env=cfg.n_env, n_gate=cfg.n_gate, n_start=cfg.n_start, ridge=cfg.ridge, ridge_a=cfg.ridge_a,
                   ridge_feat=cfg.ridge_feat, per_coef_ridge=cfg.per_coef_ridge, ridge_lr_scale=cfg.ridge_lr_scale,
                   rmax=cfg.rmax, fft_pad=cfg.fft_pad, cosine_lr=cfg.cosine_lr, trunk=trunk, n_trunk=cfg.n_trunk,
                   n_filter=cfg.n_filter, cv_ridge=cfg.cv_ridge, cv_classical=cfg.cv_classical)

    # ---- properties

    @property
    def channels(self) -> int:
        """M: channels of the feature map."""
        return self.phi.channels

    @property
    def n_b(self) -> int:
        """MA coefficients fitted per task: one DC tap + nb taps of every other channel."""
        return 1 + (self.channels - 1) * self.nb

    @property
    def n_coef(self) -> int:
        """Coefficients fitted per task: 1 + (M - 1) nb + na."""
        return self.n_b + self.na

    def _head_from_vector(self, w: Tensor) -> ARXHead:
        """(B, P) coefficient vectors -> ARXHead b (B, M, nb) (DC lags >= 1 are 0), a (B, na + 1)."""
        B = w.shape[0]
        M, nb = self.channels, self.nb
        dc = F.pad(w[:, :1], (0, nb - 1))[:, None]  # (B, 1, nb)
        b = torch.cat([dc, w[:, 1:self.n_b].reshape(B, M - 1, nb)], 1)
        one = torch.ones(B, 1, dtype=w.dtype, device=w.device)
        return ARXHead(b=b, a=torch.cat([one, w[:, self.n_b:]], 1))

    def ridge_strengths(self) -> tuple[Tensor, Tensor]:
        """Relative ridges ``(lambda_b (n_b,) or (), lambda_a (na,) or ())`` = exp(log-ridge)."""
        s = self.ridge_lr_scale
        return (self.log_ridge_b_init + s * self.ridge_b_delta).exp(), (self.log_ridge_a_init + s * self.ridge_a_delta).exp()

    def fit_only_parameters(self) -> tuple[str, ...]:
        """Names of parameters that act only in :meth:`fit` (no gradient from ``forward``)."""
        return ("ridge_b_delta", "ridge_a_delta")

    def output_len(self, T: int) -> int:
        """One output sample per input sample."""
        return T

    # ---- features

    def feats(self, x: Tensor) -> Tensor:
        """Features of slices.

        Args:
            x: slices, (..., 1, T).

        Returns:
            (..., M, T).

        Raises:
            ValueError: ``x`` is not (..., 1, T).
        """
        lead, T = x.shape[:-2], x.shape[-1]
        if x.shape[-2] != 1:
            raise ValueError(f"MetaARX: expected slices (..., 1, T), got {tuple(x.shape)}")
        return self.phi(x.reshape(-1, T)).reshape(*lead, self.channels, T)

    # ---- closed-form fit

    def fit_features(self, feats: Tensor, y: Tensor, ridge_scale: float = 1.0) -> ARXHead:
        """Equation-error ridge fit from precomputed features (batched over tasks).

        Args:
            feats: support features, (B, K, M, L).
            y: support targets, (B, K, L).
            ridge_scale: multiplier of the meta-learned ridge (1 = as learned; :meth:`fit_selected`).

        Returns:
            ARXHead with b (B, M, nb), a (B, na + 1), in ``feats``' dtype.

        Raises:
            ValueError: slices too short for the orders.
            torch.linalg.LinAlgError: singular normal equations (cannot happen for a positive ridge
                and finite data; non-finite features make it possible).
        """
        lb, la = self.ridge_strengths()
        lam = torch.cat([lb.double().expand(self.n_b), la.double().expand(self.na)])  # (P,)
        w = ridge_fit_arx(feats, y, self.nb, self.na, lam, self.prior, ridge_scale)
        return self._head_from_vector(w.to(feats.dtype))

    def fit_classical(self, feats: Tensor, y: Tensor, ridge_scale: float = 1.0) -> ARXHead:
        """Classical ARX on the channels ``[1, x]`` of ``feats``, as a head of this model (the learned channels' b zero).

        The ridge is the initial one of ``[1, x]`` and of the AR coefficients (not meta-learned), the prior
        the identity: the head :func:`metafx.evaluate.classical_arx` fits on the same support, here a
        candidate of :meth:`fit_selected` (``cv_classical``) that runs through this model's
        :meth:`predict_features` (zero times a learned channel is zero).

        Args:
            feats: support features, (B, K, M, L) (only channels 0 and 1 are read).
            y: support targets, (B, K, L).
            ridge_scale: multiplier of that ridge.

        Returns:
            ARXHead with b (B, M, nb) (rows 2.. zero), a (B, na + 1), in ``feats``' dtype.
        """
        nb, na = self.nb, self.na
        lb = self.log_ridge_b_init.double().exp().expand(self.n_b)[: 1 + nb]
        lam = torch.cat([lb, self.log_ridge_a_init.double().exp().expand(na)])  # (1 + nb + na,)
        prior = torch.zeros(1 + nb + na, dtype=torch.float64, device=feats.device)
        prior[1] = 1.0  # b[x, 0] = 1: the identity, an untrained classical ARX's prior mean
        wc = ridge_fit_arx(feats[:, :, :2], y, nb, na, lam, prior, ridge_scale)  # (B, 1 + nb + na)
        w = wc.new_zeros(wc.shape[0], self.n_coef)
        w[:, : 1 + nb] = wc[:, : 1 + nb]
        w[:, self.n_b:] = wc[:, 1 + nb:]
        return self._head_from_vector(w.to(feats.dtype))

    def fit(self, support_x: Tensor, support_y: Tensor) -> ARXHead:
        """Fit the head of one task (or a batch of tasks) on its support slices.

        Args:
            support_x: dry slices, (K, 1, L) or (B, K, 1, L).
            support_y: wet slices, same shape.

        Returns:
            ARXHead: b (M, nb), a (na + 1,) for one task; with a leading B for a batch.
        """
        single = support_x.dim() == 3
        sx, sy = (support_x[None], support_y[None]) if single else (support_x, support_y)
        if sx.shape != sy.shape or sx.dim() != 4 or sx.shape[2] != 1:
            raise ValueError(f"MetaARX.fit: support_x {tuple(support_x.shape)} and support_y "
                             f"{tuple(support_y.shape)} must both be (K, 1, L) or (B, K, 1, L)")
        head = self.fit_features(self.feats(sx), sy[:, :, 0])
        return ARXHead(head.b[0], head.a[0]) if single else head

    @torch.no_grad()
    def fit_selected(self, support_x: Tensor, support_y: Tensor, scales: tuple[float, ...] = CV_RIDGE_SCALES
                     ) -> tuple[ARXHead, float]:
        """Fit one task's head with the ridge multiplier chosen on its support by leave-one-slice-out CV.

        The meta-learned ridge is one value for every task of the meta-training distribution; a
        task far from it (another family, a support that does not cover the query's level) can need
        much more shrinkage towards the prior mean, or much less. For each multiplier, K fits that
        each leave one support slice out simulate that slice from a zero state (as the query is
        predicted); the multiplier with the smallest pooled ESR over the left-out slices is refitted
        on every slice. With ``cv_classical``, classical ARX (:meth:`fit_classical`) at each multiplier
        of its own ridge is a candidate too, kept only where it is strictly better (measured on the
        universal study's validation episodes, 40-step model: the learned head's ESR was 0.47 on the
        limiter against classical ARX's 0.15, 1.1 against 0.39 on the tube clipper, while the learned
        head wins on the cubic curve and the ladders; benchmarks/arx_selection.md). A single candidate is used as it is; a
        support of one slice (nothing to leave out) fits with the meta-learned ridge, as :meth:`fit` does.

        Args:
            support_x, support_y: one task's support slices, (K, 1, L) each.
            scales: candidate multipliers of the meta-learned ridge.

        Returns:
            ``(head (b (M, nb), a (na + 1,); ``head.classical`` True where classical ARX won), chosen multiplier)``.

        Raises:
            ValueError: not (K, 1, L) slices of the same shape.
        """
        if support_x.shape != support_y.shape or support_x.dim() != 3 or support_x.shape[1] != 1:
            raise ValueError(f"MetaARX.fit_selected: support_x {tuple(support_x.shape)} and support_y "
                             f"{tuple(support_y.shape)} must both be (K, 1, L)")
        fs, y = self.feats(support_x), support_y[:, 0]  # (K, M, L), (K, L)
        K = fs.shape[0]
        best, best_err = (float(scales[0]) if len(scales) == 1 else 1.0), math.inf
        classical = False
        if K > 1 and len(scales) > 1:
            keep = torch.stack([torch.arange(K, device=fs.device) != k for k in range(K)])  # (K folds, K)
            f_tr = torch.stack([fs[m] for m in keep])  # (K, K - 1, M, L)
            y_tr = torch.stack([y[m] for m in keep])  # (K, K - 1, L)
            tgt = max(float(y.double().pow(2).sum()), 1e-30)
            # the learned head's candidates first: classical ARX must predict the left-out slices strictly better
            candidates = [(False, s) for s in scales]
            if self.cv_classical and self.channels > 2:
                candidates += [(True, s) for s in scales]
            for is_classical, scale in candidates:
                fitter = self.fit_classical if is_classical else self.fit_features
                heads = fitter(f_tr, y_tr, ridge_scale=scale)  # one head per left-out slice
                pred = self.predict_features(fs[:, None], heads)[:, 0]  # (K, L): slice k by fold k's head
                err = float((pred.double() - y.double()).pow(2).sum()) / tgt
                if math.isfinite(err) and err < best_err:
                    classical, best, best_err = is_classical, float(scale), err
        head = (self.fit_classical if classical else self.fit_features)(fs[None], y[None], ridge_scale=best)
        return ARXHead(head.b[0], head.a[0], classical=classical), best

    # ---- simulation

    def predict_features(self, feats: Tensor, head: ARXHead) -> Tensor:
        """Zero-state simulation of batched heads on precomputed features.

        Args:
            feats: query features, (B, K, M, T).
            head: one head per task, b (B, M, nb), a (B, na + 1).

        Returns:
            (B, K, T).
        """
        B, K, M, T = feats.shape
        nb = head.b.shape[-1]
        X = lagged(feats.reshape(B * K, M, T), nb).reshape(B, K, T, M, nb)
        u = torch.einsum("bktmn,bmn->bkt", X, head.b.to(feats.dtype))  # MA part, (B, K, T)
        if head.a.shape[-1] == 1:
            return u
        a, _ = stabilize(head.a.to(feats.dtype), self.rmax)
        return iir_fft(u, a, self.fft_pad)

    def predict(self, query_x: Tensor, head: ARXHead) -> Tensor:
        """Simulate a fitted head on query slices from a zero state.

        Args:
            query_x: (K, 1, T) with a single-task head, or (B, K, 1, T) with a batched head.
            head: from :meth:`fit`.

        Returns:
            (K, 1, T) or (B, K, 1, T).
        """
        single = query_x.dim() == 3
        qx = query_x[None] if single else query_x
        if head.b.dim() == 2:  # one head for every batch entry
            hb = ARXHead(head.b.expand(qx.shape[0], -1, -1), head.a.expand(qx.shape[0], -1))
        else:
            hb = head
        y = self.predict_features(self.feats(qx), hb)[:, :, None]  # (B, K, 1, T)
        return y[0] if single else y

    def prior_head(self) -> ARXHead:
        """The head at the prior mean w0 (what the ridge shrinks towards)."""
        h = self._head_from_vector(self.prior[None])
        return ARXHead(h.b[0], h.a[0])

    def forward(self, x: Tensor) -> Tensor:
        """Pre-adaptation prediction: the prior-mean head simulated on ``x``.

        Args:
            x: dry input, (B, 1, T).

        Returns:
            (B, 1, T).

        Raises:
            ValueError: ``x`` is not (B, 1, T).
        """
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"MetaARX: expected (B, 1, T), got {tuple(x.shape)}")
        return self.predict(x, self.prior_head())


__all__ = ["ARXHead", "FeatureNetwork", "Features", "MetaARX", "iir_fft", "lagged", "onepole_fft", "pole_radius", "ridge_fit_arx", "ridge_solve", "stabilize"]
