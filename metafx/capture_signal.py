"""The shipped capture signal: a designed probe, then held-out programme material.

A user plays this signal through their device (pedal, amp, plugin, outboard unit) and records
the output; ``python launch/capture.py --wet recording.wav`` then adapts a meta-model to the
pair (:mod:`metafx.capture`). The signal is generated, not stored: :func:`capture_signal` is
deterministic (fixed seeds, numpy's PCG64 generator, no platform-dependent randomness) and
:data:`CAPTURE_VERSION` names its layout; :func:`fingerprint` is recorded with every capture so
a recording made from another version is recognisable.

Layout at :data:`SAMPLE_RATE` (48 kHz, mono, float, peak at most 0.95 = -0.45 dBFS, the synthesized corpus's ceiling).
The probe (the default support, :func:`probe_seconds`, about 4.6 s) comes first; its parts are
ordered so that any prefix of it is as informative as possible (the first second already holds
broadband noise, a click and a sweep):

======================  ==========  =========================================================
part                    length      why
======================  ==========  =========================================================
silence                 50 ms       the device's idle output (noise floor, DC offset); every
                                    filter starts from rest
clicks (+, -)           2 x 60 ms   a one-sample impulse of each polarity followed by its
                                    decay: the impulse response and the latency of a linear
                                    device, and asymmetric (even-order) behaviour
white noise, -18 dB     300 ms      broadband excitation at programme level: the
                                    best-conditioned equations for a least-squares fit of any
                                    linear part, with a hard attack (compressor attack)
sweeps at -18, -6,      3 x 450 ms  exponential sine sweeps 30 Hz -> 20 kHz with 30 ms gaps: the
-30 dBFS RMS                        frequency response at every frequency, and how harmonic
                                    distortion grows with level (three levels = the static
                                    curve of a clipper at three points of the whole band)
pink-noise bursts       4 x 180 ms  -30, -10, -24, -16 dBFS RMS with hard on/offsets: level
                                    steps in both directions (attack and release of
                                    compressors, limiters, envelope followers) and the
                                    low-frequency weight of music
level ramp              600 ms      a 110 Hz sine + a 1.7 kHz sine rising from -48 to -3 dBFS
                                    peak: the static input/output curve of a distortion or
                                    compressor over its whole range, and intermodulation
plucked tones           3 x 250 ms  Karplus-Strong strings (82, 196, 659 Hz) at -16 dBFS RMS:
                                    guitar-like attacks and decays, what pedals are played with
struck tones            2 x 250 ms  inharmonic modal tones (bell/drum-like) with a noise click:
                                    sharp transients and high partials that decay fast
silence                 150 ms      release tails and the filter ring-down; the held-out part
                                    starts from (near) rest
======================  ==========  =========================================================

Held-out programme (:data:`PROGRAMME_SECONDS`, 15 s): the project's synthesized corpus
(:func:`metafx.data.sources.synth_corpus`: sweeps, plucks, struck tones, chords, noise and
silence at -18 dBFS RMS per segment) with seed :data:`PROGRAMME_SEED`, a seed no study of the
repository trains on, so the held-out score measures audio the meta-model has not seen.

Why a short designed probe rather than minutes of programme material (Neural Amp Modeler's
standard capture signal is about 3 minutes): the meta-model already knows what effects look
like; the support only has to pin down the few numbers of one device, and the probe puts the
excitations that identify those numbers (all frequencies, all levels, level steps, transients)
into a few seconds.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from metafx.data.sources import db_to_amplitude, synth_corpus

SAMPLE_RATE = 48000  # Hz; the capture signal is defined at this rate only
CAPTURE_VERSION = 1  # bump when the signal changes (recordings of another version no longer match)
PROGRAMME_SECONDS = 15.0  # held-out programme material after the probe
PROGRAMME_SEED = 90210  # synthesized-corpus seed of the held-out part (no study trains on it)
PROBE_SEED = 1307  # seed of the probe's noise
PEAK_LIMIT = 0.95  # absolute peak of the whole signal (the corpus's own ceiling, -0.45 dBFS)
PART_PEAK = 0.9  # absolute peak of every probe part
FADE_MS = 3.0  # raised-cosine fades at part edges (no clicks except the intended ones)


def _fade(x: np.ndarray, sr: int, ms: float = FADE_MS) -> np.ndarray:
    n = min(int(ms * 1e-3 * sr), x.size // 2)
    if n > 1:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _rms_to(x: np.ndarray, db: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
    return x if rms == 0 else x * (db_to_amplitude(db) / rms)


def _cap(x: np.ndarray, peak: float = PART_PEAK) -> np.ndarray:
    """Scale down to ``peak`` when the part's peak is above it (noise has a high crest factor)."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    return x * (peak / m) if m > peak else x


