"""Adapting a meta-model to a capture's support, and the baselines fitted on the same seconds.

The ridge ARX head is fitted on features computed continuously over the whole support (as the
exported model runs them) with its strength chosen on the support by cross-validation; the
gradient methods run the engine's own inner loop and bake the adapted weights into a copy of the
network (:func:`adapted_network`), which :mod:`metafx.export` turns into a streaming module.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from metafx import metrics as M
from metafx.capture.errors import CaptureError
from metafx.capture.meta_model import MetaModel
from metafx.config import Config
from metafx.capture.cascade_units import (CASCADE_MAX_CRITERION, CASCADE_MIN_CRITERION, CASCADE_MIN_CV_ESR,
                                          CASCADE_TRIES, CASCADE_UNITS, Cascade, cascade_bank, fit_cascade)
from metafx.capture.dynamics_units import DYN_EXPLAINS, DYN_MAX_CRITERION, DYN_UNITS, dynamics_bank, fit_dynamics
from metafx.capture.tuned_units import TUNED_SEED, TUNED_UNITS, fit_prefilter, tuned_bank
from metafx.export import ARXStream, export_network
from metafx.wiener import (WIENER_MIN_EQUATIONS, WIENER_RIDGE, WIENER_UNITS, WienerBank, cascade_channels,
                           dynamics_channels, head_coefficients, make_bank, tuned_channels)

MAX_SUPPORT_SLICES = 64  # gradient engines: support slices per adaptation (memory and time)

def support_slices(x: np.ndarray, y: np.ndarray, n_support: int, L: int, max_k: int = MAX_SUPPORT_SLICES
                   ) -> tuple[Tensor, Tensor]:
    """Non-overlapping slices of ``L`` samples from the start of the support, (K, 1, L) each, K <= max_k."""
    K = min(n_support // L, max_k)
    sx = torch.from_numpy(np.ascontiguousarray(x[: K * L], dtype=np.float32)).reshape(K, 1, L)
    sy = torch.from_numpy(np.ascontiguousarray(y[: K * L], dtype=np.float32)).reshape(K, 1, L)
    return sx, sy


RIDGE_SCALES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # candidate multipliers of the meta-learned ridge
CV_SEGMENTS, CV_FOLDS = 8, 4  # the support's equations in 8 contiguous segments; fold k = segments k and k + 4


def _head_from(w: Tensor, M: int, nb: int, n_b: int) -> tuple[Tensor, Tensor]:
    b = torch.zeros(M, nb, dtype=torch.float64)
    b[0, 0] = w[0]
    b[1:] = w[1:n_b].reshape(M - 1, nb)
    return b, torch.cat([torch.ones(1, dtype=torch.float64), w[n_b:]])


def simulate_heads(phi: Tensor, heads: list[tuple[Tensor, Tensor]]) -> list[np.ndarray]:
    """Several heads on the same precomputed features from a zero state: FIR over the feature lags, then ``1 / A(z)``.

    The taps of every head are applied in one product (the features, hundreds of MB for seconds of
    a banked head, are read once, not once per head: the cross-validation simulates a head per
    ridge scale). Trailing channels whose taps after lag 0 are zero in every head (the Wiener bank's
    gain units, fitted at lag 0 only: 54 of a banked head's ~140 channels) get a product of their
    lag-0 row alone (a third fewer products for a banked head).

    Shape: phi (M, S), each head ``(b (M, nb), a (na + 1,))`` -> a list of (S,).
    """
    from scipy.signal import lfilter

    M, S = phi.shape
    nb = heads[0][0].shape[1]
    lagged = torch.stack([b[:, 1:] for b, _ in heads]).ne(0).any(2).any(0)  # (M,): a channel with a tap after lag 0
    t = int(torch.nonzero(lagged).max()) + 1 if bool(lagged.any()) else 0  # channels t.. are lag 0 only
    Z = torch.cat([b[:t].T for b, _ in heads]) @ phi[:t]  # (K nb, S): tap j of every channel, for every head
    Z0 = torch.stack([b[t:, 0] for b, _ in heads]) @ phi[t:] if t < M else None  # (K, S): the lag-0-only channels
    out = []
    for i, (_, a) in enumerate(heads):
        u = Z[i * nb].clone()
        if Z0 is not None:
            u += Z0[i]
        for j in range(1, nb):
            u[j:] += Z[i * nb + j, : S - j]
        out.append(lfilter([1.0], a.numpy(), u.numpy()) if a.numel() > 1 else u.numpy())
    return out


def simulate_head(phi: Tensor, b: Tensor, a: Tensor) -> np.ndarray:
    """One head on precomputed features from a zero state (:func:`simulate_heads`). Shape: phi (M, S) -> (S,)."""
    return simulate_heads(phi, [(b, a)])[0]


def lag_correlations(f: Tensor, s: int, e: int, nb: int, n_lag0: int = 0,
                     known: list[Tensor] | None = None, added: list[tuple[int, int]] | None = None) -> list[Tensor]:
    """The lag correlations ``B_0 = sum_{u=s}^{e-1} f[u] f[u]^T`` and ``B_d = sum_u f[u] f[u-d, :L]^T``, ``1 <= d < nb``,
    of :func:`normal_equations`.

    They are its costly part (``C L (e - s) nb`` products). A second fit whose channels are a first
    fit's with a few inserted (a capture's cascade and dynamics units) passes the first fit's
    correlations as ``known`` and the inserted rows as ``added``: only the inserted channels' rows and
    columns are computed (14 channels of ~130: about a seventh of the products).

    Args:
        f: the lagged channels (C, S), float64 (``phi[1:]``).
        s, e: the equations' sample range.
        nb: lags.
        n_lag0: trailing channels used at lag 0 only (not on the lagged side: ``L = C - n_lag0``).
        known: the correlations of ``f`` without the inserted channels over the same range: (C - n, C - n) at lag 0,
            (C - n, L - n_l) at the others (``n`` inserted rows, ``n_l`` of them before the lag-0-only ones).
        added: ``[(first, n), ..]``: rows ``first .. first + n - 1`` of ``f`` are inserted channels (blocks in
            ascending order, none straddling the first lag-0-only row).

    Returns:
        ``[B_0 (C, C), B_1 (C, L), .., B_{nb-1} (C, L)]``.

    Raises:
        ValueError: ``known`` without ``added`` or of another shape, or blocks that overlap or straddle.
    """
    C = f.shape[0]
    L = C - n_lag0
    fl = f[:L]
    if known is None:
        return [f[:, s:e] @ f[:, s:e].T] + [f[:, s:e] @ fl[:, s - d: e - d].T for d in range(1, nb)]
    if not added:
        raise ValueError("lag_correlations(known=...) needs added=[(first, n), ..]: the inserted channels")
    is_new = torch.zeros(C, dtype=torch.bool)
    last = -1
    for a, n in added:
        if not (a > last and a + n <= C and (a + n <= L or a >= L)):
            raise ValueError(f"lag_correlations: inserted rows {added} overlap, are out of order or straddle the "
                             f"lag-0-only channels ({C} channels, {L} lagged)")
        is_new[a:a + n] = True
        last = a + n - 1
    new = torch.nonzero(is_new).flatten()
    old = torch.nonzero(~is_new).flatten()  # the first fit's channels in the new order
    new_l, old_l = new[new < L], old[old < L]
    if len(known) != nb or tuple(known[0].shape) != (old.numel(), old.numel()) \
            or any(tuple(k.shape) != (old.numel(), old_l.numel()) for k in known[1:]):
        raise ValueError(f"lag_correlations: known correlations of shapes {[tuple(k.shape) for k in known]} do "
                         f"not fit {C} channels ({L} lagged, {nb} lags) with rows {added} inserted")
    fn = f[new]  # (n, S): the inserted channels
    out = []
    for d in range(nb):
        lagged = f if d == 0 else fl  # lag 0: every channel on the lagged side too
        cols_new = new if d == 0 else new_l
        B = torch.empty(C, lagged.shape[0], dtype=f.dtype)
        B[old[:, None], old if d == 0 else old_l] = known[d]
        B[new] = fn[:, s:e] @ lagged[:, s - d: e - d].T
        if cols_new.numel():
            B[:, cols_new] = f[:, s:e] @ f[cols_new, s - d: e - d].T
        out.append(B)
    return out


def normal_equations(phi: Tensor, y: Tensor, s: int, e: int, nb: int, na: int, n_lag0: int = 0,
                     corr: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(A^T A, A^T y)`` of the equations ``s <= t < e``, without building the regressors ``A``.

    ``A``'s row ``t`` is ``[1, phi[1:, t - k] for k < nb (channel-major, lag-minor), -y[t - k] for
    1 <= k <= na]``: the columns of :meth:`metafx.models.arx.MetaARX.fit_features`.

    Why: with ``M`` feature channels of ``nb`` lags each, ``A^T A`` costs ``(e - s) (M nb)^2``
    products, 5e10 for 3 s of support with a Wiener bank, seconds on one core. The lagged block
    of two lags ``k <= k'`` is a shifted lag-``d = k' - k`` correlation of the features,
    ``sum_{u=s-k}^{e-1-k} phi[u] phi[u-d]^T``: the ``nb`` correlations over ``[s, e)`` plus
    ``k`` boundary terms at each end give every block, ``nb`` times fewer products. The blocks
    with the DC column and the AR columns (``-y`` lags) are computed directly.

    With ``n_lag0`` the last ``n_lag0`` channels are used at lag 0 only (the Wiener bank's gain
    units): their columns of lags ``>= 1`` are left zero in ``G`` and ``r`` (the caller leaves them
    out of the solve), and the correlations at lags ``>= 1`` are computed against the other
    channels only.

    Args:
        phi: features (M, S), float64, channel 0 the constant.
        y: the wet (S,), float64.
        s, e: the equations' sample range, ``max(nb - 1, na) <= s < e <= S``.
        nb, na: MA taps per channel, AR order.
        n_lag0: trailing channels used at lag 0 only.
        corr: the lag correlations of ``phi[1:]`` over ``[s, e)`` (:func:`lag_correlations`), when already computed.

    Returns:
        ``(G (P, P), r (P,))``, ``P = 1 + (M - 1) nb + na``.
    """
    M = phi.shape[0]
    C = M - 1
    L = C - n_lag0  # the channels with every lag come first
    nF = C * nb
    P = 1 + nF + na
    f = phi[1:]  # (C, S): the lagged channels
    fl = f[:L]
    # the directly built columns: DC, then -y lags 1..na, (rows, 1 + na)
    D = torch.empty(e - s, 1 + na, dtype=phi.dtype)
    D[:, 0] = phi[0, s:e]
    for k in range(1, na + 1):
        D[:, k] = -y[s - k: e - k]
    yy = y[s:e]
    FF = torch.zeros(C, nb, C, nb, dtype=phi.dtype)  # [m, k, m', k']
    # B_d = sum_{u=s}^{e-1} f[u] f[u-d]^T; at d >= 1 the lagged side is a channel with every lag, (C, L)
    if corr is None:
        corr = lag_correlations(f, s, e, nb, n_lag0)
    FF[:, 0, :, 0] = corr[0]
    for d in range(1, nb):  # lag 0 against lag d
        FF[:, 0, :L, d] = corr[d]
        FF[:L, d, :, 0] = corr[d].T
    for k in range(1, nb):  # both lags >= 1: channels with every lag only
        for k2 in range(k, nb):
            d = k2 - k
            blk = corr[d][:L, :L].clone()  # u over [s-k, e-k) instead of [s, e)
            blk += fl[:, s - k: s] @ fl[:, s - k - d: s - d].T
            blk -= fl[:, e - k: e] @ fl[:, e - k - d: e - d].T
            FF[:L, k, :L, k2] = blk
            if k2 != k:
                FF[:L, k2, :L, k] = blk.T
    DF = torch.zeros(1 + na, C, nb, dtype=phi.dtype)
    DF[:, :, 0] = D.T @ f[:, s:e].T
    for k in range(1, nb):
        DF[:, :L, k] = D.T @ fl[:, s - k: e - k].T
    G = torch.empty(P, P, dtype=phi.dtype)
    fi = slice(1, 1 + nF)
    di = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + nF, P)])  # the direct columns' places
    dfl = DF.reshape(1 + na, nF)
    G[fi, fi] = FF.reshape(nF, nF)
    G[di[:, None], di] = D.T @ D
    G[di, fi] = dfl
    G[fi, di] = dfl.T
    r = torch.empty(P, dtype=phi.dtype)
    rf = torch.zeros(C, nb, dtype=phi.dtype)
    rf[:, 0] = f[:, s:e] @ yy
    for k in range(1, nb):
        rf[:L, k] = fl[:, s - k: e - k] @ yy
    r[fi] = rf.reshape(nF)
    r[di] = D.T @ yy
    return G, r


