"""MLflow tracking against a real SQLite store, read back through MlflowClient.

One store per module (MLflow's schema migration on first use takes seconds);
each test uses its own experiment or search name so tests stay independent.
"""
from __future__ import annotations

import json
import threading
import traceback
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import soundfile as sf
from mlflow import MlflowClient

from metafx.config import REPO_ROOT, dump_config, load_config
from metafx.plots import write_trial_artifacts
from metafx.records import (
    TAG_ASHA_STOPPED,
    TAG_BUDGET,
    TAG_CODE_DIRTY,
    TAG_CODE_VERSION,
    TAG_DATASET_HASH,
    TAG_ERROR,
    TAG_MODEL,
    TAG_NODE,
    TAG_PARENT,
    TAG_RAY_TRIAL_ID,
    TAG_TRIAL_ID,
    SearchSummary,
    artifact_location_for,
    default_tracking_uri,
    sqlite_path,
)
from metafx.tracking import Tracker, TrackingError
from tracking_fakes import SR, make_examples, make_history

MANIFEST = {"dataset_hash": "abc123def4567890", "families": ["moog_vcf"], "tasks": 12, "sample_rate": SR}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    Tracker(uri, "warmup")  # runs the schema migration once for the module
    return uri


@pytest.fixture(scope="module")
def cfg():
    return load_config("lstm.yaml", "smoke")


def _trial_dir(tmp: Path, with_examples: bool = True) -> Path:
    """What a trial leaves in its final checkpoint directory."""
    tmp.mkdir(parents=True, exist_ok=True)
    if with_examples:
        write_trial_artifacts(tmp, make_examples(n=2, length=3000, tcn_crop=200), make_history(6), SR)
    (tmp / "checkpoint.pt").write_bytes(b"\x00fake-state-dict")
    (tmp / "results.json").write_text(json.dumps({"test/query_l1_post": 0.05}))
    return tmp


def _summary(table: list[dict], best: dict, best_cfg: Path | None, parent: str | None) -> SearchSummary:
    return SearchSummary(name="s", experiment_path="/tmp/ray/s", best_config_path=best_cfg, best_checkpoint=None,
                         best_metrics=best, table=table, parent_run_id=parent)


def _hp(i: int) -> dict:
    return {"maml.inner_lr": 0.01 * (i + 1), "model.lstm.hidden": [16, 32][i % 2], "maml.first_order": bool(i % 2)}


