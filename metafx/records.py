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
                                 code_version, code_dirty, config_hash, best_trial,
                                 best_run_id, best_definition
                                 params: the flattened resolved config
                                 artifacts: config/config.yaml, dataset/manifest.json,
                                            summary/{trials.csv, trials.md, best_config.yaml,
                                            summary.json, *.png}
        run "trial 3: lstm ..."  mlflow.parentRunId = the search run; named by trial_run_name
                                 tags role=trial, trial_id, ray_trial_id, trial_number, model,
                                 node, asha_stopped, outcome, stft_resolution, error
                                 (+ the search's tags)
                                 params: the trial's sampled hyperparameters + flat config
                                 metrics: the metafx metrics it reported (no Ray internals),
                                          step = meta-step; rank and best/<metric> at the end
                                 artifacts: whatever the trial wrote (checkpoint,
                                            audio/, plots/, results.json), error.txt
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
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
TAG_TRIAL_NUMBER = "metafx.trial_number"  # Tune's trial counter (1, 2, ...): the "trial 3" of the run name
TAG_OUTCOME = "metafx.outcome"  # finished | stopped (ASHA) | failed: how the trial ended
TAG_STFT_RESOLUTION = "metafx.stft_resolution"  # e.g. "fft=512,hop=128,win=512": what test/*stft* were computed with
TAG_MRSTFT_RESOLUTIONS = "metafx.mrstft_resolutions"  # the MR-STFT resolutions, ";"-separated
TAG_BEST_TRIAL = "metafx.best_trial"  # parent run: the best trial's run name (see best_definition)
TAG_BEST_RUN = "metafx.best_run_id"  # parent run: the best trial's MLflow run id
TAG_BEST_DEFINITION = "metafx.best_definition"  # parent run: what "best" means, in words
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI groups children under it)
TAG_NOTE = "mlflow.note.content"  # MLflow's run description (Markdown) shown in the UI
TAG_GIT_COMMIT = "mlflow.source.git.commit"

#: Experiment type shown (and editable) in MLflow 3's UI: model training, not GenAI. Note the UI's
#: default *view* is still GenAI; open ``#/experiments/<id>/runs?workflowType=machine_learning``
#: (or click "Model training") to land on the runs table.
EXP_TAG_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: Experiment tag MLflow's UI reads as the experiment's primary metric (the first chart of its chart view).
EXP_TAG_PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name"
#: Experiment tag prefix of a saved view of the runs page; ``?viewStateShareKey=<key>`` opens it.
EXP_TAG_SHARED_VIEW = "mlflow.sharedViewState."
#: The key of metafx's saved view (columns, order, expanded searches, charts) of every experiment.
VIEW_KEY = "metafx"

