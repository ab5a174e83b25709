"""Rendering task sets with real DAWDreamer and real Faust code (metafx.data.render, with metafx.data.plan and .cache)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import yaml

from metafx.config import EFFECTS_DIR, REPO_ROOT, ConfigError, load_config
from metafx.data.cache import is_complete
from metafx.data.plan import RenderError, assign_splits, dataset_hash, plan_tasks
from metafx.data.render import describe_dsp, render_taskset
from metafx.data.tasks import TaskSet, TaskSetError, load_taskset

SR = 48000


def study(cache: Path, families: list[dict] | None = None, **overrides):
    """lstm.yaml at the smoke budget with the cache in ``cache`` and optional families / dotted overrides."""
    ov = {"data.cache_dir": str(cache), **{k.replace("__", "."): v for k, v in overrides.items()}}
    if families is not None:
        ov["data.families"] = families
    return load_config("lstm.yaml", "smoke", overrides=ov)


def dsp_file(tmp_path: Path, name: str, code: str) -> str:
    p = tmp_path / f"{name}.dsp"
    p.write_text(textwrap.dedent(code))
    return str(p)


def moog_vcf_reference(x: np.ndarray, cutoff: float, resonance: float, sr: int) -> np.ndarray:
    """Faust ``ve.moog_vcf(res, fr)`` as a difference equation, in float64 from zero state.

    vaeffects.lib: ``(+ : seq(i,4,fi.pole(p)) : *(g)) ~ *(mk)`` with p = 1 - 2 pi fr / SR,
    g = (1 - p)^4, mk = -4 min(res, 0.999999). Faust's ``~`` delays the feedback by one
    sample, so Y = g X / ((1 - p z^-1)^4 - mk g z^-1).
    """
    p = 1.0 - cutoff * 2.0 * np.pi / sr
    g = (1.0 - p) ** 4
    mk = -4.0 * max(0.0, min(resonance, 0.999999))
    a = np.poly([p] * 4)
    a[1] -= mk * g
    return scipy.signal.lfilter([g], a, x.astype(np.float64))


def test_moog_vcf_matches_the_difference_equation(smoke_cfg):
    """Every smoke task equals the float64 difference equation within 1e-4 of its peak (-80 dB).

    The tolerance covers Faust's single-precision arithmetic (worst seen: 3e-5 at 200 Hz,
    resonance 0.9). Sample-exact agreement also shows there is no latency offset and
    every task starts from zero filter state (two engines render six tasks each here).
    """
    ts = load_taskset(smoke_cfg.data, progress=False)
    assert len(ts) == 12 and ts.manifest["render"]["workers"] >= 1
    x = np.asarray(ts.input)
    for t in ts.tasks:
        ref = moog_vcf_reference(x, t["params"]["cutoff"], t["params"]["resonance"], ts.sample_rate)
        err = np.max(np.abs(ts.targets[t["index"]] - ref)) / np.max(np.abs(ref))
        assert err < 1e-4, (t["id"], err)
    # an offset of one sample would be far outside the tolerance
    t0 = ts.tasks[0]
    ref = moog_vcf_reference(x, t0["params"]["cutoff"], t0["params"]["resonance"], ts.sample_rate)
    assert np.max(np.abs(ts.targets[0][1:] - ref[:-1])) / np.max(np.abs(ref)) > 1e-3


def test_identity_and_impulse_alignment(tmp_path):
    """A gain of 1 reproduces the input bit for bit; a one-sample delay (mem) shifts by exactly one sample."""
    fams = [
        {"name": "gain", "dsp": dsp_file(tmp_path, "gain", 'process = *(hslider("gain", 1, 0, 4, 0.01));'),
         "params": {"gain": [1.0, 0.5, 2.0]}},
        {"name": "delay", "dsp": dsp_file(tmp_path, "delay", 'process = *(hslider("gain", 1, 0, 4, 0.01)) : mem;'),
         "params": {"gain": [1.0, 0.5, 2.0]}},
    ]
    ts = load_taskset(study(tmp_path / "c", fams, data__val_fraction=0.2, data__test_fraction=0.2).data, progress=False)
    x = np.asarray(ts.input)
    for t in ts.tasks:
        y = ts.targets[t["index"]]
        g = np.float32(t["params"]["gain"])
        if t["family"] == "gain":
            np.testing.assert_array_equal(y, x * g)
        else:
            assert y[0] == 0.0
            np.testing.assert_array_equal(y[1:], x[:-1] * g)


def test_impulse_response_is_aligned(tmp_path):
    """Impulses in a folder source: the Moog output starts at each impulse's sample and follows the reference."""
    import soundfile as sf

    folder = tmp_path / "audio"
    folder.mkdir()
    x = np.zeros(24000)
    x[[1000, 9000, 17001]] = [1.0, -0.5, 0.25]
    sf.write(folder / "impulses.wav", x, SR, subtype="FLOAT")
    fams = [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [500, 2000, 5000], "resonance": [0.5]}}]
    cfg = study(tmp_path / "c", fams, data__source={"kind": "folder", "path": str(folder), "seconds": 0.5},
                data__val_fraction=0.3, data__test_fraction=0.3, maml__slice_len=64)
    ts = load_taskset(cfg.data, progress=False)
    inp = np.asarray(ts.input)
    assert np.flatnonzero(inp).tolist() == [1000, 9000, 17001]
    for t in ts.tasks:
        y = np.asarray(ts.targets[t["index"]])
        assert np.flatnonzero(y)[0] == 1000, "no latency: the response starts at the impulse"
        ref = moog_vcf_reference(inp, t["params"]["cutoff"], 0.5, SR)
        assert np.max(np.abs(y - ref)) < 1e-4 * np.max(np.abs(ref))


