"""Render a task grid with DAWDreamer into a cached, content-addressed dataset directory.

This is the only module that imports ``dawdreamer``.

A *task* is one effect family (a Faust ``.dsp`` file) at one parameter setting
(one point of the family's grid). Every task processes the same dry source
signal (:mod:`metafx.data.sources`); the dataset stores it once plus one target
signal per task::

    <cache_dir>/<hash>/
        input.npy      float32 (T,)     the dry source
        targets.npy    float32 (N, T)   row i = task i's output
        manifest.json  sample rate, tasks (index, id, family, params, split), splits, hash, versions, timing

``<hash>`` covers everything that determines the content (source fingerprint,
each family's .dsp text and any .lib beside it, the grids, sample rate, split
settings, ``on_unstable``, the dawdreamer and numpy versions and
:data:`FORMAT_VERSION`), so a second run with the same configuration finds the
directory and renders nothing.

Writes are atomic: the dataset is rendered into ``<hash>.tmp-<host>-<pid>-<random>``
in the same ``cache_dir`` and renamed to ``<hash>`` as the very last step, after
``manifest.json`` (the completeness marker) is written and every file is fsynced.
A killed render leaves only a ``.tmp-`` directory, which is never read and is
removed by the next render on the same host once its process is gone. Two
processes rendering the same hash race harmlessly: the first rename wins and
the other uses the winner's directory.

Rendering runs in a thread pool (``data.render_workers``; DAWDreamer 0.9
releases the GIL in render and compile) with one ``RenderEngine`` per thread.
Each thread compiles each family once and reuses the processor: DAWDreamer
resets a processor's state at the start of every ``render`` call, so every
task starts from zero state (``tests/test_data_render.py`` checks that results
do not depend on task order or thread count). The target rows are written
straight into ``targets.npy`` with ``os.pwrite`` at the row's offset (the file
and its ``.npy`` header are created with ``np.lib.format.open_memmap``); only
one row per thread is ever in memory, and no mapping of the whole file inflates
the renderer's resident memory, so the paper budget (600 s x 120 tasks x 48 kHz,
13.8 GB) renders in a few hundred MB of RAM.

Rendering can also be split into parts (consecutive tasks of one family), each rendered
by another process, possibly on another node, into ``<cache_dir>/<hash>.parts/`` and
assembled into the same dataset, byte for byte (:func:`render_part`,
:func:`assemble_parts`; the Ray side is :mod:`metafx.data.distributed`). Both paths share
the checks (:func:`prepare`), the render loop and the manifest writer, and publish through
:func:`build_dataset`.

Faust I/O: the mono source is fed to every input of the effect; if the effect
has several outputs, output channel 0 is the target. An effect without inputs is
rejected. DAWDreamer adds no latency to Faust processors: output sample n
answers input sample n (checked against an impulse and the exact difference
equation in the tests).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import dawdreamer as daw
import numpy as np

from metafx.config import ConfigError, DataConfig, FamilyConfig
from metafx.data.sources import load_sources, source_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the on-disk layout or the rendering procedure changes
BLOCK_SIZE = 4096  # DAWDreamer block size; results do not depend on it, speed does (512 is ~7x slower)
UNSTABLE_GAIN = 100.0  # an output peak above this multiple of the input peak (+40 dB) counts as blowing up
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

#: Number of renders this process has started (cache hits do not count). Tests use
#: it as timing-free evidence that a second load rendered nothing.
renders_started = 0


class RenderError(RuntimeError):
    """Rendering failed (unstable settings with on_unstable: fail, Faust compile error, disk space). The message says how to fix it."""


# --------------------------------------------------------------------------- the DAWDreamer control thread

# DAWDreamer (JUCE) binds its message thread to the thread that creates the first
# RenderEngine; load_graph() called on any other thread waits forever for that
# thread's message loop (measured: a second worker thread hangs in load_graph).
# So every engine is created, compiled, wired and destroyed on one long-lived
# control thread owned by this module, and only render()/get_audio()/set_parameter()
# run on the worker threads (DAWDreamer releases the GIL in render). This holds as
# long as no other module creates a RenderEngine first, which is why this module
# is the only dawdreamer import.
_control_lock = threading.Lock()
_control: ThreadPoolExecutor | None = None


def _forget_control_in_child() -> None:
    global _control, _control_lock
    _control, _control_lock = None, threading.Lock()  # the parent's thread does not exist after fork


os.register_at_fork(after_in_child=_forget_control_in_child)


def _on_control(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the DAWDreamer control thread and return its result (re-raising its exception)."""
    global _control
    if threading.current_thread().name.startswith("metafx-dawdreamer"):
        return fn(*args, **kwargs)
    with _control_lock:
        if _control is None:
            _control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metafx-dawdreamer")
    return _control.submit(fn, *args, **kwargs).result()


# --------------------------------------------------------------------------- Faust introspection


@dataclass(frozen=True)
class Slider:
    """One Faust UI parameter of a compiled effect."""

    label: str  # the name given in hslider("label", ...)
    address: str  # DAWDreamer's parameter address, e.g. "/moog_vcf/cutoff"
    min: float
    max: float
    default: float


