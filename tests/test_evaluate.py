"""metafx.evaluate on real renders: small studies, example audio, long-signal prediction, split refusals."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from metafx.config import load_config
from metafx.data.tasks import load_taskset
from metafx.evaluate import EXAMPLE_SECONDS, predict_long
from metafx.train import meta_train

# 3 cutoffs x 2 resonances = 6 tasks: with 15 % val/test fractions, one validation and one test task.
SIX_TASKS = {"data.families[0].params.cutoff": [400.0, 1200.0, 3600.0],
             "data.families[0].params.resonance": [0.0, 0.5],
             "model.lstm.hidden": 8, "eval.test_episodes": 3, "data.source.seconds": 4}


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config("lstm.yaml", "smoke", {**SIX_TASKS, "data.cache_dir": str(cache)})
    return cfg, load_taskset(cfg.data, progress=False)


def test_a_test_split_of_one_task_evaluates_and_writes_its_artifacts(six, tmp_path):
    """Issue 12.1: the cycling test split gave two examples of one task and every trial crashed."""
    cfg, ts = six
    assert len(ts.split("test")) == 1 and len(ts.split("val")) == 1
    res = meta_train(cfg, ts, None, workdir=tmp_path, baselines=False, artifacts=True)
    assert np.isfinite(res.metrics["test/query_l1_post"])
    ids = [e["task_id"] for e in res.examples]
    assert len(ids) == 1 and len(set(ids)) == len(ids)
    wavs = sorted((tmp_path / "checkpoint" / "artifacts").rglob("*.wav"))
    assert wavs, "no audio artifacts written"
    # Seconds of audio, not one 43 ms slice.
    info = sf.info(str(wavs[0]))
    assert info.frames >= int(0.9 * min(EXAMPLE_SECONDS, cfg.data.source.seconds) * cfg.data.sample_rate)
    ex = res.examples[0]
    assert {len(ex[k]) for k in ("input", "target", "pred_pre", "pred_post")} == {len(ex["input"])}


def test_an_empty_test_split_is_refused_before_training(six, tmp_path, monkeypatch):
    cfg, ts = six
    real = type(ts).split
    monkeypatch.setattr(type(ts), "split", lambda self, name, family=None: [] if name == "test" else real(self, name, family))
    calls = []
    with pytest.raises(ValueError, match=r"split 'test' .*has no tasks \(tasks per split: train \d+, val \d+, test 0\)"):
        meta_train(cfg, ts, lambda m, c: calls.append(m), workdir=tmp_path)
    assert not calls  # nothing was trained or reported


def test_predict_long_equals_the_model_on_the_whole_signal():
    """A causal FIR (valid convolution) run window by window equals it run on the zero-padded whole signal."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(1, 1, 33, bias=False).double()
    x = torch.randn(5000, dtype=torch.float64)
    whole = conv(torch.cat([torch.zeros(32, dtype=torch.float64), x])[None, None])[0, 0]
    for window in (64, 256, 1000):
        got = predict_long(conv, x, window)
        assert got.shape == x.shape
        torch.testing.assert_close(got, whole, rtol=1e-10, atol=1e-12)


def test_single_task_baseline_uses_its_own_rate_and_records_a_learning_curve(six):
    """The single-task ceiling trains at eval.single_task_lr (not the meta-update's outer_lr, which left it
    under-trained: benchmarks/ceiling.md) and reports its query metrics along the way; the last point of the
    curve is the final result."""
    from dataclasses import replace

    from metafx.evaluate import fixed_test_episodes, single_task_baseline

    cfg, ts = six
    cfg = replace(cfg, eval=replace(cfg.eval, single_task_steps=6, single_task_tasks=1))
    eps = fixed_test_episodes(cfg, ts)
    out = single_task_baseline(cfg, ts, eps, torch.device("cpu"), curve_at=(3, 6))
    for k in ("l1", "stft", "esr"):
        assert out[f"test/single_task@6/query_{k}_post"] == pytest.approx(out[f"test/single_task/query_{k}_post"])
        assert f"test/single_task@3/query_{k}_post" in out
    assert out["test/single_task@3/query_l1_post"] != out["test/single_task@6/query_l1_post"]
    # A different rate is a different model: the rate is read from eval.single_task_lr.
    other = single_task_baseline(replace(cfg, eval=replace(cfg.eval, single_task_lr=1e-5)), ts, eps, torch.device("cpu"))
    assert other["test/single_task/query_l1_post"] != pytest.approx(out["test/single_task/query_l1_post"], rel=1e-4)
