"""Capture: adapt a meta-model to a recording of the user's own device, score it, export it.

The job Neural Amp Modeler does from ~3 minutes of reamped audio and minutes of GPU training,
done from seconds of audio in seconds (docs/design.md): the user plays the capture signal
(:mod:`metafx.capture_signal`) through the device and records the output (the *wet*); the
first ``support_seconds`` of the aligned pair adapt a meta-model, everything after is held
out and scored beside the baselines, and the adapted model is exported as a TorchScript file
that runs without metafx, streaming (:mod:`metafx.export`).

Steps of :func:`run_capture` (each timed, ``results.json`` ``seconds``):

1. ``load_model``: a checkpoint (``best.pt`` / ``checkpoint.pt`` or their folder), a search's
   folder (its ``summary.json`` names the best trial's checkpoint), an MLflow model URI
   (``models:/name/version``, :func:`metafx.tracking.fetch_registered_model`), or the shipped
   meta-model (:data:`SHIPPED_MODEL`); always ``torch.load(weights_only=True)``.
2. ``load_audio``: dry and wet read with :func:`metafx.data.sources.read_audio` (any rate and
   channel count: mixed to mono, resampled to the meta-model's rate, as the source folders).
   Checks: missing or unreadable files, NaN, a silent wet (errors); a clipped wet (a warning
   with the clipped fraction).
3. ``align``: the latency of the wet behind the dry (:func:`find_latency`): on the shipped
   capture signal, the onset of the device's response to the probe's clicks; for any other
   pair, the onset of the phase-transform cross-correlation's peak. Both search up to
   ``max_latency`` (1 s). Lengths that differ by more than that are refused.
4. ``adapt``: the adaptation engine of the meta-model's ``maml.method``. Support slices: all
   the non-overlapping slices of ``maml.slice_len`` that fit in the support seconds (up to
   :data:`MAX_SUPPORT_SLICES`), not only ``maml.k_support`` of them: a least-squares head
   (ridge) and an inner-loop gradient (MAML, ANIL, CAVIA, the encoder) both average over the
   slices, so more slices only lower the variance of the fit at the same meta-learned step
   size or prior strength (the ridge is relative to the mean Gram diagonal). The ridge ARX
   head is fitted on the features computed *continuously* over the whole support (the way the
   exported model runs them, :class:`metafx.export.ARXStream`) rather than per slice from a
   zero state: the envelope features (time constants up to 200 ms) then have the values the
   deployed model will see, and no equation is lost at slice starts (``ridge_fit="slices"``
   keeps the engine's slice-wise fit; ``bench capture`` compares both: continuous is far better).
   The meta-learned ridge was learned for ``k_support`` slices; with seconds of support its
   strength is chosen on the support by cross-validation (:func:`ridge_fit_continuous`).
5. ``predict``: the exported model on the whole dry file from a zero state: prediction.wav is
   produced by the very module written to model.ts.
6. ``baselines`` and ``score``: on the held-out part (after the support), whole-signal ESR
   (error energy / target energy), MAE, STFT and MR-STFT (:mod:`metafx.metrics`) of the adapted
   model and of the baselines fitted on the same support seconds: ``lsfir`` (least-squares FIR,
   ``eval.lsfir_taps``), ``arx`` (classical ARX(13, 12) on [1, x], no meta-learning, the same
   continuous ridge fit) and ``identity``.

Everything is written into a temporary folder beside ``--out`` and renamed at the end; the
MLflow run (:func:`metafx.tracking.log_capture`) is created only after every check passed and
ends FAILED if logging fails, so neither holds half a capture.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metafx import capture_signal as cs
from metafx import metrics as M
from metafx.config import ARXConfig, Config, ConfigError, config_from_dict
from metafx.data.sources import SourceError, read_audio
from metafx.export import ARXStream, ExportError, export_network, real_time_factor, save, script

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_MODEL = SHIPPED_DIR / "capture_arx.pt"
RESULTS_FORMAT = "metafx.capture"
RESULTS_VERSION = 1
MAX_LATENCY_SECONDS = 1.0  # bounded latency search (and the largest length difference accepted)
MAX_SUPPORT_SLICES = 64  # gradient engines: support slices per adaptation (memory and time)
MIN_HELDOUT_SECONDS = 0.5  # a capture must leave at least this much audio to score
SILENT_RMS = 1e-5  # a wet quieter than -100 dBFS RMS carries nothing to fit
CLIP_LEVEL = 0.999  # |x| at or above this counts as clipped
CLIP_WARN_FRACTION = 1e-4  # warn when more of the wet is clipped
LATENCY_MARGIN = 2  # samples subtracted from a detected onset (a filter's response rises gradually)
FIT_CHUNK = 16384  # equations per chunk of the continuous ridge fit (bounds memory)
AUDIO_SECONDS = 5.0  # seconds of held-out audio logged to MLflow (dry, wet, prediction)
RTF_BLOCK = 256


class CaptureError(ValueError):
    """The capture's input is unusable (files, lengths, support, checkpoint); the message names the file and the fix."""