def _silence(seconds: float, sr: int) -> np.ndarray:
    return np.zeros(int(round(seconds * sr)))


def _click(sr: int, sign: float) -> np.ndarray:
    """One full-scale-ish impulse (0.5) and 60 ms of silence for the response to decay."""
    x = _silence(0.060, sr)
    x[int(0.005 * sr)] = 0.5 * sign
    return x


def _sweep(sr: int, seconds: float, db_rms: float, f0: float = 30.0, f1: float = 20000.0) -> np.ndarray:
    """Exponential sine sweep f0 -> f1 (instantaneous frequency f0 (f1/f0)^(t/T)) at ``db_rms``."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    r = math.log(f1 / f0)
    x = np.sin(2 * np.pi * f0 * seconds / r * np.expm1(t / seconds * r))
    return _fade(_rms_to(x, db_rms), sr)


def _pink(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pink (1/f power) noise by spectral shaping, no DC."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f)
    spec[0] = 0.0
    return np.fft.irfft(spec, n)


def _ramp(sr: int, seconds: float) -> np.ndarray:
    """110 Hz + 1.7 kHz sines whose peak rises exponentially from -48 to -3 dBFS."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    tone = 0.6 * np.sin(2 * np.pi * 110.0 * t) + 0.4 * np.sin(2 * np.pi * 1700.0 * t + 0.3)
    tone /= np.max(np.abs(tone))
    env = db_to_amplitude(-48.0) * (db_to_amplitude(-3.0) / db_to_amplitude(-48.0)) ** (t / seconds)
    return _fade(tone * env, sr)


