"""The left-out capture benchmark (metafx/bench/universal_capture.py): its left-out meta-models and its report.

The left-out model is meta-trained for real on a DAWDreamer render of the shipped capture study's
smoke budget; the test checks the family is nowhere in what meta-training or checkpoint selection
sees, and that a finished model is reused rather than trained again.
"""
from __future__ import annotations

import json

import torch

from metafx.bench.universal_capture import left_out_config, report, targets, train_left_out
from metafx.data.tasks import load_taskset


def test_left_out_model_is_trained_without_the_family_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFX_CACHE", str(tmp_path / "cache"))
    cfg = left_out_config("cubicnl", 2, "smoke")
    assert list(cfg.data.left_out_families) == ["cubicnl"]
    ts = load_taskset(cfg.data, progress=False)
    held = [t["index"] for t in ts.tasks if t["family"] == "cubicnl" and t["split"] == "test"]
    assert held and ts.split("test", "cubicnl") == held  # the same held-out settings as when it is not left out
    assert not ts.split("train", "cubicnl") and not ts.split("val", "cubicnl")
    assert ts.split("train", "moog_vcf") and ts.split("val", "moog_vcf")

    info = train_left_out("cubicnl", 2, str(tmp_path / "m"), budget="smoke")
    assert not info["reused"] and info["meta_steps"] == 2 and info["family"] == "cubicnl"
    ck = torch.load(info["checkpoint"], weights_only=True)
    assert list(ck["config"]["data"]["left_out_families"]) == ["cubicnl"]  # the model says what it never saw
    assert json.loads((tmp_path / "m" / "train.json").read_text())["best_step"] == info["best_step"]

    again = train_left_out("cubicnl", 2, str(tmp_path / "m"), budget="smoke")
    assert again["reused"] and again["seconds"] == info["seconds"]
    other = train_left_out("cubicnl", 3, str(tmp_path / "m"), budget="smoke")  # another study: trained again
    assert not other["reused"] and other["meta_steps"] == 3


def _rows(fam: str, left: float, fir: float, arx: float, tid: str = "") -> list[dict]:
    common = {"family": fam, "params": {"drive": 0.5}, "support_seconds": 3.0, "task_id": tid or fam}
    rows = [{**common, "setting": s, "variant": "universal", "method": "ridge", "bank": b, "esr": e,
             "meta_train_seconds": 100.0 if s == "left_out" else None}
            for s, b, e in (("in_family", True, left / 2), ("in_family", False, left), ("left_out", True, left),
                            ("left_out", False, 2 * left))]
    return rows + [{**common, "setting": "in_family", "variant": "baseline", "method": m, "bank": False, "esr": e,
                    "meta_train_seconds": 0.0} for m, e in (("lsfir", fir), ("arx", arx), ("identity", 1.0))]


def test_targets_need_all_three_conditions_on_the_family_mean():
    rows = (_rows("a", 0.01, 0.5, 0.4) + _rows("b", 0.06, 0.5, 0.4) + _rows("c", 0.01, 0.005, 0.4)
            + _rows("d", 0.01, 0.5, 0.01) + _rows("e", 0.02, 0.5, 0.4, "e1") + _rows("e", 0.10, 0.5, 0.4, "e2"))
    lines = targets(rows)
    assert [ln.split(":")[0] for ln in lines[:5]] == ["* a", "* b", "* c", "* d", "* e"]
    assert lines[0].endswith(": met") and all(ln.endswith("NOT met") for ln in lines[1:5])
    assert "left-out ESR 0.06 " in lines[4]  # e: the mean of its two settings, one of which alone would meet it
    assert lines[-1] == "Met on 1 of 5 families."
    md = report({"command": "x", "cores": 2, "wall_seconds": 1.0, "support_seconds": 3.0, "settings": 6,
                 "heldout_from_seconds": 10.0, "shipped_meta_steps": 500, "left_out_meta_steps": 500, "rows": rows})
    assert "| a | 1 | 0.005 | 0.01 | 0.01 | 0.02 | 0.5 | 0.4 | 1 | 100 |" in md
    assert "| e | 2 | 0.03 | 0.06 | 0.06 | 0.12 | 0.5 | 0.4 | 1 | 100 |" in md
    assert "| e | drive=0.5 | 0.05 | 0.1 | 0.1 | 0.2 | 0.5 | 0.4 | 1 |" in md  # the per-setting table


def test_a_tie_at_float_rounding_is_reported_as_a_tie_not_as_met():
    rows = _rows("lin", 3e-14, 1e-14, 5e-15) + _rows("lin2", 2e-7, 0.3, 7e-11)
    lines = targets(rows)
    assert "tie with a baseline" in lines[0] and lines[1].endswith("NOT met")  # 2e-7 is not rounding
    assert lines[-1] == "Met on 0 of 2 families; 1 more tie with a baseline at float64 rounding."


def test_bad_input_is_one_line_and_exit_status_2_before_any_training(tmp_path):
    import subprocess
    import sys

    from metafx.config import REPO_ROOT

    for argv in (["--", "--families", "nope,amp", "--workdir", str(tmp_path / "w")],
                 ["--budget", "smoke", "--", "--workdir", str(tmp_path / "w")]):
        r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "bench.py"), "universal_capture", *argv],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and ("nope" in err[0] or "--budget smoke" in err[0]) and "Traceback" not in r.stderr
        assert not (tmp_path / "w").exists()  # nothing trained, nothing written
