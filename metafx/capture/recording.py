"""A capture's recordings: reading them at the model's rate, and finding the device's latency.

Files of any rate and channel count are read as the source folders are
(:func:`metafx.data.sources.read_audio`: mixed to mono, resampled); the wet's delay behind the
dry is found from the capture signal's clicks or by phase-transform cross-correlation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metafx.capture.errors import CaptureError
from metafx.data.sources import SourceError, read_audio, resample

CLIP_LEVEL = 0.999  # |x| at or above this counts as clipped
LATENCY_MARGIN = 2  # samples subtracted from a detected onset (a filter's response rises gradually)


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


def read_recording(path: Path, role: str, sr: int) -> Recording:
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
    clipped = clipped_fraction(native)
    x = resample(native, int(info.samplerate), sr)  # what read_audio(path, sr) returns, without reading it again
    return Recording(path, int(info.samplerate), int(info.channels), int(info.frames), x.astype(np.float32), peak, clipped)


def clipped_fraction(x: np.ndarray) -> float:
    """Fraction of samples at full scale (|x| >= 0.999), or on a flat top (3+ equal samples at the peak).

    A float file that goes above full scale (peak > 1) was not clipped there: only its flat tops count.
    """
    a = np.abs(x)
    peak = float(a.max()) if a.size else 0.0
    hard = a >= CLIP_LEVEL if peak <= 1.0 else np.zeros(a.shape, dtype=bool)
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


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.size >= n else np.concatenate([x, np.zeros(n - x.size, dtype=x.dtype)])
