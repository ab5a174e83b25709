"""Render a task grid with DAWDreamer into a dataset directory: the only module that imports ``dawdreamer``.

Every task (:class:`metafx.data.plan.PlannedTask`: one family at one grid point)
processes the same dry source signal (:mod:`metafx.data.sources`); the dataset stores
it once plus one target signal per task::

    <cache_dir>/<hash>/
        input.npy      float32 (T,)     the dry source
        targets.npy    float32 (N, T)   row i = task i's output
        manifest.json  sample rate, tasks (index, id, family, params, split), splits, hash, versions, timing

``<hash>`` is :func:`metafx.data.plan.dataset_hash`, so a second run with the same
configuration finds the directory and renders nothing; the directory is published
atomically by :func:`metafx.data.cache.build_dataset`.

Rendering runs in a thread pool (``data.render_workers``; DAWDreamer 0.9
releases the GIL in render and compile) with one ``RenderEngine`` per thread.
Each thread compiles each family once and reuses the processor: DAWDreamer
resets a processor's state at the start of every ``render`` call, so every
task starts from zero state (``tests/test_data_render.py`` checks that results
do not depend on task order or thread count). The target rows are written
straight into ``targets.npy`` (:class:`metafx.data.cache.RowWriter`): only one
row per thread is ever in memory, so the paper budget (600 s x 120 tasks x 48 kHz,
13.8 GB) renders in a few hundred MB of RAM.

Rendering can also be split into parts (:class:`metafx.data.plan.Part`), each rendered by
another process, possibly on another node (:func:`render_part`; the Ray side is
:mod:`metafx.data.distributed`), and assembled into the same dataset, byte for byte
(:func:`assemble_parts`). Both paths share the checks (:func:`prepare`), the render loop and
one dataset writer (:func:`_write_dataset`), and publish through
:func:`~metafx.data.cache.build_dataset`.

Faust I/O: the mono source is fed to every input of the effect; if the effect
has several outputs, output channel 0 is the target. An effect without inputs is
rejected. DAWDreamer adds no latency to Faust processors: output sample n
answers input sample n (checked against an impulse and the exact difference
equation in the tests).
"""
from __future__ import annotations

import logging
import math
import os
import platform
import queue
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dawdreamer as daw
import numpy as np

from metafx.config import ConfigError, DataConfig, FamilyConfig
from metafx.data.cache import (MANIFEST, Progress, RenderResult, RowReader, RowWriter, atomic_file, build_dataset,
                               check_disk, compact_rows, copy_rows, fsync_path, write_json_atomic)
from metafx.data.plan import (FORMAT_VERSION, SPLITS, UNSTABLE_GAIN, Part, PlannedTask, RenderError, assign_splits,
                              check_plan_splits, dataset_key, hash_key, parts_dir, plan_tasks, sha256_file, versions)
from metafx.data.sources import load_sources

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096  # DAWDreamer block size; results do not depend on it, speed does (512 is ~7x slower)


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

    def resolve(self, name: str, *, family: str = "?", key: str = "data.families[...].params", dsp: Any = None) -> Slider:
        """The slider a grid key refers to: by label, full address, or address suffix.

        Args:
            name: the grid key.
            family: name used in error messages.
            key: the dotted key of the family's grid, e.g. ``data.families[0].params``.
            dsp: the .dsp file, named in error messages.

        Returns:
            The one matching :class:`Slider`.

        Raises:
            ConfigError: no slider or several sliders match ``name`` (its ``key`` is ``<key>.<name>``).
        """
        hits = [s for s in self.sliders if name in (s.label, s.address) or s.address.endswith("/" + name)]
        if len(hits) == 1:
            return hits[0]
        full = f"{key}.{name}"
        where = f"the .dsp{f' {dsp}' if dsp else ''}"
        if not hits:
            labels = ", ".join(s.label for s in self.sliders) or "(none)"
            fix = f"rename the key under {key} or add hslider(\"{name}\", ...) to the .dsp"
            raise ConfigError(f"key '{full}': family {family!r}: {where} has no slider named {name!r}; its sliders "
                              f"are: {labels}. Fix: {fix}", key=full, allowed=fix)
        addrs = ", ".join(s.address for s in hits)
        raise ConfigError(f"key '{full}': family {family!r}: slider name {name!r} is ambiguous in {where} ({addrs}); "
                          "use the full address as the key", key=full, allowed="the full address as the key")


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