# --------------------------------------------------------------------------- the meta-model


@dataclass
class MetaModel:
    """A meta-model ready to adapt: its config, learner and engine, and where it came from."""

    cfg: Config
    learner: nn.Module
    engine: Any
    source: str  # what the user asked for (path, models:/..., "shipped")
    checkpoint: Path  # the file loaded
    step: int | None = None


def _checkpoint_file(path: Path) -> Path:
    """The checkpoint of a path: a file, a folder with best.pt / checkpoint.pt, or a search folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CaptureError(f"--model {path}: no such file or folder; pass a best.pt / checkpoint.pt, its folder, "
                           f"a search folder (ray_results/<name>), or models:/<name>/<version>")
    for name in ("best.pt", "checkpoint.pt"):
        if (path / name).is_file():
            return path / name
    summary = path / "summary.json"
    if summary.is_file():
        try:
            best = json.loads(summary.read_text(encoding="utf-8")).get("best_checkpoint")
        except (OSError, ValueError) as e:
            raise CaptureError(f"--model {path}: cannot read {summary} ({e}); pass the best trial's checkpoint folder") from e
        if not best:
            raise CaptureError(f"--model {path}: the search recorded no best checkpoint (no trial finished); pass a "
                               f"trial's checkpoint folder instead")
        if "://" in str(best):
            raise CaptureError(f"--model {path}: the best checkpoint is remote ({best}); download it and pass its folder")
        return _checkpoint_file(Path(best))
    raise CaptureError(f"--model {path}: the folder holds no best.pt, checkpoint.pt or summary.json; pass a "
                       f"checkpoint file or folder, or a search folder (ray_results/<name>)")


def _config_of(raw: Any, path: Path) -> Config:
    """The Config stored in a checkpoint; its data section is replaced when only that does not load here.

    A capture never reads the training data, so a study whose source folder or .dsp files do not
    exist on this machine still yields its model.
    """
    if not isinstance(raw, dict):
        raise CaptureError(f"{path}: the checkpoint's config is a {type(raw).__name__}, not a study mapping: "
                           f"it was not written by metafx's training (launch/train.py or a search)")
    try:
        return config_from_dict(raw, path)
    except ConfigError as first:
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        stub = {"sample_rate": data.get("sample_rate", 48000),
                "source": {"kind": "synth", "seconds": 3600},
                "families": [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [1000.0]}}]}
        try:
            cfg = config_from_dict({**raw, "data": stub}, path)
        except ConfigError:
            raise CaptureError(f"{path}: its stored config does not load in this metafx version ({first}); "
                               f"re-train with this version or use the metafx version that wrote it") from first
        log.info("%s: the data section of the stored config does not load here (%s); a capture does not need it",
                 path, first)
        return cfg


def load_meta_model(spec: str | os.PathLike[str] | None, tracking_uri: str | None = None,
                    workdir: Path | None = None) -> MetaModel:
    """Load the meta-model a capture adapts.

    Args:
        spec: a checkpoint file or folder, a search folder, ``models:/<name>/<version>`` (or
            ``@alias``), or None for the shipped meta-model.
        tracking_uri: the MLflow store of a ``models:/`` URI (None = the default store).
        workdir: where a registered model is downloaded (a temporary folder by default).

    Returns:
        The :class:`MetaModel` (learner in eval mode, float32, CPU).

    Raises:
        CaptureError: a missing file, a file that is not a metafx checkpoint, a checkpoint of
            another format or version (names the file and the fix).
    """
    from metafx.engines import engine_for

    source = "shipped" if spec is None else str(spec)
    if spec is None:
        path = SHIPPED_MODEL
        if not path.is_file():
            raise CaptureError(f"the shipped meta-model {path} is missing: regenerate it (metafx/shipped/README.md) "
                               f"or pass --model")
    elif str(spec).startswith("models:/"):
        from metafx.tracking import TrackingError, fetch_registered_model

        dst = Path(tempfile.mkdtemp(prefix="metafx-model-", dir=workdir))
        try:
            path = _checkpoint_file(fetch_registered_model(str(spec), dst, tracking_uri))
        except TrackingError as e:
            raise CaptureError(f"--model {spec}: {e}") from e
    else:
        path = _checkpoint_file(Path(spec).expanduser())
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-torch files: all the same answer
        raise CaptureError(f"{path} is not a metafx checkpoint readable with torch.load(weights_only=True) "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a best.pt or "
                           f"checkpoint.pt written by launch/train.py or a search") from e
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or "config" not in ck:
        keys = sorted(ck)[:8] if isinstance(ck, dict) else type(ck).__name__
        raise CaptureError(f"{path} is a checkpoint of another format (found {keys}; a metafx checkpoint has 'model' "
                           f"and 'config'): pass a best.pt or checkpoint.pt written by launch/train.py or a search")
    cfg = _config_of(ck["config"], path)
    engine = engine_for(cfg)
    learner = engine.build_learner(cfg)
    try:
        learner.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CaptureError(f"{path}: its weights do not fit the model of its own config ({str(e).splitlines()[0]}): "
                           f"it was written by another metafx version; re-train or use that version") from e
    learner.eval()
    step = ck.get("step")
    return MetaModel(cfg, learner, engine, source, path, int(step) if isinstance(step, (int, float)) else None)


# --------------------------------------------------------------------------- audio


@dataclass
class Recording:
    """One input file: read, mixed to mono, resampled to the model's rate; plus what was found in it."""

    path: Path | None  # None: the capture signal, generated
    rate_in: int
    channels: int
    frames_in: int
    samples: np.ndarray  # float32, mono, at the model's rate
    peak: float = 0.0
    clipped_fraction: float = 0.0