def _pluck(sr: int, f0: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong string: noise burst of one period, averaged feedback with loop gain ``rho``."""
    n = int(round(seconds * sr))
    L = max(2, int(round(sr / f0)))
    rho = 10.0 ** (-3.0 / (f0 * 1.5))  # -60 dB after 1.5 s
    y = np.zeros(n + L + 1)
    y[:L] = np.convolve(rng.uniform(-1, 1, L), [0.25, 0.5, 0.25], mode="same")
    for i in range(L, n + L + 1):  # short tones: a plain loop is fast enough (~40k samples)
        y[i] = 0.5 * rho * (y[i - L] + y[i - L - 1])
    return _fade(_cap(_rms_to(y[:n], -16.0)), sr)


def _struck(sr: int, f0: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Modal tone: inharmonic partials with faster decay for higher ones, plus a 4 ms noise click."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    x = np.zeros(n)
    for k, ratio in enumerate((1.0, 2.76, 5.40, 8.93)):
        f = f0 * ratio
        if f < 0.45 * sr:
            x += np.exp(-6.9 * t / (0.5 / ratio)) * np.sin(2 * np.pi * f * t + k) / ratio ** 0.5
    c = int(0.004 * sr)
    x[:c] += 0.5 * rng.standard_normal(c) * np.exp(-np.arange(c) / (0.001 * sr))
    return _fade(_cap(_rms_to(x, -18.0)), sr)


def probe_parts(sr: int = SAMPLE_RATE) -> list[tuple[str, np.ndarray]]:
    """The probe, part by part (see the module docstring for each part's reason).

    Args:
        sr: sample rate in Hz (the shipped signal is :data:`SAMPLE_RATE`).

    Returns:
        ``(name, audio)`` pairs in playing order; float64 mono arrays.
    """
    rng = np.random.default_rng([PROBE_SEED, CAPTURE_VERSION])
    gap = lambda: _silence(0.030, sr)  # noqa: E731
    parts: list[tuple[str, np.ndarray]] = [("silence", _silence(0.050, sr)),
                                           ("click+", _click(sr, 1.0)), ("click-", _click(sr, -1.0))]
    parts.append(("white_noise", _fade(_rms_to(rng.standard_normal(int(0.3 * sr)), -18.0), sr, ms=0.5)))
    for db in (-18.0, -6.0, -30.0):
        parts += [("gap", gap()), (f"sweep_{int(db)}dB", _sweep(sr, 0.45, db))]
    for db in (-30.0, -10.0, -24.0, -16.0):  # hard-edged bursts: level steps both ways
        parts.append((f"pink_{int(db)}dB", _fade(_cap(_rms_to(_pink(rng, int(0.18 * sr)), db)), sr, ms=0.5)))
    parts += [("gap", gap()), ("ramp", _ramp(sr, 0.6))]
    for f0 in (82.41, 196.0, 659.26):
        parts.append((f"pluck_{f0:g}Hz", _pluck(sr, f0, 0.25, rng)))
    for f0 in (220.0, 1250.0):
        parts.append((f"struck_{f0:g}Hz", _struck(sr, f0, 0.25, rng)))
    parts.append(("silence", _silence(0.150, sr)))
    return parts


def click_positions(sr: int = SAMPLE_RATE) -> list[int]:
    """Sample indices of the probe's two clicks (impulses in silence; latency is measured on them)."""
    out, pos = [], 0
    for name, p in probe_parts(sr):
        if name.startswith("click"):
            out.append(pos + int(np.flatnonzero(p)[0]))
        pos += p.size
    return out


def probe(sr: int = SAMPLE_RATE) -> np.ndarray:
    """The designed probe alone (the default support of a capture).

    Returns:
        float32 mono audio, shape ``(round(probe_seconds() * sr),)``.
    """
    return np.concatenate([p for _, p in probe_parts(sr)]).astype(np.float32)


def probe_seconds(sr: int = SAMPLE_RATE) -> float:
    """Length of the probe in seconds: the default ``--support-seconds`` of a capture."""
    return sum(p.size for _, p in probe_parts(sr)) / sr


def capture_signal(sr: int = SAMPLE_RATE) -> np.ndarray:
    """The whole capture signal: the probe, then :data:`PROGRAMME_SECONDS` of held-out programme.

    Deterministic: every call returns the same samples.

    Args:
        sr: sample rate in Hz; only :data:`SAMPLE_RATE` is the shipped signal (other rates are
            for tests).

    Returns:
        float32 mono audio, peak at most :data:`PEAK_LIMIT`.

    Shape:
        ``(round(probe_seconds(sr) * sr) + round(PROGRAMME_SECONDS * sr),)``.
    """
    x = np.concatenate([probe(sr), synth_corpus(PROGRAMME_SECONDS, sr, PROGRAMME_SEED, -18.0)]).astype(np.float32)
    return np.clip(x, -PEAK_LIMIT, PEAK_LIMIT)  # a no-op: every part and corpus segment is below it


def write_wav(path: str | os.PathLike[str]) -> float:
    """Write the capture signal as a float32 WAV (48 kHz, mono), atomically; returns :func:`probe_seconds`."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        sf.write(tmp, capture_signal(), SAMPLE_RATE, subtype="FLOAT", format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return probe_seconds()


def fingerprint(x: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of a signal's float32 samples (recorded with every capture)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:16]


__all__ = ["CAPTURE_VERSION", "PROGRAMME_SECONDS", "PROGRAMME_SEED", "SAMPLE_RATE", "capture_signal", "click_positions",
           "fingerprint", "probe", "probe_parts", "probe_seconds", "write_wav"]