def test_full_search_roundtrip(store, cfg, tmp_path):
    tr = Tracker(store, "roundtrip")
    parent = tr.start_search(cfg, "search-a", MANIFEST, resume=False)

    # Trial 0: finishes, stopped early by ASHA, full artifacts.
    full = {**cfg.flat(), **_hp(0)}
    r0 = tr.trial_run("t_000", {"sampled": _hp(0), "config": full}, {TAG_MODEL: "lstm", TAG_NODE: "127.0.0.1"})
    for step in range(5):
        tr.log_metrics("t_000", {"support_l1_pre": 0.3 - 0.01 * step, "val/query_l1_post": 0.2 - 0.01 * step}, step)
    tr.log_artifacts("t_000", _trial_dir(tmp_path / "ckpt0"))
    tr.end_trial("t_000", "FINISHED", stopped_early=True)
    # Trial 1: fails with a traceback.
    tr.trial_run("t_001", {"sampled": _hp(1)}, {TAG_MODEL: "lstm"})
    tr.log_metrics("t_001", {"support_l1_pre": 0.5}, 0)
    try:
        raise FloatingPointError("meta-loss became NaN at meta-step 3")
    except FloatingPointError:
        err = traceback.format_exc()
    tr.end_trial("t_001", "FAILED", error=err)
    # Trial 2: killed mid-run.
    tr.trial_run("t_002", {"sampled": _hp(2)}, {TAG_MODEL: "lstm"})
    tr.log_metrics("t_002", {"support_l1_pre": 0.4}, 0)
    tr.end_trial("t_002", "KILLED")

    plot = tmp_path / "optuna_history.png"
    import matplotlib.pyplot as plt

    plt.figure()
    plt.plot([0, 1], [1, 0])
    plt.savefig(plot)
    plt.close("all")
    rows = [{"trial_id": "t_000", "status": "FINISHED", "val/query_l1_post": 0.16},
            {"trial_id": "t_001", "status": "FAILED", "val/query_l1_post": None}]
    best_cfg = tmp_path / "best_config.yaml"
    dump_config(cfg.to_dict(), best_cfg)
    best = {"trial_id": "t_000", "val/query_l1_post": 0.16}
    tr.end_search("FINISHED", _summary(rows, best, best_cfg, parent), [plot])

    got = Tracker.read_search(store, "roundtrip", "search-a")
    p = got["parent"]
    assert p["run_id"] == parent and p["run_name"] == "search-a" and p["status"] == "FINISHED"
    # Parent params are the flattened config; lists are JSON, everything is a string.
    flat = cfg.flat()
    assert p["params"]["maml.inner_lr"] == str(flat["maml.inner_lr"])
    assert json.loads(p["params"]["search.params.model.lstm.hidden.choices"]) == [16, 32, 64]
    assert set(flat) <= set(p["params"])
    assert p["tags"][TAG_BUDGET] == "smoke" and p["tags"][TAG_DATASET_HASH] == "abc123def4567890"
    assert p["tags"][TAG_CODE_VERSION] != "" and p["tags"][TAG_CODE_DIRTY] in ("true", "false", "unknown")
    assert p["metrics"]["best/val/query_l1_post"] == pytest.approx(0.16)
    assert {"config/config.yaml", "dataset/manifest.json", "summary/trials.csv", "summary/trials.md",
            "summary/best_config.yaml", "summary/summary.json", "summary/optuna_history.png"} <= set(p["artifacts"])
    assert "| t_000 | FINISHED | 0.16 |" in p["tags"]["mlflow.note.content"]

    kids = {c["trial_id"]: c for c in got["children"]}
    assert set(kids) == {"t_000", "t_001", "t_002"}
    assert kids["t_000"]["run_id"] == r0
    for tid, c in kids.items():
        assert c["tags"][TAG_PARENT] == parent and c["run_name"] == tid
        assert c["tags"][TAG_TRIAL_ID] == tid == c["tags"][TAG_RAY_TRIAL_ID]
        assert c["tags"][TAG_BUDGET] == "smoke" and c["tags"][TAG_DATASET_HASH] == "abc123def4567890"
        assert c["tags"][TAG_MODEL] == "lstm"
    c0 = kids["t_000"]
    assert c0["status"] == "FINISHED" and c0["tags"][TAG_ASHA_STOPPED] == "true"
    assert c0["tags"][TAG_NODE] == "127.0.0.1"
    assert c0["params"]["sampled.maml.inner_lr"] == "0.01" and c0["params"]["config.maml.meta_steps"] == "6"
    assert c0["history"]["val/query_l1_post"] == [(s, pytest.approx(0.2 - 0.01 * s)) for s in range(5)]
    assert [s for s, _ in c0["history"]["support_l1_pre"]] == [0, 1, 2, 3, 4]
    c1 = kids["t_001"]
    assert c1["status"] == "FAILED" and c1["tags"][TAG_ASHA_STOPPED] == "false"
    assert c1["tags"][TAG_ERROR] == "FloatingPointError: meta-loss became NaN at meta-step 3"
    assert "error.txt" in c1["artifacts"]
    assert kids["t_002"]["status"] == "KILLED"

    # Artifacts download and decode: WAVs at the right rate and length, PNGs open.
    client = MlflowClient(store)
    wavs = [a for a in c0["artifacts"] if a.endswith(".wav")]
    pngs = [a for a in c0["artifacts"] if a.endswith(".png")]
    assert len(wavs) == 8 and len(pngs) == 5 and "checkpoint.pt" in c0["artifacts"]
    dst = tmp_path / "dl"
    for a in wavs:
        data, sr = sf.read(client.download_artifacts(c0["run_id"], a, str(dst)))
        assert sr == SR and data.shape == (3000,)
    for a in pngs + ["summary/optuna_history.png"]:
        rid = c0["run_id"] if a in pngs else parent
        img = mpimg.imread(client.download_artifacts(rid, a, str(dst)))
        assert img.ndim == 3 and img.shape[0] > 50
    err_txt = Path(client.download_artifacts(c1["run_id"], "error.txt", str(dst))).read_text()
    assert "Traceback" in err_txt and "meta-step 3" in err_txt
    csv_txt = Path(client.download_artifacts(parent, "summary/trials.csv", str(dst))).read_text()
    assert csv_txt.splitlines()[0] == "trial_id,status,val/query_l1_post"
    best = load_config(client.download_artifacts(parent, "summary/best_config.yaml", str(dst)))
    assert best.hash() == cfg.hash()
    manifest = json.loads(Path(client.download_artifacts(parent, "dataset/manifest.json", str(dst))).read_text())
    assert manifest == MANIFEST
    cfg_back = load_config(client.download_artifacts(parent, "config/config.yaml", str(dst)))
    assert cfg_back.to_dict() == cfg.to_dict()


