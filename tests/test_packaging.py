"""The package as pip builds it: every file metafx reads at run time travels in the wheel.

Why: a clone installs metafx editable (its files are read in place), but a wheel (``pip install .``, a
cluster image) holds only the Python modules and the declared package data; the shipped meta-model, the
Faust sources and the native runtime and header were each a file a capture or a render opens by path.
Real component: setuptools builds the wheel from this checkout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_file_under_metafx(tmp_path):
    # built from a copy: setuptools reuses a build/ folder's files (a stale one would hide a missing entry), and
    # the checkout stays as it was
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    shutil.copytree(REPO / "metafx", src / "metafx", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("metafx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for root, dirs, files in os.walk(REPO / "metafx"):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        want |= {(Path(root) / f).relative_to(REPO).as_posix() for f in files if not f.endswith((".pyc", ".so"))}
    missing = sorted(want - names)
    assert not missing, f"files under metafx/ missing from the wheel (add them to pyproject's package-data): {missing}"
    assert {"metafx/shipped/capture_arx.pt", "metafx/native_arx.h", "metafx/data/effects/amp.dsp"} <= names
