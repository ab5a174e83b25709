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

_METAFX_KEYS = {"support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss", "best_step", "params",
                "wall_seconds", "rank"}


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
    assert "finished" in statuses, statuses
    assert "stopped" in statuses, f"ASHA stopped no trial: {statuses}"
    for row in out.table:
        arch = row.get("model.arch") or cfg.model.arch  # ridge trials do not sample it: the file's arx
        assert (arch == "arx") == (row["maml.method"] == "ridge"), row
        for other in {"lstm", "tcn", "ssm", "arx"} - {arch}:
            assert not any(k.startswith(f"model.{other}.") for k in row), row


def test_one_best_trial_everywhere(smoke_search):
    """The table order, the summary, best_config.yaml, the checkpoint and the parent run name one trial,
    by one definition: the finished trial with the lowest validation value at any report (the checkpoint
    it was tested with), ASHA-stopped trials ranked after every finished one."""
    import torch
    from mlflow.tracking import MlflowClient

    from metafx.records import best_definition

    cfg, out, uri, _ = smoke_search
    metric, col = cfg.search.metric, f"best {cfg.search.metric}"
    rows = out.table
    # Ranked: finished trials first by their best value, then the stopped ones; 1 = the best.
    assert [r["rank"] for r in rows if r["status"] != "failed"] == list(range(1, 1 + sum(r["status"] != "failed"
                                                                                          for r in rows)))
    status_order = [r["status"] for r in rows]
    assert status_order == sorted(status_order, key=["finished", "stopped", "failed"].index), status_order
    finished = [r[col] for r in rows if r["status"] == "finished"]
    assert finished == sorted(finished)
    best = rows[0]
    assert best["status"] == "finished" and out.best_trial == best["name"] and out.best_value == best[col]
    assert out.definition == best_definition(metric) and "finished" in out.definition
    assert out.best_metrics[metric] == best[col]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = {r.data.tags.get("metafx.trial_id"): r for r in client.search_runs([exp.experiment_id], max_results=100)}
    parent = client.get_run(out.parent_run_id)
    best_run = runs[best["trial_id"]]
    # Its value is the lowest of its whole validation history (not its last report) ...
    hist = [m.value for m in client.get_metric_history(best_run.info.run_id, metric)]
    assert best[col] == pytest.approx(min(hist))
    # ... which is the value of the checkpoint it was tested with.
    ckpt = torch.load(Path(out.best_checkpoint) / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["val"] == pytest.approx(best[col])
    assert best["trial_id"] in str(out.best_checkpoint)
    # The same trial on the parent run, in best_config.yaml, and in every run's rank.
    assert parent.data.tags["metafx.best_trial"] == best["name"] == best_run.info.run_name
    assert parent.data.tags["metafx.best_run_id"] == best_run.info.run_id
    assert parent.data.tags["metafx.best_definition"] == out.definition
    assert parent.data.metrics[f"best/{metric}"] == pytest.approx(best[col])
    assert best["name"] in out.best_config_path.read_text().splitlines()[0]
    for r in rows:
        run = runs[r["trial_id"]]
        assert run.data.tags["metafx.outcome"] == r["status"]
        if r["rank"] is not None:
            assert run.data.metrics["rank"] == r["rank"]
            assert run.data.metrics[f"best/{metric}"] == pytest.approx(r[col])


def test_trial_directories_hold_only_tunes_checkpoints(smoke_search):
    """A trial's scratch checkpoints stay out of its trial directory, which Tune syncs to the storage while the
    trial runs (a checkpoint.tmp renamed during that copy failed the sync with FileNotFoundError in `make run`);
    what the storage keeps of a trial is Tune's own files and the checkpoints it copied (checkpoint_NNNNNN)."""
    _, out, _, root = smoke_search
    trial_dirs = [d for d in (root / "ray" / "smoke-e2e").iterdir() if d.is_dir() and d.name.startswith("_trainable")]
    assert len(trial_dirs) == len(out.table)
    for d in trial_dirs:
        dirs = sorted(p.name for p in d.iterdir() if p.is_dir())
        assert dirs and all(n.startswith("checkpoint_") for n in dirs), (d.name, dirs)
        assert not list(d.rglob("*.tmp")), d.name


def test_best_meta_model_is_registered_and_loads_for_a_capture(smoke_search, tmp_path):
    """The search hands its best meta-model on: a Model Registry version under the study's name, holding the
    tested checkpoint, its config and the dataset manifest; ``--model models:/<study>/<version>`` loads it."""
    import json

    import torch
    from mlflow.tracking import MlflowClient

    from metafx.capture import load_meta_model

    cfg, out, uri, _ = smoke_search
    assert out.model_uri == f"models:/{cfg.name}/1"
    client = MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version(cfg.name, "1")
    assert mv.run_id == out.parent_run_id and mv.tags["metafx.trial"] == out.best_trial
    files = {Path(a.path).name for a in client.list_artifacts(out.parent_run_id, "meta_model")}
    assert files == {"best.pt", "best_config.yaml", "manifest.json"}
    man = json.loads(Path(client.download_artifacts(out.parent_run_id, "meta_model/manifest.json",
                                                    str(tmp_path))).read_text())
    assert man["hash"] == mv.tags["metafx.dataset_hash"] and man["hash"]
    mm = load_meta_model(out.model_uri, tracking_uri=uri, workdir=tmp_path)
    want = torch.load(Path(out.best_checkpoint) / "best.pt", map_location="cpu", weights_only=True)
    assert mm.step == want["step"]
    got = mm.learner.state_dict()
    assert set(got) == set(want["model"]) and all(torch.equal(got[k], want["model"][k]) for k in got)


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
    # Readable run names, not trial hashes; only metafx's metrics, none of Ray's internals.
    for ch in children:
        assert ch.info.run_name.startswith(f"trial {ch.data.tags['metafx.trial_number']}: "), ch.info.run_name
        assert ch.data.tags["metafx.stft_resolution"] == "fft=512,hop=128,win=512"  # smoke slices: 512 samples
        for k in ch.data.metrics:
            assert k.startswith(("val/", "test/", "best/")) or k in _METAFX_KEYS, k
    for k in parents[0].data.metrics:
        assert k.startswith("best/") and k[5:].startswith(("val/", "test/")) or k[5:] in _METAFX_KEYS, k
    assert parents[0].data.tags["metafx.stft_resolution"] == "fft=512,hop=128,win=512"
    # The experiment tells the UI its primary metric and holds the search's saved view.
    tags = exp.tags
    assert tags["mlflow.experiment.primaryMetric.name"] == cfg.search.metric
    import json

    saved = json.loads(tags["mlflow.sharedViewState.metafx-smoke-e2e"])
    view = json.loads(saved["state"])
    assert saved["name"] == "smoke-e2e: trials ranked" and view["orderByKey"] == "metrics.`rank`"
    assert "metrics.`test/lsfir/query_l1_post`" in view["selectedColumns"]
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
                                             "search.params.maml.inner_lr": None,
                                             # gradient trials only: the closed-form head has no inner lr to diverge
                                             "search.params.maml.method": None, "search.first": []})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        out = run_search(cfg, name="nan", storage=str(tmp_path / "ray"), tracking_uri=uri, verbose=0)
    finally:
        ray.shutdown()
    assert [r["status"] for r in out.table] == ["failed", "failed"]
    assert out.best_config_path is None and out.best_trial is None
    assert [(k["kind"], k["count"]) for k in out.failures] == [("NonFiniteLossError", 2)], out.failures
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FAILED"
        assert "non-finite" in c.data.tags["metafx.error"].lower()
        assert "step 1" in c.data.tags["metafx.error"] or "step 1" in c.data.tags.get("mlflow.note.content", "")


