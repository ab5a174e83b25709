"""Native export: an ARX capture as one self-contained C file (``model.c``) and the shared library built from it.

Why: a TorchScript export (:mod:`metafx.export`) runs a block as a few hundred tensor operations,
each dispatched by the TorchScript interpreter and most of them over a few hundred float64 samples;
with the Wiener bank kept (about 120 channels) that is 8-14x real time on one core at blocks of 256,
far from what a real-time host needs beside other plugins. The same computation written as loops over
a block's samples (:file:`metafx/native_arx.c`) has no dispatch, keeps the recursions sequential
(two operations per one-pole per sample instead of a Toeplitz product), and lets the compiler run the
memoryless parts several samples per instruction (glibc's vector ``exp``/``log``/``log1p``/``tanh``).
It is also what an audio host can use directly: a plugin (VST3, CLAP, AU, LV2) includes ``model.h``
(:file:`metafx/native_arx.h`, written beside ``model.c``; C++ guards), compiles ``model.c`` in as C
and calls four functions, no Python, no torch.

``model.c`` = a generated header (the model's sizes as ``MFX_*`` macros, its numbers as ``static const``
arrays, float64 printed to 17 significant digits and float32 to 9: exact round trips) followed by the
runtime :file:`metafx/native_arx.c`, which documents the C API (``mfx_create``, ``mfx_process``,
``mfx_reset``, ``mfx_destroy``, ``mfx_sample_rate``, ``mfx_latency_samples``). It computes what
:class:`metafx.export.ARXStream` computes, in the same precision per stage, so its output equals
``model.ts`` to float rounding (tests: 1e-5, whole files and blocks of any size).

Supported: the ``arx`` export without a network trunk (every capture of the shipped meta-model); an
export with an LSTM or TCN trunk, or a non-ARX export, raises :class:`NativeExportError` (use
``model.ts``).

Loading a library from Python needs only ``ctypes`` (no metafx, no torch)::

    import ctypes, numpy as np
    lib = ctypes.CDLL("model.so")
    lib.mfx_create.restype = ctypes.c_void_p
    lib.mfx_process.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    st = lib.mfx_create()
    x = np.ascontiguousarray(dry, dtype=np.float32); y = np.empty_like(x)
    lib.mfx_process(st, x.ctypes.data, y.ctypes.data, x.size)      # or block by block with the same st
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from metafx.export import EXPORT_VERSION, ExportError

RUNTIME = Path(__file__).with_name("native_arx.c")  # the generic half of model.c
HEADER = Path(__file__).with_name("native_arx.h")  # model.h: the C API, for a host that compiles model.c in
NATIVE_ABI = 1  # mfx_abi_version() of that runtime (MFX_ABI there)
CC_ENV = "CC"  # the C compiler: $CC, else cc, gcc or clang on PATH
LIBRARY = "model.so"  # the shared library a native export builds beside model.c (loaded by ctypes)
# -O2 with the vectorizer's dynamic cost model: the speed of -O3 here (amp capture 77-79x either way) in a third
# of its compile time (0.46 s against 1.4-1.6 s), which a capture waits for
# -fno-trapping-math: GCC if-converts (and so vectorizes) the loops with a comparison in them (the clamps, floors and
# mins of the gain units, the envelopes' log, the curve table, ADAA's small steps) only where comparisons may not trap:
# the banked libraries 1.09-1.35x faster (benchmarks/export_rtf.md); the runtime reads no floating-point exception flags
BASE_FLAGS = ["-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic", "-fPIC", "-shared", "-fno-math-errno",
              "-fno-trapping-math"]
MINIMAL_FLAGS = ["-O2", "-fPIC", "-shared"]  # any C compiler (clang has no -fvect-cost-model)
VECMATH_FLAGS = ["-march=native", "-fopenmp-simd", "-DMFX_VECMATH"]  # + -lmvec: glibc >= 2.35 on x86_64


class NativeExportError(ExportError):
    """A model has no native export, or the C compiler is missing or failed; the message says what to use."""


def _get(module: Any, name: str) -> Any:
    """An attribute of an ARXStream or of its scripted module, tensors as float64 numpy arrays."""
    v = getattr(module, name)
    if hasattr(v, "detach"):
        return v.detach().cpu().double().numpy()
    return v


def _array(name: str, values: Iterable[float], c_type: str = "double") -> str:
    """``static const <c_type> NAME[n] = {...};`` (at least one element: C has no empty arrays)."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise NativeExportError(f"native export: {name} has non-finite values; the model cannot be exported")
    if v.size == 0:
        v = np.zeros(1)
    if c_type == "float":
        body = ", ".join(repr(float(np.float32(x))) + "f" for x in v)
    else:
        body = ", ".join(format(float(x), ".17g") for x in v)
    return f"static const {c_type} {name}[{v.size}] = {{{body}}};"


