"""Shared check: a run resumed from its first checkpoint ends exactly as the uninterrupted run."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def assert_resume_matches_uninterrupted(cfg, taskset, tmp_path: Path) -> dict[str, Any]:
    """Train uninterrupted; train again keeping the first checkpoint handed to ``report``; resume from it.

    The two final checkpoints must hold the same step, bit-identical weights and the same validation
    history (the optimizer state, the learning-rate schedule and the episode stream are in the
    checkpoint or derived from the step). Returns the first checkpoint, for further checks.
    """
    from metafx.train import load_checkpoint, meta_train

    meta_train(cfg, taskset, None, workdir=tmp_path / "full", evaluate=False)
    saved = tmp_path / "saved"

    def report(m, ck):
        if ck is not None and not saved.exists():
            shutil.copytree(ck, saved)

    meta_train(cfg, taskset, report, workdir=tmp_path / "part", evaluate=False)
    first = load_checkpoint(saved)
    assert 0 < first["step"] < cfg.maml.meta_steps, first["step"]
    meta_train(cfg, taskset, None, workdir=tmp_path / "resumed", resume_from=saved, evaluate=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint")
    assert a["step"] == b["step"] == cfg.maml.meta_steps
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["val/query_l1_post"] for h in a["history"]] == [h["val/query_l1_post"] for h in b["history"]]
    return first
