"""Fractional GPUs: ``search.gpus_per_trial`` packs trials on a GPU (real Ray, Optuna, MLflow; no CUDA here).

Ray's resources are logical: a local Ray started with ``num_gpus=1`` on this CPU-only machine
schedules GPU requests exactly as on a GPU node (it sets ``CUDA_VISIBLE_DEVICES`` to the
assigned id), but ``torch.cuda.is_available()`` is False, so the trials fall back to the CPU.
What this shows: the packing (two trials at 0.5 GPU run at once on GPU 0), the assigned ids
recorded in MLflow, and the fallback. What it cannot show: real CUDA memory sharing.
"""
from __future__ import annotations

import pytest
import torch

from metafx.config import load_config


@pytest.fixture
def logical_gpu_ray():
    """A local loopback Ray with 2 CPUs and one logical GPU (the search's own init with num_gpus)."""
    import ray

    from metafx.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(2, num_gpus=1)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow  # a two-trial search, ~25 s on 2 cores
def test_half_gpu_trials_share_one_logical_gpu_and_fall_back_to_cpu(logical_gpu_ray, tmp_path):
    from mlflow.tracking import MlflowClient

    from metafx.search import run_search

    assert logical_gpu_ray.cluster_resources().get("GPU") == 1.0
    assert not torch.cuda.is_available()
    cfg = load_config("lstm.yaml", "smoke", {
        "data.cache_dir": str(tmp_path / "cache"), "search.num_samples": 2, "search.max_concurrent": 2,
        "search.scheduler": "fifo", "search.cpus_per_trial": 1, "search.gpus_per_trial": 0.5,
        "model.lstm.hidden": 8, "maml.meta_steps": 4})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_search(cfg, name="half-gpu", storage=str(tmp_path / "ray"), tracking_uri=uri, verbose=0)
    assert [r["status"] for r in out.table] == ["finished", "finished"], out.table

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.parent_run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        # Ray assigned logical GPU 0 to both trials; torch found no CUDA and the trial trained on the CPU.
        assert r.data.tags["metafx.gpu_ids"] == "0", r.data.tags
        assert r.data.tags["metafx.device"] == "cpu", r.data.tags
        assert "test/query_l1_post" in r.data.metrics
    # Both trials held half of GPU 0 at the same time: their runs overlap in time.
    a, b = sorted(children, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time, (a.info.start_time, a.info.end_time, b.info.start_time)


def test_trials_without_a_gpu_are_pinned_to_the_cpu(monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES alone for a zero-GPU trial; the trial must not take a GPU it did not reserve."""
    import os

    from metafx.cluster import pin_device

    monkeypatch.setenv("METAFX_DEVICE", "")  # unset for metafx; restored after the test
    assert pin_device({"GPU": []}) == "cpu"
    assert os.environ["METAFX_DEVICE"] == "cpu"
    monkeypatch.setenv("METAFX_DEVICE", "cpu:0")  # a user's explicit choice wins
    assert pin_device({}) == "cpu:0"
    monkeypatch.delenv("METAFX_DEVICE")
    assert pin_device({"GPU": ["0"]}) == ("cuda" if torch.cuda.is_available() else "cpu")