#: Metric of every trial run: its rank in the search (1 = best; see :func:`best_definition`).
RANK_METRIC = "rank"
#: Outcomes of a trial (tag ``metafx.outcome`` and the trial table's status column).
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"

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
        best_metrics: the best trial's metafx metrics (parent metrics ``best/<key>``); its
            ``search.metric`` is the trial's best value (see :func:`best_definition`), the
            other keys are its final report (the test metrics of that checkpoint).
        table: one row per trial, best first (:func:`rank_rows`): ``rank``, ``trial`` (number),
            ``name`` (the run name), ``status`` (finished | stopped | failed), ``step`` (last),
            ``best <metric>`` and ``best step``, test metrics, ``stft``, sampled values.
        parent_run_id: the search's MLflow run, or None when not tracked.
        metric: the search metric.
        best_trial: the best trial's run name, or None.
        best_value: the best trial's best value of ``metric``, or None.
        definition: :func:`best_definition` of this search, the sentence every output states.
        failures: one entry per kind of failure (:func:`failure_kinds`), most frequent first.
        view_path: the MLflow UI path of the ranked view of the trials (``#/experiments/...``),
            or None when not tracked.
        model_uri: the best trial's meta-model in the MLflow Model Registry
            (``models:/<study>/<version>``, what ``launch/capture.py --model`` takes), or None
            (not tracked, no finished trial, or the registration failed: a warning says why).
    """

    name: str
    experiment_path: str
    best_config_path: Path | None
    best_checkpoint: str | None
    best_metrics: dict[str, float]
    table: list[dict[str, Any]]
    parent_run_id: str | None
    metric: str = ""
    best_trial: str | None = None
    best_value: float | None = None
    definition: str = ""
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    view_path: str | None = None
    model_uri: str | None = None


# --------------------------------------------------------------------------- best trial, names, failures


def best_key(metric: str) -> str:
    """The name of a trial's best value of ``metric`` (a metric of its run, a column of the table)."""
    return f"best/{metric}"


def best_definition(metric: str, mode: str = "min") -> str:
    """What "best" means in every output of a search: one definition, stated in words.

    Args:
        metric: the search metric, e.g. ``val/query_l1_post``.
        mode: ``min`` or ``max``.

    Returns:
        The sentence.
    """
    low = "lowest" if mode == "min" else "highest"
    return (f"best trial = the trial that finished (ran its test evaluation) with the {low} {metric} "
            f"at any of its validation reports; that value is the checkpoint it was tested with. "
            f"Trials ASHA stopped early rank after every finished one")


def finite_value(v: Any) -> float | None:
    """A row's value as a finite float, or None: missing, boolean, not a number, NaN or infinite.

    Why: trial rows and histories hold NaN for a failed or not-yet-reported metric, and strings
    where a reader sends them through CSV; plots and the summary study keep only real values.

    Args:
        v: any value.

    Returns:
        ``float(v)`` when that is finite (a bool is not a number here), else None.
    """
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def rank_rows(rows: Sequence[Mapping[str, Any]], metric: str, mode: str = "min") -> list[dict[str, Any]]:
    """Order trial rows by :func:`best_definition` and number them (``rank``, 1 = best).

    Finished trials first, by their best value of ``metric``; then trials ASHA stopped, by
    theirs; failed trials last (no rank).

    Args:
        rows: trial rows with ``status`` (finished | stopped | failed) and ``best <metric>``.
        metric: the search metric.
        mode: ``min`` or ``max``.

    Returns:
        New rows, ordered, with ``rank`` first.
    """
    col = f"best {metric}"
    sign = 1.0 if mode == "min" else -1.0
    order = {FINISHED: 0, STOPPED: 1}

    def key(r: Mapping[str, Any]) -> tuple:
        v = r.get(col)
        finite = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        return (order.get(r.get("status"), 2), 0 if finite else 1, sign * v if finite else 0.0,
                r.get("trial") if isinstance(r.get("trial"), int) else 1 << 30)

    out = []
    for i, r in enumerate(sorted(rows, key=key), start=1):
        ranked = r.get("status") in (FINISHED, STOPPED)
        out.append({"rank": i if ranked else None, **{k: v for k, v in r.items() if k != "rank"}})
    return out


#: Prefixes and names shortened in run names ("trial 3: lstm hidden=32 inner_lr=0.012").
_NAME_FIRST = ("maml.method", "model.arch")


def trial_run_name(number: int | None, sampled: Mapping[str, Any], arch: str, method: str = "maml") -> str:
    """A trial's readable name: its number, method and model, and the values Optuna sampled.

    Example: ``trial 3: lstm hidden=32 inner_lr=0.012 outer_lr=0.0068 inner_steps=2``; the method
    is named when it is not plain ``maml`` (``trial 5: ridge arx nb=13 na=12``).

    Args:
        number: Tune's trial counter (1, 2, ...), or None.
        sampled: the sampled values under their dotted keys.
        arch: the trial's ``model.arch``.
        method: the trial's ``maml.method``.

    Returns:
        The name (MLflow run name, progress lines, trial table).
    """
    head = f"trial {number}" if number is not None else "trial"
    words = ([method] if method != "maml" else []) + [arch]
    rest = [(k, v) for k, v in sampled.items() if k not in _NAME_FIRST]
    short = [k.rsplit(".", 1)[-1] for k, _ in rest]
    for (k, v), name in zip(rest, short):
        words.append(f"{name if short.count(name) == 1 else k}={_short_value(v)}")
    return f"{head}: {' '.join(words)}"


def _short_value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.2g}"
    return str(v)