# --------------------------------------------------------------------------- the command line


def _cli(tmp: Path, *extra: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """launch/search.py as a person runs it, its output piped (not a terminal)."""
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "search.py"), "--space", "lstm.yaml", "--budget", "smoke",
           "--storage", str(tmp / "ray"), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
           "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "model.lstm.hidden=8", *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})


#: What Ray prints on its own, none of which belongs in a successful search's default output (issue 12,
#: item 7): checkpoint notes from every trial worker, Tune's tables and its TensorBoard hint (no
#: TensorBoard is installed), the duplicate concurrency warning, Tune's error summary of a trial it
#: retried, worker tracebacks, ANSI colour codes in a log file, Optuna's study note.
RAY_NOISE = ("Checkpoint successfully created", "tensorboard", "TensorBoard", "max_concurrent_trials",
             "ConcurrencyLimiter", "Trial status:", "Configuration for experiment", "Number of errored trials",
             "terminated successfully after retrying", "Traceback", "ActorDiedError", "\x1b[",
             "A new study created", "(_trainable pid=", "View detailed results here")


@pytest.mark.slow  # a second search (47 s); make test-slow
def test_search_cli_prints_metafx_lines_not_ray_noise(tmp_path):
    r = _cli(tmp_path, "--num-samples", "3", "--name", "quiet")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    for noise in RAY_NOISE:
        assert noise not in out, (noise, out[-5000:])
    # One line per trial start and end, by readable name; then the ranked table and its definition.
    # search.first: lstm.yaml runs each method once before sampling, the closed-form head (model arx) first.
    assert out.count(": started") == 3 and "trial 1: ridge arx " in out and "trial 2: lstm " in out, out[-5000:]
    metric = load_config("lstm.yaml", "smoke").search.metric  # val/query_esr_post
    assert "Trials, best first (best trial = the trial that finished (ran its test evaluation) with the lowest " \
           f"{metric} at any of its validation reports" in out, out[-5000:]
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert table[0].startswith(f"| rank | name | status | step | best {metric} | best step |"), table[0]
    assert table[1].startswith("| 1 | trial ") and "| finished |" in table[1], table[1]
    assert table[0].rstrip(" |").endswith("stft") and table[1].rstrip(" |").endswith("fft=512,hop=128,win=512")
    best_name = table[1].split(" | ")[1]
    assert f"best trial: {best_name}" in r.stdout
    assert "viewStateShareKey=metafx-quiet" in r.stdout
    # ESR is a headline metric: a table column beside LS-FIR's, and the first line of the best trial's results.
    assert "| test/query_esr_post | test/lsfir/query_esr_post |" in table[0], table[0]
    assert "  test ESR " in r.stdout and "LS-FIR" in r.stdout.split("  test ESR ", 1)[1].splitlines()[0]
    # The best meta-model is registered under the study's name, and the line says how to capture with it.
    assert "best meta-model:    models:/lstm/1 (MLflow Model Registry" in r.stdout, r.stdout[-3000:]


