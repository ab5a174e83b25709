"""The leaderboard names the STFT resolution beside its STFT column (issue 12, item 12)."""
from __future__ import annotations

from metafx.bench.leaderboard import _stft_text, write_report


def _row(method: str, stft: float, resolution: str | None) -> dict:
    row = {"family": "moog_vcf", "tasks": 12, "test_tasks": 2, "test_episodes": 2, "model": "arx",
           "method": method, "params": 0, "adapted_params": 25, "seconds_per_meta_step": None, "wall_seconds": 0.0,
           "mae": 0.01, "stft": stft, "hf_error": 1.0}
    if resolution is not None:
        row["stft_resolution"] = resolution
    return row


def test_leaderboard_has_an_stft_resolution_column(tmp_path):
    assert _stft_text(2048) == "fft=1024,hop=256,win=1024"  # auraloss's defaults
    assert _stft_text(512) == "fft=512,hop=128,win=512"  # the fallback on short slices
    result = {"rows": [_row("identity", 5.0, _stft_text(512)), _row("lsfir", 1.0, None)], "seeds": [],
              "command": "python launch/bench.py leaderboard --budget smoke", "budget": "smoke", "jobs": 1,
              "machine": {"platform": "linux", "cpus": 2, "torch": "2", "loadavg_start": 0, "loadavg_end": 0},
              "total_seconds": 60.0, "date": "2026-11-29", "setup": "test", "notes": []}
    write_report(result, tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| model |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols.index("STFT resolution") == cols.index("STFT") + 1, cols
    rows = {ln.split("|")[2].strip(): [c.strip() for c in ln.strip("|").split("|")]
            for ln in md.splitlines() if ln.startswith("| arx |")}
    assert rows["identity"][cols.index("STFT resolution")] == "fft=512,hop=128,win=512"
    # A row of an older leaderboard.json: every row of a family is scored on the identity row's episodes (checked
    # when rows are made and merged), so it shows that row's resolution; with none recorded, "not recorded".
    assert rows["lsfir"][cols.index("STFT resolution")] == "fft=512,hop=128,win=512"
    result["rows"][0]["stft_resolution"] = None
    write_report(result, tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert [[c.strip() for c in ln.strip("|").split("|")][cols.index("STFT resolution")]
            for ln in md.splitlines() if ln.startswith("| arx |")] == ["not recorded"] * 2