def bank_equations_per_coefficient(model: nn.Module, n_support: int, n_bank: int, n_gain: int = 0) -> float:
    """Equations of a support of ``n_support`` samples (after the ``max(nb - 1, na)`` warm-up) per
    coefficient of the head with ``n_bank`` Wiener bank channels, the last ``n_gain`` of them gain
    units (one coefficient each; the others ``nb``)."""
    return (n_support - max(model.nb - 1, model.na)) / (model.n_coef + head_coefficients(n_bank - n_gain, n_gain, model.nb))


def bank_offered(model: nn.Module, n_support: int, n_bank: int, bank_min_equations: float = WIENER_MIN_EQUATIONS,
                 n_gain: int = 0) -> bool:
    """Whether a support of ``n_support`` samples is long enough to offer ``n_bank`` Wiener bank channels (the last
    ``n_gain`` of them gain units) to the head.

    The rule of :func:`ridge_fit_continuous`: at least ``bank_min_equations`` equations per
    coefficient of the head with the bank (:func:`bank_equations_per_coefficient`).
    """
    return n_bank > 0 and bank_equations_per_coefficient(model, n_support, n_bank, n_gain) >= bank_min_equations


@dataclass(frozen=True)
class ContinuousFit:
    """The head :func:`ridge_fit_continuous` chose.

    Attributes:
        b: MA coefficients, (M, nb) float64 (the Wiener bank's rows, when given, are zero unless ``bank``).
        a: AR polynomial ``[1, a_1, ..., a_na]``, pole-clamped, float64.
        scale: the chosen multiplier of the meta-learned ridge.
        bank: True when the Wiener bank's channels are in the head.
        cv_esr: the pooled left-out ESR of the chosen candidate (NaN with a single candidate: no cross-validation).
        tuned: True when the bank's tuned units are in the head too (their rows of ``b`` are zero otherwise).
        correlations: each cross-validation segment's lag correlations of the features (:func:`lag_correlations`),
            for a second fit with channels added (``ridge_fit_continuous(known=...)``).
    """

    b: Tensor
    a: Tensor
    scale: float
    bank: bool
    cv_esr: float
    tuned: bool = False
    correlations: list[list[Tensor]] | None = field(default=None, repr=False, compare=False)


