"""The left-out capture benchmark (metafx/bench/universal_capture.py): its left-out meta-models and its report.

The left-out model is meta-trained for real on a DAWDreamer render of the shipped capture study's
smoke budget; the test checks the family is nowhere in what meta-training or checkpoint selection
sees, and that a finished model is reused rather than trained again.
"""
from __future__ import annotations

import json

import torch

from metafx.bench.universal_capture import (in_family_targets, left_out_config, merge_update, report, targets,
                                              train_left_out)
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


def test_per_family_model_is_trained_on_the_family_alone_with_the_same_held_out_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFX_CACHE", str(tmp_path / "cache"))
    cfg = left_out_config("cubicnl", 2, "smoke", per_family=True)
    others = [f.name for f in cfg.data.families if f.name != "cubicnl"]
    assert sorted(cfg.data.left_out_families) == sorted(others) and others  # every other family of the budget
    ts = load_taskset(cfg.data, progress=False)
    full = load_taskset(left_out_config("moog_vcf", 2, "smoke").data, progress=False)  # cubicnl not left out there
    assert ts.split("test", "cubicnl") == full.split("test", "cubicnl")  # the same held-out settings
    assert ts.split("train", "cubicnl") == full.split("train", "cubicnl") and ts.split("val", "cubicnl")
    assert all(not ts.split("train", f) and not ts.split("val", f) for f in others)

    info = train_left_out("cubicnl", 2, str(tmp_path / "p"), budget="smoke", per_family=True)
    assert not info["reused"] and info["per_family"] is True
    ck = torch.load(info["checkpoint"], weights_only=True)
    assert sorted(ck["config"]["data"]["left_out_families"]) == sorted(others)
    assert train_left_out("cubicnl", 2, str(tmp_path / "p"), budget="smoke", per_family=True)["reused"]
    # a left-out model in the same folder is another study: trained, not taken for the per-family one
    assert not train_left_out("cubicnl", 2, str(tmp_path / "p"), budget="smoke")["reused"]


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
                 ["--budget", "smoke", "--", "--workdir", str(tmp_path / "w")],
                 ["--", "--update", "--workdir", str(tmp_path / "w")],
                 ["--out", str(tmp_path / "o"), "--", "--update", "--families", "amp", "--workdir", str(tmp_path / "w")],
                 ["--", "--models", "left_out,specialist", "--workdir", str(tmp_path / "w")]):
        r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "bench.py"), "universal_capture", *argv],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "Traceback" not in r.stderr
        assert any(w in err[0] for w in ("nope", "--budget smoke", "name them with --families", "run without --update",
                                         "--models left_out,specialist: name some of left_out,per_family"))
        assert not (tmp_path / "w").exists()  # nothing trained, nothing written


def test_update_replaces_only_the_rerun_families_rows_and_records_the_run():
    old = {"command": "first", "cores": 2, "wall_seconds": 10.0, "support_seconds": 3.0, "settings": 3,
           "heldout_from_seconds": 10.0, "shipped_meta_steps": 500, "left_out_meta_steps": 500,
           "rows": _rows("a", 0.01, 0.5, 0.4, "a1") + _rows("b", 2e-7, 0.5, 1e-11, "b1") + _rows("c", 0.02, 0.5, 0.4, "c1")}
    new = {"command": "second", "settings": 1, "wall_seconds": 5.0, "models_reused": 0,
           "rows": _rows("b", 1e-11, 0.5, 1e-11, "b2")}
    merged = merge_update(old, new)
    assert [r["family"] for r in merged["rows"]] == [r["family"] for r in old["rows"]]  # the earlier order
    assert {r["task_id"] for r in merged["rows"] if r["family"] == "b"} == {"b2"}  # b's old rows gone
    assert [r for r in merged["rows"] if r["family"] != "b"] == [r for r in old["rows"] if r["family"] != "b"]
    assert merged["command"] == "first" and merged["settings"] == 3
    assert [(u["command"], u["families"]) for u in merged["updates"]] == [("second", ["b"])]
    md = report(merged)
    assert "`first`" in md and "Then `second`" in md and "of: b." in md
    b_line = next(ln for ln in md.splitlines() if ln.startswith("* b:"))
    assert "tie with a baseline" in b_line, b_line  # was NOT met (2e-7 against 1e-11) before the update
    again = merge_update(merged, {**new, "command": "third"})
    assert [u["command"] for u in again["updates"]] == ["second", "third"]
    # a run that captured with per-family models only: b's left-out rows stay, its other rows are replaced
    pf = [r for r in _rows("b", 0.5, 0.6, 0.7, "b3") if r["setting"] != "left_out"]
    pf += [{**r, "variant": "per_family", "setting": "in_family"} for r in _rows("b", 0.2, 0, 0, "b3")
           if r["setting"] == "left_out"]
    third = merge_update(merged, {**new, "command": "fourth", "rows": pf})
    b_rows = [r for r in third["rows"] if r["family"] == "b"]
    assert {(r["setting"], r["variant"], r["task_id"]) for r in b_rows} == {
        ("left_out", "universal", "b2"), ("in_family", "universal", "b3"), ("in_family", "baseline", "b3"),
        ("in_family", "per_family", "b3")}
    assert third["updates"][-1]["rows"] == ["in_family/baseline", "in_family/per_family", "in_family/universal"]


def test_in_family_target_compares_the_universal_model_with_the_per_family_one():
    def per(fam: str, esr: float, tid: str = "") -> list[dict]:
        return [{"family": fam, "params": {"drive": 0.5}, "support_seconds": 3.0, "task_id": tid or fam,
                 "setting": "in_family", "variant": "per_family", "method": "ridge", "bank": b,
                 "esr": esr if b else 2 * esr, "meta_train_seconds": 50.0} for b in (True, False)]

    # _rows: the universal model's in-family ESR with the bank is left / 2
    rows = (_rows("a", 0.02, 0.5, 0.4) + per("a", 0.008) + _rows("b", 0.02, 0.5, 0.4) + per("b", 0.006)
            + _rows("c", 2e-14, 0.5, 0.4) + per("c", 1e-15) + _rows("d", 0.02, 0.5, 0.4))
    lines = in_family_targets(rows)
    assert [ln.split(":")[0] for ln in lines[:3]] == ["* a", "* b", "* c"]  # d has no per-family model
    assert lines[0].endswith("(1.25x): met") and lines[1].endswith("(1.67x): NOT met")
    assert lines[2].endswith(": met")  # 1e-14 against 1e-15: both exact to float64 rounding
    assert lines[-1] == "Met on 2 of 3 families."
    assert targets(rows)[-1] == "Met on 4 of 4 families."  # the per-family rows are not the universal model's
    md = report({"command": "x", "cores": 2, "wall_seconds": 1.0, "support_seconds": 3.0, "settings": 4,
                 "heldout_from_seconds": 10.0, "shipped_meta_steps": 500, "left_out_meta_steps": 500, "rows": rows})
    assert "| a | 1 | 0.01 | 0.02 | 0.008 | 0.02 | 0.04 | 0.016 | 0.5 | 0.4 | 1 | 100 |" in md
    assert "| d | 1 | 0.01 | 0.02 | - | 0.02 | 0.04 | - | 0.5 | 0.4 | 1 | 100 |" in md
    assert "## In-family target" in md and "Met on 2 of 3 families." in md
    assert in_family_targets(_rows("a", 0.02, 0.5, 0.4)) == []
