"""The methods bench runs end to end (smoke budget) and writes what it claims."""
from __future__ import annotations

import json
import subprocess
import sys

from metafx.config import REPO_ROOT


def test_speed_part_writes_curves_and_verdicts(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "bench.py"), "methods", "--budget", "smoke", "--out",
           str(tmp_path), "--", "--part", "speed", "--variants", "lstm32_maml,arx_ridge", "--steps", "4",
           "--jobs", "1"]
    env = {"METAFX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "methods_speed.json").read_text())
    assert {x["variant"] for x in res["results"]} == {"lstm32_maml", "arx_ridge"}
    for x in res["results"]:
        assert x["curve"] and x["curve"][-1][1] == 4 and x["final_val_l1"] > 0
    assert set(res["verdict"]) == {"lstm32_maml", "arx_ridge"}
    # The reference reaches its own final loss by its last report at the latest.
    assert res["verdict"]["lstm32_maml"]["reached_at_seconds"] is not None
    assert "Reference: plain second-order LSTM-32 MAML" in (tmp_path / "methods_speed.md").read_text()


def test_unknown_variant_is_refused_with_the_list(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "bench.py"), "methods", "--budget", "smoke", "--out",
           str(tmp_path), "--", "--part", "speed", "--variants", "lstm32_maml,nope"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown variant 'nope'" in r.stderr and "arx_ridge" in r.stderr
    assert not (tmp_path / "methods_speed.json").exists()