def c_header(stream: Any) -> str:
    """The generated half of ``model.c``: the sizes and numbers of an ARX export.

    Args:
        stream: a :class:`metafx.export.ARXStream` (or its scripted module, or a loaded ``model.ts`` of this
            metafx version) with its head installed.

    Returns:
        C source (macros and ``static const`` arrays).

    Raises:
        NativeExportError: not an ARX export, an export with a network trunk, or one saved before the pointwise
            MLP's weights were kept in the file (export the capture again).
    """
    kind = str(getattr(stream, "kind", ""))
    if kind != "arx":
        raise NativeExportError(f"native export covers ARX captures only, not {kind!r}: use model.ts (TorchScript)")
    if int(stream.n_trunk):
        raise NativeExportError("native export has no LSTM/TCN trunk: use model.ts (TorchScript) for an ARX model "
                                "with model.arx.features = lstm or tcn")
    g = lambda k: int(getattr(stream, k))  # noqa: E731
    n_point, n_filter, n_env, n_gate, n_start = g("n_point"), g("n_filter"), g("n_env"), g("n_gate"), g("n_start")
    P1, p1b, P2, p2b = _get(stream, "P1"), _get(stream, "p1b"), _get(stream, "P2"), _get(stream, "p2b")
    if n_point and P1.size == 0:
        raise NativeExportError("this model.ts predates native export (no pointwise MLP weights in the file): "
                                "capture again to get model.c")
    n_bank_lp, n_att, n_peak = g("n_bank_lp"), g("n_att"), g("n_peak")
    n_gain, n_grid, n_dyn = g("n_gain"), g("n_grid"), g("n_dyn")
    n_aa, n_cas = g("n_aa"), g("n_cas")
    n_curve = int(_get(stream, "bank_W").shape[0]) if _get(stream, "bank_W").size else 0
    nb, na = g("nb"), g("na")
    n_framed = g("n_framed")
    want = 2 + n_point + n_gate + n_env + n_curve + n_aa + n_cas
    if n_framed != want:
        raise NativeExportError(f"native export: {n_framed} framed channels, the runtime computes {want}; "
                                "use model.ts (TorchScript)")
    levels = _get(stream, "gain_levels")
    G1 = _get(stream, "G1")
    dyn_pw = _get(stream, "dyn_pw")
    cas_pw = _get(stream, "cas_pw")
    env_pw = _get(stream, "env_pw")
    fir_W = _get(stream, "fir_W")  # (nb, n_framed): row k is lag nb - 1 - k
    b = fir_W.T[:, ::-1]  # (n_framed, nb): b[m, lag]
    a = _get(stream, "a")
    lines = [
        "/* metafx native export: generated by metafx/native_export.py; the runtime follows (metafx/native_arx.c) */",
        f"#define MFX_FORMAT {EXPORT_VERSION}",
        f"#define MFX_SR {g('sample_rate')}",
        f"#define MFX_LAT {g('latency_samples')}",
        f"#define MFX_NB {nb}", f"#define MFX_NA {na}",
        f"#define MFX_NFR {n_framed}", f"#define MFX_NG {n_gain}",
        f"#define MFX_NPOINT {n_point}", f"#define MFX_PH {P1.shape[0] if P1.size else 0}",
        f"#define MFX_TABLE {1 if n_point and not n_filter else 0}",
        f"#define MFX_TSIZE {g('table_size')}",
        f"#define MFX_TLO {format(float(stream.table_lo), '.17g')}",
        f"#define MFX_TINV {format(float(stream.table_inv_step), '.17g')}",
        f"#define MFX_NE {n_env}", f"#define MFX_NGATE {n_gate}", f"#define MFX_GH {G1.shape[0] if G1.size else 0}",
        f"#define MFX_NSTART {n_start}", f"#define MFX_NF {n_filter}", f"#define MFX_NBLP {n_bank_lp}",
        f"#define MFX_NATT {n_att}", f"#define MFX_NPEAK {n_peak}", f"#define MFX_NATTACK {g('n_attack')}",
        f"#define MFX_NPOLE {g('n_pole')}", f"#define MFX_NR {n_curve}", f"#define MFX_NAA {n_aa}",
        f"#define MFX_NCAS {n_cas}", f"#define MFX_NCASLP {g('n_cas_lp')}",
        f"#define MFX_NGRID {n_grid}", f"#define MFX_NLEV {levels.size}", f"#define MFX_NDYN {n_dyn}",
        f"#define MFX_HOLD {g('dyn_hold')}",
        f"#define MFX_ENV_FLOOR {format(float(stream.env_floor), '.17g')}",
        f"#define MFX_INV_LN10 {format(float(stream.inv_ln10), '.17g')}",
        f"#define MFX_GAIN_FLOOR {format(float(stream.gain_floor), '.17g')}",
        f"#define MFX_ADAA_EPS {format(float(stream.adaa_eps), '.17g')}",
        f"#define MFX_CAS_SHIFT {format(float(stream.cas_shift), '.17g')}",
        f"#define MFX_DYN_ATT {format(float(dyn_pw[0, 0]) if n_dyn else 0.0, '.17g')}",
        f"#define MFX_DYN_REL {format(float(dyn_pw[1, 0]) if n_dyn else 0.0, '.17g')}",
        f"#define MFX_CAS_C {format(float(_get(stream, 'cas_c').reshape(-1)[0]) if n_cas else 0.0, '.17g')}",
        _array("POLE_A", env_pw[:, 0] if env_pw.size else []),
        _array("PEAK_R", np.exp(_get(stream, "peak_logr"))),
        _array("P1", P1), _array("P1B", p1b), _array("P2", P2), _array("P2B", p2b),
        _array("START_TAU", _get(stream, "start_tau")),
        _array("G1", G1, "float"), _array("G1B", _get(stream, "g1b"), "float"),
        _array("G2", _get(stream, "G2"), "float"), _array("G2B", _get(stream, "g2b"), "float"),
        _array("BANK_W", _get(stream, "bank_W"), "float"), _array("BANK_C", _get(stream, "bank_c"), "float"),
        _array("AA_W", _get(stream, "aa_W")), _array("AA_C", _get(stream, "aa_c")),
        _array("CAS_W", _get(stream, "cas_W")), _array("CAS_BETA", _get(stream, "cas_beta")),
        _array("CAS_G", _get(stream, "cas_g")), _array("CAS_B", _get(stream, "cas_b")),
        _array("CAS_A", cas_pw[:, 0] if cas_pw.size else []),
        _array("LEV", levels), _array("DYN_LEV", _get(stream, "dyn_levels")),
        _array("FIR_B", b), _array("GAIN_W", _get(stream, "gain_w")), _array("AR", a[1:]),
    ]
    return "\n".join(lines) + "\n"


