"""Source (dry) audio for the task renders: a synthesized corpus or a user folder.

The paper rendered its tasks from 10 minutes of speech, music and
noise-perturbed sine sweeps. We need no download: :func:`load_sources` either
synthesizes a deterministic corpus from a seed (``kind: synth``) or reads a
folder of the user's WAV/FLAC files (``kind: folder``). Either way the result is
one mono float32 signal at the dataset sample rate, every segment (synth) or
file (folder) normalized to ``loudness_db`` RMS dBFS and kept below the peak
ceiling :data:`PEAK_CEILING`.

The synthesized corpus concatenates segments of varying length:

* ``sweep``  exponential sine sweeps over random ranges with added white noise
  (15-40 dB SNR), the paper's noise-perturbed sweeps;
* ``pluck``  Karplus-Strong plucked strings (vectorized one period at a time);
* ``struck`` modal struck/decaying tones (inharmonic partials, exponential decay,
  a short noise click);
* ``chord``  3-5 harmonic tones of a major/minor/seventh/suspended chord with
  attack/release envelopes (wavetable oscillators);
* ``noise``  white, pink or brown noise bursts with an envelope;
* ``silence`` short gaps of digital silence.

:data:`SYNTH_VERSION` is part of every dataset hash: bump it whenever the
synthesis changes its output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from metafx.config import SourceConfig

log = logging.getLogger(__name__)

SYNTH_VERSION = 1  # bump when the synthesized corpus changes for the same seed
FOLDER_VERSION = 1  # bump when folder reading / normalization changes
PEAK_CEILING = 0.95  # absolute peak limit of every normalized segment (-0.45 dBFS)
AUDIO_SUFFIXES = (".wav", ".flac")
SILENT_RMS = 1e-6  # a file quieter than this (-120 dBFS) cannot be normalized and is skipped
FADE_SECONDS = 0.005  # raised-cosine fade at synthesized segment edges (no clicks)

# kind -> (relative weight, min seconds, max seconds)
SEGMENTS: dict[str, tuple[float, float, float]] = {
    "sweep": (0.24, 0.5, 4.0),
    "pluck": (0.18, 0.3, 2.0),
    "struck": (0.15, 0.3, 2.0),
    "chord": (0.17, 0.5, 3.0),
    "noise": (0.16, 0.1, 1.5),
    "silence": (0.10, 0.05, 0.5),
}


_CONTENT_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> BLAKE2b of the file


class SourceError(RuntimeError):
    """Source audio cannot be produced (unreadable file, empty folder). The message names the file and the fix."""


# --------------------------------------------------------------------------- public API


def load_sources(src: SourceConfig, sample_rate: int) -> np.ndarray:
    """Produce the dry source signal the tasks are rendered from.

    Args:
        src: the ``data.source`` section (kind, path, seconds, seed, loudness_db).
        sample_rate: dataset sample rate in Hz.

    Returns:
        Mono float32 audio. Shape ``(T,)`` with ``T = round(src.seconds * sample_rate)``
        for ``kind: synth``; for ``kind: folder`` at most that (less if the folder
        holds less audio). Every segment/file is normalized to ``src.loudness_db``
        RMS dBFS, scaled down further only where its peak would exceed
        :data:`PEAK_CEILING`.

    Raises:
        SourceError: folder is empty or missing, has no audible file, or a file
            cannot be read (the message names the file).
        ValueError: unknown ``src.kind``.
    """
    if src.kind == "synth":
        return synth_corpus(src.seconds, sample_rate, src.seed, src.loudness_db)
    if src.kind == "folder":
        if src.path is None:
            raise SourceError("data.source.kind is 'folder' but data.source.path is not set: give a folder of WAV/FLAC files")
        return read_folder(Path(src.path), sample_rate, src.seconds, src.loudness_db)
    raise ValueError(f"unknown source kind {src.kind!r}; allowed: synth, folder")


def source_fingerprint(src: SourceConfig, sample_rate: int) -> str:
    """A hash of everything that determines :func:`load_sources` output (for the dataset cache key).

    For ``synth``: kind, seconds, seed, loudness, sample rate, :data:`SYNTH_VERSION`.
    For ``folder``: additionally every audio file's relative path, size and a
    content hash (BLAKE2b of its bytes), so an edited or replaced file changes the
    fingerprint but a ``touch`` or copy does not.

    Args:
        src: the ``data.source`` section.
        sample_rate: dataset sample rate in Hz.

    Returns:
        A 64-character hex digest.

    Raises:
        SourceError: for ``folder``, when the folder is missing or empty.
    """
    key: dict[str, object] = {
        "kind": src.kind,
        "seconds": float(src.seconds),
        "loudness_db": float(src.loudness_db),
        "sample_rate": int(sample_rate),
        "peak_ceiling": PEAK_CEILING,
    }
    if src.kind == "synth":
        key.update(seed=int(src.seed), synth_version=SYNTH_VERSION)
    else:
        root = Path(src.path) if src.path is not None else None
        if root is None:
            raise SourceError("data.source.kind is 'folder' but data.source.path is not set")
        files = []
        for p in list_audio_files(root):
            st = p.stat()
            memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
            digest = _CONTENT_HASHES.get(memo)
            if digest is None:  # hash each file once per process (every trial computes the dataset key)
                h = hashlib.blake2b(digest_size=16)
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                digest = _CONTENT_HASHES[memo] = h.hexdigest()
            files.append((p.relative_to(root).as_posix(), st.st_size, digest))
        key.update(files=files, folder_version=FOLDER_VERSION)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- helpers


def db_to_amplitude(db: float) -> float:
    """dBFS -> linear amplitude (``10 ** (db / 20)``)."""
    return float(10.0 ** (db / 20.0))


def normalize(x: np.ndarray, loudness_db: float, ceiling: float = PEAK_CEILING) -> np.ndarray:
    """Scale to ``loudness_db`` RMS dBFS, then down to ``ceiling`` if the peak exceeds it.

    Args:
        x: audio, shape ``(n,)``; a silent input (RMS 0) is returned unchanged.
        loudness_db: RMS target in dBFS.
        ceiling: absolute peak limit (< 1.0).

    Returns:
        The scaled audio, same shape and dtype.
    """
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    if rms <= 0.0:
        return x
    g = db_to_amplitude(loudness_db) / rms
    peak = float(np.max(np.abs(x))) * g
    if peak > ceiling:
        g *= ceiling / peak
    return (x * g).astype(x.dtype, copy=False)


def _fade(x: np.ndarray, sr: int) -> np.ndarray:
    n = min(int(FADE_SECONDS * sr), x.size // 2)
    if n > 1:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _colored_noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2 power) noise of length n, by spectral shaping."""
    w = rng.standard_normal(n)
    if color == "white" or n < 4:
        return w
    spec = np.fft.rfft(w)
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f) if color == "pink" else f
    spec[0] = 0.0  # no DC
    return np.fft.irfft(spec, n)