def test_search_where_no_trial_finishes_exits_nonzero_with_one_line_per_failure(tmp_path):
    """Every trial raises (a device that does not exist): exit 1, and the failure named once with its count."""
    r = _cli(tmp_path, "--num-samples", "2", "--set", "search.max_failures=0", "--name", "allfail",
             env={"METAFX_DEVICE": "nodevice"})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]
    lines = [ln for ln in r.stderr.splitlines() if "trial(s) failed with" in ln]
    assert len(lines) == 1, r.stderr[-5000:]
    assert lines[0].strip().startswith("2 trial(s) failed with RuntimeError; first (trial 1: ridge arx "), lines
    assert "nodevice" in lines[0], lines
    assert "error: no trial of search 'allfail' finished its evaluation" in r.stderr
    assert "Traceback" not in out, out[-5000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lstm").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FAILED"] * 3  # the search and both trials


@pytest.mark.slow
def test_verbose_ray_brings_ray_output_back(tmp_path):
    r = _cli(tmp_path, "--num-samples", "1", "--name", "loud", "--verbose-ray", "--set", "search.scheduler=fifo")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "Checkpoint successfully created" in out and "Trial status:" in out, out[-5000:]


def test_search_first_longer_than_num_samples_runs_the_first_and_warns(caplog):
    """A quick --set search.num_samples=2 on a study with four enqueued trials runs the first two, and says so."""
    from metafx.search import first_points

    cfg = load_config("lstm.yaml", "smoke", {"search.num_samples": 2})
    assert len(cfg.search.first) == 4
    with caplog.at_level("WARNING", logger="metafx.search"):
        points = first_points(cfg.search)
    assert points == [dict(p) for p in cfg.search.first[:2]]
    assert "only the first 2 run" in caplog.text and str(dict(cfg.search.first[3])) in caplog.text
    caplog.clear()
    assert first_points(load_config("lstm.yaml", "smoke", {"search.first": []}).search) is None
    assert len(first_points(load_config("lstm.yaml", "smoke", {"search.num_samples": 4}).search)) == 4
    assert not caplog.text