def write_c(stream: Any, path: Path) -> Path:
    """Write ``model.c`` (the header of :func:`c_header`, then the runtime) and, beside it, the C API's header
    (``model.h`` for ``model.c``: :data:`HEADER`, with C++ guards) that a host includes.

    Returns:
        The path of the C file.

    Raises:
        NativeExportError: see :func:`c_header`.
    """
    text = c_header(stream) + "\n" + RUNTIME.read_text(encoding="utf-8")  # raises before anything is written
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    path.with_suffix(".h").write_text(HEADER.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def find_compiler() -> str | None:
    """The C compiler: ``$CC``, else the first of cc, gcc, clang on PATH; None when there is none."""
    cc = os.environ.get(CC_ENV)
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _vecmath() -> bool:
    """glibc >= 2.35 on x86_64: libmvec has vector exp, log, log1p and tanh."""
    lib, ver = platform.libc_ver()
    if lib != "glibc" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        major, minor = (int(p) for p in ver.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def compile_c(c_file: Path, library: Path, cc: str | None = None) -> dict[str, Any]:
    """Compile ``model.c`` into a shared library for this machine.

    With glibc's vector math (:func:`_vecmath`) first (``-march=native``: built for this CPU, as a host
    building its plugin would), then without it, then with :data:`MINIMAL_FLAGS` if those fail.

    Args:
        c_file: the ``model.c`` of :func:`write_c`. library: the ``.so`` to write.
        cc: the compiler (default :func:`find_compiler`).

    Returns:
        ``{"compiler", "command", "seconds"}``.

    Raises:
        NativeExportError: no compiler, or it failed (its last error line in the message).
    """
    cc = cc or find_compiler()
    if cc is None:
        raise NativeExportError("no C compiler for the native export (model.c is written; install gcc or clang, "
                                "or set CC, to build model.so): model.ts still works")
    attempts = []
    if _vecmath():
        attempts.append([cc, *BASE_FLAGS, *VECMATH_FLAGS, str(c_file), "-o", str(library), "-lmvec", "-lm"])
    attempts.append([cc, *BASE_FLAGS, str(c_file), "-o", str(library), "-lm"])
    attempts.append([cc, *MINIMAL_FLAGS, str(c_file), "-o", str(library), "-lm"])
    t0 = time.perf_counter()
    err = ""
    for cmd in attempts:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # the compiler itself is missing
            raise NativeExportError(f"compiling {c_file} failed: C compiler {cc!r} not found ({e.strerror}); install "
                                    f"gcc or clang, or set CC (model.ts still works)") from e
        if r.returncode == 0:
            return {"compiler": cc, "command": " ".join(cmd), "seconds": time.perf_counter() - t0}
        lines = r.stderr.strip().splitlines() or ["(no output)"]
        err = next((ln.strip() for ln in lines if "error" in ln), lines[-1].strip())
    raise NativeExportError(f"compiling {c_file} failed ({cc}: {err}); model.ts still works")


class NativeModel:
    """A compiled native export, through ctypes: whole signals and blocks with a carried state.

    Args:
        library: the ``.so`` of :func:`compile_c`.

    Raises:
        NativeExportError: not a metafx native library, or of another ABI version.
    """

    def __init__(self, library: Path):
        self.path = Path(library)
        try:
            lib = ctypes.CDLL(str(self.path))
            lib.mfx_abi_version.restype = ctypes.c_int
        except (OSError, AttributeError) as e:
            raise NativeExportError(f"{self.path} is not a metafx native library ({e}): build it with "
                                    "metafx.native_export.compile_c") from e
        if lib.mfx_abi_version() != NATIVE_ABI:
            raise NativeExportError(f"{self.path} has native ABI {lib.mfx_abi_version()}, this metafx reads "
                                    f"{NATIVE_ABI}: export the capture again")
        lib.mfx_create.restype = ctypes.c_void_p
        lib.mfx_destroy.argtypes = [ctypes.c_void_p]
        lib.mfx_reset.argtypes = [ctypes.c_void_p]
        lib.mfx_process.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        self.lib = lib
        self.sample_rate = int(lib.mfx_sample_rate())
        self.latency_samples = int(lib.mfx_latency_samples())

    def create(self) -> int:
        """A new zero state (a pointer; free it with :meth:`destroy`)."""
        st = self.lib.mfx_create()
        if not st:
            raise MemoryError("mfx_create returned NULL")
        return st

    def destroy(self, state: int) -> None:
        self.lib.mfx_destroy(state)

    def run(self, state: int, x: np.ndarray) -> np.ndarray:
        """One block with the carried ``state``: float32 (T,) -> (T,)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty_like(x)
        self.lib.mfx_process(state, x.ctypes.data, y.ctypes.data, x.size)
        return y

    def process(self, x: np.ndarray) -> np.ndarray:
        """The whole signal from a zero state, float32 (T,) -> (T,)."""
        st = self.create()
        try:
            return self.run(st, x)
        finally:
            self.destroy(st)

    def real_time_factors(self, block: int = 256, seconds: float = 5.0, seed: int = 0) -> tuple[float, float]:
        """Seconds of audio per second of wall time and of this process's CPU time, blocks of ``block``.

        The input and warm-up of :func:`metafx.export.real_time_factors` (noise at -18 dBFS RMS, 20
        blocks first); the library runs on the calling thread.
        """
        rng = np.random.default_rng(seed)
        n_blocks = max(1, int(seconds * self.sample_rate) // block)
        x = (rng.standard_normal((n_blocks + 20, block)) * 10 ** (-18 / 20)).astype(np.float32)
        y = np.empty(block, dtype=np.float32)
        st = self.create()
        proc, yp = self.lib.mfx_process, y.ctypes.data
        try:
            for i in range(20):
                proc(st, x[i].ctypes.data, yp, block)
            ptrs = [x[i].ctypes.data for i in range(20, n_blocks + 20)]
            t, c = time.perf_counter(), time.process_time()
            for p in ptrs:
                proc(st, p, yp, block)
            audio = n_blocks * block / self.sample_rate
            return audio / (time.perf_counter() - t), audio / (time.process_time() - c)
        finally:
            self.destroy(st)


class NativeBuild:
    """A native export under way: ``model.c`` written, ``model.so`` compiling on a thread.

    Why: the compiler is its own process (0.1-0.7 s measured); a caller with other work (the capture
    fits its baselines meanwhile) starts the build with :func:`start_native` and calls :meth:`finish`
    when it needs the library. :func:`export_native` is the two in a row.

    Attributes:
        info: the export's record, the results' ``export.native``: ``{"c", "header", "library", "compiler",
            "command", "compile_seconds", "max_abs_diff", "error"}``; ``error`` says why there is no
            library (no compiler, the compiler failed, or the check of :meth:`finish` failed), else None.
    """

    def __init__(self, out_dir: Path, c_file: Path, compile: bool):
        self.out_dir = Path(out_dir)
        self.info: dict[str, Any] = {"c": c_file.name, "header": c_file.with_suffix(".h").name, "library": None,
                                     "compiler": None, "command": None, "compile_seconds": None, "max_abs_diff": None,
                                     "error": None}
        self._future = None
        if compile:
            from concurrent.futures import ThreadPoolExecutor

            self.info["compiler"] = find_compiler()  # named in the record even where it fails

            pool = ThreadPoolExecutor(1, thread_name_prefix="metafx-cc")
            self._future = pool.submit(compile_c, c_file, self.out_dir / LIBRARY)
            pool.shutdown(wait=False)  # the thread ends with the compiler

    def wait(self) -> None:
        """Wait for the compiler without loading anything, whatever it did (a caller that gives up and removes
        ``out_dir`` calls it first: a compiler still writing ``model.so`` would leave the folder behind)."""
        if self._future is not None:
            self._future.exception()  # waits; the error, if any, is not the caller's concern here

    def finish(self, check: tuple[np.ndarray, np.ndarray] | None = None, tolerance: float = 0.0,
               reference: str = "the reference") -> NativeModel | None:
        """Wait for the compiler and load the library; with ``check``, compare its output with a reference.

        Args:
            check: ``(x, want)``: the library's whole-signal output on ``x`` must equal ``want`` (the
                same model's TorchScript output, say) to ``tolerance``. A library that differs (a bug of
                the runtime) is removed with ``model.c``: ``info["c"]`` and ``info["library"]`` become
                None and ``info["error"]`` says why, so the caller stands on its other export.
            tolerance: the largest absolute difference accepted.
            reference: what ``want`` is, for the error message (``"model.ts"``).

        Returns:
            The loaded library, or None (``info["error"]`` says why; None with no error when built with
            ``compile=False``).

        Shape:
            ``x`` and ``want``: (T,).
        """
        if self._future is None:
            return None
        try:
            built = self._future.result()
        except NativeExportError as e:
            self.info["error"] = str(e)
            return None
        self.info.update(library=LIBRARY, compiler=built["compiler"], command=built["command"],
                         compile_seconds=round(built["seconds"], 4))
        nm = NativeModel(self.out_dir / LIBRARY)
        if check is None:
            return nm
        x, want = check
        diff = float(np.max(np.abs(nm.process(x).astype(np.float64) - want))) if len(x) else 0.0
        self.info["max_abs_diff"] = diff
        if not diff <= tolerance:
            del nm
            for name in (self.info["c"], self.info["header"], LIBRARY):
                (self.out_dir / name).unlink()
            self.info.update(c=None, header=None, library=None,
                             error=f"{LIBRARY} differs from {reference} by {diff:.3g} (a metafx bug, please report "
                                   f"it); {self.info['c']}, {self.info['header']} and {LIBRARY} were left out")
            return None
        return nm


def start_native(stream: Any, out_dir: Path, compile: bool = True) -> NativeBuild:
    """Write ``out_dir/model.c`` and, with ``compile``, start building ``out_dir/model.so`` on a thread.

    Args:
        stream: an ARX export (see :func:`c_header`). out_dir: the folder. compile: build the library.

    Returns:
        The build; :meth:`NativeBuild.finish` waits for it.

    Raises:
        NativeExportError: the model has no native export (nothing is written then).
    """
    c_file = write_c(stream, Path(out_dir) / "model.c")  # raises before anything is written
    return NativeBuild(Path(out_dir), c_file, compile)


def export_native(stream: Any, out_dir: Path, compile: bool = True) -> dict[str, Any]:
    """Write ``out_dir/model.c`` and, with a compiler, build ``out_dir/model.so`` (waits for it).

    Args:
        stream: an ARX export (see :func:`c_header`). out_dir: the folder. compile: build the library.

    Returns:
        :attr:`NativeBuild.info`.

    Raises:
        NativeExportError: the model has no native export (nothing is written then).
    """
    build = start_native(stream, out_dir, compile)
    build.finish()
    return build.info


__all__ = ["HEADER", "NATIVE_ABI", "NativeBuild", "NativeExportError", "NativeModel", "RUNTIME", "c_header", "compile_c",
           "export_native", "find_compiler", "start_native", "write_c"]