def _read(path: Path, role: str, sr: int) -> Recording:
    import soundfile as sf

    path = Path(path).expanduser()
    if not path.is_file():
        raise CaptureError(f"{role} file {path} does not exist: check the path")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise CaptureError(f"{role} file {path} is not a readable audio file ({str(e).strip()}): export it as WAV or "
                           f"FLAC") from e

    def read(rate: int) -> np.ndarray:
        try:
            return read_audio(path, rate)
        except SourceError as e:
            if "NaN" in str(e):
                raise CaptureError(f"{role} file {path} contains NaN or infinite samples: re-export the recording "
                                   f"(16/24-bit PCM or float without NaN)") from e
            raise CaptureError(f"{role} file {path}: {e}") from e

    native = read(int(info.samplerate))
    if native.size == 0:
        raise CaptureError(f"{role} file {path} holds no audio: record again")
    peak = float(np.max(np.abs(native)))
    clipped = _clipped_fraction(native)
    x = native if int(info.samplerate) == sr else read(sr)
    return Recording(path, int(info.samplerate), int(info.channels), int(info.frames), x.astype(np.float32), peak, clipped)


def _clipped_fraction(x: np.ndarray) -> float:
    """Fraction of samples at full scale (|x| >= 0.999), or on a flat top (3+ equal samples at the peak)."""
    a = np.abs(x)
    hard = a >= CLIP_LEVEL
    peak = float(a.max()) if a.size else 0.0
    flat = np.zeros_like(hard)
    if peak > 0.05 and a.size > 2:
        at = a >= peak * (1 - 1e-6)
        run = at[:-2] & at[1:-1] & at[2:]
        flat[:-2] |= run
        flat[1:-1] |= run
        flat[2:] |= run
    return float((hard | flat).mean()) if a.size else 0.0


# --------------------------------------------------------------------------- alignment


@dataclass
class Latency:
    """The wet's delay behind the dry and how it was found."""

    samples: int
    method: str  # "clicks" | "impulse_response"
    peak_lag: int  # lag of the largest impulse-response tap (a filter's group delay adds to it)

    def ms(self, sr: int) -> float:
        return 1000.0 * self.samples / sr


def impulse_response(dry: np.ndarray, wet: np.ndarray, max_lag: int, n: int) -> np.ndarray:
    """Phase-transform cross-correlation (GCC-PHAT) of wet against dry at lags ``-max_lag .. max_lag``.

    ``h = IFFT(C / |C|)`` with ``C = Y conj(X)`` over the first ``n`` samples of the dry and
    ``n + max_lag`` of the wet: the device's response with every frequency weighted equally, so
    the dry's own spectrum (a low-passed or tonal signal) does not smear the peak, and a filter's
    magnitude response does not move it much (Knapp & Carter 1976).

    Returns:
        (2 max_lag + 1,), index ``max_lag + k`` = lag ``k``.
    """
    n = min(dry.size, n)
    m = min(wet.size, n + max_lag)
    nfft = 1 << int(math.ceil(math.log2(n + m + max_lag)))
    X = np.fft.rfft(dry[:n].astype(np.float64), nfft)
    Y = np.fft.rfft(wet[:m].astype(np.float64), nfft)
    C = Y * np.conj(X)
    h = np.fft.irfft(C / (np.abs(C) + 1e-12 * float(np.abs(C).max())), nfft)
    return np.concatenate([h[nfft - max_lag:], h[:max_lag + 1]])