def ridge_fit_continuous(model: nn.Module, phi: Tensor, y: Tensor, scales: tuple[float, ...] = RIDGE_SCALES,
                         n_bank: int = 0, bank_ridge: float = WIENER_RIDGE,
                         bank_min_equations: float = WIENER_MIN_EQUATIONS, n_gain: int = 0,
                         n_tuned: int = 0, fitted_only: bool = False, known: list[list[Tensor]] | None = None,
                         added: list[tuple[int, int]] | None = None) -> ContinuousFit:
    """The equation-error ridge fit of :meth:`metafx.models.arx.MetaARX.fit_features` over one continuous stretch.

    The regressors, the meta-learned per-coefficient ridge and the prior mean of the meta-trained
    fit, with every sample ``n >= max(nb - 1, na)`` of the support as an equation (features computed
    continuously, ``phi`` from :meth:`ARXStream.features`), in float64 normal equations
    (:func:`normal_equations`).

    The ridge's strength is chosen on the support itself: the meta-learned relative ridge was
    learned for ``k_support`` slices, and it stays relative to the mean Gram diagonal, so with the
    seconds of a capture the prior would keep the same weight against far more data (a Bayesian
    prior's weight falls as data accumulates). So the ridge is multiplied by each of ``scales``
    (1 = as meta-learned); for each, four fits that leave out one fold of the equations (two of
    eight contiguous segments) are simulated from a zero state over the support, and the scale
    with the smallest pooled simulation ESR on the left-out folds is refitted on every equation.

    With ``n_bank`` Wiener bank channels (:mod:`metafx.wiener`, the last ``n_bank`` rows of
    ``phi``), the same cross-validation also decides whether they enter the head: every scale is
    tried without them (the model's own channels, as with ``n_bank = 0``) and with them (their
    coefficients under a relative ridge ``bank_ridge``, prior mean 0), and the candidate with the
    smallest left-out ESR wins. The normal equations are accumulated once, with the bank; the
    fits without it use their sub-block. The bank is offered only where the support holds
    ``bank_min_equations`` equations per coefficient of the head with it (below that, the
    cross-validation picks it where it hurts as often as where it helps: metafx/wiener.py). The
    bank's last ``n_gain`` channels are gain units, fitted at lag 0 only (their other lags' rows
    of ``b`` are zero).

    Args:
        model: the :class:`metafx.models.arx.MetaARX`.
        phi: features of the support, (M, S), float64: the model's channels, then ``n_bank`` bank channels.
        y: the aligned wet of the support, (S,), float64.
        scales: candidate multipliers of the meta-learned ridge.
        n_bank: bank channels at the end of ``phi`` (0: none).
        bank_ridge: their relative ridge.
        bank_min_equations: equations per coefficient below which the bank is not offered.
        n_gain: of the ``n_bank`` channels, the last ``n_gain`` are gain units (lag 0 only).
        n_tuned: of the ``n_bank`` channels, the ``n_tuned`` before the gain units are a capture's tuned units
            (:mod:`metafx.capture.tuned_units`): the bank is then also tried without them (a third candidate), so
            units that do not help cannot cost the bank.
        fitted_only: cross-validate only the bank with its ``n_tuned`` fitted units (every scale): a second
            cross-validation after one without some of them (the folds are the same, so the left-out ESRs compare).
        known: a first fit's :attr:`ContinuousFit.correlations` over the same support, whose features were these
            without the rows ``added``: only the added channels' correlations are computed.
        added: ``[(first, n), ..]``: rows ``first .. first + n - 1`` of ``phi`` are channels added since ``known``.

    Returns:
        The :class:`ContinuousFit`.

    Raises:
        CaptureError: fewer equations than coefficients, or singular normal equations.
        ValueError: ``known`` that does not fit (another support, or ``added`` missing or wrong).
    """
    from metafx.models.arx import ridge_solve, stabilize

    M, S = phi.shape
    nb, na = model.nb, model.na
    warm = max(nb - 1, na)
    n_b = model.n_b + n_bank * nb  # MA coefficients with the bank: its rows follow the model's
    P = n_b + na
    if S - warm < 2 * model.n_coef:
        raise CaptureError(f"the support holds {S} samples, too few for the {model.n_coef} coefficients of the model's "
                           f"head: raise --support-seconds")
    edges = np.linspace(warm, S, CV_SEGMENTS + 1).round().astype(int)
    Gs = torch.zeros(CV_SEGMENTS, P, P, dtype=torch.float64)
    rs = torch.zeros(CV_SEGMENTS, P, dtype=torch.float64)
    if known is not None and (len(known) != CV_SEGMENTS or added is None):
        raise ValueError(f"ridge_fit_continuous(known=...) needs {CV_SEGMENTS} segments' correlations and added=")
    correlations = []
    for g in range(CV_SEGMENTS):
        s, e = int(edges[g]), int(edges[g + 1])
        corr = lag_correlations(phi[1:], s, e, nb, n_gain, None if known is None else known[g],
                                None if added is None else [(a - 1, n) for a, n in added])
        Gs[g], rs[g] = normal_equations(phi, y, s, e, nb, na, n_gain, corr)
        correlations.append(corr)
    G, r = Gs.sum(0), rs.sum(0)
    with torch.no_grad():
        lb, la = model.ridge_strengths()
        lam = torch.cat([lb.double().expand(model.n_b), torch.full((n_bank * nb,), float(bank_ridge), dtype=torch.float64),
                         la.double().expand(na)])
        p0 = model.prior.detach().double()
        prior = torch.cat([p0[: model.n_b], torch.zeros(n_bank * nb, dtype=torch.float64), p0[model.n_b:]])
    # the coefficients of each candidate model: without the bank, the model's MA block and the AR part
    without = torch.cat([torch.arange(model.n_b), torch.arange(n_b, P)])
    # with the bank: every column but the gain units' lags >= 1 (channel c >= 1, lag k: column 1 + (c - 1) nb + k)
    keep = torch.ones(P, dtype=torch.bool)
    if n_gain:
        keep[1 + (M - 1 - n_gain) * nb: 1 + (M - 1) * nb] = (torch.arange(n_gain * nb) % nb) == 0
    # (bank in the head, tuned units in the head, the candidate's columns)
    variants = [(False, False, without)] + ([(True, n_tuned > 0, torch.nonzero(keep).flatten())]
                                            if bank_offered(model, S, n_bank, bank_min_equations, n_gain) else [])
    if n_tuned and len(variants) > 1:  # the bank without its tuned units (their columns: before the gain units')
        plain = keep.clone()
        lo = 1 + (M - 1 - n_gain - n_tuned) * nb
        plain[lo: lo + n_tuned * nb] = False
        variants.insert(1, (True, False, torch.nonzero(plain).flatten()))
    if fitted_only:
        if not (n_tuned and len(variants) > 1):
            raise ValueError("ridge_fit_continuous(fitted_only=True) needs an offered bank with fitted units")
        variants = variants[-1:]

    def solve_all(Gm: Tensor, rm: Tensor, idx: Tensor, at: tuple[float, ...]) -> list[tuple[Tensor, Tensor]]:
        """The heads at each ridge scale of ``at``: the candidate's sub-system is taken out once for all of them.

        (One solve per scale, by :func:`metafx.models.arx.ridge_solve`: Cholesky, an LU where rounding makes the
        ridged normal equations not positive definite.)
        """
        Gi, ri, pi = Gm[idx][:, idx], rm[idx], prior[idx]
        base = torch.diagonal(Gi).mean() * lam[idx]
        heads = []
        for scale in at:
            D = base * scale
            try:
                Ai, bi = Gi + torch.diag(D), ri + D * pi
                wi = ridge_solve(Ai, bi[:, None])[:, 0]
            except torch.linalg.LinAlgError as e:
                raise CaptureError(f"the ridge fit of the support is singular ({e}): the support may be silent or "
                                   f"constant; record the whole probe") from e
            w = torch.zeros(P, dtype=torch.float64)
            w[idx] = wi
            b, a = _head_from(w, M, nb, n_b)
            if na:
                a = stabilize(a[None], model.rmax)[0][0]
            heads.append((b, a))
        return heads

    yn = y.numpy()
    best, best_err = (variants[0], scales[0]), math.inf
    several = len(variants) * len(scales) > 1  # more than one candidate head: cross-validate
    if several:
        folds = [[k, k + CV_FOLDS] for k in range(CV_FOLDS)]
        left_in = [(G - Gs[segs].sum(0), r - rs[segs].sum(0)) for segs in folds]  # each fold's equations, once
        cv: dict[tuple[int, float], float] = {}  # (variant, scale) -> left-out ESR
        for vi, (v, _, idx) in enumerate(variants):  # every scale of a variant simulated together
            err, tgt = np.zeros(len(scales)), 0.0
            m = M if v else M - n_bank  # without the bank its rows of b are zero: leave them out
            for segs, (Gk, rk) in zip(folds, left_in):
                heads = solve_all(Gk, rk, idx, scales)
                stop = int(edges[max(segs) + 1])  # a zero-state simulation up to the last left-out sample
                sims = simulate_heads(phi[:m, :stop], [(b[:m], a) for b, a in heads])
                for g in segs:
                    lo, hi = int(edges[g]), int(edges[g + 1])
                    err += [float(np.sum((yn[lo:hi] - sim[lo:hi]) ** 2)) for sim in sims]
                    tgt += float(np.sum(yn[lo:hi] ** 2))
            for scale, e in zip(scales, err):
                cv[(vi, scale)] = e / (tgt + 1e-12) if np.isfinite(e) else math.inf
        for vi, var in enumerate(variants):  # in the candidates' order: the first of equals wins, as before
            for scale in scales:
                if cv[(vi, scale)] < best_err:
                    best, best_err = (var, scale), cv[(vi, scale)]
    (with_bank, tuned, idx), scale = best
    b, a = solve_all(G, r, idx, (scale,))[0]
    return ContinuousFit(b, a, float(scale), with_bank, float(best_err) if several else math.nan, tuned,
                         correlations)


