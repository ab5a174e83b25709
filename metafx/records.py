"""The record of a search, without mlflow: its store, tag names, provenance and typed summary.

:mod:`metafx.tracking` writes these records into MLflow (the only module importing
mlflow); this module holds what needs no MLflow client, so the search driver and its
trials can name tags and build a :class:`SearchSummary` without importing mlflow.

Store (issue 5): by default a SQLite database ``mlruns/mlflow.db`` in the
repository with artifacts in ``mlruns/artifacts`` (MLflow 3.13+ refuses a bare
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` or an explicit URI points at a
tracking server instead (the cluster case), which then decides where artifacts
go.

Run layout, all tag keys prefixed ``metafx.`` (constants below)::

    experiment <study name>
      run <search_name>          tags role=search, search_name, budget, dataset_hash,
                                 code_version, code_dirty, config_hash
                                 params: the flattened resolved config
                                 artifacts: config/config.yaml, dataset/manifest.json,
                                            summary/{trials.csv, trials.md, best_config.yaml,
                                            summary.json, *.png}
        run <trial_id>           mlflow.parentRunId = the search run
                                 tags role=trial, trial_id, ray_trial_id, model, node,
                                 asha_stopped, error (+ the search's tags)
                                 params: the trial's sampled hyperparameters + flat config
                                 metrics: every reported metric, step = meta-step
                                 artifacts: whatever the trial wrote (checkpoint,
                                            audio/, plots/, results.json), error.txt
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from metafx.config import REPO_ROOT, Config, dump_config

log = logging.getLogger(__name__)

TAG_ROLE = "metafx.role"  # "search" (parent) | "trial" (child)
TAG_SEARCH_NAME = "metafx.search_name"
TAG_TRIAL_ID = "metafx.trial_id"
TAG_RAY_TRIAL_ID = "metafx.ray_trial_id"
TAG_BUDGET = "metafx.budget"
TAG_DATASET_HASH = "metafx.dataset_hash"
TAG_CODE_VERSION = "metafx.code_version"
TAG_CODE_DIRTY = "metafx.code_dirty"
TAG_CONFIG_HASH = "metafx.config_hash"
TAG_STUDY = "metafx.study"
TAG_MODEL = "metafx.model"  # model architecture of a trial (lstm | tcn | transformer)
TAG_NODE = "metafx.node"  # ip / hostname the trial ran on
TAG_NODE_ID = "metafx.node_id"  # Ray's node id (two nodes on one host differ here)
TAG_HOSTNAME = "metafx.hostname"
TAG_GPU_IDS = "metafx.gpu_ids"  # accelerator ids Ray assigned the trial (comma-separated)
TAG_DEVICE = "metafx.device"  # the torch device the trial trained on
TAG_ASHA_STOPPED = "metafx.asha_stopped"  # "true" when the scheduler stopped the trial early
TAG_ERROR = "metafx.error"  # short error message; the full text is the artifact error.txt
TAG_CLOSED_BY = "metafx.closed_by"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI groups children under it)
TAG_NOTE = "mlflow.note.content"  # MLflow's run description (Markdown) shown in the UI
TAG_GIT_COMMIT = "mlflow.source.git.commit"

#: Experiment type shown (and editable) in MLflow 3's UI: model training, not GenAI. Note the UI's
#: default *view* is still GenAI; open ``#/experiments/<id>/runs?workflowType=machine_learning``
#: (or click "Model training") to land on the runs table.
EXP_TAG_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

STATUSES = ("FINISHED", "FAILED", "KILLED")  # the terminal statuses of a run
ERROR_TAG_CHARS = 1000
_SQLITE = "sqlite:///"


# --------------------------------------------------------------------------- store location


def default_tracking_uri() -> str:
    """The tracking URI used when none is given.

    Returns:
        ``MLFLOW_TRACKING_URI`` from the environment when set (e.g. an
        ``http://host:5000`` tracking server on a cluster), else
        ``sqlite:///<repo>/mlruns/mlflow.db``; the ``mlruns/`` directory is
        created if missing. Artifacts of that SQLite store go to
        ``<repo>/mlruns/artifacts`` (see :func:`artifact_location_for`).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    d = REPO_ROOT / "mlruns"
    d.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE}{d / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths against the cwd), else None.

    Args:
        tracking_uri: any MLflow tracking URI.

    Returns:
        The absolute database path, or None for other stores and in-memory SQLite.
    """
    if not tracking_uri.startswith(_SQLITE):
        return None
    rest = tracking_uri[len(_SQLITE):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).resolve()


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go for this store.

    Args:
        tracking_uri: the tracking URI.

    Returns:
        ``file://<db dir>/artifacts`` for a SQLite store (so the database and
        its artifacts stay side by side in ``mlruns/``), None otherwise (a
        tracking server decides, e.g. its ``--artifacts-destination``).
    """
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").as_uri() if db is not None else None


# --------------------------------------------------------------------------- provenance