def find_latency(dry: np.ndarray, wet: np.ndarray, sr: int, max_lag: int, clicks: list[int] | None = None) -> Latency:
    """The wet's delay behind the dry, in samples at ``sr`` (searched over ``0 .. max_lag``).

    With the shipped capture signal (``clicks`` given): the first sample after each click where
    the wet rises above ``max(10 x its idle noise, 1e-5 x its largest response)``, minus
    :data:`LATENCY_MARGIN`; the smaller of the two clicks. A device's response to an impulse in
    silence starts at its latency whatever it does (filter, distortion, dynamics), where a
    cross-correlation peak adds a filter's group delay (a 200 Hz four-pole low-pass peaks 110
    samples late). Otherwise, or when no response to a click is found (a gate): the first lag within
    10 ms before the peak of the phase-transform cross-correlation (:func:`impulse_response`) whose
    magnitude exceeds 30 % of the peak and 1.5 x the largest non-causal tap (the estimation noise of
    a nonlinear device), minus the margin. Measured on the shipped families' renders with 0 and 300
    samples of latency: never more than 2 samples late, at most 21 early (a slow low-pass's soft
    onset), which the head's FIR taps absorb.

    Raises:
        CaptureError: the wet leads the dry (the largest taps are at negative lags).
    """
    if clicks:
        found = []
        idle = wet[: max(1, clicks[0] - int(0.001 * sr))]
        noise = float(np.sqrt(np.mean(np.square(idle, dtype=np.float64)))) if idle.size else 0.0
        for c in clicks:
            seg = np.abs(wet[c: c + max_lag + int(0.05 * sr)].astype(np.float64))
            if seg.size == 0:
                continue
            thr = max(10 * noise, 1e-5 * float(seg.max()), 1e-9)
            above = np.flatnonzero(seg[: max_lag + 1] > thr)
            if above.size:
                found.append(int(above[0]))
        if found:
            onset = min(found)
            return Latency(max(0, onset - LATENCY_MARGIN), "clicks", onset)
    h = impulse_response(dry, wet, max_lag, 10 * sr)
    neg, pos = np.abs(h[:max(1, max_lag - 64)]), np.abs(h[max_lag:])
    if float(neg.max()) > 2.0 * float(pos.max()):
        lead = max_lag - int(np.argmax(np.abs(h[:max_lag])))
        raise CaptureError(f"the wet seems to start {lead} samples ({1000 * lead / sr:.1f} ms) before the dry: pass the "
                           f"pair in the right order (--dry is the device's input) or trim the dry's start")
    p = int(np.argmax(pos))
    thr = max(0.3 * float(pos[p]), 1.5 * float(neg.max()))
    lo = max(0, p - int(0.01 * sr))
    onset = lo + int(np.argmax(pos[lo: p + 1] > thr))
    return Latency(max(0, onset - LATENCY_MARGIN), "impulse_response", p)


# --------------------------------------------------------------------------- adaptation


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
    stream = ARXStream(model, sample_rate=sr, latency_samples=latency)
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


# --------------------------------------------------------------------------- plots and audio


