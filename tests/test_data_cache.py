"""The content-addressed cache and task planning without an audio engine (metafx.data.cache, metafx.data.plan)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from metafx.config import REPO_ROOT, load_config
from metafx.data.cache import (HOST, RenderResult, RowReader, RowWriter, build_dataset, clean_stale_tmp, compact_rows,
                               copy_rows, is_complete)
from metafx.data.plan import dataset_hash, sha256_file


def test_asking_whether_a_dataset_is_cached_does_not_import_dawdreamer(tmp_path):
    """Planning, hashing and the cache lookup run in a fresh interpreter without loading dawdreamer."""
    script = textwrap.dedent(f"""
        import sys
        from metafx.config import load_config
        from metafx.data.cache import is_complete
        from metafx.data.plan import dataset_path, plan_tasks
        import metafx.data.distributed, metafx.data.tasks

        cfg = load_config("lstm.yaml", "smoke", overrides={{"data.cache_dir": {str(tmp_path)!r}}}).data
        assert len(plan_tasks(cfg)) == 12
        assert not is_complete(dataset_path(cfg))
        assert "dawdreamer" not in sys.modules, "planning or the cache imported dawdreamer"
        print("no dawdreamer")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode == 0 and "no dawdreamer" in r.stdout, r.stderr[-3000:]


def test_row_writer_copy_and_compaction_stream_exact_rows(tmp_path):
    """Rows written out of order land at their offsets; copy_rows' digest is the file's sha256; compaction keeps rows."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 37)).astype(np.float32)
    src = tmp_path / "src.npy"
    with RowWriter(src, 5, 37) as w:
        for j in (3, 0, 4, 1, 2):
            w.write(j, data[j] if j % 2 else data[j].tobytes())  # an array or its raw bytes
    np.testing.assert_array_equal(np.load(src), data)

    dst = tmp_path / "dst.npy"
    with RowReader(src) as r, RowWriter(dst, 2, 37) as w:
        assert r.shape == (5, 37) and r.dtype == np.float32
        assert copy_rows(r, w, {4: 0, 1: 1}, digest=True) == sha256_file(src)
    np.testing.assert_array_equal(np.load(dst), data[[4, 1]])

    compact_rows(src, [0, 2, 3])
    np.testing.assert_array_equal(np.load(src), data[[0, 2, 3]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.npy", "src.npy"]


def test_build_dataset_publishes_whole_or_nothing(tmp_path):
    cfg = load_config("lstm.yaml", "smoke", overrides={"data.cache_dir": str(tmp_path)}).data
    h = dataset_hash(cfg)

    def fail(tmp: Path, key: dict, h2: str) -> None:
        (tmp / "input.npy").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_dataset(cfg, fail)
    assert list(tmp_path.iterdir()) == [], "a failed fill leaves nothing"

    def fill(tmp: Path, key: dict, h2: str) -> None:
        assert h2 == h and tmp.name.startswith(f"{h}.tmp-{HOST}-{os.getpid()}-")
        (tmp / "manifest.json").write_text("{}")

    first, second = build_dataset(cfg, fill), build_dataset(cfg, fail)  # the second finds it: fill is not called
    assert first == RenderResult(tmp_path / h, rendered=True) and second == RenderResult(tmp_path / h, rendered=False)
    assert Path(first) == tmp_path / h and is_complete(first)


def test_stale_tmp_dirs_of_dead_processes_on_this_host_are_removed(tmp_path):
    dead = tmp_path / f"abc123.tmp-{HOST}-{2**22 + 1}-00ff"  # above Linux's default pid_max range
    alive = tmp_path / f"abc123.tmp-{HOST}-{os.getpid()}-00ff"
    other_host = tmp_path / f"abc123.tmp-elsewhere-{2**22 + 1}-00ff"
    for d in (dead, alive, other_host):
        d.mkdir()
    assert clean_stale_tmp(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other_host.name])
