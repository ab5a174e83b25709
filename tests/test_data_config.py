"""Every bad data configuration raises one ConfigError naming the file, the key, the value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metafx.config import SPACES_DIR, ConfigError, load_config, read_yaml

STUDY = str(SPACES_DIR / "lstm.yaml")


@pytest.mark.parametrize("overrides, expect", [
    ({"data.sample_rte": 44100},
     ["unknown key 'data.sample_rte'", "allowed keys here: sample_rate"]),
    ({"data.source.sedd": 1},
     ["unknown key 'data.source.sedd'", "seed"]),
    ({"data.families[0].parms": {"cutoff": [100]}},
     ["unknown key 'data.families[0].parms'", "params"]),
    ({"data.sample_rate": "fast"},
     ["data.sample_rate", "'fast'", "expected an integer"]),
    ({"data.source.seconds": "ten"},
     ["data.source.seconds", "'ten'", "expected a number"]),
    ({"data.families[0].params.cutoff": ["a", "b"]},
     ["data.families[0].params.cutoff", "grid values must be finite numbers"]),
    ({"data.source.seconds": -1},
     ["data.source.seconds", "-1", "must be > 0"]),
    ({"data.source.seconds": 0},
     ["data.source.seconds", "must be > 0"]),
    ({"data.families[0].params.cutoff": [1000, 30000]},
     ["data.families[0].params.cutoff", "30000", "below Nyquist (24000 Hz"]),
    ({"data.sample_rate": 16000, "data.families[0].params.cutoff": [1000, 8000]},
     ["data.families[0].params.cutoff", "8000", "below Nyquist (8000 Hz"]),
    ({"data.families[0].params.cutoff": [0, 1000]},
     ["data.families[0].params.cutoff", "must be > 0 Hz"]),
    ({"data.families[0].params.cutoff": []},
     ["data.families[0].params.cutoff", "an empty grid has no tasks"]),
    ({"data.families[0].params.resonance": {"low": 0, "high": 1, "num": 0}},
     ["data.families[0].params.resonance.num", "must be >= 1"]),
    ({"data.families[0].params": {}},
     ["data.families[0].params", "expected a mapping slider -> grid"]),
    ({"data.families": []},
     ["data.families", "non-empty list of effect families"]),
    ({"data.families[0].dsp": "no_such_effect.dsp"},
     ["data.families[0].dsp", "no_such_effect.dsp", "no such .dsp file", "moog_vcf.dsp"]),
    ({"maml.slice_len": 100000},
     ["maml.k_support + maml.k_query = 4", "maml.slice_len = 100000", "data.source.seconds = 2",
      "raise data.source.seconds or lower the slices"]),
    ({"maml.k_support": 100, "maml.k_query": 100},
     ["maml.k_support + maml.k_query = 200", "2.13 s of audio", "raise data.source.seconds"]),
    ({"data.on_unstable": "ignore"},
     ["data.on_unstable", "'ignore'", "drop, fail"]),
    ({"data.val_fraction": 0.6, "data.test_fraction": 0.5},
     ["data.val_fraction", "must be < 1"]),
    ({"data.source.kind": "folder"},
     ["data.source.path", "needs a path to a folder of WAV/FLAC files"]),
    ({"data.source.kind": "folder", "data.source.path": "/no/such/folder"},
     ["data.source.path", "/no/such/folder", "no such folder"]),
    ({"data.families[0].max_tasks": 0},
     ["data.families[0].max_tasks", "must be >= 1"]),
    ({"data.render_workers": -2},
     ["data.render_workers", "must be >= 0"]),
])
def test_bad_data_config(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config("lstm.yaml", "smoke", overrides=overrides)
    msg = str(e.value)
    assert STUDY in msg, f"the error names the file: {msg}"
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_bad_key_in_a_study_file_names_that_file(tmp_path: Path):
    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["data"]["families"][0]["params"]["cutoff"] = {"low": 100, "high": 25000, "num": 4, "scale": "log"}
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{p}: key 'data.families\[0\].params.cutoff' = 25000.0 is invalid: a cutoff must be below Nyquist"):
        load_config(p, "local")


def test_a_users_dsp_by_path_and_relative_to_the_study(tmp_path: Path):
    (tmp_path / "fx").mkdir()
    (tmp_path / "fx" / "mine.dsp").write_text('process = *(hslider("gain", 1, 0, 2, 0.01));')
    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["data"]["families"] = [{"name": "mine", "dsp": "fx/mine.dsp", "params": {"gain": [0.5, 1, 1.5]}}]
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p, "local")
    assert cfg.data.families[0].dsp == (tmp_path / "fx" / "mine.dsp").resolve()
    cfg2 = load_config("lstm.yaml", "smoke", overrides={"data.families[0].dsp": str(tmp_path / "fx" / "mine.dsp"),
                                                        "data.families[0].params": {"gain": [1.0]}})
    assert cfg2.data.families[0].dsp.name == "mine.dsp"
