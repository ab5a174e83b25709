"""``launch/bench.py gpu``: refuses clearly where there is no CUDA device; its cases cover every model and method.

The bench itself is a GPU check (benchmarks/gpu.md): on this CPU-only machine it ran with
``-- --device cpu`` as a check of the script (74 checks passed, 12 minutes on 2 loaded cores), which
is too slow for the default suite.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from metafx.bench.gpu import CASES
from metafx.config import ARCHS, REPO_ROOT, load_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the bench would run")
def test_no_cuda_device_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "bench.py"), "gpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: bench gpu: no CUDA device") and "--device cpu" in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_cases_cover_every_model_and_method_and_load():
    seen_arch, seen_method = set(), set()
    for name, (study, ov) in CASES.items():
        cfg = load_config(study, "smoke", ov)
        seen_arch.add(cfg.model.arch)
        seen_method.add(cfg.maml.method)
        assert cfg.model.arch in name and cfg.maml.method in name, name
    assert seen_arch == set(ARCHS), set(ARCHS) - seen_arch
    assert seen_method == {"maml", "anil", "cavia", "encoder", "ridge"}