@dataclass
class Prepared:
    """The checks every render makes before touching audio, and what they found."""

    planned: list[PlannedTask]
    infos: list[DspInfo | None]  # per family (None: not compiled, because no task of it is rendered here)
    addresses: list[dict[str, str] | None]  # per family: grid key -> DAWDreamer address
    texts: list[str | None]  # per family: the .dsp source


def prepare(cfg: DataConfig, families: set[int] | None = None) -> Prepared:
    """Plan the tasks, check the split is feasible, compile the families and resolve slider names.

    Args:
        cfg: the ``data`` section.
        families: indices of the families to compile (default: all). A part renderer
            compiles only its own family.

    Returns:
        The :class:`Prepared` plan.

    Raises:
        ConfigError: too few tasks for a split, or a grid key that names no slider.
        RenderError: a Faust compile error, or an effect without input or output.
    """
    planned = plan_tasks(cfg)
    check_plan_splits(cfg, planned)
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
            s = info.resolve(p.name, family=fam.name, key=f"data.families[{fi}].params", dsp=fam.dsp)
            amap[p.name] = s.address
            tol = 1e-6 * max(1.0, abs(s.min), abs(s.max))  # slider bounds are stored as float32
            out = [v for v in p.values if not s.min - tol <= v <= s.max + tol]
            if out and families is None:
                log.warning("family %r: grid values %s of %r lie outside the slider range [%g, %g] in %s; "
                            "they are used as given (Faust does not clamp them here)", fam.name, out, p.name, s.min, s.max, fam.dsp)
        infos[fi] = info
        addresses[fi] = amap
    return Prepared(planned, infos, addresses, texts)


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

    Unstable means a non-finite sample, or a peak above :data:`~metafx.data.plan.UNSTABLE_GAIN`
    x the input peak (a filter that grows without bound reaches that long before overflow).

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


def _unstable_error(planned: list[PlannedTask], unstable: dict[int, str]) -> RenderError:
    """The ``on_unstable: fail`` error, naming every unstable setting (``{planned index: reason}``)."""
    items = "; ".join(f"family {planned[i].family!r}, params {planned[i].params}: {unstable[i]}" for i in sorted(unstable))
    grids = ", ".join(f"data.families[{fi}].params" for fi in sorted({planned[i].family_index for i in unstable}))
    return RenderError(
        f"unstable render: {len(unstable)} of {len(planned)} setting(s) (data.on_unstable: fail): {items}. "
        f"Fix: shrink {grids} to stable settings "
        f"(for ve.moog_vcf keep cutoff below about sample_rate / 7 when resonance > 0), "
        f"or set data.on_unstable: drop to leave such tasks out with a warning"
    )


def _log_drop(t: PlannedTask, reason: str) -> None:
    log.warning("dropping unstable task: family %r, params %s: %s", t.family, t.params, reason)


