"""benchmarks/quality.md: the report written from quality.json (no training here)."""
from __future__ import annotations

import json

from metafx.bench.quality import report

ROW = {"params": 10, "inner_steps": 1, "inner_lr": 0.1, "outer_lr": 1e-3, "first_order": True, "meta_steps": 2,
       "hf_error": 1.0}


def test_report_has_esr_the_joint_models_mae_before_adaptation_and_each_studys_slices():
    rows = [{**ROW, "model": "lstm", "slice_len": 2048, "method": "maml", "esr": 0.9921, "mae": 0.0378, "stft": 3.9,
             "mae_pre": 1.1, "wall_seconds": 269.0},
            {**ROW, "model": "lstm", "slice_len": 2048, "method": "joint", "esr": 125.7, "mae": 0.357, "stft": 15.3,
             "mae_pre": 0.0467},
            {**ROW, "model": "transformer", "slice_len": 512, "method": "maml", "esr": 1e-5, "mae": 0.04, "stft": 5.2,
             "mae_pre": 1.4, "wall_seconds": 160.0}]
    md = report(json.loads(json.dumps({"command": "python launch/bench.py quality --budget local", "date": "d",
                                       "cores": 2, "load_average": [2.0, 2.0, 2.0], "rows": rows})))
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert " ESR | MAE | STFT |" in header
    joint = next(line for line in md.splitlines() if line.startswith("| lstm | joint"))
    assert "| 125.7 | 0.3570 |" in joint and "| 0.0467 |" in joint  # ESR in significant digits; MAE pre
    assert "| 1e-05 |" in next(line for line in md.splitlines() if line.startswith("| transformer | maml"))
    assert "lstm 2048-sample slices" in md and "transformer 512-sample slices" in md
    assert "No single_task row for lstm: its study skips it" in md
    assert "No joint or single_task row for transformer: its study skips them" in md