def code_version(repo: Path = REPO_ROOT) -> tuple[str, bool | None]:
    """Git commit of the code and whether the work tree has uncommitted changes.

    Args:
        repo: a directory inside the git work tree.

    Returns:
        ``(commit, dirty)``; ``("unknown", None)`` when git or the repository is
        unavailable (a copied tree, a container without git).
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log.debug("git not available for the code version (%s); tagging 'unknown'", e)
        return "unknown", None
    return (head or "unknown"), bool(status.strip())


def dataset_hash(manifest: Mapping[str, Any]) -> str:
    """The dataset's content hash from its manifest.

    Args:
        manifest: the dataset manifest written by the renderer.

    Returns:
        The manifest's ``dataset_hash``, ``hash`` or ``key`` entry (first found),
        else the first 16 hex digits of the SHA-256 of its canonical JSON.
    """
    for k in ("dataset_hash", "hash", "key"):
        v = manifest.get(k)
        if isinstance(v, str) and v:
            return v
    import hashlib

    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def search_tags(cfg: Config, search_name: str, manifest: Mapping[str, Any]) -> dict[str, str]:
    """The tags every run of a search carries: its name, study, budget, data, code and config.

    Args:
        cfg: the resolved study configuration.
        search_name: the search's name.
        manifest: the dataset manifest.

    Returns:
        Tag name -> value; ``mlflow.source.git.commit`` only when the commit is known.
    """
    commit, dirty = code_version()
    tags = {
        TAG_SEARCH_NAME: search_name,
        TAG_STUDY: cfg.name,
        TAG_BUDGET: cfg.budget,
        TAG_DATASET_HASH: dataset_hash(manifest),
        TAG_CODE_VERSION: commit,
        TAG_CODE_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
        TAG_CONFIG_HASH: cfg.hash(),
    }
    if commit != "unknown":
        tags[TAG_GIT_COMMIT] = commit
    return tags


def write_inputs(cfg: Config, search_name: str, manifest: Mapping[str, Any], out_dir: Path) -> None:
    """Write what a search starts from: ``config/config.yaml`` (resolved) and ``dataset/manifest.json``.

    Args:
        cfg: the resolved study configuration.
        search_name: the search's name (in the YAML's header).
        manifest: the dataset manifest (JSON-serializable).
        out_dir: an existing folder; the two sub-folders are created in it.
    """
    (out_dir / "config").mkdir()
    (out_dir / "dataset").mkdir()
    dump_config(cfg.to_dict(), out_dir / "config" / "config.yaml",
                header=f"# resolved config of search {search_name} ({cfg.budget})")
    (out_dir / "dataset" / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str),
                                                       encoding="utf-8")


def check_status(status: str) -> None:
    """Refuse a run status that is not a terminal one (:data:`STATUSES`).

    Args:
        status: the status to set.

    Raises:
        ValueError: ``status`` is not FINISHED, FAILED or KILLED.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")


def error_summary(error: str) -> str:
    """The ``metafx.error`` tag of an error: its last non-empty line (a traceback's message), truncated.

    Args:
        error: an error message or a whole traceback.

    Returns:
        At most :data:`ERROR_TAG_CHARS` characters.
    """
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    s = lines[-1] if lines else str(error)
    return s if len(s) <= ERROR_TAG_CHARS else s[: ERROR_TAG_CHARS - 3] + "..."


# --------------------------------------------------------------------------- the summary


@dataclass(frozen=True)
class SearchSummary:
    """The outcome of a search: what :func:`metafx.search.run_search` returns and the parent run records.

    Attributes:
        name: the search's name (Tune experiment and MLflow parent run).
        experiment_path: Tune's experiment folder or URI.
        best_config_path: the best trial's configuration written as a study YAML, or None
            when no trial finished its evaluation.
        best_checkpoint: the best trial's last checkpoint (folder or URI), or None.
        best_metrics: the best trial's numeric results (parent metrics ``best/<key>``).
        table: one row per trial: trial id, status, step, sampled values and metrics.
        parent_run_id: the search's MLflow run, or None when not tracked.
    """

    name: str
    experiment_path: str
    best_config_path: Path | None
    best_checkpoint: str | None
    best_metrics: dict[str, float]
    table: list[dict[str, Any]]
    parent_run_id: str | None


def write_summary(summary: SearchSummary, out_dir: Path) -> str | None:
    """Write a search's summary files: ``summary.json``, ``trials.csv``, ``trials.md``, ``best_config.yaml``.

    The trial files are written when the table has rows (columns in the order first
    seen), ``best_config.yaml`` when the summary names a best configuration.

    Args:
        summary: the search's summary.
        out_dir: an existing folder to write into.

    Returns:
        The trial table as Markdown, or None when the table is empty.

    Raises:
        FileNotFoundError: ``summary.best_config_path`` is set but not a file.
    """
    from metafx.plots import trial_table_markdown  # matplotlib import only when summarizing

    out_dir = Path(out_dir)
    (out_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2, default=str),
                                          encoding="utf-8")
    md = None
    rows = list(summary.table)
    if rows:
        cols = _columns(rows)
        (out_dir / "trials.csv").write_text(_csv(rows, cols), encoding="utf-8")
        md = trial_table_markdown(rows, cols)
        (out_dir / "trials.md").write_text(md, encoding="utf-8")
    if summary.best_config_path is not None:
        best_cfg = Path(summary.best_config_path)
        if not best_cfg.is_file():
            raise FileNotFoundError(f"best config file {best_cfg} does not exist")
        (out_dir / "best_config.yaml").write_bytes(best_cfg.read_bytes())
    return md


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(str(k), None)
    return list(cols)


def _csv(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (json.dumps(r[c], default=str) if isinstance(r.get(c), (dict, list)) else r[c])
                    for c in cols])
    return buf.getvalue()