def _wavetable_tone(f0: float, n: int, sr: int, amps: np.ndarray, phase0: float) -> np.ndarray:
    """A harmonic tone with harmonic amplitudes ``amps`` (harmonic k+1 has amps[k]), via a 4096-point table."""
    size = 4096
    k = np.arange(1, amps.size + 1)
    grid = np.arange(size) / size
    table = (amps[:, None] * np.sin(2 * np.pi * k[:, None] * grid[None, :])).sum(0)
    phase = (phase0 + f0 / sr * np.arange(n)) % 1.0
    pos = phase * size
    i0 = pos.astype(np.int64)
    frac = pos - i0
    return table[i0] * (1 - frac) + table[(i0 + 1) % size] * frac


# --------------------------------------------------------------------------- synthesized segments


def _sweep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    nyq = 0.45 * sr
    f0 = _loguniform(rng, 20.0, min(2000.0, nyq))
    f1 = _loguniform(rng, min(200.0, nyq / 2), min(20000.0, nyq))
    if rng.random() < 0.5:
        f0, f1 = f1, f0
    dur = n / sr
    t = np.arange(n) / sr
    r = math.log(f1 / f0)
    if abs(r) < 1e-6:
        phi = 2 * np.pi * f0 * t
    else:  # exponential sweep: instantaneous frequency f0 * (f1/f0)^(t/dur)
        phi = 2 * np.pi * f0 * dur / r * np.expm1(t / dur * r)
    x = np.sin(phi + rng.uniform(0, 2 * np.pi))
    snr_db = rng.uniform(15.0, 40.0)
    x += rng.standard_normal(n) * (np.sqrt(0.5) * db_to_amplitude(-snr_db))
    return x