def _plot(out: Path, sr: int, dry: np.ndarray, wet: np.ndarray, pred: np.ndarray, base: np.ndarray,
          title: str) -> list[Path]:
    """``plots/spectrum.png`` (Welch spectra of the held-out part) and ``plots/time.png`` (its loudest 30 ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import welch

    out.mkdir(parents=True, exist_ok=True)
    files = []
    nper = int(min(4096, max(256, wet.size // 8)))
    fig, ax = plt.subplots(figsize=(10, 4.4))
    try:
        for sig, label, st in ((dry, "dry (input)", dict(color="gray", lw=0.9, alpha=0.7)),
                               (wet, "wet (device)", dict(color="black", lw=1.6)),
                               (pred, "adapted model", dict(color="tab:blue", lw=1.0)),
                               (base, "classical ARX", dict(color="tab:orange", lw=0.9, alpha=0.8)),
                               (wet - pred, "error of the adapted model", dict(color="tab:red", lw=0.9, ls="--"))):
            f, p = welch(sig.astype(np.float64), fs=sr, nperseg=nper)
            keep = f > 0
            ax.semilogx(f[keep], 10 * np.log10(p[keep] + 1e-20), label=label, **st)
        ax.set_xlim(max(sr / nper, 10.0), sr / 2)
        ax.set_xlabel("frequency (Hz)")
        ax.set_ylabel("power spectral density (dB)")
        ax.set_title(f"{title}\nheld-out part, Welch spectra", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / "spectrum.png", dpi=110)
        files.append(out / "spectrum.png")
    finally:
        plt.close(fig)
    w = max(1, min(wet.size, int(0.03 * sr)))
    e = np.concatenate([[0.0], np.cumsum(wet.astype(np.float64) ** 2)])
    starts = np.arange(0, max(1, wet.size - w + 1), max(1, w // 4))
    s0 = int(starts[np.argmax(e[starts + w] - e[starts])]) if wet.size > w else 0
    t = (s0 + np.arange(w)) / sr * 1e3
    fig, ax = plt.subplots(figsize=(10, 3.8))
    try:
        ax.plot(t, dry[s0:s0 + w], color="gray", lw=0.9, alpha=0.7, label="dry (input)")
        ax.plot(t, wet[s0:s0 + w], color="black", lw=1.6, label="wet (device)")
        ax.plot(t, pred[s0:s0 + w], color="tab:blue", lw=1.0, label="adapted model")
        ax.plot(t, base[s0:s0 + w], color="tab:orange", lw=0.9, alpha=0.8, label="classical ARX")
        ax.set_xlabel("time into the held-out part (ms)")
        ax.set_ylabel("amplitude")
        ax.set_title(f"{title}\nheld-out part, its loudest 30 ms", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.savefig(out / "time.png", dpi=110)
        files.append(out / "time.png")
    finally:
        plt.close(fig)
    return files


def _write_audio(out: Path, sr: int, signals: dict[str, np.ndarray]) -> list[Path]:
    """16-bit WAVs of equal length at ONE gain (the loudest peaks at -1 dBFS): levels stay comparable by ear."""
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    peak = max(float(np.max(np.abs(s))) for s in signals.values() if s.size) or 1.0
    g = 10 ** (-1 / 20) / peak
    files = []
    for name, s in signals.items():
        p = out / f"{name}.wav"
        sf.write(p, np.clip(np.nan_to_num(s) * g, -1, 1).astype(np.float32), sr, subtype="PCM_16")
        files.append(p)
    return files


def _to_rate(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    if sr_from == sr_to:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(sr_from), int(sr_to))
    return resample_poly(x.astype(np.float64), sr_to // g, sr_from // g).astype(np.float32)


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.size >= n else np.concatenate([x, np.zeros(n - x.size, dtype=x.dtype)])


# --------------------------------------------------------------------------- the capture


@dataclass
class CaptureResult:
    """What :func:`run_capture` produced: the results mapping and where things went."""

    results: dict[str, Any]
    out: Path
    run_id: str | None = None
    warnings: list[str] = field(default_factory=list)


def write_capture_signal(path: Path) -> float:
    """Write the shipped capture signal as a float WAV (48 kHz mono); returns the probe length in seconds."""
    return cs.write_wav(path)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CaptureError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")


def run_capture(
    wet: Path,
    out: Path,
    *,
    dry: Path | None = None,
    support_seconds: float | None = None,
    model: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    mlflow: bool = True,
    run_name: str | None = None,
    apply: Path | None = None,
    apply_out: Path | None = None,
    max_latency_seconds: float = MAX_LATENCY_SECONDS,
    overwrite: bool = False,
    ridge_fit: str = "continuous",
    heldout_from_seconds: float | None = None,
    measure_rtf: bool = True,
    command: str | None = None,
    meta_model: MetaModel | None = None,
    threads: int = 1,
) -> CaptureResult:
    """Adapt a meta-model to a dry/wet recording; write results, prediction, plots and the exported model.

    Args:
        wet: the device's output.
        out: the output folder (must not exist or be empty, unless ``overwrite``).
        dry: the device's input; None = the shipped capture signal (regenerated).
        support_seconds: seconds from the start that adapt the model; None = the probe's length.
        model: see :func:`load_meta_model` (None = the shipped meta-model).
        tracking_uri, experiment, mlflow, run_name: the MLflow run (``mlflow=False``: none).
        apply, apply_out: another file processed with the adapted model.
        max_latency_seconds: bound of the latency search and of the length difference.
        overwrite: replace a non-empty ``out``.
        ridge_fit: ``"continuous"`` or ``"slices"`` (ARX meta-models; :func:`adapt_arx`).
        heldout_from_seconds: score from here instead of from the end of the support (a fixed
            held-out part for comparisons across support lengths; >= ``support_seconds``).
        measure_rtf: time the exported model (blocks of 256, one thread).
        command: the command line, recorded in results.json.
        meta_model: an already loaded meta-model (``model`` is then only a label).
        threads: torch intra-op threads during the capture (restored after). One by default: the
            streaming model is many small operations that a second thread only slows down, and
            on a shared machine a busy-waiting second thread costs far more than it gives.

    Returns:
        :class:`CaptureResult`.

    Raises:
        CaptureError: bad input (files, lengths, support, checkpoint); nothing is written.
        metafx.tracking.TrackingError: the MLflow run could not be written (it ends FAILED;
            ``out`` is not written).
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _run_capture(wet, out, dry=dry, support_seconds=support_seconds, model=model, tracking_uri=tracking_uri,
                            experiment=experiment, mlflow=mlflow, run_name=run_name, apply=apply, apply_out=apply_out,
                            max_latency_seconds=max_latency_seconds, overwrite=overwrite, ridge_fit=ridge_fit,
                            heldout_from_seconds=heldout_from_seconds, measure_rtf=measure_rtf, command=command,
                            meta_model=meta_model)
    finally:
        torch.set_num_threads(old_threads)