def _found(search: Callable[[], Any], max_criterion: float) -> Any:
    """A unit search's result, or None where its rows were degenerate (a support silent where it looked) or its
    criterion ends above ``max_criterion`` (it found too little to be worth a second cross-validation)."""
    try:
        res = search()
    except np.linalg.LinAlgError:
        return None
    return None if res.criterion > max_criterion else res


def adapt_arx(model: nn.Module, dry: np.ndarray, wet: np.ndarray, n_support: int, sr: int, latency: int,
              cfg: Config | None = None, fit: str = "continuous", wiener_units: int = WIENER_UNITS,
              bank_min_equations: float = WIENER_MIN_EQUATIONS, tuned_units: bool = True,
              cascade_units: bool = True, dynamics_units: bool = True,
              classical: bool | ARXStream = True, cascade_tries: int = CASCADE_TRIES) -> ARXStream:
    """Adapt a :class:`metafx.models.arx.MetaARX` to the support and return its streaming export.

    Args:
        model: the meta-model (or a classical ARX with ``features: none``).
        dry, wet: the aligned pair at the model's rate.
        n_support: support samples (from the start).
        sr, latency: recorded on the export.
        cfg: the study (``maml`` section) for ``fit="slices"``.
        fit: ``"continuous"`` (:func:`ridge_fit_continuous`, the default) or ``"slices"`` (the
            ridge engine's fit on the support slices from zero state, as in meta-training).
        wiener_units: curve units of the Wiener bank (:mod:`metafx.wiener`, with its gain units)
            offered to a continuous fit, kept only where the support's cross-validation prefers them
            (0: no bank offered).
        bank_min_equations: see :func:`ridge_fit_continuous`.
        tuned_units: where the bank is offered, add the units of a pre-filter fitted to the support
            (:mod:`metafx.capture.tuned_units`); the cross-validation keeps the bank with them, without them, or
            neither.
        cascade_units: with the tuned units, where their criterion is above
            :data:`metafx.capture.cascade_units.CASCADE_MIN_CRITERION` and the cross-validated head without a
            cascade leaves more than :data:`metafx.capture.cascade_units.CASCADE_MIN_CV_ESR` (and the support is
            long enough for the bank with both), also fit cascade units (:mod:`metafx.capture.cascade_units`) and
            cross-validate again with them: the head with the smaller left-out ESR is kept.
        dynamics_units: likewise (the same rule, a bank with gain units), fit dynamics units
            (:mod:`metafx.capture.dynamics_units`); they enter that second cross-validation with the cascade units.
        classical: with a continuous fit of a model with learned channels, classical ARX (:func:`classical_arx_model`:
            its own orders and ridge, on ``[1, x]``) is a candidate too, cross-validated on the same segments of the
            support (:func:`ridge_fit_continuous` over ``[1, x]``), and returned (its own stream) where its left-out
            ESR is the smaller. A linear device (an EQ, a linear filter) is fitted by it to float64 rounding, where
            the meta-model's head leaves a little of the learned channels it fits beside ``x`` (the Moog VCF and the
            EQ left out of meta-training: 2.5e-7 and 6.7e-7 against classical ARX's 1.8e-11 and 1.5e-9,
            benchmarks/universal_capture.md); on a nonlinear device it loses by orders of magnitude. (The segments
            start after ``max(nb - 1, na)`` samples of each model: the same for the shipped model's (8, 12) and
            classical ARX's (13, 12), a few samples apart otherwise.) An :class:`ARXStream` from
            :func:`classical_arx_fit` on the same support is that candidate, already fitted (a capture fits it once,
            for this choice and for its ``arx`` baseline); False: no classical candidate.
        cascade_tries: searches for the cascade units (:data:`metafx.capture.cascade_units.CASCADE_TRIES`), each on
            other rows of the support; every cascade found is cross-validated (with the dynamics units, where those
            were found) and the head with the smallest left-out ESR of all is kept.

    Returns:
        The :class:`ARXStream` (eager; :func:`metafx.export.script` it to save), with the
        attributes ``ridge_scale`` (the chosen multiplier), ``bank_offered`` (whether the support
        was long enough to offer the bank), ``n_bank`` (bank channels kept: 0, or the bank's
        curve, tuned, cascade and gain units, ``n_curve``, ``n_aa``, ``n_cas`` and ``n_gain``), ``prefilter``
        (the fitted :class:`metafx.capture.tuned_units.PreFilter`, or None where none was fitted or kept),
        ``cascade`` (the fitted :class:`metafx.capture.cascade_units.Cascade`, or None likewise), ``dynamics``
        (the fitted :class:`metafx.capture.dynamics_units.Dynamics`, or None likewise; ``n_dyn`` units) and
        ``classical_arx`` (True where classical ARX won: the stream is then classical ARX's, on ``[1, x]``) and
        ``cascade_tries`` (one ``{"seed", "criterion", "cv_esr"}`` per search: the criterion reached, None where the
        search found too little; the cross-validated ESR of the head with that cascade, None where it was not
        cross-validated; empty where none ran).

    Raises:
        ValueError: ``cascade_tries`` < 1, or a ``fit`` other than ``"continuous"`` or ``"slices"``.
    """
    if cascade_tries < 1:
        raise ValueError(f"cascade_tries must be >= 1, got {cascade_tries}")
    support = torch.from_numpy(np.ascontiguousarray(dry[:n_support], dtype=np.float32))
    tries: list[dict[str, Any]] = []

    def build(bank: WienerBank | None = None) -> ARXStream:
        return ARXStream(model, sample_rate=sr, latency_samples=latency, support=support, bank=bank)

    if fit == "slices":
        if cfg is None:
            raise ValueError("adapt_arx(fit='slices') needs the study config")
        from metafx.models.arx import stabilize

        sx, sy = support_slices(dry, wet, n_support, cfg.maml.slice_len, max_k=10**9)
        with torch.no_grad():
            head = model.fit(sx, sy)
        a = stabilize(head.a.double()[None], model.rmax)[0][0] if model.na else head.a.double()
        stream = build()
        stream.set_head(head.b.double(), a)
        return stream
    if fit != "continuous":
        raise ValueError(f"unknown ARX fit {fit!r}; use 'continuous' or 'slices'")
    # the bank's channels are computed only where the fit may keep them
    bank = make_bank(wiener_units, sample_rate=sr) if wiener_units > 0 else None
    prefilter = None
    untuned = bank  # the bank without tuned units (the cross-validation may keep it so)
    cascade = dynamics = None
    if bank is None or not bank.n_grid_gains:  # dynamics units join a bank with gain units
        dynamics_units = False
    if bank is not None and tuned_units:  # the tuned units count in the offer rule
        if not bank_offered(model, n_support, bank.n_units + TUNED_UNITS, bank_min_equations, bank.n_gains):
            tuned_units = False
        if not bank_offered(model, n_support, bank.n_units + TUNED_UNITS + CASCADE_UNITS, bank_min_equations,
                            bank.n_gains):
            cascade_units = False
        extra = CASCADE_UNITS if cascade_units else 0
        if not bank_offered(model, n_support, bank.n_units + TUNED_UNITS + extra + DYN_UNITS, bank_min_equations,
                            bank.n_gains + DYN_UNITS):
            dynamics_units = False
    if bank is not None and not bank_offered(model, n_support, bank.n_units, bank_min_equations, bank.n_gains):
        bank = None
    xs = torch.from_numpy(np.ascontiguousarray(dry[:n_support], dtype=np.float64))
    ys = torch.from_numpy(np.ascontiguousarray(wet[:n_support], dtype=np.float64))
    with torch.no_grad():
        offered = build(bank)
        phi = offered.features(xs)
        if bank is not None and tuned_units:
            try:  # the search sees the model's own channels (the rows before the bank's)
                prefilter = fit_prefilter(xs.numpy(), ys.numpy(), phi[: offered.channels - offered.n_bank].numpy(),
                                          model.nb, model.na, sr)
            except np.linalg.LinAlgError:  # degenerate rows (a support silent where the search looked): no units
                prefilter = None
            if prefilter is not None:  # the tuned units' channels go before the gain units (the stream's order)
                bank = tuned_bank(bank, prefilter, sr)
                lo = offered.channels - offered.n_gain
                tuned = torch.from_numpy(tuned_channels(bank, xs.numpy()))
                phi = torch.cat([phi[:lo], tuned, phi[lo:]])
                offered = build(bank)
        res = ridge_fit_continuous(model, phi, ys, n_bank=offered.n_bank, bank_min_equations=bank_min_equations,
                                   n_gain=offered.n_gain, n_tuned=offered.n_aa)
        if ((cascade_units or dynamics_units) and prefilter is not None and prefilter.criterion > CASCADE_MIN_CRITERION
                and math.isfinite(res.cv_esr) and res.cv_esr > CASCADE_MIN_CV_ESR):
            own = offered.channels - offered.n_bank  # the searches see the model's channels and the tuned units
            span = torch.cat([phi[:own], tuned]).numpy()
            if dynamics_units:
                dynamics = _found(lambda: fit_dynamics(xs.numpy(), ys.numpy(), span, model.nb, model.na, sr),
                                  DYN_MAX_CRITERION)
            bank_u, kept_dyn = bank, None  # the bank with the tuned units; the dynamics units where a candidate won
            found: list[tuple[Cascade | None, dict[str, Any] | None]] = []  # each cascade found, with its try's record
            if cascade_units and (dynamics is None or dynamics.criterion > DYN_EXPLAINS):  # not where they explain
                for k in range(cascade_tries):  # each try searches on other rows of the support
                    c = _found(lambda k=k: fit_cascade(xs.numpy(), ys.numpy(), span, model.nb, model.na, sr, prefilter,
                                                       seed=TUNED_SEED + k), CASCADE_MAX_CRITERION)
                    tries.append({"seed": TUNED_SEED + k, "criterion": None if c is None else c.criterion,
                                  "cv_esr": None})
                    if c is not None:
                        found.append((c, tries[-1]))
            first = res  # the fit without cascade or dynamics units, whose correlations the candidates extend
            # none found: the dynamics units alone, where they were found
            for cas, record in found or [(None, None)]:
                if cas is None and dynamics is None:
                    continue
                bank_c, phi_c, added = bank_u, phi, []  # a candidate of the cross-validation beside the first's
                if cas is not None:  # after the tuned units, before the gain units
                    bank_c = cascade_bank(bank_c, cas, sr)
                    at = lo + bank_c.n_aa
                    phi_c = torch.cat([phi_c[:at], torch.from_numpy(cascade_channels(bank_c, xs.numpy())), phi_c[at:]])
                    added.append((at, bank_c.n_cascade))
                if dynamics is not None:  # after the grid's gain units, at lag 0 as they are
                    bank_c = dynamics_bank(bank_c, dynamics, sr)
                    added.append((phi_c.shape[0], bank_c.n_dynamics))
                    phi_c = torch.cat([phi_c, torch.from_numpy(dynamics_channels(bank_c, xs.numpy()))])
                offered_c = build(bank_c)
                # only the new candidate (the others were cross-validated above, on the same folds)
                res_c = ridge_fit_continuous(model, phi_c, ys, n_bank=offered_c.n_bank, n_gain=offered_c.n_gain,
                                             bank_min_equations=bank_min_equations,
                                             n_tuned=offered_c.n_aa + offered_c.n_cas, fitted_only=True,
                                             known=first.correlations, added=added)
                if record is not None:
                    record["cv_esr"] = res_c.cv_esr
                if res_c.cv_esr < res.cv_esr:  # the same folds: the candidates' left-out ESRs compare
                    bank, offered, res, cascade, kept_dyn = bank_c, offered_c, res_c, cas, dynamics
            dynamics = kept_dyn
    stream: ARXStream | None = None
    if classical is not False and int(model.channels) > 2 and math.isfinite(res.cv_esr):
        c_stream = classical if isinstance(classical, ARXStream) else classical_arx_fit(dry, wet, n_support, sr, latency)
        if c_stream.cv_esr < res.cv_esr:  # the same segments: the left-out ESRs compare
            stream = c_stream
    if stream is None:
        b = res.b
        n_fitted = offered.n_aa + offered.n_cas
        if res.bank and n_fitted and not res.tuned:  # the bank kept without its fitted units: a stream without them
            # (never with dynamics units: they are kept only by the second cross-validation, with the fitted units)
            lo = offered.channels - offered.n_gain - n_fitted
            b = torch.cat([b[:lo], b[lo + n_fitted:]])
            stream = build(untuned)
        else:
            stream = offered if res.bank or bank is None else build()  # the bank left out: a stream without it
        stream.set_head(b[: stream.channels], res.a)
        stream.ridge_scale = res.scale  # recorded in results.json (an attribute of the export module too)
        stream.cv_esr = res.cv_esr
        stream.classical_arx = False
    stream.bank_offered = bank is not None
    stream.prefilter = prefilter if stream.n_aa else None  # classical ARX's stream has no bank: None
    stream.cascade = cascade if stream.n_cas else None
    stream.dynamics = dynamics if stream.n_dyn else None
    stream.cascade_tries = tries
    return stream


