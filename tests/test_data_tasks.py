"""TaskSet (memory-mapped, shared) and the episode sampler (metafx.data.tasks)."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from metafx.config import load_config
from metafx.data.tasks import SILENCE_DB, Episode, EpisodeSampler, TaskSet, load_taskset


@pytest.fixture(scope="module")
def gain_ts(tmp_path_factory) -> TaskSet:
    """Gains of 1, 0.5, 2 and 0.25 (exact in float32): each target is exactly gain x input."""
    d = tmp_path_factory.mktemp("gain")
    dsp = d / "gain.dsp"
    dsp.write_text('process = *(hslider("gain", 1, 0, 4, 0.01));')
    cfg = load_config("lstm.yaml", "smoke", overrides={
        "data.cache_dir": str(d / "cache"),
        "data.families": [{"name": "gain", "dsp": str(dsp), "params": {"gain": [1.0, 0.5, 2.0, 0.25]}}],
        "data.val_fraction": 0.25, "data.test_fraction": 0.25,
    })
    return load_taskset(cfg.data, progress=False)


def test_taskset_is_memory_mapped_read_only(smoke_cfg):
    ts = load_taskset(smoke_cfg.data, progress=False)
    T = round(smoke_cfg.data.source.seconds * smoke_cfg.data.sample_rate)
    assert isinstance(ts.input, np.memmap) and isinstance(ts.targets, np.memmap)
    assert ts.input.shape == (T,) and ts.targets.shape == (12, T) and ts.targets.dtype == np.float32
    assert not ts.targets.flags.writeable and not ts.input.flags.writeable
    assert ts.sample_rate == 48000 and ts.hash == ts.path.name and ts.seconds == pytest.approx(2.0)
    assert [t["index"] for t in ts.tasks] == list(range(12))
    assert set(ts.tasks[0]) >= {"index", "id", "family", "params", "split"}
    assert sorted(ts.split("train") + ts.split("val") + ts.split("test")) == list(range(12))
    with pytest.raises(ValueError, match="unknown split 'validation'; allowed: train, val, test"):
        ts.split("validation")


def test_taskset_pickles_as_its_path(smoke_cfg):
    """Sent to another process (Ray, multiprocessing) it reopens the same files instead of copying arrays."""
    ts = load_taskset(smoke_cfg.data, progress=False)
    blob = pickle.dumps(ts)
    assert len(blob) < 1000 < ts.targets.nbytes
    ts2 = pickle.loads(blob)
    assert ts2.path == ts.path and isinstance(ts2.targets, np.memmap)
    np.testing.assert_array_equal(ts2.targets[3, :100], ts.targets[3, :100])


def test_episode_lines_up_input_and_target(gain_ts):
    s = EpisodeSampler(gain_ts, "train", k_support=3, k_query=2, slice_len=1000, seed=0)
    x = np.asarray(gain_ts.input)
    for _ in range(10):
        ep = s.sample()
        assert isinstance(ep, Episode) and ep.task in gain_ts.split("train") and ep.task_index == ep.task
        assert ep.support_x.shape == ep.support_y.shape == (3, 1, 1000)
        assert ep.query_x.shape == ep.query_y.shape == (2, 1, 1000)
        assert all(t.dtype == torch.float32 for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y))
        g = np.float32(ep.params["gain"])
        xs = torch.cat([ep.support_x, ep.query_x])[:, 0].numpy()
        ys = torch.cat([ep.support_y, ep.query_y])[:, 0].numpy()
        for j, p in enumerate(ep.positions):  # support first, then query
            np.testing.assert_array_equal(xs[j], x[p:p + 1000])
            np.testing.assert_array_equal(ys[j], x[p:p + 1000] * g)
        pos = np.sort(ep.positions)
        assert pos[0] >= 0 and pos[-1] + 1000 <= x.size and np.all(np.diff(pos) >= 1000), "non-overlapping"


def test_moog_episode_matches_the_target_rows(smoke_cfg):
    ts = load_taskset(smoke_cfg.data, progress=False)
    s = EpisodeSampler(ts, "test", 2, 2, 512, seed=5)
    ep = s.sample()
    assert ts.tasks[ep.task]["split"] == "test" and ep.family == "moog_vcf" and ep.params == ts.tasks[ep.task]["params"]
    for j, p in enumerate(ep.positions[:2]):
        np.testing.assert_array_equal(ep.support_y[j, 0].numpy(), ts.targets[ep.task, p:p + 512])
    for j, p in enumerate(ep.positions[2:]):
        np.testing.assert_array_equal(ep.query_y[j, 0].numpy(), ts.targets[ep.task, p:p + 512])


def _same(a: Episode, b: Episode) -> bool:
    return (a.task == b.task and np.array_equal(a.positions, b.positions)
            and all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("support_x", "support_y", "query_x", "query_y")))


def test_same_seed_same_episodes(gain_ts):
    a = EpisodeSampler(gain_ts, "train", 2, 2, 256, seed=7)
    b = EpisodeSampler(gain_ts, "train", 2, 2, 256, seed=7)
    c = EpisodeSampler(gain_ts, "train", 2, 2, 256, seed=8)
    ea, eb, ec = [a.sample() for _ in range(5)], [b.sample() for _ in range(5)], [c.sample() for _ in range(5)]
    assert all(_same(x, y) for x, y in zip(ea, eb))
    assert not all(_same(x, y) for x, y in zip(ea, ec))
    # an explicit generator gives the same as a sampler seeded the same way
    rng = np.random.default_rng(7)
    assert _same(EpisodeSampler(gain_ts, "train", 2, 2, 256, seed=0).sample(rng), ea[0])


def test_fixed_episodes_are_deterministic_and_cover_the_split(smoke_cfg):
    ts = load_taskset(smoke_cfg.data, progress=False)
    s = EpisodeSampler(ts, "train", 2, 2, 512, seed=0)
    first = s.fixed(16, seed=1234)
    for _ in range(3):
        s.sample()  # advancing the sampler's own generator does not change fixed()
    again = EpisodeSampler(ts, "train", 2, 2, 512, seed=99).fixed(16, seed=1234)
    assert all(_same(x, y) for x, y in zip(first, s.fixed(16, seed=1234)))
    assert all(_same(x, y) for x, y in zip(first, again))
    counts = np.bincount([e.task for e in first], minlength=len(ts))[ts.split("train")]
    assert counts.min() == 2 and counts.max() == 2, "16 episodes over 8 train tasks: each task twice"
    assert not all(_same(x, y) for x, y in zip(first, s.fixed(16, seed=1)))


def test_almost_silent_slices_are_avoided(tmp_path, caplog):
    """A source that is half digital silence: no slice of any episode is silent."""
    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sf.write(folder / "half_silent.wav", np.concatenate([0.1 * rng.standard_normal(48000), np.zeros(48000)]), 48000)
    dsp = tmp_path / "gain.dsp"
    dsp.write_text('process = *(hslider("gain", 1, 0, 4, 0.01));')
    cfg = load_config("lstm.yaml", "smoke", overrides={
        "data.cache_dir": str(tmp_path / "cache"),
        "data.source": {"kind": "folder", "path": str(folder), "seconds": 2},
        "data.families": [{"name": "gain", "dsp": str(dsp), "params": {"gain": [1.0, 0.5, 2.0]}}],
        "data.val_fraction": 0.3, "data.test_fraction": 0.3,
    })
    ts = load_taskset(cfg.data, progress=False)
    s = EpisodeSampler(ts, "train", 2, 2, 2048, seed=0)
    floor = 10 ** (SILENCE_DB / 20)
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            ep = s.sample()
            x = torch.cat([ep.support_x, ep.query_x])[:, 0].double()
            assert torch.all(x.pow(2).mean(-1).sqrt() >= floor)
    assert "almost-silent" not in caplog.text


def test_sampler_errors(gain_ts):
    EpisodeSampler(gain_ts, "train", 4, 4, 12000).sample()  # exactly the whole signal: fits
    with pytest.raises(ValueError, match=r"need 96008 samples but the task set has 96000"):
        EpisodeSampler(gain_ts, "train", 4, 4, 12001)
    with pytest.raises(ValueError, match="unknown split"):
        EpisodeSampler(gain_ts, "holdout", 1, 1, 100)


def test_incomplete_directory_is_refused(tmp_path):
    from metafx.data.tasks import TaskSetError

    (tmp_path / "x").mkdir()
    with pytest.raises(TaskSetError, match="not a complete dataset.*launch/render.py"):
        TaskSet(tmp_path / "x")


@pytest.fixture(scope="module")
def two_families(tmp_path_factory) -> TaskSet:
    """A real multi-family task set: the Moog VCF and the wah, rendered by DAWDreamer."""
    cfg = load_config("lstm.yaml", "smoke", overrides={
        "data.cache_dir": str(tmp_path_factory.mktemp("multi")),
        "data.families": [
            {"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [300.0, 900.0, 2700.0], "resonance": [0.0, 0.5]}},
            {"name": "wah", "dsp": "wah.dsp", "params": {"pedal": [0.0, 0.25, 0.5, 0.75, 1.0], "resonance": [0.5]}},
        ],
    })
    return load_taskset(cfg.data, progress=False)


def test_episodes_draw_tasks_across_families(two_families):
    ts = two_families
    assert ts.families == ["moog_vcf", "wah"]
    s = EpisodeSampler(ts, "train", 2, 2, 512, seed=0)
    fams = {ep.family for step in range(1, 30) for ep in s.for_step(0, step, 2)}
    assert fams == {"moog_vcf", "wah"}


def test_a_left_out_family_never_reaches_meta_training(two_families):
    """Split by family: no task of the left-out family in train or val; test holds only its held-out tasks."""
    ts = two_families
    out = TaskSet(ts.path, left_out=["wah"])
    fam = {t["index"]: t["family"] for t in ts.tasks}
    assert out.split("train") and out.split("val")
    assert all(fam[i] == "moog_vcf" for i in out.split("train") + out.split("val"))
    assert out.split("test") == ts.split("test", "wah") and out.split("test")  # the same held-out wah tasks
    train = EpisodeSampler(out, "train", 2, 2, 512, seed=0)
    val = EpisodeSampler(out, "val", 2, 2, 512, seed=1)
    seen = {ep.family for step in range(1, 40) for ep in train.for_step(0, step, 2)}
    seen |= {ep.family for ep in val.fixed(8, seed=1)}
    assert seen == {"moog_vcf"}
    assert {ep.family for ep in EpisodeSampler(out, "test", 2, 2, 512).fixed(6, seed=2)} == {"wah"}
    # Pickled (as Ray ships it to a trial): the same split.
    back = pickle.loads(pickle.dumps(out))
    assert back.left_out == ("wah",) and back.split("train") == out.split("train")
    with pytest.raises(Exception, match="not in this dataset"):
        TaskSet(ts.path, left_out=["fuzz"])
    with pytest.raises(Exception, match="every family is left out"):
        TaskSet(ts.path, left_out=["moog_vcf", "wah"])


def test_a_study_leaves_families_out_by_name(two_families):
    """data.left_out_families reaches the loaded task set (the same render: the split is made at load)."""
    cfg = load_config("lstm.yaml", "smoke", overrides={
        "data.cache_dir": str(two_families.path.parent),
        "data.families": [
            {"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [300.0, 900.0, 2700.0], "resonance": [0.0, 0.5]}},
            {"name": "wah", "dsp": "wah.dsp", "params": {"pedal": [0.0, 0.25, 0.5, 0.75, 1.0], "resonance": [0.5]}},
        ],
        "data.left_out_families": ["wah"],
    })
    ts = load_taskset(cfg.data, progress=False)
    assert ts.path == two_families.path and ts.left_out == ("wah",)
    assert {ts.tasks[i]["family"] for i in ts.split("train") + ts.split("val")} == {"moog_vcf"}
