"""The export speed benchmark (metafx/bench/export_rtf.py) on one family, and the capture report's RTF line.

Real components: DAWDreamer renders the family's held-out setting, the shipped meta-model captures it,
model.ts and model.so are timed in fresh interpreters; the report's rows are what the capture wrote.
"""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from metafx.bench import capture as bench_capture
from metafx.bench import export_rtf
from metafx.capture import SHIPPED_MODEL
from metafx.native_export import find_compiler

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a capture and four fresh interpreters (26 s); make test-slow
@pytest.mark.skipif(not SHIPPED_MODEL.is_file() or find_compiler() is None, reason="shipped model or C compiler missing")
def test_export_rtf_times_both_exports_of_a_capture(tmp_path, capsys):
    args = Namespace(out=str(tmp_path), budget="local", space="lstm.yaml")
    assert export_rtf.main(args, ["--", "--families", "diode_ladder", "--seconds", "0.5"]) == 0
    rep = json.loads((tmp_path / "export_rtf.json").read_text())
    assert rep["command"] == "python launch/bench.py export_rtf -- --families diode_ladder --seconds 0.5"
    assert rep["speed_probe"]["python_loop_s"] > 0 and rep["speed_probe"]["numpy_matmul_s"] > 0
    (row,) = rep["rows"]
    assert row["family"] == "diode_ladder" and row["native_error"] is None
    assert row["rtf_ts_cpu"] > 0 and row["rtf_native_cpu"] > 0 and 0 <= row["max_abs_diff_vs_model_ts"] <= 1e-5
    assert 0 < row["heldout_esr"] < 0.1 and row["compile_seconds"] > 0
    md = (tmp_path / "export_rtf.md").read_text()
    assert "| diode_ladder |" in md and ("model.so 1 of 1 families" in md or "model.so 0 of 1 families" in md)
    assert "-o model.so" in md and str(tmp_path) not in md  # the compile command without temporary paths


def test_capture_report_names_the_native_figure_where_it_has_one():
    rep = json.loads((REPO / "benchmarks" / "capture.json").read_text())
    fit = "continuous"
    keys = ("rtf_block256", "rtf_block256_bank", "rtf_block256_cascade")
    for k in keys:  # a report from before the native export: no native figure
        if rep.get(k):
            rep[k] = {f: v for f, v in rep[k].items() if not f.startswith("native")}
    assert "native model.so" not in bench_capture._markdown(rep, fit)
    rep["rtf_block256_bank"] = dict(rep["rtf_block256_bank"] or {"family": "cubicnl", "bank_units": 111,
                                                                  "rtf_cpu": 13.0, "rtf_wall": 13.0},
                                    native_rtf_cpu=77.7)
    assert "(native model.so: 77.7x in CPU time)" in bench_capture._markdown(rep, fit)


def test_capture_report_only_rewrites_the_markdown_from_the_json(tmp_path, capsys):
    """``bench.py capture -- --report-only``: capture.md again from capture.json (the committed one), with the
    command that made the figures, not the one that re-wrote the report."""
    rep = json.loads((REPO / "benchmarks" / "capture.json").read_text())
    (tmp_path / "capture.json").write_text(json.dumps(rep))
    args = Namespace(out=str(tmp_path), budget="local", space="lstm.yaml")
    assert bench_capture.main(args, ["--", "--report-only"]) == 0
    md = (tmp_path / "capture.md").read_text()
    assert md == bench_capture._markdown(rep, rep["rows"][0]["fit"]) and f"`{rep['command']}`" in md
    assert json.loads((tmp_path / "capture.json").read_text()) == rep