def classical_arx_fit(dry: np.ndarray, wet: np.ndarray, n_support: int, sr: int, latency: int = 0) -> ARXStream:
    """Classical ARX (:func:`classical_arx_model`) fitted to the support by :func:`ridge_fit_continuous` over ``[1, x]``.

    Args:
        dry, wet: the aligned pair (T,) at the rate ``sr``; the first ``n_support`` samples are fitted.
        sr, latency: recorded on the export.

    Returns:
        Its :class:`ARXStream` with the head set and the attributes ``ridge_scale``, ``cv_esr`` (the
        cross-validated left-out ESR :func:`adapt_arx` compares) and ``classical_arx`` (True).
    """
    xs = torch.from_numpy(np.ascontiguousarray(dry[:n_support], dtype=np.float64))
    ys = torch.from_numpy(np.ascontiguousarray(wet[:n_support], dtype=np.float64))
    c_model = classical_arx_model()
    stream = ARXStream(c_model, sample_rate=sr, latency_samples=latency)
    with torch.no_grad():
        res = ridge_fit_continuous(c_model, stream.features(xs), ys)
    stream.set_head(res.b, res.a)
    stream.ridge_scale = res.scale
    stream.cv_esr = res.cv_esr
    stream.classical_arx = True
    return stream


def adapted_network(mm: MetaModel, sx: Tensor, sy: Tensor) -> tuple[nn.Module, Tensor | None]:
    """The network of a gradient meta-model with its adapted weights baked in, and the adapted context.

    The same adaptation as the engine's ``adapt`` (first order, the config's inner steps and
    learning rate): :func:`metafx.engines.gradient.inner_loop` for a
    :class:`~metafx.engines.gradient.MetaLearner` (ANIL, CAVIA, the encoder, stabilized MAML),
    :func:`metafx.engines.maml.adapt_params` for a bare model (plain MAML, joint).

    Returns:
        ``(network, context or None)``; the network is a copy, the learner is not modified.
    """
    from metafx.engines.gradient import MetaLearner, inner_loop
    from metafx.engines.maml import adapt_params

    lrn, mc = mm.learner, mm.cfg.maml
    buffers = dict(lrn.named_buffers())
    if isinstance(lrn, MetaLearner):
        names = set(lrn.adapted_names())
        params = {k: v.detach().requires_grad_(k[4:] in names if k.startswith("net.") else False)
                  for k, v in lrn.named_parameters()}
        with torch.enable_grad():
            net_p, ctx, _ = inner_loop(lrn, params, buffers, sx, sy, mc, first_order=True)
        net = copy.deepcopy(lrn.net)
        net.load_state_dict({**net.state_dict(), **{k: v.detach() for k, v in net_p.items()}})
        return net, None if ctx is None else ctx.detach()
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in lrn.named_parameters()}
    with torch.enable_grad():
        fast = adapt_params(lrn, params, buffers, sx, sy, mc, first_order=True)
    net = copy.deepcopy(lrn)
    net.load_state_dict({**net.state_dict(), **{k: v.detach() for k, v in fast.items()}})
    return net, None