#: Test metrics shown beside the search metric in metafx's runs view: the model, then its baselines.
VIEW_METRICS = ("test/query_esr_post", "test/identity/query_esr_post", "test/lsfir/query_esr_post",
                "test/arx/query_esr_post",
                "test/query_l1_post", "test/identity_l1", "test/lsfir/query_l1_post",
                "test/query_stft_post", "test/identity_stft", "test/lsfir/query_stft_post", "test/arx/query_stft_post")


def view_key(search_name: str) -> str:
    """The share key of a search's saved runs view (``?viewStateShareKey=<key>`` in the UI's URL)."""
    import re

    return "metafx-" + re.sub(r"[^A-Za-z0-9_.-]", "_", search_name)


def runs_view(search_name: str, metric: str, searched: Sequence[str]) -> dict[str, Any]:
    """MLflow's saved-view state of a search's runs page: its trials ranked, key columns shown.

    MLflow's UI (3.x) shows no metric or parameter column until a person picks them; a
    view saved as the experiment tag ``mlflow.sharedViewState.<key>`` is what its "Share"
    button stores, and ``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens it. This
    one lists the search's trials (not the search's own run), ordered by ``rank`` (1 = best,
    :func:`best_definition`), with the rank, the best value of the search metric, the test
    metrics beside the baselines (:data:`VIEW_METRICS`), the trial's outcome and STFT
    resolution and the searched parameters; its chart view shows every run (no run hidden),
    the curves of every reported metric with ``metric`` first.

    Args:
        search_name: the search (its trial runs carry ``metafx.search_name``).
        metric: the search metric.
        searched: the searched parameters' dotted keys.

    Returns:
        The JSON-serializable state (search facets and UI state, as the UI stores them).
    """
    def col(kind: str, key: str) -> str:
        return f"{kind}.`{key}`"

    cols = [col("metrics", RANK_METRIC), col("metrics", best_key(metric)), col("tags", TAG_OUTCOME)]
    cols += [col("metrics", m) for m in VIEW_METRICS]
    cols += [col("tags", TAG_STFT_RESOLUTION)] + [col("params", k) for k in searched]
    q = search_name.replace("'", "")
    return {
        "searchFilter": f"tags.`{TAG_SEARCH_NAME}` = '{q}' and tags.`{TAG_ROLE}` = 'trial'",
        "orderByKey": col("metrics", RANK_METRIC),
        "orderByAsc": True,
        "selectedColumns": cols,
        "columnOrder": cols,
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
    }


def resolution_text(resolutions: Sequence[Sequence[int]]) -> str:
    """``fft=512,hop=128,win=512`` for each (fft, hop, win), ``;``-separated (tag and table text)."""
    return ";".join(f"fft={f},hop={h},win={w}" for f, h, w in resolutions)


def failure_kinds(errors: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Group trial failures by kind: the first error of each kind and how many trials hit it.

    Args:
        errors: ``(trial name, error text)`` per failed trial, in trial order; the text is a
            traceback or a message. Its kind is the exception type of its last line
            (``ValueError: ...`` -> ``ValueError``), else the whole line.

    Returns:
        ``[{"kind", "count", "first": one-line message of the first trial of the kind,
        "trial": that trial, "trials": [names]}]``, most frequent first.
    """
    kinds: dict[str, dict[str, Any]] = {}
    for trial, text in errors:
        line = error_summary(text)
        head = line.split(":", 1)[0].strip()
        kind = head.rsplit(".", 1)[-1] if head and " " not in head else line
        k = kinds.setdefault(kind, {"kind": kind, "count": 0, "first": line, "trial": trial, "trials": []})
        k["count"] += 1
        k["trials"].append(trial)
    return sorted(kinds.values(), key=lambda k: -k["count"])


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
