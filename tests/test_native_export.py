"""Native export (metafx/native_export.py, metafx/native_arx.c): model.c compiled by the real C compiler.

* every ARX export without a network trunk (learned features with start decays, filtered inputs, no
  envelopes, the Wiener bank with its peak-follower gain units, tuned and cascade units, dynamics units,
  classical [1, x] + bank) compiles, and the library's output equals the TorchScript export's to 1e-5 on
  noise that crosses the pointwise table's range, silence and a loud burst;
* the library streams: blocks of 1, 7, 32, 256, 2048 and ragged sizes with the state carried give the
  whole-signal output to 1e-5 (the runtime is sample-sequential; only the vector and scalar math functions,
  used for a block's vectorized part and its remainder, differ in their last bits);
* a library loaded in a fresh interpreter with ctypes and numpy only (never torch, never metafx) reproduces
  the output, and so does model.c built by a host's plain ``cc -O2`` without metafx's flags;
* a build started beside other work and finished with a check against a reference keeps a library that
  matches and removes model.c, model.h and model.so when the reference differs (the error says by how much);
* a C++ host includes model.h, links model.c compiled as C into its own executable (no shared library, no
  Python) and processes two channels, one state each, in blocks of 128 in place, reporting the model's rate
  and latency: its output is the library's;
* an export with a network trunk, a missing compiler and a foreign library are refused with a message that
  names the fix.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from metafx.export import ARXStream, script
from metafx.models.arx import MetaARX
from metafx.models.lstm import LSTMModel
from metafx.native_export import NATIVE_ABI, NativeExportError, NativeModel, compile_c, export_native, find_compiler, \
    start_native, write_c
from metafx.wiener import make_bank

from test_cascade_units import cascade_bank_example

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler")

SR = 48000


def pole(seconds: float) -> float:
    return math.exp(-1.0 / (seconds * SR))


def test_signal() -> torch.Tensor:
    """Noise at two levels (crossing the pointwise table's +-2 range), silence, a loud burst, quiet noise, then a
    strictly decaying level over 3000 samples (a peak hold's window full of ever smaller maxima: its deque at its
    longest)."""
    g = torch.Generator().manual_seed(9)
    decay = 0.8 * torch.exp(-torch.arange(3000) / 500.0)
    return torch.cat([torch.randn(12000, generator=g) * 0.3, torch.zeros(3000), torch.randn(6000, generator=g) * 1.5,
                      torch.randn(4000, generator=g) * 0.05, decay, torch.randn(2000, generator=g) * 0.2])


test_signal.__test__ = False  # a helper, not a test


def random_head(st: ARXStream, seed: int = 1) -> ARXStream:
    """A random stable head of the stream's size (gain units at lag 0 only)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(st.channels, st.nb, dtype=torch.float64, generator=g) * 0.05
    b[0, 1:] = 0
    b[st.n_framed:, 1:] = 0
    a = torch.zeros(st.na + 1, dtype=torch.float64)
    a[0], a[1] = 1.0, -0.6
    if st.na > 1:
        a[2] = 0.1
    st.set_head(b, a)
    return st


def case(name: str) -> ARXStream:
    torch.manual_seed(0)
    bank = None
    if name == "learned, start decays":
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4, n_start=2)
    elif name == "filtered":
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4, n_filter=3)
        with torch.no_grad():
            m.phi.filt_logit.add_(torch.tensor([0.5, -0.3, 0.2]))
    elif name == "filtered, no envelopes":
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=0, n_gate=0, n_filter=2)
    elif name == "learned + bank with gain units":
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4)
        bank = make_bank(5, 2, dynamics=True)
    elif name == "classical + bank, no gain units":
        m = MetaARX(nb=6, na=8, features="none")
        bank = make_bank(5, 2, dynamics=False)
    elif name == "learned + tuned, cascade and dynamics units":
        m = MetaARX(nb=8, na=4, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4)
        bank = cascade_bank_example().with_dynamics_units(37, pole(0.002), pole(0.05), np.array([0.02, 0.05, 0.1]))
    else:
        raise KeyError(name)
    return random_head(ARXStream(m, sample_rate=SR, latency_samples=7, bank=bank))


CASES = ["learned, start decays", "filtered", "filtered, no envelopes", "learned + bank with gain units",
         "classical + bank, no gain units", "learned + tuned, cascade and dynamics units"]


@pytest.fixture(scope="module", params=CASES)
def built(request, tmp_path_factory):
    st = case(request.param)
    d = tmp_path_factory.mktemp("native")
    info = export_native(st, d)
    assert info["error"] is None and info["library"] == "model.so", info
    return request.param, st, d, NativeModel(d / "model.so")


