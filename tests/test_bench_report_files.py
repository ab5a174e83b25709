"""The benchmarks' report writer (metafx/bench/report_files.py): both files, numpy values as numbers, a final
newline, the folder created, and an old report kept whole when the new one cannot be written."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from metafx.bench.report_files import write_report, write_text_atomic


def test_writes_json_and_markdown_with_numpy_values_as_numbers(tmp_path):
    rep = {"command": "python launch/bench.py x", "esr": np.float32(0.25), "rows": np.arange(3), "n": np.int64(7),
           "pair": (1, 2), "path": tmp_path}
    j, m = write_report(tmp_path / "new" / "sub", "x", rep, "# X\n\n| a |")
    back = json.loads(j.read_text(encoding="utf-8"))
    assert back["esr"] == 0.25 and back["rows"] == [0, 1, 2] and back["n"] == 7 and back["pair"] == [1, 2]
    assert back["path"] == str(tmp_path) and back["command"] == rep["command"]
    assert m.read_text(encoding="utf-8") == "# X\n\n| a |\n" and j.read_text().endswith("}\n")
    assert sorted(p.name for p in j.parent.iterdir()) == ["x.json", "x.md"]  # no temporary file left


def test_a_report_that_cannot_be_written_keeps_the_old_one(tmp_path):
    write_report(tmp_path, "x", {"v": 1}, "old\n")

    class Unwritable:
        def __str__(self):
            raise RuntimeError("cannot write this")

    with pytest.raises(RuntimeError, match="cannot write this"):
        write_report(tmp_path, "x", {"v": Unwritable()}, "new\n")
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1} and (tmp_path / "x.md").read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.md"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.md"
    write_text_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new " + "\ud800")  # a lone surrogate: UTF-8 fails inside the write
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["r.md"]
