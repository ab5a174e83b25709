"""Every shipped effect family renders through DAWDreamer, stays bounded and responds to its sliders.

Parametrized over ``metafx/data/effects/*.dsp``: a new ``.dsp`` dropped there is tested
without editing this file. Each family is rendered (real DAWDreamer, through the
project's own render path, :func:`metafx.data.tasks.load_taskset`) at the corners of
the grid its README block documents: the product of every grid key's lowest and highest
value, which holds the all-low and the all-high corner. The source is a deterministic
0.5 s test signal at 48 kHz (an exponential sine sweep, a decaying chord and a noise
burst with a sharp onset), normalized by the folder source to -18 dBFS RMS.

Checked per family: the ``.dsp`` is mono in / mono out and has a slider for every grid
key; every corner is finite and its peak stays within :data:`MAX_GAIN` x the input peak
(far tighter than the renderer's 100x drop rule); the all-low and all-high corners
differ by more than :data:`MIN_DIFFERENCE`; and the effect is not a no-op.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from metafx.config import EFFECTS_DIR, is_cutoff_param, load_config
from metafx.data.render import check_stability, describe_dsp
from metafx.data.tasks import load_taskset

SR = 48000
SECONDS = 0.5
MAX_GAIN = 8.0  # corner output peak / input peak (+18 dB); the README grids stay below about 4
MIN_DIFFERENCE = 0.01  # ||y_low - y_high||^2 / max(||y_low||^2, ||y_high||^2), i.e. the corners differ by more than -20 dB

DSPS = sorted(EFFECTS_DIR.glob("*.dsp"))


def _readme_grids() -> dict[str, dict]:
    """README blocks keyed by their .dsp file name."""
    text = (EFFECTS_DIR / "README.md").read_text(encoding="utf-8")
    fams: dict[str, dict] = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        for fam in yaml.safe_load(block):
            fams[fam["dsp"]] = fam
    return fams


def _extremes(spec) -> list[float]:
    """[lowest, highest] value of a grid key (one value if it has one)."""
    if isinstance(spec, dict):
        vals = [float(spec["low"]), float(spec["high"])]
    else:
        vals = [float(v) for v in spec]
    lo, hi = min(vals), max(vals)
    return [lo] if lo == hi else [lo, hi]


def _test_signal() -> np.ndarray:
    """0.5 s: a 60 Hz - 12 kHz exponential sweep, a decaying chord, a decaying noise burst."""
    rng = np.random.default_rng(1234)
    t = np.arange(int(0.2 * SR)) / SR
    k = np.log(12000 / 60) / 0.2
    sweep = np.sin(2 * np.pi * 60 * np.expm1(k * t) / k)
    n = int(0.15 * SR)
    tc = np.arange(n) / SR
    env = (1 - np.exp(-tc / 0.003)) * np.exp(-tc / 0.08)
    chord = sum(np.sin(2 * np.pi * h * f0 * tc) / h for f0 in (110.0, 138.6, 164.8) for h in range(1, 9)) * env
    noise = rng.standard_normal(SR // 2 - t.size - n) * np.exp(-np.arange(SR // 2 - t.size - n) / SR / 0.04)
    x = np.concatenate([sweep, chord / np.abs(chord).max(), noise / np.abs(noise).max()])
    assert x.size == int(SECONDS * SR)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    import soundfile as sf

    d = tmp_path_factory.mktemp("effect_source")
    sf.write(d / "test_signal.wav", _test_signal(), SR, subtype="FLOAT")
    return d


@pytest.mark.parametrize("dsp", DSPS, ids=[p.stem for p in DSPS])
def test_family_renders_bounded_and_responds(dsp: Path, source_dir: Path, tmp_path: Path):
    grids = _readme_grids()
    assert dsp.name in grids, f"{dsp.name} has no ```yaml block in {EFFECTS_DIR / 'README.md'}: document its grid"
    grid = grids[dsp.name]

    info = describe_dsp(dsp, SR, family=grid["name"])
    assert (info.inputs, info.outputs) == (1, 1), f"{dsp.name}: mono in / mono out expected"
    labels = {s.label for s in info.sliders}
    assert set(grid["params"]) <= labels, f"{dsp.name}: grid keys {set(grid['params']) - labels} are not sliders"

    corners = {key: _extremes(spec) for key, spec in grid["params"].items()}
    for key, vals in corners.items():
        if is_cutoff_param(key):
            assert max(vals) < SR / 2, f"{dsp.name}: {key} {max(vals)} Hz is not below Nyquist"
    fam = {"name": grid["name"], "dsp": str(dsp), "params": {k: list(v) for k, v in corners.items()}}
    cfg = load_config("lstm.yaml", "smoke", overrides={
        "data.cache_dir": str(tmp_path),
        "data.families": [fam],
        "data.source.kind": "folder",
        "data.source.path": str(source_dir),
        "data.source.seconds": SECONDS,
        "data.sample_rate": SR,
        "data.on_unstable": "drop",
        "data.val_fraction": 0.0,
        "data.test_fraction": 0.0,
        "data.render_workers": 1,
    })
    ts = load_taskset(cfg.data, progress=False)
    assert ts.manifest["dropped"] == [], f"{dsp.name}: corners dropped as unstable: {ts.manifest['dropped']}"
    assert len(ts) == int(np.prod([len(v) for v in corners.values()]))

    x = np.asarray(ts.input, dtype=np.float64)
    x_peak = float(np.abs(x).max())
    assert 0.1 < x_peak < 1.0 and np.sqrt(np.mean(x**2)) > 0.05  # the -18 dBFS RMS test signal arrived

    def row(which) -> np.ndarray:
        want = {k: v[0] if which == "low" else v[-1] for k, v in corners.items()}
        hits = [t["index"] for t in ts.tasks if all(np.isclose(t["params"][k], want[k]) for k in want)]
        assert len(hits) == 1, (which, want, [t["params"] for t in ts.tasks])
        return np.asarray(ts.targets[hits[0]], dtype=np.float64)

    residuals = []
    for i, y in enumerate(np.asarray(ts.targets, dtype=np.float64)):
        params = ts.tasks[i]["params"]
        assert check_stability(y.astype(np.float32), x_peak, SR) is None, (dsp.name, params)
        assert np.isfinite(y).all(), (dsp.name, params)
        peak = float(np.abs(y).max())
        assert peak <= MAX_GAIN * x_peak, f"{dsp.name} at {params}: peak {peak:.3g} > {MAX_GAIN} x input peak {x_peak:.3g}"
        assert np.sqrt(np.mean(y**2)) > 1e-4, f"{dsp.name} at {params}: output is (nearly) silent"
        g = float(y @ x / (x @ x))  # best gain: a pure gain change does not count as an effect
        residuals.append(float(np.sum((y - g * x) ** 2) / np.sum(y**2)))
    assert max(residuals) > 1e-3, f"{dsp.name}: every corner is the input up to a gain (residual {max(residuals):.2g})"

    lo, hi = row("low"), row("high")
    diff = float(np.sum((lo - hi) ** 2) / max(np.sum(lo**2), np.sum(hi**2)))
    assert diff > MIN_DIFFERENCE, f"{dsp.name}: the all-low and all-high grid corners differ by only {diff:.3g}"


def test_every_family_is_parametrized():
    """The glob found the shipped families (an empty parametrization would pass silently)."""
    names = {p.stem for p in DSPS}
    assert {"moog_vcf", "peq_tone", "wah", "tube_clip", "fuzz", "limiter", "amp", "korg35", "oberheim"} <= names