def _run_capture(wet: Path, out: Path, *, dry: Path | None, support_seconds: float | None, model: str | None,
                 tracking_uri: str | None, experiment: str | None, mlflow: bool, run_name: str | None,
                 apply: Path | None, apply_out: Path | None, max_latency_seconds: float, overwrite: bool,
                 ridge_fit: str, heldout_from_seconds: float | None, measure_rtf: bool, command: str | None,
                 meta_model: MetaModel | None) -> CaptureResult:
    t_all = time.perf_counter()
    sec: dict[str, float] = {}
    warnings: list[str] = []

    def warn(msg: str) -> None:
        log.warning("%s", msg)
        warnings.append(msg)

    cpu: dict[str, float] = {}
    c_last = [time.process_time()]

    def stage(name: str, t0: float) -> float:
        sec[name] = time.perf_counter() - t0
        c = time.process_time()
        cpu[name] = c - c_last[0]
        c_last[0] = c
        return time.perf_counter()

    out = Path(out).expanduser()
    _check_out(out, overwrite)
    if (apply is None) != (apply_out is None):
        raise CaptureError("--apply and --apply-out go together: give both (the file to process and where to write it)")
    if apply is not None and not Path(apply).is_file():
        raise CaptureError(f"--apply file {apply} does not exist: check the path")
    if support_seconds is not None and not support_seconds > 0:
        raise CaptureError(f"--support-seconds must be > 0, got {support_seconds}")

    t = time.perf_counter()
    mm = meta_model if meta_model is not None else load_meta_model(model, tracking_uri)
    sr = int(mm.cfg.data.sample_rate)
    t = stage("load_model", t)

    wet_rec = _read(Path(wet), "--wet", sr)
    if dry is None:
        if sr != cs.SAMPLE_RATE:
            raise CaptureError(f"the meta-model runs at {sr} Hz but the shipped capture signal is defined at "
                               f"{cs.SAMPLE_RATE} Hz: pass the dry file with --dry")
        x = cs.capture_signal()
        dry_rec = Recording(None, cs.SAMPLE_RATE, 1, x.size, x, float(np.max(np.abs(x))), 0.0)
    else:
        dry_rec = _read(Path(dry), "--dry", sr)
    probe = cs.probe() if sr == cs.SAMPLE_RATE else None
    is_signal = dry is None or (probe is not None and dry_rec.samples.size >= probe.size and
                                float(np.max(np.abs(dry_rec.samples[:probe.size] - probe))) < 1e-3)  # 16-bit PCM too
    dname = "the capture signal" if dry is None else str(dry)
    w_rms = float(np.sqrt(np.mean(np.square(wet_rec.samples, dtype=np.float64))))
    if w_rms < SILENT_RMS:
        raise CaptureError(f"--wet file {wet} is silent ({20 * math.log10(w_rms + 1e-30):.0f} dBFS RMS): check the "
                           f"device's output and the recording level, and record again")
    d_rms = float(np.sqrt(np.mean(np.square(dry_rec.samples, dtype=np.float64))))
    if d_rms < SILENT_RMS:
        raise CaptureError(f"--dry file {dry} is silent: pass the signal that was played into the device")
    if wet_rec.clipped_fraction > CLIP_WARN_FRACTION:
        warn(f"--wet file {wet}: {100 * wet_rec.clipped_fraction:.3f} % of the samples are clipped (peak "
             f"{wet_rec.peak:.4f}): lower the recording level and record again; the model learns the clipping")
    t = stage("load_audio", t)

    max_lag = int(round(max_latency_seconds * sr))
    dx, wy = dry_rec.samples, wet_rec.samples
    if abs(wy.size - dx.size) > max_lag:
        raise CaptureError(f"--wet {wet} ({wy.size / sr:.2f} s) and {dname} ({dx.size / sr:.2f} s) differ in length by "
                           f"{abs(wy.size - dx.size) / sr:.2f} s, more than a plausible latency ({max_latency_seconds:g} s): "
                           f"they are not one take; trim them to the same take (or raise --max-latency-ms)")
    lat = find_latency(dx, wy, sr, max_lag, cs.click_positions(sr) if is_signal else None)
    n = min(dx.size, wy.size - lat.samples)
    dry_a = dx[:n]
    wet_a = wy[lat.samples: lat.samples + n]
    t = stage("align", t)

    S = support_seconds if support_seconds is not None else cs.probe_seconds()
    n_sup = int(round(S * sr))
    L = mm.cfg.maml.slice_len
    if n_sup < L:
        raise CaptureError(f"--support-seconds {S:g} holds {n_sup} samples, fewer than one slice of the meta-model "
                           f"({L} samples = {L / sr:.3f} s): raise --support-seconds")
    if n_sup >= n:
        raise CaptureError(f"--support-seconds {S:g} is longer than the aligned recording ({n / sr:.2f} s of {wet}): "
                           f"lower --support-seconds (the default is the capture signal's probe, "
                           f"{cs.probe_seconds():.2f} s)")
    h0 = n_sup if heldout_from_seconds is None else int(round(heldout_from_seconds * sr))
    if h0 < n_sup:
        raise CaptureError(f"the held-out part may not start ({h0 / sr:g} s) inside the support ({S:g} s)")
    if n - h0 < int(MIN_HELDOUT_SECONDS * sr):
        raise CaptureError(f"--support-seconds {S:g} leaves {max(0, n - h0) / sr:.2f} s of the {n / sr:.2f} s recording "
                           f"to score (at least {MIN_HELDOUT_SECONDS:g} s needed): lower --support-seconds or record "
                           f"the whole capture signal")

    # ---- every check passed: compute into a temporary folder beside --out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the published folder's mode
    apply_tmp: Path | None = None
    try:
        t = time.perf_counter()
        try:
            module = adapt_and_export(mm, dry_a, wet_a, n_sup, sr, lat.samples, ridge_fit=ridge_fit)
        except ExportError as e:
            raise CaptureError(f"{mm.checkpoint}: {e}") from e
        t = stage("adapt", t)
        scripted = script(module)
        save(scripted, tmp / "model.ts")
        t = stage("export", t)
        with torch.no_grad():
            pred_full = scripted.process(torch.from_numpy(dx)).numpy()  # the whole dry file from a zero state
        pred = pred_full[:n]
        t = stage("predict", t)
        base = baseline_predictions(mm.cfg, dry_a, wet_a, n_sup, sr)
        t = stage("baselines", t)
        target = wet_a[h0:]
        held = score(pred[h0:], target)
        baselines = {k: score(v[h0:n], target) for k, v in base.items()}
        support = {"esr": float(np.sum((wet_a[:n_sup] - pred[:n_sup]) ** 2) / (np.sum(wet_a[:n_sup] ** 2) + 1e-12))}
        t = stage("score", t)
        capture_seconds = sum(sec.values())
        capture_cpu = sum(cpu.values())
        rtf = real_time_factor(scripted, block=RTF_BLOCK, seconds=2.0) if measure_rtf else None
        t = stage("rtf", t)

        # prediction.wav: aligned with the wet FILE (delayed by the latency), at its rate and length
        import soundfile as sf

        p_wet = _to_rate(np.concatenate([np.zeros(lat.samples, np.float32), pred_full]), sr, wet_rec.rate_in)
        sf.write(tmp / "prediction.wav", _fit_length(p_wet, wet_rec.frames_in), wet_rec.rate_in, subtype="FLOAT")
        title = f"capture of {Path(wet).name} with {mm.cfg.name} ({mm.cfg.model.arch}, {mm.cfg.maml.method}), " \
                f"{S:g} s support: held-out ESR {held['esr']:.4g} (classical ARX {baselines['arx']['esr']:.4g})"
        _plot(tmp / "plots", sr, dry_a[h0:], target, pred[h0:], base["arx"][h0:n], title)
        a0, a1 = h0, min(n, h0 + int(AUDIO_SECONDS * sr))
        _write_audio(tmp / "audio", sr, {"dry": dry_a[a0:a1], "wet": wet_a[a0:a1], "prediction": pred[a0:a1]})
        if apply is not None:
            apply_tmp = _apply(scripted, Path(apply), Path(apply_out), sr)
        t = stage("write", t)

        if all(v["esr"] > 0.9 for v in (held, *baselines.values()) if v is not baselines["identity"]):
            warn(f"neither the adapted model nor the baselines explain the wet (held-out ESR {held['esr']:.3g}): is "
                 f"{wet} a recording of {dname}?")
        results: dict[str, Any] = {
            "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
            "command": command,
            "rate": sr,
            "dry": {"path": None if dry is None else str(dry), "capture_signal": bool(is_signal),
                    "capture_signal_version": cs.CAPTURE_VERSION if is_signal else None,
                    "rate_in": dry_rec.rate_in, "channels": dry_rec.channels, "seconds": dx.size / sr,
                    "fingerprint": cs.fingerprint(dx)},
            "wet": {"path": str(wet), "rate_in": wet_rec.rate_in, "channels": wet_rec.channels,
                    "seconds": wy.size / sr, "peak": wet_rec.peak, "clipped_fraction": wet_rec.clipped_fraction},
            "latency": {"samples": lat.samples, "ms": lat.ms(sr), "method": lat.method, "peak_lag": lat.peak_lag,
                        "max_search_ms": 1000 * max_latency_seconds},
            "support_seconds": n_sup / sr,
            "heldout_seconds": (n - h0) / sr,
            "heldout_from_seconds": h0 / sr,
            "model": {"source": mm.source, "checkpoint": str(mm.checkpoint), "study": mm.cfg.name,
                      "arch": mm.cfg.model.arch, "method": mm.cfg.maml.method, "step": mm.step,
                      "slice_len": L, "ridge_fit": ridge_fit if mm.cfg.model.arch == "arx" else None,
                      "ridge_scale": getattr(module, "ridge_scale", None)},
            "heldout": held,
            "support": support,
            "baselines": baselines,
            "export": {"file": "model.ts", "kind": str(scripted.kind), "streaming": bool(scripted.streaming),
                       "bytes": (tmp / "model.ts").stat().st_size, "rtf_block256_one_thread": rtf},
            "seconds": {**{k: round(v, 4) for k, v in sec.items()}, "capture": round(capture_seconds, 4)},
            "cpu_seconds": {**{k: round(v, 4) for k, v in cpu.items()}, "capture": round(capture_cpu, 4)},
            "apply": None if apply is None else {"in": str(apply), "out": str(apply_out)},
            "warnings": warnings,
        }
        run_id = None
        if mlflow:
            t = time.perf_counter()
            run_id = _log_mlflow(results, tmp, tracking_uri, experiment, run_name or f"{Path(wet).stem}", mm)
            sec["mlflow"] = time.perf_counter() - t
        else:
            _write_results(tmp / "results.json", results)
        # ---- publish
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
        if apply_tmp is not None:
            os.replace(apply_tmp, Path(apply_out))
            apply_tmp = None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if apply_tmp is not None:
            apply_tmp.unlink(missing_ok=True)
        raise
    results["seconds"]["total"] = round(time.perf_counter() - t_all, 4)
    return CaptureResult(results, out, run_id, warnings)


