"""The search end to end: real Ray (local, loopback), real Optuna, real DAWDreamer, real MLflow (SQLite)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from metafx.config import REPO_ROOT, load_config
from metafx.search_space import DefineByRun, distribution, trial_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def test_define_by_run_conditionals_with_real_optuna():
    """all.yaml samples the method first; the model family, its sizes and the context only where they apply."""
    cfg = load_config("all.yaml", "smoke")
    space = DefineByRun(cfg.search.params, cfg.to_dict())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    methods, archs = set(), set()
    for _ in range(120):
        t = study.ask()
        space(t)
        p = t.params
        study.tell(t, 0.0)
        method = p["maml.method"]
        methods.add(method)
        tc = trial_config(cfg, p)  # every sample is a valid trial configuration
        if method == "ridge":  # closed form: the ARX head, no gradient-method knobs
            assert "model.arch" not in p and tc.model.arch == "arx"
            assert {"model.arx.nb", "model.arx.na"} <= set(p)
            assert not any(k in p for k in ("maml.inner_steps", "maml.inner_lr", "model.context_dim"))
            continue
        arch = p["model.arch"]
        archs.add(arch)
        assert tc.model.arch == arch and not any(k.startswith("model.arx.") for k in p)
        for other in {"lstm", "tcn", "ssm"} - {arch}:
            assert not any(k.startswith(f"model.{other}.") for k in p), (arch, p)
        assert any(k.startswith(f"model.{arch}.") for k in p)
        assert ("model.context_dim" in p) == (method in ("cavia", "encoder"))
        assert ("maml.first_order" in p) == (arch in ("ssm", "tcn"))
    assert methods == {"ridge", "maml", "anil", "cavia", "encoder"}
    assert archs == {"lstm", "tcn", "ssm"}
    # The sampled distributions are the ones the summary plots rebuild the study with.
    params = {p.key: p for p in cfg.search.params}
    for t in study.trials:
        assert t.distributions == {k: distribution(params[k]) for k in t.params}


@pytest.fixture(scope="module")
def smoke_search(tmp_path_factory):
    """One smoke search of all.yaml into a temporary Tune storage and MLflow store."""
    import ray

    from metafx.search import run_search

    root = tmp_path_factory.mktemp("search")
    cfg = load_config("all.yaml", "smoke", {"data.cache_dir": str(root / "cache"), "search.num_samples": 6})
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    (root / "mlruns").mkdir()
    try:
        out = run_search(cfg, name="smoke-e2e", storage=str(root / "ray"), tracking_uri=uri, verbose=0)
    finally:
        ray.shutdown()
    return cfg, out, uri, root


def test_search_runs_trials_and_asha_stops_some(smoke_search):
    cfg, out, _, _ = smoke_search
    assert len(out.table) == 6
    statuses = [r["status"] for r in out.table]
    assert "done" in statuses, statuses
    assert "stopped" in statuses, f"ASHA stopped no trial: {statuses}"
    for row in out.table:
        arch = row.get("model.arch") or cfg.model.arch  # ridge trials do not sample it: the file's arx
        assert (arch == "arx") == (row["maml.method"] == "ridge"), row
        for other in {"lstm", "tcn", "ssm", "arx"} - {arch}:
            assert not any(k.startswith(f"model.{other}.") for k in row), row


def test_best_config_reruns_with_launch_train(smoke_search, tmp_path):
    cfg, out, _, _ = smoke_search
    assert out.best_config_path and out.best_config_path.is_file()
    assert out.best_checkpoint and (Path(out.best_checkpoint) / "checkpoint.pt").is_file()
    res = tmp_path / "rerun.json"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--space", str(out.best_config_path),
                        "--no-baselines", "--results", str(res)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    metrics = json.loads(res.read_text())["metrics"]
    assert "test/query_l1_post" in metrics


def test_mlflow_store_read_back(smoke_search):
    import soundfile as sf
    from mlflow.tracking import MlflowClient

    cfg, out, uri, root = smoke_search
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.parent_run_id]
    assert len(parents) == 1 and parents[0].info.run_id == out.parent_run_id
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 6
    for r in runs:
        assert r.info.status != "RUNNING", r.info.run_name
    finished = [c for c in children if "test/query_l1_post" in c.data.metrics]
    assert finished
    c = finished[0]
    hist = client.get_metric_history(c.info.run_id, "val/query_l1_post")
    assert [h.step for h in hist] == sorted(h.step for h in hist) and len(hist) >= 2
    assert c.data.params["model.arch"] in ("arx", "lstm", "tcn", "ssm")
    assert c.data.params["maml.method"] in ("ridge", "maml", "anil", "cavia", "encoder")
    for tag in ("model", "budget", "dataset_hash", "node", "node_id", "ray_trial_id", "code_version", "asha_stopped"):
        assert f"metafx.{tag}" in c.data.tags, tag
    assert c.data.tags["metafx.asha_stopped"] == "false"
    stopped = [ch for ch in children if "test/query_l1_post" not in ch.data.metrics]
    assert stopped and all(ch.data.tags["metafx.asha_stopped"] == "true" for ch in stopped)
    assert all(ch.info.status == "FINISHED" for ch in children)
    arts = [a.path for a in client.list_artifacts(c.info.run_id)]
    assert any(a.startswith("audio") for a in arts) and any(a.startswith("plots") for a in arts), arts
    local = Path(client.download_artifacts(c.info.run_id, "audio", str(root / "dl")))
    wavs = sorted(local.rglob("*.wav"))
    assert len(wavs) >= 4
    for w in wavs:
        data, sr = sf.read(w)
        assert sr == cfg.data.sample_rate and len(data) > 0


def test_nonfinite_trials_fail_without_stopping_the_search(tmp_path):
    """Every trial diverges (inner lr 1e38): each ends as an error with its message, the search completes."""
    import ray
    from mlflow.tracking import MlflowClient

    from metafx.search import run_search

    cfg = load_config("lstm.yaml", "smoke", {"data.cache_dir": str(tmp_path / "cache"), "search.num_samples": 2,
                                             "maml.inner_lr": 1e38, "maml.inner_steps": 2, "model.lstm.hidden": 8,
                                             "search.params.maml.inner_lr": None})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        out = run_search(cfg, name="nan", storage=str(tmp_path / "ray"), tracking_uri=uri, verbose=0)
    finally:
        ray.shutdown()
    assert [r["status"] for r in out.table] == ["ERROR", "ERROR"]
    assert out.best_config_path is None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FAILED"
        assert "non-finite" in c.data.tags["metafx.error"].lower()
        assert "step 1" in c.data.tags["metafx.error"] or "step 1" in c.data.tags.get("mlflow.note.content", "")
