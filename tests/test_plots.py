"""Per-trial review artifacts: WAVs decode right, PNGs open, malformed input is refused."""
from __future__ import annotations

import json
import logging

import matplotlib.image as mpimg
import numpy as np
import pytest
import soundfile as sf

from metafx.plots import (
    ArtifactError,
    optuna_plots,
    plot_training_curves,
    trial_table_markdown,
    write_trial_artifacts,
)
from metafx.search_space import study_from_rows
from tracking_fakes import SR, make_examples, make_history


def _png_ok(path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.01, f"{path} is blank"


def test_write_trial_artifacts_layout_audio_and_plots(tmp_path):
    examples = make_examples(n=2, length=4000, tcn_crop=300)
    files = write_trial_artifacts(tmp_path, examples, make_history(), SR)
    rel = sorted(str(p.relative_to(tmp_path)) for p in files)
    expected = sorted(
        [f"audio/{e['task_id']}/{k}.wav" for e in examples for k in ("input", "target", "pred_pre", "pred_post")]
        + [f"audio/{e['task_id']}/levels.json" for e in examples]
        + [f"plots/{e['task_id']}_{kind}.png" for e in examples for kind in ("time", "spectrum")]
        + ["plots/training_curves.png"]
    )
    assert rel == expected
    for p in files:
        assert p.is_file() and p.stat().st_size > 0
    for e in examples:
        d = tmp_path / "audio" / e["task_id"]
        gain = json.loads((d / "levels.json").read_text())["gain"]
        for k in ("input", "target", "pred_pre", "pred_post"):
            data, sr = sf.read(d / f"{k}.wav", dtype="float32")
            assert sr == SR
            # Shorter (TCN) predictions are end-aligned: padded at the front to the target's length.
            assert data.ndim == 1 and data.shape[0] == e["target"].size
        post, _ = sf.read(d / "pred_post.wav", dtype="float32")
        assert np.all(post[:300] == 0)
        np.testing.assert_allclose(post[300:], gain * e["pred_post"], atol=2 / 32768)
        tgt, _ = sf.read(d / "target.wav", dtype="float32")
        np.testing.assert_allclose(tgt, gain * e["target"], atol=2 / 32768)
    for p in files:
        if p.suffix == ".png":
            _png_ok(p)


def _peak_db(x) -> float:
    return 20 * np.log10(np.max(np.abs(x)))


def test_wavs_are_clip_safe_and_finite(tmp_path, caplog):
    ex = make_examples(n=1)[0]
    ex["pred_pre"] = ex["pred_pre"] * 100  # diverged model: far outside [-1, 1]
    ex["pred_post"] = ex["pred_post"].copy()
    ex["pred_post"][5] = np.nan
    with caplog.at_level(logging.WARNING, logger="metafx.plots"):
        write_trial_artifacts(tmp_path, [ex], [], SR)
    pre, _ = sf.read(tmp_path / "audio" / ex["task_id"] / "pred_pre.wav", dtype="float32")
    post, _ = sf.read(tmp_path / "audio" / ex["task_id"] / "pred_post.wav", dtype="float32")
    # The loudest signal (the diverged one) sets the gain: it peaks at -1 dBFS, nothing clips.
    assert _peak_db(pre) == pytest.approx(-1.0, abs=0.05) and np.isfinite(post).all()
    assert "non-finite" in caplog.text


def test_seconds_of_quiet_audio_are_written_audible_with_one_gain(tmp_path):
    """Three seconds at -51 dBFS (as the test episodes come out of a quiet source): the loudest of the four
    peaks at -1 dBFS in its WAV, the others keep their level relative to it, and the gain is recorded."""
    sr, n = 16000, 3 * 16000
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n)
    x *= 10 ** (-51 / 20) / np.abs(x).max()  # input peaks at -51 dBFS
    y = 0.5 * x  # the effect: -6 dB
    ex = {"task_id": "moog_vcf-quiet", "family": "moog_vcf", "params": {"cutoff": 800.0},
          "input": x, "target": y, "pred_pre": 0.9 * x, "pred_post": 0.55 * x[100:]}
    write_trial_artifacts(tmp_path, [ex], [], sr)
    d = tmp_path / "audio" / "moog_vcf-quiet"
    wav = {k: sf.read(d / f"{k}.wav", dtype="float64")[0] for k in ("input", "target", "pred_pre", "pred_post")}
    assert all(len(w) == n for w in wav.values())  # seconds, not one slice
    assert _peak_db(wav["input"]) == pytest.approx(-1.0, abs=0.05)  # the loudest of the four
    for k, level in (("target", 0.5), ("pred_pre", 0.9), ("pred_post", 0.55)):
        assert _peak_db(wav[k]) - _peak_db(wav["input"]) == pytest.approx(20 * np.log10(level), abs=0.05), k
    levels = json.loads((d / "levels.json").read_text())
    assert levels["gain_db"] == pytest.approx(50.0, abs=0.05)
    assert levels["peak_dbfs_in_data"]["input"] == pytest.approx(-51.0, abs=0.01)
    np.testing.assert_allclose(wav["target"], levels["gain"] * y, atol=2 / 32768)