def test_metric_filtering_and_names(store, cfg):
    tr = Tracker(store, "metrics")
    tr.start_search(cfg, "s", MANIFEST, resume=False)
    tr.trial_run("t", {}, {})
    n = tr.log_metrics(
        "t",
        {"ok": 1.5, "np": np.float32(0.25), "int": 3, "nan": float("nan"), "inf": float("inf"), "flag": True,
         "text": "x", "none": None, "val": {"query_l1_post": 0.5}, "bad name!": 2.0},
        step=7,
    )
    assert n == 5
    tr.end_trial("t", "FINISHED")
    tr.end_search("FINISHED")
    c = Tracker.read_search(store, "metrics", "s", artifacts=False)["children"][0]
    assert c["metrics"] == {"ok": 1.5, "np": 0.25, "int": 3.0, "val/query_l1_post": 0.5, "bad name_": 2.0}
    assert c["history"]["val/query_l1_post"] == [(7, 0.5)]


def test_long_and_odd_params(store, cfg):
    tr = Tracker(store, "params")
    tr.start_search(cfg, "s", MANIFEST, resume=False)
    tr.trial_run("t", {"long": "x" * 10000, "list": [1, 2.5, "a"], "none": None, "nested": {"a": {"b": 1}}}, {"long_tag": "y" * 9000})
    tr.close_dangling()
    c = Tracker.read_search(store, "params", "s", artifacts=False, history=False)["children"][0]
    assert len(c["params"]["long"]) == 6000 and c["params"]["long"].endswith("[truncated]")
    assert json.loads(c["params"]["list"]) == [1, 2.5, "a"]
    assert c["params"]["none"] == "None" and c["params"]["nested.a.b"] == "1"
    assert len(c["tags"]["long_tag"]) == 8000


def test_close_dangling_leaves_nothing_running(store, cfg):
    tr = Tracker(store, "dangling")
    parent = tr.start_search(cfg, "crashed", MANIFEST, resume=False)
    ids = {tr.trial_run(f"t{i}", _hp(i), {}) for i in range(3)}
    tr.log_metrics("t0", {"x": 1.0}, 0)
    tr.end_trial("t2", "FINISHED")  # already ended: must stay FINISHED
    closed = tr.close_dangling()
    assert set(closed) == {parent} | (ids - {tr.run_id("t2")})
    got = Tracker.read_search(store, "dangling", "crashed", artifacts=False, history=False)
    statuses = {c["trial_id"]: c["status"] for c in got["children"]}
    assert statuses == {"t0": "KILLED", "t1": "KILLED", "t2": "FINISHED"}
    assert got["parent"]["status"] == "KILLED"
    assert tr.close_dangling() == []
    assert Tracker(store, "never-started").close_dangling() == []