def _write_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")


def _log_mlflow(results: dict[str, Any], tmp: Path, tracking_uri: str | None, experiment: str | None, run_name: str,
                mm: MetaModel) -> str:
    from metafx.tracking import CAPTURE_EXPERIMENT, log_capture

    exp = experiment or CAPTURE_EXPERIMENT

    def before(run_id: str, uri: str) -> None:
        results["mlflow"] = {"tracking_uri": uri, "experiment": exp, "run_id": run_id}
        _write_results(tmp / "results.json", results)

    params = {"wet": results["wet"]["path"], "dry": results["dry"]["path"] or f"capture signal v{cs.CAPTURE_VERSION}",
              "model_source": mm.source, "model_checkpoint": str(mm.checkpoint), "study": mm.cfg.name,
              "arch": mm.cfg.model.arch, "method": mm.cfg.maml.method, "support_seconds": results["support_seconds"],
              "rate": results["rate"], "wet_rate_in": results["wet"]["rate_in"],
              "latency_method": results["latency"]["method"], "dry_fingerprint": results["dry"]["fingerprint"],
              "ridge_fit": results["model"]["ridge_fit"]}
    metrics = {"heldout": results["heldout"], "baselines": results["baselines"], "support": results["support"],
               "latency_samples": results["latency"]["samples"], "latency_ms": results["latency"]["ms"],
               "seconds": results["seconds"], "rtf_block256": results["export"]["rtf_block256_one_thread"],
               "clipped_fraction": results["wet"]["clipped_fraction"]}
    tags = {"metafx.role": "capture", "metafx.model": mm.cfg.model.arch, "metafx.study": mm.cfg.name}
    run_id, _ = log_capture(tracking_uri, exp, run_name, params=params, metrics=metrics, tags=tags, artifact_dir=tmp,
                            before_upload=before)
    return run_id