def adapt_and_export(mm: MetaModel, dry: np.ndarray, wet: np.ndarray, n_support: int, sr: int, latency: int,
                     ridge_fit: str = "continuous", wiener_units: int = WIENER_UNITS,
                     classical: bool | ARXStream = True, cascade_tries: int = CASCADE_TRIES) -> nn.Module:
    """Adapt ``mm`` to the support of an aligned pair; return the (eager) export module of the adapted model.

    ``ridge_fit``, ``wiener_units``, ``classical`` and ``cascade_tries`` apply to ARX meta-models
    (:func:`adapt_arx`); the gradient methods ignore them.
    """
    cfg = mm.cfg
    if cfg.model.arch == "arx":
        return adapt_arx(mm.learner, dry, wet, n_support, sr, latency, cfg, fit=ridge_fit, wiener_units=wiener_units,
                         classical=classical, cascade_tries=cascade_tries)
    sx, sy = support_slices(dry, wet, n_support, cfg.maml.slice_len)
    net, ctx = adapted_network(mm, sx, sy)
    return export_network(net, cfg.model.arch, ctx, sx, cfg.maml.slice_len, sr, latency)


def classical_arx_model() -> nn.Module:
    """Classical ARX(13, 12) on [1, x] (:func:`metafx.evaluate.classical_arx` of the ``model.arx`` defaults, no
    meta-learning): the same model whatever the study, the capture's baseline and its classical candidate
    (:func:`adapt_arx`)."""
    from metafx.config import ModelConfig
    from metafx.evaluate import classical_arx

    return classical_arx(ModelConfig())