def _render_rows(cfg: DataConfig, prep: Prepared, indices: list[int], x: np.ndarray, workers: int,
                 write: Callable[[int, np.ndarray], None], bar: Progress | None = None,
                 log_drops: bool = True, raise_unstable: bool = True) -> dict[int, str]:
    """Render the planned tasks ``indices`` with ``workers`` threads; ``write(i, y)`` each stable row.

    Family by family: only ``min(workers, tasks)`` engines (each holding a copy of the
    source) exist at a time; they are created and destroyed on the DAWDreamer control
    thread, and each thread renders with one engine at a time. ``write`` runs on the
    render threads.

    Args:
        raise_unstable: with ``on_unstable: fail``, raise once every task is rendered (so the
            error names every unstable setting); False returns them (a part's record, the
            assembly raises).

    Returns:
        ``{planned index: reason}`` of the unstable tasks (dropped; ``on_unstable: fail`` raises instead).

    Raises:
        RenderError: unstable tasks with ``on_unstable: fail`` and ``raise_unstable``, naming each.
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
                        if log_drops and cfg.on_unstable != "fail":
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
    if unstable and cfg.on_unstable == "fail" and raise_unstable:
        raise _unstable_error(planned, unstable)
    return unstable


# --------------------------------------------------------------------------- the dataset writer (local render and assembled parts)


def _write_dataset(tmp: Path, cfg: DataConfig, key: dict[str, Any], h: str, prep: Prepared, x: np.ndarray, rows: int,
                   fill: Callable[[RowWriter], dict[int, str]], render_info: Callable[[], dict[str, Any]]) -> None:
    """Write ``input.npy``, ``targets.npy`` and ``manifest.json`` (last) of one dataset into ``tmp``.

    The one writer of a dataset directory's content: a local render and the assembly of
    parts both go through it, so they write the same bytes.

    Args:
        tmp: the temporary dataset directory (:func:`~metafx.data.cache.build_dataset`).
        cfg, key, h: the ``data`` section, its dataset key and hash.
        prep: :func:`prepare` of ``cfg`` (all families).
        x: the source, float32 ``(T,)``.
        rows: rows of ``targets.npy`` as ``fill`` writes it: every planned task (a render,
            which finds the unstable ones as it goes) or only the stable ones (an assembly).
        fill: writes the target rows into the :class:`~metafx.data.cache.RowWriter` it is
            given and returns ``{planned index: reason}`` of the unstable tasks. If it wrote
            more rows than there are stable tasks, the file is compacted to the stable rows.
        render_info: the manifest's ``render`` section, called once the arrays are complete.

    Raises:
        RenderError: too little disk space, or too few stable tasks left for the split.
    """
    T = int(x.size)
    check_disk(tmp.parent, (rows + 1) * T * 4)
    np.save(tmp / "input.npy", x)
    tpath = tmp / "targets.npy"
    with RowWriter(tpath, rows, T) as writer:
        unstable = fill(writer)
    check_plan_splits(cfg, prep.planned, unstable)
    keep = [i for i in range(len(prep.planned)) if i not in unstable]
    if len(keep) < rows:
        compact_rows(tpath, keep)
    _write_manifest(tmp, cfg, key, h, prep, unstable, T, render_info())


def _write_manifest(tmp: Path, cfg: DataConfig, key: dict[str, Any], h: str, prep: Prepared,
                    unstable: dict[int, str], T: int, render_info: dict[str, Any]) -> None:
    """Write ``manifest.json`` (the completeness marker) last into ``tmp`` and fsync the directory.

    Everything except ``created`` and ``render`` (timings, workers, where parts ran) is a
    function of the configuration, so a local and a distributed render write the same.
    """
    planned = prep.planned
    kept = [t for i, t in enumerate(planned) if i not in unstable]
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
        "versions": {**versions(), "python": platform.python_version()},
        "render": render_info,
        "key": key,
    }
    fsync_path(tmp / "input.npy")
    write_json_atomic(tmp / MANIFEST, manifest)  # the completeness marker, written last inside tmp
    fsync_path(tmp)


# --------------------------------------------------------------------------- a local render


def render_taskset(cfg: DataConfig, *, progress: bool = True) -> RenderResult:
    """Render (or reuse) the dataset for ``cfg``.

    Args:
        cfg: the ``data`` section.
        progress: report progress on stderr.

    Returns:
        The complete dataset directory ``cfg.cache_dir / <hash>`` (see the module docstring
        for its layout) and whether this call rendered it (False: it was in the cache).

    Raises:
        ConfigError: a grid key names no slider of the .dsp, or a family has too few tasks to split.
        RenderError: unstable settings with ``on_unstable: fail`` (names family and parameters),
            too few stable tasks after dropping, a Faust compile error, or too little disk space.
        SourceError: the source audio cannot be read.
    """
    return build_dataset(cfg, lambda tmp, key, h: _render_into(tmp, cfg, key, h, progress))


def _render_into(tmp: Path, cfg: DataConfig, key: dict[str, Any], h: str, progress: bool) -> None:
    """Render every planned task of ``cfg`` into the temporary dataset directory ``tmp``."""
    t_start = time.perf_counter()
    sr = cfg.sample_rate
    prep = prepare(cfg)
    N = len(prep.planned)
    t0 = time.perf_counter()
    x = load_sources(cfg.source, sr)
    t_source = time.perf_counter() - t0
    T = int(x.size)
    workers = max(1, min(cfg.render_workers or os.cpu_count() or 1, N))
    t_render, n_kept = 0.0, N

    def fill(writer: RowWriter) -> dict[int, str]:  # each task's row at its planned index
        nonlocal t_render, n_kept
        log.info("rendering %d tasks x %.1f s at %d Hz with %d thread(s) into %s", N, T / sr, sr, workers, tmp)
        t0 = time.perf_counter()
        unstable = _render_rows(cfg, prep, list(range(N)), x, workers, writer.write, Progress(N, f"render {h[:8]}", progress))
        writer.fsync()
        t_render, n_kept = time.perf_counter() - t0, N - len(unstable)
        return unstable

    def render_info() -> dict[str, Any]:
        total = time.perf_counter() - t_start
        audio_s = n_kept * T / sr
        return {
            "workers": workers,
            "block_size": BLOCK_SIZE,
            "source_seconds": round(t_source, 3),
            "render_seconds": round(t_render, 3),
            "total_seconds": round(total, 3),
            "audio_seconds": audio_s,
            "speed_x_realtime": round(audio_s / total, 1) if total > 0 else None,
        }

    _write_dataset(tmp, cfg, key, h, prep, x, N, fill, render_info)


# --------------------------------------------------------------------------- parts (rendering spread over processes / nodes)

# A part is rendered into ``<cache>/<hash>.parts/<part>.npy`` (under a .tmp- name, fsynced, renamed),
# then ``<part>.json``, its record and completeness marker (rows, unstable tasks, sha256, where it
# ran). Finished parts of an interrupted render are reused (metafx.data.cache.read_part); the
# driver assembles them through the local render's dataset writer and removes the parts directory.

_source_cache: dict[str, np.ndarray] = {}  # hash -> source, in a process that renders several parts of one dataset


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
            dawdreamer / numpy versions), or a Faust error. Unstable tasks are recorded, also with
            ``on_unstable: fail`` (:func:`assemble_parts` raises then, naming those of every part).
    """
    t0 = time.perf_counter()
    mine = hash_key(dataset_key(cfg))
    if mine != h:
        raise RenderError(
            f"host {socket.gethostname()} computes dataset hash {mine} for this configuration but the driver computed "
            f"{h}: the nodes differ in the .dsp files, the source audio or the dawdreamer / numpy versions "
            f"(here: {versions()}). Give every node the same code and environment")
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
    check_disk(out, n * T * 4, f"part {part.name}")
    pos = {i: j for j, i in enumerate(part.indices)}
    threads = max(1, min(threads, n))
    with atomic_file(out / f"{part.name}.npy") as tmp:
        with RowWriter(tmp, n, T) as writer:
            # on_unstable: fail is raised by the assembly, which names the unstable settings of every part
            unstable = _render_rows(cfg, prep, list(part.indices), x, threads, lambda i, y: writer.write(pos[i], y),
                                    None, log_drops=False, raise_unstable=False)
        sha = sha256_file(tmp)
    record = {
        "name": part.name, "family_index": part.family_index, "family": part.family, "indices": list(part.indices),
        "rows": n, "num_samples": T, "unstable": {str(i): r for i, r in sorted(unstable.items())}, "sha256": sha,
        "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
        "threads": threads, **(extra or {}),
    }
    write_json_atomic(out / f"{part.name}.json", record)  # the part's completeness marker, after its data
    fsync_path(out)
    return record