def _apply(module: Any, src: Path, dst: Path, sr: int) -> Path:
    """Process ``src`` (any rate/channels; mixed to mono at the model's rate) with ``module``; float WAV at src's rate.

    Returns:
        The temporary file beside ``dst`` (renamed to ``dst`` by the caller).
    """
    import soundfile as sf

    rec = _read(src, "--apply", sr)
    with torch.no_grad():
        y = module.process(torch.from_numpy(rec.samples)).numpy()
    y = _fit_length(_to_rate(y, sr, rec.rate_in), rec.frames_in)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 1.0:
        log.warning("--apply-out %s peaks at %.3g (> 1): written as float, scale it before playback", dst, peak)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}.wav")
    sf.write(tmp, y, rec.rate_in, subtype="FLOAT")
    return tmp


def apply_exported(model_file: Path, src: Path, dst: Path) -> dict[str, Any]:
    """Process ``src`` with an exported model file (``model.ts`` of a capture) into ``dst`` (float WAV).

    Raises:
        CaptureError: a missing or unreadable model or audio file.
    """
    model_file = Path(model_file)
    if model_file.is_dir():
        model_file = model_file / "model.ts"
    if not model_file.is_file():
        raise CaptureError(f"exported model {model_file} does not exist: pass a capture's model.ts or its folder")
    try:
        m = torch.jit.load(str(model_file))
        sr = int(m.sample_rate)
    except Exception as e:
        raise CaptureError(f"{model_file} is not an exported metafx model ({type(e).__name__}): pass a capture's model.ts") from e
    if not Path(src).is_file():
        raise CaptureError(f"input file {src} does not exist: check the path")
    tmp = _apply(m, Path(src), Path(dst), sr)
    os.replace(tmp, dst)
    return {"model": str(model_file), "in": str(src), "out": str(dst), "rate": sr}


__all__ = ["CaptureError", "CaptureResult", "Latency", "MetaModel", "SHIPPED_MODEL", "adapt_and_export", "adapt_arx",
           "adapted_network", "apply_exported", "baseline_predictions", "classical_arx_model", "find_latency",
           "impulse_response", "load_meta_model", "ridge_fit_continuous", "run_capture", "score", "support_slices",
           "write_capture_signal"]