@dataclass(frozen=True)
class DspInfo:
    """What a compiled .dsp exposes: channel counts and sliders."""

    inputs: int
    outputs: int
    sliders: tuple[Slider, ...] = field(default_factory=tuple)

    def resolve(self, name: str, *, family: str = "?") -> Slider:
        """The slider a grid key refers to: by label, full address, or address suffix.

        Raises:
            ConfigError: no slider or several sliders match ``name``.
        """
        hits = [s for s in self.sliders if name in (s.label, s.address) or s.address.endswith("/" + name)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            labels = ", ".join(s.label for s in self.sliders) or "(none)"
            raise ConfigError(
                f"family {family!r}: the .dsp has no slider named {name!r}; its sliders are: {labels}. "
                f"Rename the key under data.families[...].params or add hslider(\"{name}\", ...) to the .dsp"
            )
        addrs = ", ".join(s.address for s in hits)
        raise ConfigError(f"family {family!r}: slider name {name!r} is ambiguous ({addrs}); use the full address as the key")


def _faust_processor(engine: Any, name: str, dsp_text: str, dsp_dir: Path | None, *, family: str, dsp_path: Any) -> Any:
    proc = engine.make_faust_processor(name)
    if dsp_dir is not None:
        proc.faust_libraries_paths = [str(dsp_dir)]  # local import("x.lib") beside the .dsp; stdfaust stays available
    proc.set_dsp_string(dsp_text)
    try:
        proc.compile()
    except RuntimeError as e:
        engine.remove_processor(name)  # a failed processor would break every later load_graph of this engine
        raise RenderError(f"family {family!r}: Faust could not compile {dsp_path}: {e}".rstrip()) from e
    return proc


def describe_dsp(dsp: str | os.PathLike[str], sample_rate: int = 48000, *, family: str = "?") -> DspInfo:
    """Compile a Faust effect and list its channels and sliders.

    Args:
        dsp: path to a ``.dsp`` file.
        sample_rate: Hz (Faust code may depend on it).
        family: name used in error messages.

    Returns:
        The :class:`DspInfo`.

    Raises:
        RenderError: the code does not compile (the Faust message is included).
    """
    path = Path(dsp)
    text = path.read_text(encoding="utf-8")

    def probe() -> DspInfo:
        engine = daw.RenderEngine(int(sample_rate), BLOCK_SIZE)
        proc = _faust_processor(engine, "probe", text, path.parent, family=family, dsp_path=path)
        sliders = tuple(
            Slider(label=str(d["label"]), address=str(d["name"]), min=float(d["min"]), max=float(d["max"]),
                   default=float(d["value"]))
            for d in proc.get_parameters_description()
        )
        return DspInfo(inputs=int(proc.get_num_input_channels()), outputs=int(proc.get_num_output_channels()), sliders=sliders)

    return _on_control(probe)


# --------------------------------------------------------------------------- task plan and hash


@dataclass(frozen=True)
class PlannedTask:
    """One grid point to render (before dropping unstable ones)."""

    family_index: int
    family: str
    grid_index: int  # position in the family's full grid
    params: dict[str, float]

    @property
    def id(self) -> str:
        return f"{self.family}:" + ",".join(f"{k}={v:g}" for k, v in self.params.items())


def plan_tasks(cfg: DataConfig) -> list[PlannedTask]:
    """Every task to render: each family's grid (duplicates removed), subset to ``max_tasks`` if set.

    The ``max_tasks`` subset is drawn without replacement from a generator seeded by
    ``(data.split_seed, family index)`` and kept in grid order.

    Returns:
        Tasks ordered by family, then grid position.
    """
    out: list[PlannedTask] = []
    for fi, fam in enumerate(cfg.families):
        grid = fam.grid()
        seen: set[tuple[float, ...]] = set()
        unique: list[tuple[int, dict[str, float]]] = []
        for gi, p in enumerate(grid):
            k = tuple(p.values())
            if k in seen:
                continue
            seen.add(k)
            unique.append((gi, p))
        if len(unique) < len(grid):
            log.warning("family %r: %d duplicate grid points removed (a duplicate could leak a test task into training)",
                        fam.name, len(grid) - len(unique))
        if fam.max_tasks is not None and fam.max_tasks < len(unique):
            rng = np.random.default_rng([cfg.split_seed & 0xFFFFFFFF, fi])
            pick = np.sort(rng.choice(len(unique), size=fam.max_tasks, replace=False))
            unique = [unique[i] for i in pick]
        out.extend(PlannedTask(fi, fam.name, gi, p) for gi, p in unique)
    return out


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    return {
        "dawdreamer": importlib.metadata.version("dawdreamer"),
        "numpy": np.__version__,
        "format": str(FORMAT_VERSION),
    }


def dataset_key(cfg: DataConfig) -> dict[str, Any]:
    """Everything that determines a dataset's content (hashed into its directory name).

    Raises:
        SourceError: a folder source is missing or empty.
    """
    fams = []
    for fam in cfg.families:
        libs = {p.name: _sha256_file(p) for p in sorted(Path(fam.dsp).parent.glob("*.lib"))}
        fams.append({
            "name": fam.name,
            "dsp_sha256": _sha256_file(Path(fam.dsp)),
            "libs": libs,
            "params": [[p.name, list(p.values)] for p in fam.params],
            "max_tasks": fam.max_tasks,
        })
    return {
        "format_version": FORMAT_VERSION,
        "sample_rate": cfg.sample_rate,
        "source": source_fingerprint(cfg.source, cfg.sample_rate),
        "families": fams,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_seed": cfg.split_seed,
        "on_unstable": cfg.on_unstable,
        "unstable_gain": UNSTABLE_GAIN,
        "versions": _versions(),
    }


def _hash_key(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def dataset_hash(cfg: DataConfig) -> str:
    """The content hash naming the dataset directory (24 hex characters)."""
    return _hash_key(dataset_key(cfg))


def dataset_path(cfg: DataConfig) -> Path:
    """Where the dataset for ``cfg`` lives (complete or not): ``cfg.cache_dir / dataset_hash(cfg)``."""
    return Path(cfg.cache_dir) / dataset_hash(cfg)


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a finished dataset directory (its manifest exists; it is written last)."""
    return (Path(path) / MANIFEST).is_file()


# --------------------------------------------------------------------------- splits


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = 0 if test_fraction <= 0 else max(1, int(round(test_fraction * n)))
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * n)))
    return n_val, n_test


def check_split_feasible(family: str, n: int, val_fraction: float, test_fraction: float, *, dropped: int | None = None) -> None:
    """Raise if a family with ``n`` tasks cannot give train, val and test at least one task each.

    Args:
        family: name for the message.
        n: number of tasks of the family.
        val_fraction, test_fraction: split fractions (each split gets at least one task when > 0).
        dropped: None before rendering; after rendering, how many unstable tasks were dropped.

    Raises:
        ConfigError: before rendering (``dropped is None``): the grid is too small.
        RenderError: after rendering: too few (stable) tasks remain.
    """
    n_val, n_test = _split_counts(n, val_fraction, test_fraction)
    if n - n_val - n_test >= 1:
        return
    need = 1 + (val_fraction > 0) + (test_fraction > 0)
    msg = (f"family {family!r} has {n} task(s) but needs at least {need} for a train/val/test split by task "
           f"(val_fraction = {val_fraction}, test_fraction = {test_fraction} take at least one task each when > 0)")
    if dropped is None:
        raise ConfigError(f"{msg}: add grid points under data.families[...].params, or set data.val_fraction / "
                          f"data.test_fraction to 0")
    raise RenderError(f"{msg}{f' after dropping {dropped} unstable setting(s)' if dropped else ''}: enlarge the "
                      f"family's parameter grid or move it to stable settings")


def assign_splits(families: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Split tasks by task, stratified by family: every split gets tasks of every family.

    Args:
        families: family name of each task (in task order).
        val_fraction, test_fraction: fraction of each family's tasks; at least one task when > 0.
        seed: split seed; the shuffle of family ``j`` (in order of first appearance) uses ``(seed, j)``.

    Returns:
        ``"train" | "val" | "test"`` per task.

    Raises:
        RenderError: a family has too few tasks for the split.
    """
    labels = [""] * len(families)
    order = list(dict.fromkeys(families))
    for j, fam in enumerate(order):
        idx = [i for i, f in enumerate(families) if f == fam]
        check_split_feasible(fam, len(idx), val_fraction, test_fraction, dropped=0)
        n_val, n_test = _split_counts(len(idx), val_fraction, test_fraction)
        perm = np.random.default_rng([seed & 0xFFFFFFFF, j]).permutation(len(idx))
        for r, p in enumerate(perm):
            labels[idx[p]] = "test" if r < n_test else "val" if r < n_test + n_val else "train"
    return labels


# --------------------------------------------------------------------------- rendering


class _Renderer:
    """One DAWDreamer engine wired source -> effect for one family.

    Build and destroy it on the control thread (:func:`_on_control`); :meth:`render`
    may run on any thread, one call at a time per instance.
    """

    def __init__(self, source: np.ndarray, sample_rate: int, fam: FamilyConfig, dsp_text: str, inputs: int):
        self.T = int(source.size)
        self.sr = sample_rate
        self.fam = fam
        self.engine = daw.RenderEngine(sample_rate, BLOCK_SIZE)
        self.proc = _faust_processor(self.engine, "fx", dsp_text, Path(fam.dsp).parent, family=fam.name, dsp_path=fam.dsp)
        data = source[None, :] if inputs == 1 else np.ascontiguousarray(np.broadcast_to(source, (inputs, source.size)))
        self.playback = self.engine.make_playback_processor("src", data)  # copies the source into the engine
        self.engine.load_graph([(self.playback, []), (self.proc, ["src"])])

    def render(self, params: dict[str, float]) -> np.ndarray:
        """Render the whole source through the effect at ``params`` ({address: value}).

        DAWDreamer resets the processor state at the start of every render, so the
        result does not depend on what this instance rendered before.

        Returns:
            Output channel 0, float32, shape ``(T,)``.
        """
        for addr, v in params.items():
            self.proc.set_parameter(addr, float(v))
        # render() floors duration * sr, which is sometimes one sample short: ask for half a sample more.
        if not self.engine.render((self.T + 0.5) / self.sr):
            raise RenderError(f"family {self.fam.name!r}: DAWDreamer render failed for {params}")
        y = self.engine.get_audio()  # (outputs, >= T)
        if y.shape[1] < self.T:
            raise RenderError(f"family {self.fam.name!r}: DAWDreamer returned {y.shape[1]} samples, expected {self.T}")
        return np.ascontiguousarray(y[0, : self.T], dtype=np.float32)


def check_stability(y: np.ndarray, input_peak: float, sample_rate: int) -> str | None:
    """Why ``y`` is unstable, or None if it is fine.

    Unstable means a non-finite sample, or a peak above :data:`UNSTABLE_GAIN` x the
    input peak (a filter that grows without bound reaches that long before overflow).

    Args:
        y: rendered output, shape ``(T,)``.
        input_peak: peak of the source.
        sample_rate: Hz (to report where it went non-finite).

    Returns:
        A human-readable reason, or None.
    """
    # A float64 sum of float32 values is finite iff every value is finite (no overflow possible).
    with np.errstate(invalid="ignore", over="ignore"):
        total = float(np.add.reduce(y, dtype=np.float64))
    if not math.isfinite(total):
        first = int(np.argmin(np.isfinite(y)))
        return f"output is not finite from {first / sample_rate:.3f} s on"
    peak = max(float(y.max()), -float(y.min())) if y.size else 0.0
    if peak > UNSTABLE_GAIN * input_peak:
        return (f"output peak {peak:.3g} is more than {UNSTABLE_GAIN:g} x the input peak {input_peak:.3g} "
                f"(the output grows without bound)")
    return None


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class _Progress:
    """A one-line progress report on stderr (a carriage-return line on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.last_decile = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        el = now - self.t0
        eta = el / done * (self.total - done) if done else float("nan")
        line = f"{self.label}: {done}/{self.total} tasks ({100 * done / self.total:.0f}%), {el:.1f} s, ETA {eta:.1f} s"
        if self.tty:
            if now - self.last > 0.1 or done == self.total:
                sys.stderr.write("\r" + line + ("\n" if done == self.total else ""))
                sys.stderr.flush()
                self.last = now
        else:
            dec = (10 * done) // self.total
            if dec != self.last_decile:
                self.last_decile = dec
                sys.stderr.write(line + "\n")
                sys.stderr.flush()


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TMP = re.compile(r"^(?P<hash>[0-9a-f]+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_by_dead(root: Path, pattern: re.Pattern[str]) -> Iterator[tuple[Path, int]]:
    """Entries of ``root`` named by ``pattern`` (groups ``host``, ``pid``) whose process, on this host, is gone.

    Entries of other hosts (a shared cache) are never yielded: their pids mean nothing here.
    """
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = pattern.match(p.name)
        if not m or m.group("host") != _HOST:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not _pid_alive(pid):
            yield p, pid


def clean_stale_tmp(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove ``<hash>.tmp-<host>-<pid>-*`` dirs left by dead renderers on this host.

    Directories from other hosts (a shared cache) are left alone: their pids mean nothing here.

    Returns:
        The removed directories.
    """
    removed = []
    for d, pid in _left_by_dead(Path(cache_dir), _TMP):
        if not d.is_dir():
            continue
        log.info("removing %s, left by a render (pid %d) that did not finish", d, pid)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def render_taskset(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Render (or reuse) the dataset for ``cfg`` and return its directory.

    Args:
        cfg: the ``data`` section.
        progress: report progress on stderr.

    Returns:
        The complete dataset directory ``cfg.cache_dir / <hash>`` (see the module docstring for its layout).

    Raises:
        ConfigError: a grid key names no slider of the .dsp, or a family has too few tasks to split.
        RenderError: unstable settings with ``on_unstable: fail`` (names family and parameters),
            too few stable tasks after dropping, a Faust compile error, or too little disk space.
        SourceError: the source audio cannot be read.
    """
    return build_dataset(cfg, lambda tmp, key, h: _render_into(tmp, cfg, key, h, progress))


def build_dataset(cfg: DataConfig, fill: Callable[[Path, dict[str, Any], str], None]) -> Path:
    """Produce ``cfg.cache_dir / <hash>`` atomically: reuse it if complete, else ``fill`` a temporary dir and rename it.

    ``fill(tmp, key, h)`` writes the whole dataset, ``manifest.json`` last, into ``tmp``
    (``<hash>.tmp-<host>-<pid>-<random>`` in the cache). The rename to ``<hash>`` is the
    last step; if ``fill`` raises (or the process is interrupted) ``tmp`` is removed, and a
    killed process leaves only ``tmp``, which is never read. Losing the rename race to
    another renderer of the same hash uses the winner's directory.

    Returns:
        The complete dataset directory.
    """
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = dataset_key(cfg)
    h = _hash_key(key)
    final = cache / h
    if is_complete(final):
        log.info("dataset %s found in the cache; nothing to render", final)
        return final
    if final.exists():
        if is_complete(final):  # another renderer's complete directory just landed
            return final
        # never produced by a renderer (they only rename complete dirs): keep it out of the way
        aside = cache / f"{h}.broken-{os.getpid()}-{secrets.token_hex(4)}"
        log.warning("%s exists without %s (not a finished dataset); moved to %s and rendering again", final, MANIFEST, aside)
        os.rename(final, aside)
    clean_stale_tmp(cache)
    tmp = cache / f"{h}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        fill(tmp, key, h)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
            log.info("another process finished dataset %s first; using it", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class _Prepared:
    """The checks every render makes before touching audio, and what they found."""

    planned: list[PlannedTask]
    infos: list[DspInfo | None]  # per family (None: not compiled, because no task of it is rendered here)
    addresses: list[dict[str, str] | None]  # per family: grid key -> DAWDreamer address
    texts: list[str | None]  # per family: the .dsp source


def prepare(cfg: DataConfig, families: set[int] | None = None) -> _Prepared:
    """Plan the tasks, check the split is feasible, compile the families and resolve slider names.

    Args:
        cfg: the ``data`` section.
        families: indices of the families to compile (default: all). A part renderer
            compiles only its own family.

    Raises:
        ConfigError: too few tasks for a split, or a grid key that names no slider.
        RenderError: a Faust compile error, or an effect without input or output.
    """
    planned = plan_tasks(cfg)
    for fi, fam in enumerate(cfg.families):
        check_split_feasible(fam.name, sum(t.family_index == fi for t in planned), cfg.val_fraction, cfg.test_fraction)
    n = len(cfg.families)
    infos: list[DspInfo | None] = [None] * n
    addresses: list[dict[str, str] | None] = [None] * n
    texts: list[str | None] = [None] * n
    # Compile each family once up front: fail fast on Faust errors and unknown slider names.
    for fi, fam in enumerate(cfg.families):
        if families is not None and fi not in families:
            continue
        texts[fi] = Path(fam.dsp).read_text(encoding="utf-8")
        info = describe_dsp(fam.dsp, cfg.sample_rate, family=fam.name)
        if info.inputs < 1:
            raise RenderError(f"family {fam.name!r}: {fam.dsp} has no audio input, so it cannot process the source; "
                              f"an effect's process must take the signal, e.g. process = fi.lowpass(2, cutoff);")
        if info.outputs < 1:
            raise RenderError(f"family {fam.name!r}: {fam.dsp} has no audio output")
        amap = {}
        for p in fam.params:
            s = info.resolve(p.name, family=fam.name)
            amap[p.name] = s.address
            tol = 1e-6 * max(1.0, abs(s.min), abs(s.max))  # slider bounds are stored as float32
            out = [v for v in p.values if not s.min - tol <= v <= s.max + tol]
            if out and families is None:
                log.warning("family %r: grid values %s of %r lie outside the slider range [%g, %g] in %s; "
                            "they are used as given (Faust does not clamp them here)", fam.name, out, p.name, s.min, s.max, fam.dsp)
        infos[fi] = info
        addresses[fi] = amap
    return _Prepared(planned, infos, addresses, texts)


def _check_disk(where: Path, need: int, what: str = "the dataset") -> None:
    """Raise RenderError if the existing directory ``where`` has less than ``need`` bytes free."""
    free = shutil.disk_usage(where).free
    if need > free:
        raise RenderError(f"{what} needs {need / 1e9:.1f} GB but {where} has {free / 1e9:.1f} GB free: "
                          f"set data.cache_dir (or $METAFX_CACHE) to a larger disk, or lower data.source.seconds or the grid size")


def _unstable_error(t: PlannedTask, reason: str) -> RenderError:
    return RenderError(
        f"unstable render: family {t.family!r}, params {t.params}: {reason}. "
        f"Fix: shrink data.families[{t.family_index}].params to stable settings "
        f"(for ve.moog_vcf keep cutoff below about sample_rate / 7 when resonance > 0), "
        f"or set data.on_unstable: drop to leave such tasks out with a warning"
    )


def _log_drop(t: PlannedTask, reason: str) -> None:
    log.warning("dropping unstable task: family %r, params %s: %s", t.family, t.params, reason)


def _render_rows(cfg: DataConfig, prep: _Prepared, indices: list[int], x: np.ndarray, workers: int,
                 write: Callable[[int, np.ndarray], None], bar: "_Progress | None" = None,
                 log_drops: bool = True) -> dict[int, str]:
    """Render the planned tasks ``indices`` with ``workers`` threads; ``write(i, y)`` each stable row.

    Family by family: only ``min(workers, tasks)`` engines (each holding a copy of the
    source) exist at a time; they are created and destroyed on the DAWDreamer control
    thread, and each thread renders with one engine at a time. ``write`` runs on the
    render threads.

    Returns:
        ``{planned index: reason}`` of the unstable tasks (dropped; ``on_unstable: fail`` raises instead).

    Raises:
        RenderError: an unstable task with ``on_unstable: fail`` (queued tasks are cancelled first).
    """
    sr = cfg.sample_rate
    planned = prep.planned
    input_peak = max(float(np.max(np.abs(x))), 1e-12)

    def work(i: int, pool_q: "queue.Queue[_Renderer]") -> tuple[int, str | None]:
        t = planned[i]
        amap = prep.addresses[t.family_index]
        params = {amap[k]: v for k, v in t.params.items()}
        r = pool_q.get()
        try:
            y = r.render(params)
        finally:
            pool_q.put(r)
        reason = check_stability(y, input_peak, sr)
        if reason is None:
            write(i, y)
        return i, reason

    unstable: dict[int, str] = {}
    done_n = 0
    if bar is not None:
        bar.update(0)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metafx-render") as pool:
        for fi, fam in enumerate(cfg.families):
            idx = [i for i in indices if planned[i].family_index == fi]
            if not idx:
                continue
            n_eng = min(workers, len(idx))
            engines: list[_Renderer] = [
                _on_control(_Renderer, x, sr, fam, prep.texts[fi], prep.infos[fi].inputs) for _ in range(n_eng)
            ]
            pool_q: queue.Queue[_Renderer] = queue.Queue()
            for r in engines:
                pool_q.put(r)
            futures: set[Future] = {pool.submit(work, i, pool_q) for i in idx}
            try:
                while futures:
                    done, futures = wait(futures, return_when=FIRST_COMPLETED)
                    for f in done:
                        i, reason = f.result()  # re-raises a worker's exception
                        done_n += 1
                        if reason is None:
                            continue
                        unstable[i] = reason
                        if cfg.on_unstable == "fail":
                            raise _unstable_error(planned[i], reason)
                        if log_drops:
                            _log_drop(planned[i], reason)
                    if bar is not None:
                        bar.update(done_n)
            except BaseException:
                for g in futures:  # stop early: queued tasks are cancelled, running ones finish
                    g.cancel()
                wait(futures)
                raise
            finally:
                del pool_q
                _on_control(engines.clear)  # destroy the engines on the control thread
    return unstable


def _render_into(tmp: Path, cfg: DataConfig, key: dict[str, Any], h: str, progress: bool) -> None:
    global renders_started
    renders_started += 1
    t_start = time.perf_counter()
    sr = cfg.sample_rate
    prep = prepare(cfg)
    planned = prep.planned

    t0 = time.perf_counter()
    x = load_sources(cfg.source, sr)
    t_source = time.perf_counter() - t0
    T = int(x.size)
    N = len(planned)
    _check_disk(tmp.parent, (N + 1) * T * 4)
    np.save(tmp / "input.npy", x)

    tpath = tmp / "targets.npy"
    mm = np.lib.format.open_memmap(tpath, mode="w+", dtype=np.float32, shape=(N, T))  # writes header, sizes file (sparse)
    offset = int(mm.offset)
    del mm
    workers = cfg.render_workers or os.cpu_count() or 1
    workers = max(1, min(workers, N))
    log.info("rendering %d tasks x %.1f s at %d Hz with %d thread(s) into %s", N, T / sr, sr, workers, tmp)

    t0 = time.perf_counter()
    fd = os.open(tpath, os.O_WRONLY)
    try:
        unstable = _render_rows(cfg, prep, list(range(N)), x, workers,
                                lambda i, y: _pwrite_all(fd, memoryview(y).cast("B"), offset + i * T * 4),
                                _Progress(N, f"render {h[:8]}", progress))
        os.fsync(fd)
    finally:
        os.close(fd)
    t_render = time.perf_counter() - t0

    keep = [i for i in range(N) if i not in unstable]
    _check_after_drop(cfg, planned, unstable)
    if unstable:
        _compact_rows(tpath, offset, keep, T)
    total = time.perf_counter() - t_start
    audio_s = len(keep) * T / sr
    _write_manifest(tmp, cfg, key, h, prep, unstable, T, {
        "workers": workers,
        "block_size": BLOCK_SIZE,
        "source_seconds": round(t_source, 3),
        "render_seconds": round(t_render, 3),
        "total_seconds": round(total, 3),
        "audio_seconds": audio_s,
        "speed_x_realtime": round(audio_s / total, 1) if total > 0 else None,
    })


def _check_after_drop(cfg: DataConfig, planned: list[PlannedTask], unstable: dict[int, str]) -> None:
    kept = [t for i, t in enumerate(planned) if i not in unstable]
    for fi, fam in enumerate(cfg.families):
        n_fam = sum(t.family_index == fi for t in kept)
        dropped_fam = sum(planned[i].family_index == fi for i in unstable)
        check_split_feasible(fam.name, n_fam, cfg.val_fraction, cfg.test_fraction, dropped=dropped_fam)


def _write_manifest(tmp: Path, cfg: DataConfig, key: dict[str, Any], h: str, prep: _Prepared,
                    unstable: dict[int, str], T: int, render_info: dict[str, Any]) -> None:
    """Write ``manifest.json`` (the completeness marker) last into ``tmp`` and fsync the directory.

    Everything except ``created`` and ``render`` (timings, workers, where parts ran) is a
    function of the configuration, so a local and a distributed render write the same.
    """
    planned = prep.planned
    N = len(planned)
    keep = [i for i in range(N) if i not in unstable]
    kept = [planned[i] for i in keep]
    splits = assign_splits([t.family for t in kept], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    manifest = {
        "format_version": FORMAT_VERSION,
        "hash": h,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sample_rate": cfg.sample_rate,
        "num_samples": T,
        "seconds": T / cfg.sample_rate,
        "num_tasks": len(kept),
        "source": {
            "kind": cfg.source.kind,
            "path": str(cfg.source.path) if cfg.source.path else None,
            "seconds": cfg.source.seconds,
            "seed": cfg.source.seed,
            "loudness_db": cfg.source.loudness_db,
            "fingerprint": key["source"],
        },
        "families": [
            {
                "name": fam.name,
                "dsp": str(fam.dsp),
                "dsp_sha256": key["families"][fi]["dsp_sha256"],
                "params": {p.name: list(p.values) for p in fam.params},
                "addresses": prep.addresses[fi],
                "inputs": prep.infos[fi].inputs,
                "outputs": prep.infos[fi].outputs,
                "max_tasks": fam.max_tasks,
                "num_tasks": sum(t.family_index == fi for t in kept),
                "num_dropped": sum(planned[i].family_index == fi for i in unstable),
            }
            for fi, fam in enumerate(cfg.families)
        ],
        "tasks": [
            {"index": j, "id": t.id, "family": t.family, "params": dict(t.params), "split": s, "grid_index": t.grid_index}
            for j, (t, s) in enumerate(zip(kept, splits))
        ],
        "splits": {s: splits.count(s) for s in SPLITS},
        "dropped": [{"family": planned[i].family, "params": dict(planned[i].params), "reason": unstable[i]}
                    for i in sorted(unstable)],
        "on_unstable": cfg.on_unstable,
        "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "versions": {**_versions(), "python": platform.python_version()},
        "render": render_info,
        "key": key,
    }
    _fsync_path(tmp / "input.npy")
    mpath = tmp / (MANIFEST + ".part")
    with open(mpath, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(mpath, tmp / MANIFEST)  # the completeness marker, written last inside tmp
    _fsync_path(tmp)


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _compact_rows(path: Path, offset: int, keep: list[int], T: int) -> None:
    """Rewrite ``targets.npy`` with only the ``keep`` rows (after dropping unstable tasks), streaming row by row."""
    new = path.with_name("targets.compact.npy")
    mm = np.lib.format.open_memmap(new, mode="w+", dtype=np.float32, shape=(len(keep), T))
    new_off = int(mm.offset)
    del mm
    row = T * 4
    src = os.open(path, os.O_RDONLY)
    dst = os.open(new, os.O_WRONLY)
    try:
        for j, i in enumerate(keep):
            buf = os.pread(src, row, offset + i * row)
            if len(buf) != row:
                raise RenderError(f"short read compacting {path} (row {i})")
            _pwrite_all(dst, memoryview(buf), new_off + j * row)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    os.replace(new, path)


# --------------------------------------------------------------------------- parts (rendering spread over processes / nodes)

# A distributed render (metafx.data.distributed) splits the planned tasks into parts, one
# family x chunk of consecutive tasks each. A process renders a part into
# ``<cache>/<hash>.parts/<part>.npy`` (written under a .tmp- name, fsynced, renamed) and then
# ``<part>.json`` (its record: rows, unstable tasks, sha256, where it ran), the part's
# completeness marker. The driver then assembles the parts into the dataset directory with
# build_dataset, exactly as a local render writes it: the same input.npy, targets.npy and
# manifest (but for "created" and "render"). Parts are content-addressed like the dataset (the
# directory carries the hash, the name the tasks), so an interrupted distributed render keeps
# its finished parts and the next one reuses them; the parts directory is removed once the
# dataset is in place. It is never mistaken for a dataset (no manifest, not named <hash>).

PARTS_SUFFIX = ".parts"
_PART_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")

_source_cache: dict[str, np.ndarray] = {}  # hash -> source, in a process that renders several parts of one dataset


@dataclass(frozen=True)
class Part:
    """Consecutive planned tasks of one family, rendered by one process."""

    family_index: int
    family: str
    indices: tuple[int, ...]  # indices into plan_tasks(cfg), ascending

    @property
    def name(self) -> str:
        return f"part-f{self.family_index:03d}-{self.indices[0]:06d}-{self.indices[-1]:06d}"


def parts_dir(cfg: DataConfig, h: str | None = None) -> Path:
    """``<cache_dir>/<hash>.parts``: where the parts of a distributed render of ``cfg`` go."""
    return Path(cfg.cache_dir) / f"{h or dataset_hash(cfg)}{PARTS_SUFFIX}"


def plan_parts(planned: list[PlannedTask], tasks_per_part: int) -> list[Part]:
    """Split the planned tasks into parts of at most ``tasks_per_part`` tasks of one family each."""
    if tasks_per_part < 1:
        raise ValueError(f"tasks_per_part must be >= 1, got {tasks_per_part}")
    parts = []
    for fi in sorted({t.family_index for t in planned}):
        idx = [i for i, t in enumerate(planned) if t.family_index == fi]
        for s in range(0, len(idx), tasks_per_part):
            chunk = tuple(idx[s:s + tasks_per_part])
            parts.append(Part(fi, planned[chunk[0]].family, chunk))
    return parts


def _sha256_stream(path: Path, chunk: int = 1 << 24) -> str:
    hsh = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return hsh.hexdigest()
            hsh.update(b)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def render_part(cfg: DataConfig, h: str, out_dir: str | os.PathLike[str], part: Part, threads: int = 1,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Render one part into ``out_dir/<part>.npy`` atomically and record it in ``out_dir/<part>.json``.

    Runs in the process that renders (a Ray task on any node): the DAWDreamer engines
    are created on this process's control thread and render on ``threads`` threads.

    Args:
        cfg: the ``data`` section, as resolved on this node.
        h: the dataset hash the driver computed; this node must compute the same.
        out_dir: the parts directory (on storage the driver reads too).
        part: which tasks.
        threads: render threads in this process.
        extra: stored in the record (the distributed renderer puts the node there).

    Returns:
        The record: ``name, family_index, family, indices, rows, num_samples, unstable
        ({planned index: reason}), sha256`` (of the .npy file), ``seconds, host, pid, threads`` and ``extra``.

    Raises:
        RenderError: this node computes another dataset hash (different .dsp files, source or
            dawdreamer / numpy versions), an unstable task with ``on_unstable: fail``, or a Faust error.
    """
    t0 = time.perf_counter()
    key = dataset_key(cfg)
    mine = _hash_key(key)
    if mine != h:
        raise RenderError(
            f"host {socket.gethostname()} computes dataset hash {mine} for this configuration but the driver computed "
            f"{h}: the nodes differ in the .dsp files, the source audio or the dawdreamer / numpy versions "
            f"(here: {_versions()}). Give every node the same code and environment")
    prep = prepare(cfg, families={part.family_index})
    planned = prep.planned
    if part.indices[-1] >= len(planned) or any(planned[i].family_index != part.family_index for i in part.indices):
        raise RenderError(f"part {part.name} does not match this node's task plan (tasks of family {part.family!r})")
    x = _source_cache.get(h)
    if x is None:
        x = load_sources(cfg.source, cfg.sample_rate)
        _source_cache.clear()
        _source_cache[h] = x
    T, n = int(x.size), len(part.indices)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{part.name}.npy"
    tmp = out / f"{part.name}.npy.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    _check_disk(out, n * T * 4, f"part {part.name}")
    pos = {i: j for j, i in enumerate(part.indices)}
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, T))
        offset = int(mm.offset)
        del mm
        fd = os.open(tmp, os.O_WRONLY)
        try:
            unstable = _render_rows(cfg, prep, list(part.indices), x, max(1, min(threads, n)),
                                    lambda i, y: _pwrite_all(fd, memoryview(y).cast("B"), offset + pos[i] * T * 4),
                                    None, log_drops=False)
            os.fsync(fd)
        finally:
            os.close(fd)
        sha = _sha256_stream(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {
        "name": part.name, "family_index": part.family_index, "family": part.family, "indices": list(part.indices),
        "rows": n, "num_samples": T, "unstable": {str(i): r for i, r in sorted(unstable.items())}, "sha256": sha,
        "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
        "threads": max(1, min(threads, n)), **(extra or {}),
    }
    _write_json_atomic(out / f"{part.name}.json", record)  # the part's completeness marker, after its data
    _fsync_path(out)
    return record


def read_part(out_dir: str | os.PathLike[str], part: Part, num_samples: int) -> dict[str, Any] | None:
    """The record of a finished part in ``out_dir`` (left by an earlier, interrupted render), else None."""
    out = Path(out_dir)
    try:
        rec = json.loads((out / f"{part.name}.json").read_text(encoding="utf-8"))
        arr = np.load(out / f"{part.name}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if rec.get("indices") != list(part.indices) or arr.shape != (len(part.indices), num_samples) \
            or arr.dtype != np.float32:
        return None
    return rec


def clean_stale_parts(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove ``*.tmp-<host>-<pid>-*`` files in a parts directory left by dead processes of this host."""
    removed = []
    for f, _ in _left_by_dead(Path(out_dir), _PART_TMP):
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def assemble_parts(cfg: DataConfig, h: str, prep: _Prepared, records: list[dict[str, Any]],
                   render_info: dict[str, Any]) -> Path:
    """Assemble rendered parts into the dataset directory, atomically, exactly as a local render writes it.

    Checks that the parts cover every planned task once, that each part file has the
    expected shape and sha256, drops the unstable tasks (with the local render's warnings
    and split checks), then writes ``input.npy``, ``targets.npy`` (stable rows in task
    order) and ``manifest.json`` through :func:`build_dataset`.

    Args:
        cfg: the ``data`` section.
        h: the dataset hash.
        prep: :func:`prepare` of ``cfg`` (all families).
        records: one :func:`render_part` record per part.
        render_info: the manifest's ``render`` section (assembly timing is added).

    Returns:
        The complete dataset directory.

    Raises:
        RenderError: missing or corrupt parts, or too few stable tasks left.
    """
    src_dir = parts_dir(cfg, h)
    planned = prep.planned
    N = len(planned)
    covered = sorted(i for r in records for i in r["indices"])
    if covered != list(range(N)):
        raise RenderError(f"the parts in {src_dir} cover tasks {covered[:5]}... ({len(covered)}), expected each of "
                          f"the {N} planned tasks once")

    def fill(tmp: Path, key: dict[str, Any], h2: str) -> None:
        global renders_started
        renders_started += 1
        if h2 != h:
            raise RenderError(f"dataset hash changed during the render ({h} -> {h2}): a .dsp or source file was edited")
        t0 = time.perf_counter()
        x = load_sources(cfg.source, cfg.sample_rate)
        T = int(x.size)
        unstable = {int(i): reason for r in records for i, reason in r["unstable"].items()}
        if unstable and cfg.on_unstable == "fail":  # the part renderer raises first; kept for safety
            i = min(unstable)
            raise _unstable_error(planned[i], unstable[i])
        for i in sorted(unstable):
            _log_drop(planned[i], unstable[i])
        _check_after_drop(cfg, planned, unstable)
        keep = [i for i in range(N) if i not in unstable]
        new_pos = {i: j for j, i in enumerate(keep)}
        _check_disk(tmp.parent, (len(keep) + 1) * T * 4)
        np.save(tmp / "input.npy", x)
        tpath = tmp / "targets.npy"
        mm = np.lib.format.open_memmap(tpath, mode="w+", dtype=np.float32, shape=(len(keep), T))
        offset = int(mm.offset)
        del mm
        row = T * 4
        dst = os.open(tpath, os.O_WRONLY)
        try:
            for r in sorted(records, key=lambda r: r["indices"][0]):
                p = src_dir / f"{r['name']}.npy"
                try:
                    arr = np.load(p, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise RenderError(f"part {p} cannot be read ({e}): is data.cache_dir shared by every node?") from e
                if arr.shape != (len(r["indices"]), T) or arr.dtype != np.float32:
                    raise RenderError(f"part {p} has shape {arr.shape} {arr.dtype}, expected {(len(r['indices']), T)} float32")
                src_off = int(arr.offset)
                del arr
                hsh = hashlib.sha256()
                src = os.open(p, os.O_RDONLY)
                try:
                    hsh.update(os.pread(src, src_off, 0))
                    for j, i in enumerate(r["indices"]):
                        buf = os.pread(src, row, src_off + j * row)
                        if len(buf) != row:
                            raise RenderError(f"short read in part {p} (row {j})")
                        hsh.update(buf)
                        if i in new_pos:
                            _pwrite_all(dst, memoryview(buf), offset + new_pos[i] * row)
                    tail = os.pread(src, 1 << 16, src_off + len(r["indices"]) * row)
                    hsh.update(tail)
                finally:
                    os.close(src)
                if hsh.hexdigest() != r["sha256"]:
                    raise RenderError(f"part {p} does not have the content its renderer wrote (sha256 mismatch): "
                                      f"the shared cache returned other bytes; delete {src_dir} and render again")
            os.fsync(dst)
        finally:
            os.close(dst)
        info = dict(render_info)
        info["assemble_seconds"] = round(time.perf_counter() - t0, 3)
        _write_manifest(tmp, cfg, key, h, prep, unstable, T, info)

    return build_dataset(cfg, fill)