def test_render_in_a_forked_child_after_rendering_in_the_parent(tmp_path):
    """DAWDreamer's control thread does not survive fork(); a forked child starts its own and does not hang.

    Run in a fresh interpreter: the pytest process may have started Ray (test_search, test_gpus), and a
    fork after Ray's gRPC threads ran can hang for reasons that have nothing to do with rendering.
    """
    script = textwrap.dedent(f"""
        import multiprocessing as mp
        from metafx.config import load_config
        from metafx.data.cache import is_complete
        from metafx.data.render import render_taskset

        def seed(s):
            cfg = load_config("lstm.yaml", "smoke", overrides={{"data.cache_dir": {str(tmp_path)!r}, "data.source.seed": s}})
            return str(render_taskset(cfg.data, progress=False).path)

        if __name__ == "__main__":
            seed(5)  # the parent renders first
            with mp.get_context("fork").Pool(1) as pool:
                out = pool.apply_async(seed, (6,)).get(timeout=60)
            assert is_complete(out), out
            print("child rendered", out)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert r.returncode == 0 and "child rendered" in r.stdout, r.stderr[-3000:]


def test_results_do_not_depend_on_threads_or_task_order(smoke_cfg, tmp_path):
    """One worker renders all 12 tasks in sequence on one engine; the result equals the parallel render."""
    ts = load_taskset(smoke_cfg.data, progress=False)
    one = study(tmp_path / "one", data__render_workers=1)
    assert dataset_hash(one.data) == ts.hash  # render_workers does not change the content
    ts1 = TaskSet(render_taskset(one.data, progress=False).path)
    np.testing.assert_array_equal(np.asarray(ts1.targets), np.asarray(ts.targets))
    assert ts1.manifest["render"]["workers"] == 1


def test_cache_reuse_renders_nothing(smoke_cfg):
    ts = load_taskset(smoke_cfg.data, progress=False)
    m = ts.path / "manifest.json"
    stat = (m.stat().st_mtime_ns, (ts.path / "targets.npy").stat().st_ino)
    again = render_taskset(smoke_cfg.data, progress=False)
    assert not again.rendered, "a cached task set is never rendered again"
    assert again.path == ts.path and (m.stat().st_mtime_ns, (ts.path / "targets.npy").stat().st_ino) == stat
    assert [p.name for p in Path(smoke_cfg.data.cache_dir).iterdir() if ".tmp-" in p.name] == []


def test_hash_covers_content(tmp_path):
    dsp = tmp_path / "moog.dsp"
    dsp.write_text((EFFECTS_DIR / "moog_vcf.dsp").read_text())
    fam = {"name": "moog", "dsp": str(dsp), "params": {"cutoff": [500, 1000, 2000], "resonance": [0.1]}}
    base = study(tmp_path, [fam])
    h = dataset_hash(base.data)
    assert dataset_hash(study(tmp_path / "elsewhere", [fam], data__render_workers=1).data) == h
    assert dataset_hash(study(tmp_path, [{**fam, "params": {"cutoff": [500, 1000, 2100], "resonance": [0.1]}}]).data) != h
    assert dataset_hash(study(tmp_path, [fam], data__source__seed=1).data) != h
    assert dataset_hash(study(tmp_path, [fam], data__sample_rate=44100).data) != h
    assert dataset_hash(study(tmp_path, [fam], data__split_seed=3).data) != h
    dsp.write_text(dsp.read_text() + "\n// an edit\n")
    assert dataset_hash(base.data) != h


UNSTABLE_MOOG = {"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [1000, 10000], "resonance": [0.0, 0.9]}}


def test_unstable_settings_are_dropped_with_a_warning(tmp_path, caplog):
    """ve.moog_vcf at 10 kHz, resonance 0.9 (48 kHz) has a pole outside the unit circle; so does feedback 1.5;
    a gain of 1000 stays finite but exceeds the blow-up bound."""
    fb = dsp_file(tmp_path, "fb", 'process = + ~ *(hslider("fb", 0.5, 0, 2, 0.001));')
    gain = dsp_file(tmp_path, "gain", 'process = *(hslider("gain", 1, 0, 10000, 0.01));')
    fams = [UNSTABLE_MOOG,
            {"name": "fb", "dsp": fb, "params": {"fb": [0.5, 0.9, 0.99, 1.5]}},
            {"name": "gain", "dsp": gain, "params": {"gain": [0.5, 2.0, 10.0, 1000.0]}}]
    cfg = study(tmp_path / "c", fams, data__val_fraction=0.2, data__test_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="metafx.data.render"):
        ts = load_taskset(cfg.data, progress=False)
    dropped = {(d["family"], tuple(d["params"].values())): d["reason"] for d in ts.manifest["dropped"]}
    assert set(dropped) == {("moog_vcf", (10000.0, 0.9)), ("fb", (1.5,)), ("gain", (1000.0,))}
    assert "not finite" in dropped[("moog_vcf", (10000.0, 0.9))] and "not finite" in dropped[("fb", (1.5,))]
    assert "grows without bound" in dropped[("gain", (1000.0,))]
    assert "moog_vcf" in caplog.text and "10000" in caplog.text and "0.9" in caplog.text
    assert len(ts) == 12 - 3 and ts.targets.shape[0] == 9
    kept = {(t["family"], tuple(t["params"].values())) for t in ts.tasks}
    assert kept.isdisjoint(dropped)
    assert ("moog_vcf", (10000.0, 0.0)) in kept  # no resonance: stable at the same cutoff
    for t in ts.tasks:  # rows were compacted: each row is its own task's render
        y = np.asarray(ts.targets[t["index"]])
        assert np.all(np.isfinite(y)) and np.abs(y).max() < 100 * np.abs(ts.input).max()
        if t["family"] == "gain":
            np.testing.assert_array_equal(y, np.asarray(ts.input) * np.float32(t["params"]["gain"]))
    for s in ("train", "val", "test"):
        assert {ts.tasks[i]["family"] for i in ts.split(s)} == {"moog_vcf", "fb", "gain"}


def test_unstable_settings_fail_when_asked(tmp_path):
    cache = tmp_path / "c"
    cfg = study(cache, [UNSTABLE_MOOG], data__on_unstable="fail", data__val_fraction=0.25, data__test_fraction=0.25)
    with pytest.raises(RenderError) as e:
        render_taskset(cfg.data, progress=False)
    msg = str(e.value)
    for part in ("moog_vcf", "'cutoff': 10000.0", "'resonance': 0.9", "not finite", "on_unstable: drop", "params"):
        assert part in msg, (part, msg)
    assert list(cache.iterdir()) == [], "a failed render leaves nothing behind"


def test_on_unstable_fail_names_every_unstable_setting(tmp_path):
    """Every unstable setting of every family is named, not only the first one found."""
    fb = dsp_file(tmp_path, "fb", 'process = + ~ *(hslider("fb", 0.5, 0, 2, 0.001));')
    fams = [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [1000, 10000, 10500], "resonance": [0.0, 0.9]}},
            {"name": "fb", "dsp": fb, "params": {"fb": [0.5, 0.9, 1.5]}}]
    cache = tmp_path / "c"
    cfg = study(cache, fams, data__on_unstable="fail", data__val_fraction=0.2, data__test_fraction=0.2)
    with pytest.raises(RenderError) as e:
        render_taskset(cfg.data, progress=False)
    msg = str(e.value)
    for part in ("3 of 9 setting(s)", "{'cutoff': 10000.0, 'resonance': 0.9}", "{'cutoff': 10500.0, 'resonance': 0.9}",
                 "family 'fb', params {'fb': 1.5}", "data.families[0].params, data.families[1].params",
                 "on_unstable: drop"):
        assert part in msg, (part, msg)
    assert "'resonance': 0.0}" not in msg, "stable settings are not named"
    assert list(cache.iterdir()) == [], "a failed render leaves nothing behind"


def test_split_is_by_task_stratified_and_seeded(tmp_path):
    fams = [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [300, 1000, 3000], "resonance": [0.0, 0.3, 0.6]}},
            {"name": "cubicnl", "dsp": "cubicnl.dsp", "params": {"drive": [0.2, 0.5, 0.8], "offset": [0.0, 0.2]}}]
    cfg = study(tmp_path, fams, data__val_fraction=0.2, data__test_fraction=0.2)
    ts = load_taskset(cfg.data, progress=False)
    splits = {s: set(ts.split(s)) for s in ("train", "val", "test")}
    assert set.union(*splits.values()) == set(range(len(ts))) == set(range(15))
    assert sum(len(v) for v in splits.values()) == 15, "disjoint"
    for s, idx in splits.items():
        assert {ts.tasks[i]["family"] for i in idx} == {"moog_vcf", "cubicnl"}, s
    ids = {s: {ts.tasks[i]["id"] for i in idx} for s, idx in splits.items()}
    assert ids["test"].isdisjoint(ids["train"] | ids["val"])
    fam = [t["family"] for t in ts.tasks]
    assert [t["split"] for t in ts.tasks] == assign_splits(fam, 0.2, 0.2, cfg.data.split_seed)
    assert assign_splits(fam, 0.2, 0.2, 1) != assign_splits(fam, 0.2, 0.2, 2)
    assert assign_splits(["a"] * 10, 0.15, 0.15, 0).count("test") == 2
    assert assign_splits(["a"] * 3, 0.01, 0.01, 0) .count("val") == 1  # at least one when > 0


def test_too_few_tasks_for_a_split_is_a_config_error(tmp_path):
    cfg = study(tmp_path / "c", [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [300, 600], "resonance": [0.1]}}])
    with pytest.raises(ConfigError, match=r"'moog_vcf' has 2 task\(s\) but needs at least 3.*val_fraction"):
        render_taskset(cfg.data, progress=False)
    assert not any((tmp_path / "c").iterdir())


def test_unknown_slider_names_the_sliders(tmp_path):
    cfg = study(tmp_path / "c", [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutof": [300, 600, 900], "resonance": [0.1]}}])
    with pytest.raises(ConfigError, match=r"no slider named 'cutof'; its sliders are: cutoff, resonance") as e:
        render_taskset(cfg.data, progress=False)
    assert str(e.value).startswith("key 'data.families[0].params.cutof': family 'moog_vcf': the .dsp ")
    assert str(EFFECTS_DIR / "moog_vcf.dsp") in str(e.value) and e.value.key == "data.families[0].params.cutof"


def test_faust_compile_error_is_reported(tmp_path):
    bad = dsp_file(tmp_path, "bad", 'g = hslider("g", 1, 0, 2, 0.1);\nprocess = *(g) : nosuchfunction;')
    cfg = study(tmp_path / "c", [{"name": "bad", "dsp": bad, "params": {"g": [0.5, 1.0, 1.5]}}])
    with pytest.raises(RenderError, match=r"family 'bad': Faust could not compile .*bad.dsp.*nosuchfunction"):
        render_taskset(cfg.data, progress=False)


def _readme_families() -> list[dict]:
    text = (EFFECTS_DIR / "README.md").read_text()
    fams = []
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        fams.extend(yaml.safe_load(block))
    return fams


def test_shipped_families_compile_and_are_documented():
    fams = {f["dsp"]: f for f in _readme_families()}
    shipped = sorted(p.name for p in EFFECTS_DIR.glob("*.dsp"))
    assert len(shipped) >= 5 and set(fams) == set(shipped), "every shipped .dsp has a README grid"
    for name in shipped:
        info = describe_dsp(EFFECTS_DIR / name, SR, family=name)
        assert info.inputs == 1 and info.outputs == 1, name
        labels = {s.label for s in info.sliders}
        assert set(fams[name]["params"]) <= labels, (name, labels)


def test_readme_grids_render_stably(tmp_path):
    """Every grid point of every README block renders finite and bounded (on_unstable: fail)."""
    fams = _readme_families()
    cfg = study(tmp_path, fams, data__on_unstable="fail", data__source__seconds=1.0)
    ts = load_taskset(cfg.data, progress=False)
    assert ts.manifest["dropped"] == []
    assert {f["name"] for f in ts.manifest["families"]} == {f["name"] for f in fams}
    assert len(ts) == sum(f["num_tasks"] for f in ts.manifest["families"]) > 250


def test_max_tasks_takes_a_seeded_subset(tmp_path):
    fam = {"name": "moog_vcf", "dsp": "moog_vcf.dsp", "max_tasks": 5,
           "params": {"cutoff": {"low": 300, "high": 3000, "num": 6, "scale": "log"}, "resonance": [0.0, 0.5]}}
    a = plan_tasks(study(tmp_path, [fam]).data)
    b = plan_tasks(study(tmp_path, [fam]).data)
    c = plan_tasks(study(tmp_path, [fam], data__split_seed=9).data)
    assert len(a) == 5 and [t.id for t in a] == [t.id for t in b] and [t.id for t in a] != [t.id for t in c]
    assert len({t.id for t in a}) == 5


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process finishes the same hash while we render: our rename fails and we use theirs."""
    import shutil

    cfg = study(tmp_path / "c")
    real = os.rename

    def lose_then_rename(src, dst):
        src, dst = Path(src), Path(dst)
        if src.name.startswith(f"{dst.name}.tmp-"):  # publishing our finished dataset directory
            shutil.copytree(src, dst)  # the other renderer's rename lands just before ours
            m = json.loads((dst / "manifest.json").read_text())
            (dst / "manifest.json").write_text(json.dumps({**m, "created": "by the winner"}))
        return real(src, dst)

    monkeypatch.setattr(os, "rename", lose_then_rename)
    result = render_taskset(cfg.data, progress=False)
    assert not result.rendered, "the winner's directory is used, not ours"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [result.path.name], "our tmp dir was removed"
    assert TaskSet(result.path).manifest["created"] == "by the winner"


def test_concurrent_renders_of_one_hash(tmp_path):
    cfg = study(tmp_path / "c")
    out, errs = [], []

    def go():
        try:
            out.append(render_taskset(cfg.data, progress=False))
        except Exception as e:  # noqa: BLE001 - collected and re-raised by the assertion below
            errs.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errs and len(out) == 2 and out[0].path == out[1].path and is_complete(out[0].path)
    assert sum(r.rendered for r in out) == 1, "one render publishes, the other finds it or loses the rename race"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [out[0].path.name]


KILL_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from metafx.config import load_config
from metafx.data.render import render_taskset
cfg = load_config("lstm.yaml", "smoke", overrides={overrides!r})
render_taskset(cfg.data, progress=False)
print("finished")
"""


def test_killed_render_leaves_nothing_that_looks_complete(tmp_path):
    """SIGKILL a render mid-way: only a .tmp- dir remains, never <hash>; the next render cleans it up and succeeds."""
    heavy = dsp_file(tmp_path, "heavy", """\
        import("stdfaust.lib");
        cutoff = hslider("cutoff", 1000, 20, 20000, 0.01);
        process = seq(i, 8, fi.lowpass(8, cutoff));
    """)
    cache = tmp_path / "cache"
    fams = [{"name": "heavy", "dsp": heavy, "params": {"cutoff": {"low": 500, "high": 5000, "num": 24, "scale": "log"}}}]
    overrides = {"data.cache_dir": str(cache), "data.families": fams, "data.source.seconds": 10,
                 "data.render_workers": 1}
    cfg = load_config("lstm.yaml", "smoke", overrides=overrides)
    h = dataset_hash(cfg.data)
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD.format(repo=str(REPO_ROOT), overrides=overrides)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        killed_mid_way = False
        while time.time() < deadline and child.poll() is None:
            tmps = list(cache.glob(f"{h}.tmp-*/targets.npy")) if cache.exists() else []
            # at least one 10 s row (1.9 MB) on disk: rendering is under way
            if tmps and tmps[0].stat().st_blocks * 512 >= 2 * 480000 * 4:
                child.send_signal(signal.SIGKILL)
                killed_mid_way = True
                break
            time.sleep(0.01)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert killed_mid_way, f"the child finished before it could be killed: {child.stderr.read().decode()[-2000:]}"
    left = sorted(p.name for p in cache.iterdir())
    assert h not in left and len(left) == 1 and left[0].startswith(f"{h}.tmp-"), left
    assert not is_complete(cache / left[0])
    with pytest.raises(TaskSetError, match="not a complete dataset"):
        TaskSet(cache / left[0])

    again = load_config("lstm.yaml", "smoke", overrides={**overrides, "data.render_workers": 2})
    ts = load_taskset(again.data, progress=False)
    assert ts.path == cache / h and len(ts) == 24 and np.all(np.isfinite(np.asarray(ts.targets[-1])))
    assert sorted(p.name for p in cache.iterdir()) == [h], "the dead render's tmp dir was removed"


def test_disk_space_is_checked(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(RenderError, match=r"needs 0.0 GB but .* free: set data.cache_dir"):
        render_taskset(study(tmp_path / "c").data, progress=False)
    assert list((tmp_path / "c").iterdir()) == []


def test_launch_render_names_the_study_in_one_line(tmp_path):
    """A grid key the .dsp does not have: exit 2, one line naming the study file and the key, no traceback."""
    study_file = tmp_path / "mine.yaml"
    raw = yaml.safe_load((REPO_ROOT / "search_spaces" / "lstm.yaml").read_text())
    params = raw["data"]["families"][0]["params"]
    params["reso"] = params.pop("resonance")  # a typo in the user's study
    del raw["budgets"]["smoke"]["data.families[0].params.resonance"]
    study_file.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "render.py"), "--space", str(study_file), "--budget", "smoke",
           "--quiet", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if not line.startswith("INFO")]
    assert len(err) == 1 and err[0].startswith(f"error: {study_file}: key 'data.families[0].params.reso'"), r.stderr
    assert "budget smoke replaces" in r.stdout and "maml.meta_steps: 200 in the study -> 6 used" in r.stdout


def test_launch_scripts_document_their_exit_statuses():
    for script in ("render.py", "train.py", "bench.py"):
        r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / script), "--help"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        for part in ("exit status:", "  1 ", "  2 ", "  130 ", "interrupted"):
            assert part in r.stdout, (script, part)


def test_launch_render_prints_and_reuses(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "render.py"), "--space", "lstm.yaml", "--budget", "smoke",
           "--set", f"data.cache_dir={tmp_path}", "--quiet"]
    env = {**os.environ, "PYTHONPATH": ""}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert re.search(r"dataset: +" + re.escape(str(tmp_path)), out)
    assert "tasks:    12 (train 8, val 2, test 2)" in out and "2.0 s source at 48000 Hz" in out
    assert re.search(r"render: +[\d.]+ s, \d+x real time", out)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert second.returncode == 0 and "reused from cache" in second.stdout
    bad = subprocess.run(cmd + ["--set", "data.source.seconds=-1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "data.source.seconds" in bad.stderr and "must be > 0" in bad.stderr