def test_resume_reuses_parent_and_child_runs(store, cfg):
    tr1 = Tracker(store, "resume")
    parent = tr1.start_search(cfg, "s", MANIFEST, resume=False)
    r0 = tr1.trial_run("t0", _hp(0), {TAG_MODEL: "lstm"})
    for s in range(3):
        tr1.log_metrics("t0", {"loss": 1.0 / (s + 1)}, s)
    clash = Tracker(store, "resume")
    with pytest.raises(TrackingError, match="already has a search named"):
        clash.start_search(cfg, "s", MANIFEST, resume=False)
    assert clash.close_dangling() == []  # a refused start never touches the other search's runs
    assert MlflowClient(store).get_run(r0).info.status == "RUNNING"
    tr1.close_dangling()  # the driver crashed / was interrupted

    tr2 = Tracker(store, "resume")
    assert tr2.start_search(cfg, "s", MANIFEST, resume=True) == parent
    assert tr2.run_id("t0") == r0
    changed = {**_hp(0), "maml.inner_lr": 0.5}  # a changed param is kept (MLflow forbids changing), not an error
    assert tr2.trial_run("t0", changed, {TAG_MODEL: "lstm"}) == r0
    assert MlflowClient(store).get_run(r0).info.status == "RUNNING"
    for s in range(3, 5):
        tr2.log_metrics("t0", {"loss": 1.0 / (s + 1)}, s)
    tr2.end_trial("t0", "FINISHED")
    tr2.trial_run("t1", _hp(1), {})
    tr2.end_trial("t1", "FINISHED")
    tr2.end_search("FINISHED")

    got = Tracker.read_search(store, "resume", "s", artifacts=False)
    assert got["parent"]["run_id"] == parent and got["parent"]["status"] == "FINISHED"
    assert sorted(c["trial_id"] for c in got["children"]) == ["t0", "t1"]
    c0 = next(c for c in got["children"] if c["trial_id"] == "t0")
    assert [s for s, _ in c0["history"]["loss"]] == [0, 1, 2, 3, 4]
    assert c0["params"]["maml.inner_lr"] == "0.01" and c0["status"] == "FINISHED"
    # Only one parent run exists for the search name.
    runs = MlflowClient(store).search_runs([got["experiment_id"]], "tags.`metafx.role` = 'search'")
    assert len(runs) == 1


def test_resume_without_previous_search_creates_one(store, cfg):
    tr = Tracker(store, "resume-new")
    pid = tr.start_search(cfg, "fresh", MANIFEST, resume=True)
    tr.end_search("FINISHED")
    assert Tracker.read_search(store, "resume-new", "fresh", artifacts=False)["parent"]["run_id"] == pid


def test_end_trial_without_trial_run_still_records_failure(store, cfg):
    tr = Tracker(store, "early-fail")
    tr.start_search(cfg, "s", MANIFEST, resume=False)
    tr.end_trial("t_never_started", "FAILED", error="RuntimeError: could not place trial")
    c = Tracker.read_search(store, "early-fail", "s", history=False)["children"][0]
    assert c["trial_id"] == "t_never_started" and c["status"] == "FAILED"
    assert c["tags"][TAG_ERROR] == "RuntimeError: could not place trial" and "error.txt" in c["artifacts"]


def test_concurrent_log_metrics_lose_nothing(store, cfg):
    tr = Tracker(store, "concurrency")
    tr.start_search(cfg, "s", MANIFEST, resume=False)
    trials = [f"t{i}" for i in range(4)]
    for t in trials:
        tr.trial_run(t, {}, {})
    errors: list[BaseException] = []

    def work(t: str, k: int) -> None:
        try:
            for s in range(15):
                tr.log_metrics(t, {f"m{k}": float(s), f"val/m{k}": float(-s)}, s)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t, k)) for t in trials for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    tr.close_dangling(status="FINISHED")
    got = Tracker.read_search(store, "concurrency", "s", artifacts=False)
    for c in got["children"]:
        for k in range(2):
            assert [s for s, _ in c["history"][f"m{k}"]] == list(range(15))
            assert len(c["history"][f"val/m{k}"]) == 15


def test_experiment_created_once_even_when_raced(store, monkeypatch):
    ids: list[str] = []

    def make() -> None:
        ids.append(Tracker(store, "raced").experiment_id)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert len(ids) == 4 and len(set(ids)) == 1
    # Lost race: the lookup says "missing", create then says "already exists" -> use the existing one.
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", _none_then_real(MlflowClient.get_experiment_by_name))
    assert Tracker(store, "raced").experiment_id == ids[0]
    exp = MlflowClient(store).get_experiment(ids[0])
    assert exp.artifact_location == artifact_location_for(store)


def _none_then_real(real):
    calls = {"n": 0}

    def fake(self, name):
        calls["n"] += 1
        return None if calls["n"] == 1 else real(self, name)

    return fake