def _pluck(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Karplus-Strong: y[m] = x[m] + rho/2 (y[m-L] + y[m-L-1]), computed one period (L samples) at a time."""
    f0 = _loguniform(rng, 55.0, min(1200.0, sr / 8))
    L = max(2, int(round(sr / f0)))
    t60 = rng.uniform(0.5, 4.0)
    rho = 10.0 ** (-3.0 / (f0 * t60))  # loop gain per period so the string decays 60 dB in t60
    # excitation: one period of noise, low-passed by a random one-pole (pluck brightness)
    a = rng.uniform(0.0, 0.7)  # 3-tap smoothing: a = 0 bright, 0.7 dull
    exc = np.convolve(rng.uniform(-1, 1, L), [a / 2, 1 - a, a / 2], mode="same")
    periods = -(-n // L) + 1
    y = np.zeros((periods, L))
    y[0] = exc
    prev_last = 0.0  # y[m-L-1] for the first sample of a period is the last sample two periods back
    for k in range(1, periods):
        p = y[k - 1]
        shifted = np.empty(L)
        shifted[0] = prev_last
        shifted[1:] = p[:-1]
        prev_last = p[-1]
        y[k] = 0.5 * rho * (p + shifted)
    return y.reshape(-1)[:n]


def _struck(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = _loguniform(rng, 80.0, min(2000.0, sr / 10))
    m = int(rng.integers(4, 11))
    ratios = np.concatenate([[1.0], np.sort(rng.uniform(1.3, 9.0, m - 1))])  # inharmonic partials
    freqs = f0 * ratios
    keep = freqs < 0.45 * sr
    freqs, ratios = freqs[keep], ratios[keep]
    t60 = rng.uniform(0.2, 3.0) / ratios ** rng.uniform(0.3, 1.0)  # high partials die faster
    amps = rng.uniform(0.2, 1.0, freqs.size) / ratios ** rng.uniform(0.0, 1.0)
    t = np.arange(n) / sr
    x = np.zeros(n)
    for f, a, d, ph in zip(freqs, amps, t60, rng.uniform(0, 2 * np.pi, freqs.size)):
        x += a * np.exp(-6.9078 * t / d) * np.sin(2 * np.pi * f * t + ph)  # 6.9078 = ln(1000): -60 dB at d
    click = min(n, int(0.004 * sr))
    x[:click] += rng.standard_normal(click) * np.exp(-np.arange(click) / (0.001 * sr)) * 0.5
    return x


_CHORDS = ((0, 4, 7), (0, 3, 7), (0, 4, 7, 10), (0, 3, 7, 10), (0, 5, 7), (0, 4, 7, 11), (0, 3, 7, 12))


def _chord(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    root = int(rng.integers(36, 73))  # MIDI C2..C5
    shape = _CHORDS[int(rng.integers(len(_CHORDS)))]
    notes = [root + s for s in shape] + ([root - 12] if rng.random() < 0.4 else [])
    bright = rng.uniform(0.8, 2.0)
    t = np.arange(n) / sr
    att = rng.uniform(0.005, 0.1)
    rel = rng.uniform(0.05, 0.5)
    env = np.minimum(1.0, t / att) * np.minimum(1.0, np.maximum(0.0, (n / sr - t) / rel))
    env *= np.exp(-t * rng.uniform(0.0, 1.5))  # a gentle decay
    x = np.zeros(n)
    for note in notes:
        f0 = 440.0 * 2 ** ((note - 69) / 12) * (1 + rng.normal(0, 0.002))  # slight detune
        nh = int(min(12, (0.45 * sr) // f0))
        if nh < 1:
            continue
        amps = 1.0 / np.arange(1, nh + 1) ** bright
        x += _wavetable_tone(f0, n, sr, amps, rng.random())
    return x * env


def _noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    color = ("white", "pink", "brown")[int(rng.integers(3))]
    x = _colored_noise(rng, n, color)
    t = np.arange(n) / sr
    if rng.random() < 0.5:  # percussive burst
        x *= np.exp(-t / rng.uniform(0.02, 0.5))
    return x


def _silence(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return np.zeros(n)


_GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "sweep": _sweep,
    "pluck": _pluck,
    "struck": _struck,
    "chord": _chord,
    "noise": _noise,
    "silence": _silence,
}


def synth_segments(seconds: float, sample_rate: int, seed: int, loudness_db: float) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the synthesized corpus segment by segment (deterministic from ``seed``).

    Args:
        seconds: total length; the last segment is cut so the total is ``round(seconds * sample_rate)``.
        sample_rate: Hz.
        seed: seed of the numpy Generator that draws every segment.
        loudness_db: RMS target of every non-silent segment, dBFS.

    Yields:
        ``(kind, audio)`` with audio float32 of shape ``(n,)``; kinds from :data:`SEGMENTS`.
    """
    total = int(round(seconds * sample_rate))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, SYNTH_VERSION])
    kinds = list(SEGMENTS)
    w = np.array([SEGMENTS[k][0] for k in kinds])
    w /= w.sum()
    done = 0
    while done < total:
        kind = kinds[int(rng.choice(len(kinds), p=w))]
        _, lo, hi = SEGMENTS[kind]
        n = max(1, int(rng.uniform(lo, hi) * sample_rate))
        n_out = min(n, total - done)
        # Each segment gets its own child generator so the synthesis inside it cannot
        # shift the draws of later segments (the sequence of kinds/lengths is stable).
        seg_rng = np.random.default_rng(rng.integers(0, 2**63))
        x = _GENERATORS[kind](seg_rng, n, sample_rate)
        if kind != "silence":
            x = normalize(_fade(x, sample_rate), loudness_db)
        yield kind, x[:n_out].astype(np.float32)
        done += n_out


