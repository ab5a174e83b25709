"""Adapting a meta-model to a capture's support, and the baselines fitted on the same seconds.

The ridge ARX head is fitted on features computed continuously over the whole support (as the
exported model runs them) with its strength chosen on the support by cross-validation; the
gradient methods run the engine's own inner loop and bake the adapted weights into a copy of the
network (:func:`adapted_network`), which :mod:`metafx.export` turns into a streaming module.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from metafx import metrics as M
from metafx.capture.errors import CaptureError
from metafx.capture.meta_model import MetaModel
from metafx.config import ARXConfig, Config
from metafx.export import ARXStream, export_network

MAX_SUPPORT_SLICES = 64  # gradient engines: support slices per adaptation (memory and time)
FIT_CHUNK = 16384  # equations per chunk of the continuous ridge fit (bounds memory)

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


def _simulate(phi: Tensor, b: Tensor, a: Tensor) -> np.ndarray:
    """The head on precomputed features from a zero state: FIR over the feature lags, then ``1 / A(z)``."""
    from scipy.signal import lfilter

    M, S = phi.shape
    u = torch.zeros(S, dtype=torch.float64)
    for j in range(b.shape[1]):
        u[j:] += b[:, j] @ phi[:, : S - j]
    return lfilter([1.0], a.numpy(), u.numpy()) if a.numel() > 1 else u.numpy()


def ridge_fit_continuous(model: nn.Module, phi: Tensor, y: Tensor, scales: tuple[float, ...] = RIDGE_SCALES
                         ) -> tuple[Tensor, Tensor, float]:
    """The equation-error ridge fit of :meth:`metafx.models.arx.MetaARX.fit_features` over one continuous stretch.

    The regressors, the meta-learned per-coefficient ridge and the prior mean of the meta-trained
    fit, with every sample ``n >= max(nb - 1, na)`` of the support as an equation (features computed
    continuously, ``phi`` from :meth:`ARXStream.features`), accumulated in chunks (float64 normal
    equations).

    The ridge's strength is chosen on the support itself: the meta-learned relative ridge was
    learned for ``k_support`` slices, and it stays relative to the mean Gram diagonal, so with the
    seconds of a capture the prior would keep the same weight against far more data (a Bayesian
    prior's weight falls as data accumulates). So the ridge is multiplied by each of ``scales``
    (1 = as meta-learned); for each, four fits that leave out one fold of the equations (two of
    eight contiguous segments) are simulated from a zero state over the support, and the scale
    with the smallest pooled simulation ESR on the left-out folds is refitted on every equation.

    Args:
        model: the :class:`metafx.models.arx.MetaARX`.
        phi: features of the support, (M, S), float64.
        y: the aligned wet of the support, (S,), float64.
        scales: candidate multipliers of the meta-learned ridge.

    Returns:
        ``(b (M, nb), a (na + 1,), scale)``: the head (AR part pole-clamped, ``stabilize``), float64,
        and the chosen multiplier.

    Raises:
        CaptureError: fewer equations than coefficients, or singular normal equations.
    """
    from metafx.models.arx import lagged, stabilize

    M, S = phi.shape
    nb, na = model.nb, model.na
    warm = max(nb - 1, na)
    P, n_b = model.n_coef, model.n_b
    if S - warm < 2 * P:
        raise CaptureError(f"the support holds {S} samples, too few for the {P} coefficients of the model's head: "
                           f"raise --support-seconds")
    edges = np.linspace(warm, S, CV_SEGMENTS + 1).round().astype(int)
    Gs = torch.zeros(CV_SEGMENTS, P, P, dtype=torch.float64)
    rs = torch.zeros(CV_SEGMENTS, P, dtype=torch.float64)
    for g in range(CV_SEGMENTS):
        for s in range(int(edges[g]), int(edges[g + 1]), FIT_CHUNK):
            e = min(int(edges[g + 1]), s + FIT_CHUNK)
            ph, yy = phi[:, s - warm: e], y[s - warm: e]
            rows = e - s
            cols = [ph[0, warm:, None], lagged(ph[None, 1:], nb)[0, warm:].reshape(rows, (M - 1) * nb)]
            if na:
                cols.append(-lagged(yy[None, None], na, start=1)[0, warm:].reshape(rows, na))
            A = torch.cat(cols, 1)  # (rows, P)
            Gs[g] += A.T @ A
            rs[g] += A.T @ yy[warm:]
    G, r = Gs.sum(0), rs.sum(0)
    with torch.no_grad():
        lb, la = model.ridge_strengths()
        lam = torch.cat([lb.double().expand(n_b), la.double().expand(na)])
        prior = model.prior.detach().double()

    def solve(Gm: Tensor, rm: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        D = torch.diagonal(Gm).mean() * lam * scale
        try:
            w = torch.linalg.solve(Gm + torch.diag(D), rm + D * prior)
        except torch.linalg.LinAlgError as e:
            raise CaptureError(f"the ridge fit of the support is singular ({e}): the support may be silent or "
                               f"constant; record the whole probe") from e
        b, a = _head_from(w, M, nb, n_b)
        if na:
            a = stabilize(a[None], model.rmax)[0][0]
        return b, a

    yn = y.numpy()
    best, best_err = scales[0], math.inf
    if len(scales) > 1:
        for scale in scales:
            err = tgt = 0.0
            for k in range(CV_FOLDS):
                segs = [k, k + CV_FOLDS]
                b, a = solve(G - Gs[segs].sum(0), r - rs[segs].sum(0), scale)
                sim = _simulate(phi, b, a)
                for g in segs:
                    lo, hi = int(edges[g]), int(edges[g + 1])
                    err += float(np.sum((yn[lo:hi] - sim[lo:hi]) ** 2))
                    tgt += float(np.sum(yn[lo:hi] ** 2))
            esr = err / (tgt + 1e-12) if np.isfinite(err) else math.inf
            if esr < best_err:
                best, best_err = scale, esr
    b, a = solve(G, r, best)
    return b, a, float(best)


def adapt_arx(model: nn.Module, dry: np.ndarray, wet: np.ndarray, n_support: int, sr: int, latency: int,
              cfg: Config | None = None, fit: str = "continuous") -> ARXStream:
    """Adapt a :class:`metafx.models.arx.MetaARX` to the support and return its streaming export.

    Args:
        model: the meta-model (or a classical ARX with ``features: none``).
        dry, wet: the aligned pair at the model's rate.
        n_support: support samples (from the start).
        sr, latency: recorded on the export.
        cfg: the study (``maml`` section) for ``fit="slices"``.
        fit: ``"continuous"`` (:func:`ridge_fit_continuous`, the default) or ``"slices"`` (the
            ridge engine's fit on the support slices from zero state, as in meta-training).

    Returns:
        The :class:`ARXStream` (eager; :func:`metafx.export.script` it to save).
    """
    stream = ARXStream(model, sample_rate=sr, latency_samples=latency,
                       support=torch.from_numpy(np.ascontiguousarray(dry[:n_support], dtype=np.float32)))
    if fit == "slices":
        if cfg is None:
            raise ValueError("adapt_arx(fit='slices') needs the study config")
        from metafx.models.arx import stabilize

        sx, sy = support_slices(dry, wet, n_support, cfg.maml.slice_len, max_k=10**9)
        with torch.no_grad():
            head = model.fit(sx, sy)
        a = stabilize(head.a.double()[None], model.rmax)[0][0] if model.na else head.a.double()
        stream.set_head(head.b.double(), a)
        return stream
    if fit != "continuous":
        raise ValueError(f"unknown ARX fit {fit!r}; use 'continuous' or 'slices'")
    with torch.no_grad():
        phi = stream.features(torch.from_numpy(np.ascontiguousarray(dry[:n_support], dtype=np.float64)))
        b, a, scale = ridge_fit_continuous(model, phi, torch.from_numpy(np.ascontiguousarray(wet[:n_support],
                                                                                          dtype=np.float64)))
    stream.set_head(b, a)
    stream.ridge_scale = scale  # recorded in results.json (an attribute of the export module too)
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
                     ridge_fit: str = "continuous") -> nn.Module:
    """Adapt ``mm`` to the support of an aligned pair; return the (eager) export module of the adapted model."""
    cfg = mm.cfg
    if cfg.model.arch == "arx":
        return adapt_arx(mm.learner, dry, wet, n_support, sr, latency, cfg, fit=ridge_fit)
    sx, sy = support_slices(dry, wet, n_support, cfg.maml.slice_len)
    net, ctx = adapted_network(mm, sx, sy)
    return export_network(net, cfg.model.arch, ctx, sx, cfg.maml.slice_len, sr, latency)


def classical_arx_model(cfg: Config) -> nn.Module:
    """Classical ARX(13, 12) on [1, x] (``model.arx`` defaults, ``features: none``, no meta-learning)."""
    from metafx.evaluate import classical_arx

    return classical_arx(replace(cfg, model=replace(cfg.model, arx=ARXConfig())))


# --------------------------------------------------------------------------- scoring


def score(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Whole-signal ``esr``, ``mae``, ``stft`` and ``mrstft`` of a prediction (:mod:`metafx.metrics`)."""
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None, None]
    with torch.no_grad():
        return {"esr": float(M.esr(p, t)), "mae": float(M.l1(p, t)), "stft": float(M.stft(p, t)),
                "mrstft": float(M.mrstft(p, t))}


def baseline_predictions(cfg: Config, dry: np.ndarray, wet: np.ndarray, n_support: int, sr: int
                         ) -> dict[str, np.ndarray]:
    """Whole-file predictions of ``lsfir``, ``arx`` (classical) and ``identity`` fitted on the same support."""
    from scipy.signal import oaconvolve

    from metafx.baselines import lsfir_fit

    taps = cfg.eval.lsfir_taps
    L = min(n_support, max(16384, 4 * taps))
    sx, sy = support_slices(dry, wet, n_support, L, max_k=10**9)
    with torch.no_grad():
        h = lsfir_fit(sx, sy, taps, cfg.eval.lsfir_ridge)
        # lsfir_predict's causal zero-state FIR, by FFT (the same sums; a direct float64 convolution of
        # a whole file with 256 taps costs seconds)
        fir = oaconvolve(dry.astype(np.float64), h.numpy())[: dry.size].astype(np.float32)
        arx = adapt_arx(classical_arx_model(cfg), dry, wet, n_support, sr, 0)
        arx_pred = arx.process(torch.from_numpy(np.ascontiguousarray(dry, dtype=np.float32))).numpy()
    return {"lsfir": fir, "arx": arx_pred, "identity": dry.astype(np.float32)}