def assemble_parts(cfg: DataConfig, h: str, prep: Prepared, records: list[dict[str, Any]],
                   render_info: dict[str, Any]) -> RenderResult:
    """Assemble rendered parts into the dataset directory, atomically, exactly as a local render writes it.

    Checks that the parts cover every planned task once, that each part file has the
    expected shape and sha256, drops the unstable tasks (with the local render's warnings
    and split checks), then writes the dataset through the local render's writer
    (stable rows in task order) and publishes it with :func:`~metafx.data.cache.build_dataset`.

    Args:
        cfg: the ``data`` section.
        h: the dataset hash.
        prep: :func:`prepare` of ``cfg`` (all families).
        records: one :func:`render_part` record per part.
        render_info: the manifest's ``render`` section (assembly timing is added).

    Returns:
        The complete dataset directory, and whether this call wrote it.

    Raises:
        RenderError: missing or corrupt parts, unstable tasks with ``on_unstable: fail`` (naming
            every one), or too few stable tasks left.
    """
    src_dir = parts_dir(cfg, h)
    planned = prep.planned
    N = len(planned)
    covered = sorted(i for r in records for i in r["indices"])
    if covered != list(range(N)):
        raise RenderError(f"the parts in {src_dir} cover tasks {covered[:5]}... ({len(covered)}), expected each of "
                          f"the {N} planned tasks once")
    unstable = {int(i): reason for r in records for i, reason in r["unstable"].items()}
    if unstable and cfg.on_unstable == "fail":
        raise _unstable_error(planned, unstable)

    def assemble(tmp: Path, key: dict[str, Any], h2: str) -> None:
        if h2 != h:
            raise RenderError(f"dataset hash changed during the render ({h} -> {h2}): a .dsp or source file was edited")
        t0 = time.perf_counter()
        x = load_sources(cfg.source, cfg.sample_rate)
        T = int(x.size)
        for i in sorted(unstable):
            _log_drop(planned[i], unstable[i])
        check_plan_splits(cfg, planned, unstable)
        keep = [i for i in range(N) if i not in unstable]
        new_pos = {i: j for j, i in enumerate(keep)}

        def fill(writer: RowWriter) -> dict[int, str]:  # only the stable rows, at their final index
            for r in sorted(records, key=lambda r: r["indices"][0]):
                _copy_part(src_dir / f"{r['name']}.npy", r, T, new_pos, writer)
            return unstable

        def info() -> dict[str, Any]:
            return {**render_info, "assemble_seconds": round(time.perf_counter() - t0, 3)}

        _write_dataset(tmp, cfg, key, h, prep, x, len(keep), fill, info)

    return build_dataset(cfg, assemble)


def _copy_part(p: Path, rec: dict[str, Any], T: int, new_pos: dict[int, int], writer: RowWriter) -> None:
    """Copy the stable rows of part file ``p`` to their ``new_pos`` in ``writer``, checking the file's sha256 on the way."""
    try:
        reader = RowReader(p)
    except (OSError, ValueError) as e:
        raise RenderError(f"part {p} cannot be read ({e}): is data.cache_dir shared by every node?") from e
    with reader:
        if reader.shape != (len(rec["indices"]), T) or reader.dtype != np.float32:
            raise RenderError(f"part {p} has shape {reader.shape} {reader.dtype}, expected {(len(rec['indices']), T)} float32")
        rows = {j: new_pos[i] for j, i in enumerate(rec["indices"]) if i in new_pos}
        sha = copy_rows(reader, writer, rows, digest=True)
    if sha != rec["sha256"]:
        raise RenderError(f"part {p} does not have the content its renderer wrote (sha256 mismatch): "
                          f"the shared cache returned other bytes; delete {p.parent} and render again")