# --------------------------------------------------------------------------- scoring


def score(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Whole-signal ``esr``, ``mae``, ``stft`` and ``mrstft`` of a prediction (:mod:`metafx.metrics`)."""
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None, None]
    with torch.no_grad():
        return {"esr": float(M.esr(p, t)), "mae": float(M.l1(p, t)), "stft": float(M.stft(p, t)),
                "mrstft": float(M.mrstft(p, t))}


def baseline_predictions(cfg: Config, dry: np.ndarray, wet: np.ndarray, n_support: int, sr: int,
                         arx: ARXStream | None = None) -> dict[str, np.ndarray]:
    """Whole-file predictions of ``lsfir``, ``arx`` (classical) and ``identity`` fitted on the same support.

    The classical ARX head is :func:`classical_arx_fit`'s (``arx``, where the capture has fitted it already on
    this support, else fitted here), run by ``scipy.signal.lfilter`` on its two channels ``[1, x]`` (the exported
    module's own recursion gives the same samples, to float32 rounding, several times slower over a whole file).
    """
    from scipy.signal import lfilter, oaconvolve

    from metafx.baselines import lsfir_fit

    taps = cfg.eval.lsfir_taps
    L = min(n_support, max(16384, 4 * taps))
    sx, sy = support_slices(dry, wet, n_support, L, max_k=10**9)
    with torch.no_grad():
        h = lsfir_fit(sx, sy, taps, cfg.eval.lsfir_ridge)
        # lsfir_predict's causal zero-state FIR, by FFT (the same sums; a direct float64 convolution of
        # a whole file with 256 taps costs seconds)
        fir = oaconvolve(dry.astype(np.float64), h.numpy())[: dry.size].astype(np.float32)
        if arx is None:
            arx = classical_arx_fit(dry, wet, n_support, sr)
        b, a = (v.numpy() for v in arx.head())
        if b.shape[0] != 2:
            raise RuntimeError(f"the classical ARX baseline has {b.shape[0]} channels, not [1, x]")
        x = dry.astype(np.float64)
        arx_pred = (lfilter(b[1], a, x) + lfilter(b[0], a, np.ones_like(x))).astype(np.float32)  # channels 1, x
    return {"lsfir": fir, "arx": arx_pred, "identity": dry.astype(np.float32)}