def _orange_pixels(path) -> int:
    """Pixels of matplotlib's tab:orange (the prediction before adaptation) in a PNG."""
    img = mpimg.imread(path)[..., :3]
    orange = np.array([1.0, 0.498, 0.055])
    return int((np.abs(img - orange).max(axis=-1) < 0.12).sum())


def test_prediction_before_adaptation_stays_visible_where_it_equals_after(tmp_path):
    """Adaptation that changes little puts the two prediction curves on each other; 'before' must still show."""
    ex = make_examples(n=1, length=16000, tcn_crop=0)[0]
    ex["pred_pre"] = ex["pred_post"].copy()
    write_trial_artifacts(tmp_path, [ex], [], SR)
    for kind in ("spectrum", "time"):
        png = tmp_path / "plots" / f"{ex['task_id']}_{kind}.png"
        # The legend's sample line alone is about 60 pixels; the curve itself must show as well.
        assert _orange_pixels(png) > 400, (kind, _orange_pixels(png))


def test_training_curves_overlay_val_and_skip_empty(tmp_path):
    p = plot_training_curves(tmp_path / "c.png", make_history(12))
    assert p is not None
    _png_ok(p)
    assert plot_training_curves(tmp_path / "none.png", []) is None
    assert not (tmp_path / "none.png").exists()
    # Only some keys and non-finite values: still drawn, no crash.
    p2 = plot_training_curves(tmp_path / "partial.png", [{"step": 0, "query_l1_post": float("nan")}, {"step": 1, "query_l1_post": 0.1}])
    assert p2 is not None
    with pytest.raises(ArtifactError, match="step"):
        plot_training_curves(tmp_path / "bad.png", [{"query_l1_post": 0.1}])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda e: e.pop("target"), "lacks key"),
        (lambda e: e.__setitem__("pred_post", np.zeros(e["target"].size + 1, np.float32)), "more than the target"),
        (lambda e: e.__setitem__("input", np.zeros((2, 10), np.float32)), "1-D"),
        (lambda e: e.__setitem__("params", [1, 2]), "params must be a mapping"),
    ],
)
def test_malformed_examples_are_refused(tmp_path, mutate, match):
    ex = make_examples(n=1)[0]
    mutate(ex)
    with pytest.raises(ArtifactError, match=match):
        write_trial_artifacts(tmp_path, [ex], [], SR)


def test_duplicate_task_ids_and_bad_sample_rate(tmp_path):
    a, b = make_examples(n=2)
    b["task_id"] = a["task_id"]
    with pytest.raises(ArtifactError, match="used twice"):
        write_trial_artifacts(tmp_path, [a, b], [], SR)
    with pytest.raises(ArtifactError, match="sample_rate"):
        write_trial_artifacts(tmp_path, [a], [], 0)


def test_trial_table_markdown():
    rows = [{"trial": "t1", "loss": 0.123456789, "note": "a|b"}, {"trial": "t2", "loss": None}]
    md = trial_table_markdown(rows, ["trial", "loss", "note"])
    lines = md.strip().splitlines()
    assert lines[0] == "| trial | loss | note |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| t1 | 0.1235 | a\\|b |"
    assert lines[3] == "| t2 |  |  |"
    with pytest.raises(ArtifactError):
        trial_table_markdown(rows, [])


def test_optuna_plots_from_rows(tmp_path):
    from metafx.config import load_config

    cfg = load_config("lstm.yaml", "smoke")
    rows = [
        {"trial_id": f"t{i}", "val/query_l1_post": 0.1 / (i + 1), "maml.inner_lr": 0.001 * 3**i,
         "model.lstm.hidden": [16, 32, 64][i % 3], "maml.inner_steps": 1 + i % 3}
        for i in range(5)
    ] + [{"trial_id": "failed", "val/query_l1_post": float("nan")}]
    study = study_from_rows(rows, "val/query_l1_post", "min", cfg.search.params)
    assert len(study.trials) == 5 and study.best_value == pytest.approx(0.02)
    files = optuna_plots(study, tmp_path)
    assert [p.name for p in files] == ["optuna_history.png", "optuna_importances.png"]
    for p in files:
        _png_ok(p)
    # One trial: the history only, importances are skipped (not an error).
    one = study_from_rows(rows[:1], "val/query_l1_post", "min")
    assert [p.name for p in optuna_plots(one, tmp_path / "one")] == ["optuna_history.png"]
    with pytest.raises(ValueError, match="finite"):
        study_from_rows(rows[-1:], "val/query_l1_post")


def test_finite_value_keeps_only_real_numbers():
    from metafx.records import finite_value

    assert finite_value(0.25) == 0.25 and finite_value(np.float32(2.0)) == 2.0 and finite_value("1e-3") == 1e-3
    assert finite_value(3) == 3.0 and isinstance(finite_value(np.int64(3)), float)
    for bad in (None, True, False, float("nan"), float("inf"), -float("inf"), "nan", "abc", [1.0], {}):
        assert finite_value(bad) is None, bad