def synth_corpus(seconds: float, sample_rate: int, seed: int = 0, loudness_db: float = -18.0) -> np.ndarray:
    """The concatenated synthesized corpus (see :func:`synth_segments`).

    Returns:
        float32 mono audio, shape ``(round(seconds * sample_rate),)``, peak < 1.
    """
    total = int(round(seconds * sample_rate))
    out = np.empty(total, dtype=np.float32)
    pos = 0
    for _, seg in synth_segments(seconds, sample_rate, seed, loudness_db):
        out[pos : pos + seg.size] = seg
        pos += seg.size
    assert pos == total
    return out


# --------------------------------------------------------------------------- folder


def list_audio_files(root: Path) -> list[Path]:
    """WAV/FLAC files under ``root`` (recursive), sorted by relative path.

    Raises:
        SourceError: the folder does not exist or holds no WAV/FLAC file.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist: set data.source.path to a folder of WAV/FLAC files")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SourceError(
            f"source folder {root} holds no WAV or FLAC file (searched recursively): add audio files "
            f"or use data.source.kind: synth for the built-in corpus"
        )
    return files


def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """``x`` at ``sr_to``: ``scipy.signal.resample_poly`` (polyphase, anti-aliased), filtered in x's dtype.

    Args:
        x: mono audio at ``sr_from``, shape ``(n,)``.
        sr_from: its rate in Hz.
        sr_to: the rate wanted in Hz.

    Returns:
        ``x`` itself when the rates are equal, else float32 audio, shape ``(about n * sr_to / sr_from,)``.
    """
    if int(sr_from) == int(sr_to):
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(sr_from), int(sr_to))
    return resample_poly(x, int(sr_to) // g, int(sr_from) // g).astype(np.float32)


def read_audio(path: Path, sample_rate: int, max_samples: int | None = None) -> np.ndarray:
    """Read one WAV/FLAC file as mono float32 at ``sample_rate``.

    Channels are averaged; other sample rates are resampled with
    ``scipy.signal.resample_poly`` (polyphase, anti-aliased).

    Args:
        path: audio file.
        sample_rate: output rate in Hz.
        max_samples: read only about this many output samples (None = all).

    Returns:
        float32 audio, shape ``(n,)``.

    Raises:
        SourceError: the file cannot be decoded (names the file and the fix).
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
        frames = -1
        if max_samples is not None:
            frames = min(info.frames, int(math.ceil(max_samples * info.samplerate / sample_rate)) + 64)
        data, sr_in = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        why = str(e).strip().rstrip(".")  # libsndfile's messages end with a period of their own
        raise SourceError(
            f"cannot read audio file {path}: {why}. Only WAV and FLAC are read: re-encode it "
            f"(for example `ffmpeg -i {path} {Path(path).with_suffix('.fixed.wav').name}`) or remove it from the source folder"
        ) from e
    x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    x = resample(x, sr_in, sample_rate)
    if not np.all(np.isfinite(x)):
        raise SourceError(f"audio file {path} contains NaN or infinite samples: re-export it or remove it from the source folder")
    return x[:max_samples] if max_samples is not None else x


def read_folder(root: Path, sample_rate: int, seconds: float, loudness_db: float) -> np.ndarray:
    """Read, resample, mix to mono, normalize and concatenate a folder of WAV/FLAC files.

    Files are taken in sorted relative-path order until ``seconds`` of audio are
    collected (the last file is cut). Silent files are skipped with a warning.

    Args:
        root: folder, searched recursively.
        sample_rate: output rate in Hz.
        seconds: cap on the total length.
        loudness_db: RMS target of every file, dBFS.

    Returns:
        float32 mono audio, shape ``(T,)`` with ``T <= round(seconds * sample_rate)``.

    Raises:
        SourceError: missing/empty folder, an unreadable file, or only silent files.
    """
    cap = int(round(seconds * sample_rate))
    parts: list[np.ndarray] = []
    have = 0
    for p in list_audio_files(root):
        if have >= cap:
            break
        x = read_audio(p, sample_rate, max_samples=cap - have)
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
        if rms < SILENT_RMS:
            log.warning("source file %s is silent (RMS %.1e); skipped", p, rms)
            continue
        parts.append(normalize(x, loudness_db))
        have += x.size
    if not parts:
        raise SourceError(f"every WAV/FLAC file in {root} is silent or empty: add audible audio files")
    out = np.concatenate(parts)[:cap].astype(np.float32, copy=False)
    if out.size < cap:
        log.warning("source folder %s holds %.1f s of audio, less than data.source.seconds = %g; using all of it",
                    root, out.size / sample_rate, seconds)
    return out