def test_errors_are_specific(store, cfg):
    tr = Tracker(store, "errors")
    with pytest.raises(TrackingError, match="start_search"):
        tr.trial_run("t", {}, {})
    tr.start_search(cfg, "s", MANIFEST, resume=False)
    with pytest.raises(TrackingError, match="one Tracker per search"):
        tr.start_search(cfg, "s2", MANIFEST, resume=False)
    with pytest.raises(ValueError, match="status must be one of"):
        tr.end_trial("t", "DONE")
    with pytest.raises(FileNotFoundError):
        tr.log_artifacts("t", Path("/nonexistent/dir"))
    with pytest.raises(TrackingError, match="no search"):
        Tracker.read_search(store, "errors", "missing")
    with pytest.raises(TrackingError, match="no experiment"):
        Tracker.read_search(store, "no-such-experiment", "s")
    tr.close_dangling()


def test_default_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri() == "http://127.0.0.1:5999"
    assert artifact_location_for("http://127.0.0.1:5999") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{REPO_ROOT / 'mlruns' / 'mlflow.db'}"
    assert (REPO_ROOT / "mlruns").is_dir()
    assert artifact_location_for(uri) == (REPO_ROOT / "mlruns" / "artifacts").as_uri()
    assert sqlite_path(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db"


def test_short_tag_keys_and_typed_summary(store, cfg, tmp_path):
    """The search callback's spelling: plain tag keys, a SearchSummary, its own summary files."""
    tr = Tracker(store, "aliases")
    parent = tr.start_search(cfg, "s", MANIFEST, resume=False)
    tr.trial_run("t", {}, {"model": "tcn", TAG_MODEL: "tcn", "ray_trial_id": "t"})
    tr.set_tags("t", {"node": "10.0.0.7", "hostname": "worker-1", "mlflow.note.content": "kept as is"})
    tr.end_trial("t", "FINISHED")
    best_cfg = tmp_path / "best_config.yaml"
    best_cfg.write_text("name: lstm\n")
    own_csv = tmp_path / "trials.csv"
    own_csv.write_text("trial,status\nt,done\n")
    table = [{"trial": "t", "status": "done", "val/query_l1_post": 0.1}]
    summary = _summary(table, {"val/query_l1_post": 0.1}, best_cfg, parent)
    tr.end_search("FINISHED", summary, [own_csv])
    got = Tracker.read_search(store, "aliases", "s", history=False)
    c = got["children"][0]
    assert c["tags"][TAG_MODEL] == "tcn" and c["tags"]["model"] == "tcn" and c["tags"]["node"] == "10.0.0.7"
    assert c["tags"]["hostname"] == "worker-1" and c["tags"]["mlflow.note.content"] == "kept as is"
    p = got["parent"]
    assert p["metrics"]["best/val/query_l1_post"] == pytest.approx(0.1)
    assert {"summary/trials.csv", "summary/trials.md", "summary/best_config.yaml", "summary/summary.json"} <= set(p["artifacts"])
    dl = Path(MlflowClient(store).download_artifacts(p["run_id"], "summary", str(tmp_path / "dl")))
    assert (dl / "trials.csv").read_text() == own_csv.read_text()  # the caller's file replaces the generated one
    assert (dl / "best_config.yaml").read_text() == "name: lstm\n"
    # summary.json holds every field of the summary, under its field names.
    assert json.loads((dl / "summary.json").read_text()) == {
        "name": "s", "experiment_path": "/tmp/ray/s", "best_config_path": str(best_cfg), "best_checkpoint": None,
        "best_metrics": {"val/query_l1_post": 0.1}, "table": table, "parent_run_id": parent, "metric": "",
        "best_trial": None, "best_value": None, "definition": "", "failures": [], "view_path": None, "model_uri": None}
    missing = _summary([], {}, tmp_path / "nope.yaml", parent)
    tr2 = Tracker(store, "aliases-missing")
    tr2.start_search(cfg, "s", MANIFEST, resume=False)
    with pytest.raises(FileNotFoundError, match="best config"):
        tr2.end_search("FINISHED", missing)
    tr2.close_dangling()