def test_the_library_computes_the_torchscript_export(built):
    name, st, _, nm = built
    x = test_signal()
    with torch.no_grad():
        want = script(st).process(x).numpy()
    got = nm.process(x.numpy())
    assert np.isfinite(want).all() and np.abs(want).max() > 0.05, name
    assert np.abs(got - want).max() <= 1e-5, (name, float(np.abs(got - want).max()))
    assert nm.sample_rate == SR and nm.latency_samples == 7


def test_the_library_streams_exactly(built):
    name, _, _, nm = built
    x = test_signal().numpy()
    whole = nm.process(x)
    rng = np.random.default_rng(0)
    for block in (1, 7, 32, 256, 2048, None):
        st, outs, i = nm.create(), [], 0
        try:
            while i < x.size:
                b = block or int(rng.integers(1, 3000))
                outs.append(nm.run(st, x[i:i + b]))
                i += b
        finally:
            nm.destroy(st)
        err = float(np.abs(np.concatenate(outs) - whole).max())
        assert err <= 1e-5, (name, block, err)


def test_the_library_runs_without_torch_or_metafx_and_model_c_builds_alone(built, tmp_path):
    """A host's view: ctypes and numpy only; and model.c compiled by plain ``cc -O2`` (no metafx flags)."""
    name, st, d, nm = built
    x = test_signal().numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", nm.process(x))
    plain = tmp_path / "plain.so"
    subprocess.run([find_compiler(), "-O2", "-fPIC", "-shared", str(d / "model.c"), "-o", str(plain), "-lm"],
                   check=True, capture_output=True)
    (tmp_path / "libs.json").write_text(json.dumps([str(d / "model.so"), str(plain)]))
    code = textwrap.dedent(f"""
        import ctypes, json, sys
        import numpy as np
        x, want = np.load("x.npy"), np.load("y.npy")
        for path in json.load(open("libs.json")):
            lib = ctypes.CDLL(path)
            lib.mfx_create.restype = ctypes.c_void_p
            lib.mfx_destroy.argtypes = [ctypes.c_void_p]
            lib.mfx_process.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
            assert lib.mfx_abi_version() == {NATIVE_ABI} and lib.mfx_sample_rate() == {SR}
            st = lib.mfx_create()
            y = np.empty_like(x)
            for i in range(0, x.size, 256):  # a host's blocks, in place
                b = x[i:i + 256].copy()
                lib.mfx_process(st, b.ctypes.data, b.ctypes.data, b.size)
                y[i:i + 256] = b
            lib.mfx_destroy(st)
            err = float(np.abs(y - want).max())
            assert err <= 1e-5, (path, err)
        assert not any(m in sys.modules for m in ("torch", "metafx")), "torch or metafx was imported"
        print("OK")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("OK"), (name, p.stderr[-2000:])


HOST_CPP = r"""
#include "model.h"
#include <cstdio>
#include <vector>

// A host's view: two channels (one state each), blocks of 128 processed in place, the rate and latency reported.
int main(int argc, char **argv) {
    std::FILE *f = std::fopen(argv[1], "rb");
    std::vector<float> x;
    float v;
    while (std::fread(&v, sizeof v, 1, f) == 1) x.push_back(v);
    std::fclose(f);
    const long n = (long)x.size() / 2;  // interleaved stereo
    void *st[2] = {mfx_create(), mfx_create()};
    if (!st[0] || !st[1]) return 3;
    std::vector<float> out(x.size()), buf(128);
    for (long i = 0; i < n; i += 128) {
        const long b = n - i < 128 ? n - i : 128;
        for (int c = 0; c < 2; ++c) {
            for (long k = 0; k < b; ++k) buf[k] = x[2 * (i + k) + c];
            mfx_process(st[c], buf.data(), buf.data(), b);
            for (long k = 0; k < b; ++k) out[2 * (i + k) + c] = buf[k];
        }
    }
    mfx_destroy(st[0]);
    mfx_destroy(st[1]);
    std::FILE *g = std::fopen(argv[2], "wb");
    std::fwrite(out.data(), sizeof(float), out.size(), g);
    std::fclose(g);
    std::printf("%d %d %d\n", mfx_sample_rate(), mfx_latency_samples(), mfx_abi_version());
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_a_cpp_host_compiles_model_c_in_through_model_h(built, tmp_path):
    name, _, d, nm = built
    cc = find_compiler()
    (tmp_path / "host.cpp").write_text(HOST_CPP)
    subprocess.run([cc, "-O2", "-c", str(d / "model.c"), "-o", str(tmp_path / "model.o")], check=True,
                   capture_output=True)
    r = subprocess.run(["c++", "-O2", f"-I{d}", str(tmp_path / "host.cpp"), str(tmp_path / "model.o"), "-lm", "-o",
                        str(tmp_path / "host")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    left = test_signal().numpy()
    right = np.roll(left, 5000) * 0.5
    np.stack([left, right], 1).astype(np.float32).tofile(tmp_path / "in.raw")
    p = subprocess.run([str(tmp_path / "host"), str(tmp_path / "in.raw"), str(tmp_path / "out.raw")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(SR), "7", str(NATIVE_ABI)]
    y = np.fromfile(tmp_path / "out.raw", dtype=np.float32).reshape(-1, 2)
    for c, x in enumerate((left, right)):
        err = float(np.abs(y[:, c] - nm.process(x)).max())
        assert err <= 1e-5, (name, c, err)


def test_the_real_time_factor_is_measured(built):
    _, _, _, nm = built
    wall, cpu = nm.real_time_factors(block=256, seconds=0.2)
    assert wall > 0 and cpu > 0


def test_a_network_trunk_has_no_native_export(tmp_path):
    m = MetaARX(nb=6, na=8, features="lstm", trunk=LSTMModel(hidden=8), n_trunk=3)
    st = random_head(ARXStream(m))
    with pytest.raises(NativeExportError, match="trunk.*model.ts"):
        export_native(st, tmp_path)
    assert not (tmp_path / "model.c").exists()  # refused before anything is written


def test_a_started_build_is_checked_against_its_reference(tmp_path):
    st = case("filtered, no envelopes")
    x = test_signal()
    with torch.no_grad():
        want = script(st).process(x).numpy()
    for d in ("ok", "bad", "c-only"):
        (tmp_path / d).mkdir()
    ok = start_native(st, tmp_path / "ok")
    nm = ok.finish(check=(x.numpy(), want), tolerance=1e-5, reference="model.ts")
    assert nm is not None and ok.info["error"] is None and ok.info["library"] == "model.so"
    assert 0 <= ok.info["max_abs_diff"] <= 1e-5 and ok.info["compile_seconds"] > 0
    bad = start_native(st, tmp_path / "bad")
    assert bad.finish(check=(x.numpy(), want + 1e-3), tolerance=1e-5, reference="model.ts") is None
    assert bad.info["c"] is None and bad.info["library"] is None and bad.info["max_abs_diff"] > 1e-5
    assert "differs from model.ts by" in bad.info["error"] and "left out" in bad.info["error"]
    assert not any((tmp_path / "bad").iterdir())  # model.c, model.h and model.so removed
    unbuilt = start_native(st, tmp_path / "c-only", compile=False)
    assert unbuilt.finish() is None and unbuilt.info["error"] is None and unbuilt.info["library"] is None
    assert sorted(p.name for p in (tmp_path / "c-only").iterdir()) == ["model.c", "model.h"]


def test_a_missing_compiler_is_named(tmp_path):
    c = write_c(case("filtered, no envelopes"), tmp_path / "model.c")
    with pytest.raises(NativeExportError, match="compiling .*model.c failed"):
        compile_c(c, tmp_path / "model.so", cc=str(tmp_path / "no-such-cc"))
    assert not (tmp_path / "model.so").exists()


def test_a_foreign_library_is_refused(tmp_path):
    src = tmp_path / "other.c"
    src.write_text("int other(void) { return 1; }\n")
    subprocess.run([find_compiler(), "-shared", "-fPIC", str(src), "-o", str(tmp_path / "other.so")], check=True)
    with pytest.raises(NativeExportError, match="not a metafx native library"):
        NativeModel(tmp_path / "other.so")


def test_the_bench_times_a_library_against_one_built_without_a_flag(tmp_path):
    """``bench.py export_rtf -- --compare-without=FLAG``: the same model.c built without FLAG (here the flag that lets
    GCC vectorize the loops with comparisons), which computes the same samples; both timed; no such flag: None."""
    from metafx.bench.export_rtf import compare_without

    info = export_native(case("learned + tuned, cascade and dynamics units"), tmp_path)
    if info["library"] is None:
        pytest.skip(f"no library: {info['error']}")
    assert "-fno-trapping-math" in info["command"].split()
    r = compare_without(tmp_path, info["command"], "-fno-trapping-math", 0.2, rounds=1)
    assert "-fno-trapping-math" not in r["command"].split() and (tmp_path / "without.so").is_file()
    assert r["rtf_with_cpu"] > 0 and r["rtf_without_cpu"] > 0 and r["speedup"] > 0
    x = test_signal().numpy()
    a, b = NativeModel(tmp_path / "model.so").process(x), NativeModel(tmp_path / "without.so").process(x)
    assert np.abs(a - b).max() <= 1e-6
    assert compare_without(tmp_path, info["command"], "-fno-such-flag", 0.2) is None
