"""`--resume` after the search driver is SIGKILLed mid-search (real Ray, Optuna, MLflow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metafx.config import REPO_ROOT

pytestmark = pytest.mark.slow

N = 4
ARGS = ["--space", "lstm.yaml", "--budget", "smoke", "--num-samples", str(N), "--name", "resume-test",
        "--set", "model.lstm.hidden=8", "--set", "maml.meta_steps=24", "--set", "maml.eval_every=3",
        "--set", "maml.checkpoint_every=3", "--set", "search.scheduler=fifo", "--set", "search.max_concurrent=2"]


def _results(exp: Path) -> dict[str, list[dict]]:
    out = {}
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[f.parent.name] = rows
    return out


def _wait_until(p: subprocess.Popen, exp: Path, tmp: Path, ready, timeout: float) -> None:
    """Poll the trials' result files until ``ready(results)``; fail if the search ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready(_results(exp)):
            return
        if p.poll() is not None:
            pytest.fail(f"search ended before it could be interrupted:\n{(tmp / 'log0.txt').read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail("the search did not reach the interruption point in time:\n" + (tmp / "log0.txt").read_text()[-3000:])


def _experiment_state(exp: Path) -> dict[str, tuple[str, int]]:
    """Trial id -> (status, step of its last result) in Tune's newest experiment-state snapshot.

    Empty while no snapshot is readable (Tune rewrites it in place).
    """
    states = sorted(exp.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
        out = {}
        for trial_json, meta_json in data.get("trial_data", []):
            t, meta = json.loads(trial_json), json.loads(meta_json)
            out[t["trial_id"]] = (t["status"], int((meta.get("last_result") or {}).get("step", 0)))
        return out
    except (OSError, ValueError, KeyError):
        return {}


def _wait_for_state(p: subprocess.Popen, exp: Path, tmp: Path, timeout: float) -> None:
    """Poll until Tune's snapshot holds the interruption point: a trial TERMINATED and one RUNNING at step >= 6.

    The trials' result files run ahead of the snapshot, and the snapshot is what ``--resume``
    reads; every report of these trials carries a checkpoint (``checkpoint_every`` = ``eval_every``).
    """
    def ready() -> bool:
        state = _experiment_state(exp).values()
        return any(st == "TERMINATED" for st, _ in state) and any(st == "RUNNING" and step >= 6 for st, step in state)

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if p.poll() is not None:
            pytest.fail(f"search ended before it could be interrupted:\n{(tmp / 'log0.txt').read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail("Tune's experiment state never recorded the interruption point:\n"
                + (tmp / "log0.txt").read_text()[-3000:])


def _run(tmp: Path, extra: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "search.py"), *ARGS, "--storage", str(tmp / "ray"),
           "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--set", f"data.cache_dir={tmp / 'cache'}", *extra]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True,
                            stdout=open(tmp / f"log{len(list(tmp.glob('log*')))}.txt", "w"), stderr=subprocess.STDOUT, **kw)


def test_resume_after_sigkill(tmp_path):
    from mlflow.tracking import MlflowClient

    exp = tmp_path / "ray" / "resume-test"
    p = _run(tmp_path, [])
    try:
        # Wait until one trial has finished and another has a checkpoint but is unfinished.
        def ready(res):
            done = [k for k, rows in res.items() if rows and "test/query_l1_post" in rows[-1]]
            partial = [k for k, rows in res.items() if rows and "test/query_l1_post" not in rows[-1]
                       and rows[-1].get("step", 0) >= 6]
            return done and partial

        _wait_until(p, exp, tmp_path, ready, timeout=400)
        # Tune's experiment state must have seen that point too (it is what --resume restores):
        # wait until a snapshot written after it lists the finished trial as TERMINATED.
        _wait_for_state(p, exp, tmp_path, timeout=300)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started
        p.wait()
    before = _results(exp)
    finished_before = {k: len(rows) for k, rows in before.items() if rows and "test/query_l1_post" in rows[-1]}
    unfinished_before = {k: rows[-1]["step"] for k, rows in before.items()
                         if rows and "test/query_l1_post" not in rows[-1]}
    assert finished_before and unfinished_before

    p2 = _run(tmp_path, ["--resume"])
    try:
        assert p2.wait(timeout=600) == 0, (tmp_path / "log1.txt").read_text()[-4000:]
    finally:
        if p2.poll() is None:
            os.killpg(p2.pid, signal.SIGKILL)
    after = _results(exp)
    assert len(after) == N, sorted(after)
    for k, n in finished_before.items():  # finished trials are neither lost nor run again
        assert len(after[k]) == n, k
    for k, step in unfinished_before.items():
        rows = after[k]
        assert "test/query_l1_post" in rows[-1], k
        resumed = rows[len(before[k]):]
        # Continued from a checkpoint: after the interruption no report restarts at the first eval step.
        assert resumed and min(r["step"] for r in resumed) > 3, (k, [r["step"] for r in rows])

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_ml = client.get_experiment_by_name("lstm")
    runs = client.search_runs([exp_ml.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, "the resumed search continues the same parent run"
    assert len(children) == N, "no duplicate trial runs"
    assert all(r.info.status != "RUNNING" for r in runs)
    assert parents[0].info.status == "FINISHED"


def test_ctrl_c_closes_every_run(tmp_path):
    """SIGINT to the driver mid-search: it exits, and no MLflow run is left RUNNING (trials end KILLED)."""
    from mlflow.tracking import MlflowClient

    exp = tmp_path / "ray" / "resume-test"
    p = _run(tmp_path, [])
    try:
        _wait_until(p, exp, tmp_path, lambda res: any(rows and rows[-1].get("step", 0) >= 3 for rows in res.values()),
                    timeout=300)
        os.kill(p.pid, signal.SIGINT)  # the driver only, as Ctrl-C in its terminal would
        p.wait(timeout=180)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever the driver left behind
        except ProcessLookupError:
            pass
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lstm").experiment_id], max_results=100)
    assert runs, "the search recorded nothing before the interrupt"
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert any(r.info.status == "KILLED" for r in children)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"], "an interrupted search is not FINISHED"
    assert p.returncode == 130, p.returncode  # the CLI says how to --resume and exits as on Ctrl-C
