"""MLflow tracking of a search: one parent run per search, one child run per trial.

This is the only module that imports mlflow (docs/design.md, style rule 1).

Architecture: a single writer. Every MLflow write happens in the search
DRIVER process: the Ray Tune callback in :mod:`metafx.search` calls a
:class:`Tracker` from ``on_trial_start`` / ``on_trial_result`` /
``on_trial_complete`` / ``on_trial_error``. Trials never touch MLflow; a trial
writes its artifacts (WAVs, PNGs, checkpoint, results.json) into its final
Tune checkpoint directory and the driver uploads them from there with
:meth:`Tracker.log_artifacts`. With one writer there is no "database is locked"
from SQLite and no experiment-creation race; the Tracker still serializes its
own calls with a lock (the callback may be invoked from several threads) and
retries a write the store reports as temporarily locked (an ``mlflow ui``
reading the same SQLite file can briefly hold it).

The run layout, the tag names and the summary files are :mod:`metafx.records`.
"""
from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from metafx.config import Config, flatten
from metafx.records import (
    EXP_TAG_KIND,
    EXP_TAG_PRIMARY_METRIC,
    EXP_TAG_SHARED_VIEW,
    EXPERIMENT_KIND,
    RANK_METRIC,
    TAG_ASHA_STOPPED,
    TAG_BEST_DEFINITION,
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TAG_CLOSED_BY,
    TAG_ERROR,
    TAG_NOTE,
    TAG_OUTCOME,
    TAG_PARENT,
    TAG_RAY_TRIAL_ID,
    TAG_ROLE,
    TAG_SEARCH_NAME,
    TAG_STFT_RESOLUTION,
    TAG_TRIAL_ID,
    SearchSummary,
    artifact_location_for,
    best_key,
    check_status,
    default_tracking_uri,
    error_summary,
    runs_view,
    search_tags,
    view_key,
    sqlite_path,
    write_inputs,
    write_summary,
)

log = logging.getLogger(__name__)

_BAD_NAME = re.compile(r"[^/\w.\- :]")
_RETRIES = 5
T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking store cannot do what was asked (missing search, unknown experiment, store failure)."""


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """Writes one search into MLflow from the driver process (the single writer).

    Args:
        tracking_uri: MLflow tracking URI; None = :func:`default_tracking_uri`.
        experiment: experiment name (one per study, e.g. the space name).

    Raises:
        TrackingError: the experiment can neither be created nor found.

    Attributes:
        tracking_uri: the resolved URI.
        experiment_id: the experiment's id.
        parent_run_id: the search run's id once :meth:`start_search` ran, else None.
    """

    def __init__(self, tracking_uri: str | None, experiment: str):
        if not experiment or not isinstance(experiment, str):
            raise ValueError(f"experiment must be a non-empty name, got {experiment!r}")
        self.tracking_uri = tracking_uri or default_tracking_uri()
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        self._lock = threading.RLock()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._ensure_experiment(experiment)
        self.parent_run_id: str | None = None
        self.search_name: str | None = None
        self._common_tags: dict[str, str] = {}
        self._runs: dict[str, str] = {}  # trial_id -> child run id

    # ------------------------------------------------------------------ search

    def start_search(self, cfg: Config, search_name: str, manifest: Mapping[str, Any], resume: bool) -> str:
        """Open (or, on resume, reopen) the parent run of a search.

        The run is named ``search_name``; its params are ``cfg.flat()``, its
        tags the budget, dataset hash, code version and dirty flag, and the
        resolved config YAML and the dataset manifest JSON are logged as the
        artifacts ``config/config.yaml`` and ``dataset/manifest.json``.

        Args:
            cfg: the resolved study configuration.
            search_name: unique name of this search in the experiment.
            manifest: the dataset manifest (JSON-serializable mapping).
            resume: reuse the existing parent run tagged with ``search_name``
                (status set back to RUNNING) instead of creating one; when none
                exists a new one is created.

        Returns:
            The parent run id.

        Raises:
            TrackingError: ``resume`` is False but a search of this name already
                exists in the experiment, or a search was already started on
                this Tracker.
        """
        with self._lock:
            if self.parent_run_id is not None:
                raise TrackingError(f"this Tracker already tracks search {self.search_name!r}; use one Tracker per search")
            common = search_tags(cfg, search_name, manifest)
            existing = self._find_parents(search_name)
            if existing and not resume:
                raise TrackingError(
                    f"experiment {self.experiment!r} already has a search named {search_name!r} "
                    f"(run {existing[0].info.run_id}); resume it or choose another search name"
                )
            if existing:
                if len(existing) > 1:
                    log.warning("%d parent runs are named %r; resuming the newest", len(existing), search_name)
                run = existing[0]
                run_id = run.info.run_id
                self._retry(self._client.update_run, run_id, status="RUNNING")
                old_params = dict(run.data.params)
                log.info("resuming search %r in MLflow run %s", search_name, run_id)
                # Reattach the children already recorded so their runs are reused.
                for child in self._search_runs(f"tags.`{TAG_PARENT}` = {_q(run_id)}"):
                    tid = child.data.tags.get(TAG_TRIAL_ID)
                    if tid:
                        self._runs.setdefault(tid, child.info.run_id)
            else:
                if resume:
                    log.info("no recorded search %r to resume; starting a new parent run", search_name)
                tags = {**common, TAG_ROLE: "search"}
                run = self._retry(self._client.create_run, self.experiment_id, tags=tags, run_name=search_name)
                run_id = run.info.run_id
                old_params = {}
            # Only now is this Tracker bound to the search (close_dangling acts on it).
            self.parent_run_id, self.search_name, self._common_tags = run_id, search_name, common
            self._write(run_id, params=_param_dict(cfg.flat()), tags={**common, TAG_ROLE: "search"},
                        existing_params=old_params)
            self._set_views(cfg, search_name)
            with tempfile.TemporaryDirectory(prefix="metafx-track-") as tmp:
                write_inputs(cfg, search_name, manifest, Path(tmp))
                self._retry(self._client.log_artifacts, run_id, tmp)
            return run_id

    def view_path(self) -> str:
        """The UI path (after the server's address) of this search's ranked runs view.

        Returns:
            ``#/experiments/<id>/runs?viewStateShareKey=<key>&workflowType=machine_learning``.

        Raises:
            TrackingError: no search was started.
        """
        self._parent()
        return (f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={view_key(self.search_name or '')}"
                "&workflowType=machine_learning")

    def _set_views(self, cfg: Config, search_name: str) -> None:
        """Experiment tags MLflow's UI reads: the primary metric (first chart) and this search's saved view.

        The view (:func:`metafx.records.runs_view`) is stored as MLflow 3's UI stores a saved
        view: the runs page lists it under "Views" as ``<search>: trials ranked``, and
        :meth:`view_path` opens it.
        """
        view = runs_view(search_name, cfg.search.metric, [p.key for p in cfg.search.params])
        # The envelope of MLflow's saved views: listed by name under "Views" on the runs page.
        now = _now_ms()
        saved = {"name": f"{search_name}: trials ranked", "createdAt": now, "updatedAt": now, "state": json.dumps(view)}
        for key, value in ((EXP_TAG_PRIMARY_METRIC, cfg.search.metric),
                           (EXP_TAG_SHARED_VIEW + view_key(search_name), json.dumps(saved))):
            self._retry(self._client.set_experiment_tag, self.experiment_id, key, value)

    def record_ranking(self, summary: SearchSummary) -> None:
        """Write the search's one ranking into its runs: rank and best value per trial, the best on the parent.

        Each trial row of ``summary.table`` with a ``trial_id`` gets the metrics ``rank``
        (1 = best; none for a failed trial) and ``best/<metric>`` (its best value), and the
        tag ``metafx.outcome``; the parent run gets the best trial's run name and id and
        :func:`metafx.records.best_definition` as tags.

        Args:
            summary: the search's summary (:func:`metafx.records.rank_rows` order).

        Raises:
            TrackingError: no search was started.
        """
        with self._lock:
            parent = self._parent()
            col = f"best {summary.metric}"
            best_run = None
            for row in summary.table:
                tid = row.get("trial_id")
                if not tid:
                    continue
                rid = self._runs.get(tid) or self._find_child(tid)
                if rid is None:
                    continue
                ms = [_metric(RANK_METRIC, row.get("rank"), 0), _metric(best_key(summary.metric), row.get(col), 0)]
                self._write(rid, metrics=ms, tags={TAG_OUTCOME: row.get("status", "")})
                if summary.best_trial is not None and row.get("name") == summary.best_trial:
                    best_run = rid
            tags = {TAG_BEST_DEFINITION: summary.definition}
            resolutions = {row["stft"] for row in summary.table if row.get("stft")}
            if resolutions:  # the search's STFT metrics (best/test/*stft*) were computed with these
                tags[TAG_STFT_RESOLUTION] = " | ".join(sorted(resolutions))
            if summary.best_trial is not None:
                tags[TAG_BEST_TRIAL] = summary.best_trial
            if best_run is not None:
                tags[TAG_BEST_RUN] = best_run
            self._write(parent, tags=tags)

    def end_search(self, status: str, summary: SearchSummary | None = None, files: Sequence[Path] = ()) -> None:
        """Log the search summary to the parent run and terminate it.

        With a summary, the parent run gets the files of :func:`metafx.records.write_summary`
        under ``summary/`` (``summary.json``; ``trials.csv`` and ``trials.md`` for a non-empty
        table, which is also the run's description in the UI; ``best_config.yaml``), and the
        best trial's finite numbers as metrics ``best/<key>``. A file in ``files`` with the
        name of a generated one (e.g. ``trials.csv``) replaces it.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            summary: the search's summary, or None.
            files: extra files (e.g. Optuna plots) logged under ``summary/``.

        Raises:
            ValueError: unknown status.
            TrackingError: no search was started.
            FileNotFoundError: a file in ``files``, or the summary's best config, does not exist.
        """
        check_status(status)
        with self._lock:
            run_id = self._parent()
            for f in files:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"summary file {f} does not exist")
            with tempfile.TemporaryDirectory(prefix="metafx-summary-") as tmp:
                d = Path(tmp)
                if summary is not None:
                    if summary.metric:
                        self.record_ranking(summary)
                    md = write_summary(summary, d)
                    if md is not None:
                        note = f"## Search {self.search_name}: {len(summary.table)} trials, best first\n\n"
                        if summary.definition:
                            note += f"{summary.definition}.\n\n"
                        note += (f"Ranked view of the trials: [open]({self.view_path()}) (or filter "
                                 f"`tags.metafx.search_name = '{self.search_name}'`, sort by `rank`).\n\n{md}")
                        if len(note) > MAX_TAG_VAL_LENGTH:
                            note = note[: MAX_TAG_VAL_LENGTH - 60].rsplit("\n", 1)[0] + "\n\n(truncated; see summary/trials.md)"
                        self._write(run_id, tags={TAG_NOTE: note})
                    self._write(run_id, metrics=[_metric(f"best/{k}", v, 0)
                                                 for k, v in flatten(summary.best_metrics).items()])
                for f in files:
                    dst = d / Path(f).name
                    if dst.exists():
                        log.debug("summary file %s replaces the generated one", dst.name)
                    dst.write_bytes(Path(f).read_bytes())
                if any(d.iterdir()):
                    self._retry(self._client.log_artifacts, run_id, str(d), "summary")
            self._retry(self._client.set_terminated, run_id, status)

    def close_dangling(self, status: str = "KILLED") -> list[str]:
        """Terminate every run of this search (parent or child) still RUNNING.

        Call it in the driver's ``finally`` so that nothing stays RUNNING after
        a crash, a kill of the driver's work or Ctrl-C. Runs closed here get the
        tag ``metafx.closed_by = close_dangling``.

        Args:
            status: the terminal status to set, ``KILLED`` by default.

        Returns:
            The ids of the runs it terminated (empty when none was RUNNING or no
            search was started).

        Raises:
            ValueError: unknown status.
            TrackingError: the store could not be reached or written.
        """
        check_status(status)
        with self._lock:
            if self.parent_run_id is None:
                return []
            try:
                runs = self._search_runs(
                    f"tags.`{TAG_PARENT}` = {_q(self.parent_run_id)} and attributes.status = 'RUNNING'"
                )
                parent = self._retry(self._client.get_run, self.parent_run_id)
                if parent.info.status == "RUNNING":
                    runs.append(parent)
                closed = []
                for r in runs:
                    rid = r.info.run_id
                    self._write(rid, tags={TAG_CLOSED_BY: "close_dangling"})
                    self._retry(self._client.set_terminated, rid, status)
                    closed.append(rid)
            except MlflowException as e:
                raise TrackingError(f"could not close the RUNNING runs of search {self.search_name!r}: {e}") from e
            if closed:
                log.warning("closed %d run(s) of search %r left RUNNING as %s", len(closed), self.search_name, status)
            return closed

    # ------------------------------------------------------------------ trials

    def trial_run(self, trial_id: str, params: Mapping[str, Any], tags: Mapping[str, Any], run_name: str | None = None) -> str:
        """Create (or reuse) the child run of a trial, nested under the search run.

        Idempotent: a trial already tracked by this Tracker, or recorded under
        the parent by an earlier, resumed session (tag ``metafx.trial_id``), gets
        its existing run back with status RUNNING; params it already has are
        kept (MLflow forbids changing a param; a differing value is warned about).

        Args:
            trial_id: the Ray trial id (unique within the search).
            params: the trial's hyperparameters (the sampled ones and its full
                config; nested mappings are flattened to dotted keys).
            tags: extra tags, keys used as given, e.g.
                ``{TAG_MODEL: "lstm", TAG_NODE: "10.0.0.3"}``. The search's tags
                (``metafx.budget``, ``metafx.dataset_hash``, ``metafx.code_version``,
                ...), ``metafx.trial_id`` and ``metafx.ray_trial_id`` are added.
            run_name: run name shown in the UI; default ``trial_id``.

        Returns:
            The child run id.

        Raises:
            TrackingError: no search was started.
        """
        with self._lock:
            parent = self._parent()
            all_tags = {
                **self._common_tags,
                TAG_ROLE: "trial",
                TAG_TRIAL_ID: trial_id,
                TAG_RAY_TRIAL_ID: trial_id,
                TAG_PARENT: parent,
                **{str(k): v for k, v in tags.items()},
            }
            run_id = self._runs.get(trial_id) or self._find_child(trial_id)
            old_params: dict[str, str] = {}
            if run_id is not None:
                run = self._retry(self._client.get_run, run_id)
                old_params = dict(run.data.params)
                if run.info.status != "RUNNING":
                    log.info("trial %s: reopening MLflow run %s (was %s)", trial_id, run_id, run.info.status)
                    self._retry(self._client.update_run, run_id, status="RUNNING")
            else:
                run = self._retry(self._client.create_run, self.experiment_id, tags=_tag_dict(all_tags),
                                  run_name=run_name or trial_id)
                run_id = run.info.run_id
            self._runs[trial_id] = run_id
            self._write(run_id, params=_param_dict(flatten(params)), tags=all_tags, existing_params=old_params)
            return run_id

    def log_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> int:
        """Log one report of a trial as metrics at ``step`` (one batched write).

        Only finite real numbers are logged (bools, strings, None, NaN and inf
        are skipped; numpy/torch scalars are fine). Nested mappings are
        flattened with ``/`` (``{"val": {"l1": x}}`` -> ``val/l1``); names with
        ``/`` are valid MLflow metric names. Characters MLflow rejects are
        replaced by ``_``.

        Args:
            trial_id: the trial.
            metrics: metric name -> value.
            step: the meta-step.

        Returns:
            How many metrics were logged.

        Raises:
            TrackingError: no search was started.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            try:
                step = int(step)
            except (TypeError, ValueError) as e:
                raise ValueError(f"step must be an integer, got {step!r}") from e
        now = _now_ms()
        ms = []
        for k, v in _flatten_slash(metrics).items():
            m = _metric(k, v, step, now)
            if m is not None:
                ms.append(m)
        with self._lock:
            run_id = self._trial(trial_id)
            self._write(run_id, metrics=ms)
        return len(ms)

    def set_tags(self, trial_id: str | None, tags: Mapping[str, Any]) -> None:
        """Set tags on a trial's run (or on the search run when ``trial_id`` is None).

        Keys are used as given; values are converted to strings and truncated
        to MLflow's limit.

        Args:
            trial_id: the trial, or None for the parent run.
            tags: tag name -> value.

        Raises:
            TrackingError: no search was started.
        """
        with self._lock:
            self._write(self._run_of(trial_id), tags=dict(tags))

    def log_artifacts(self, trial_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or every file under a folder, to a trial's run (or the parent's when None).

        Args:
            trial_id: the trial, or None for the parent run.
            path: a local file, or a folder such as the trial's final checkpoint directory.
            artifact_path: sub-directory of the run's artifacts, or None for the root.

        Raises:
            FileNotFoundError: ``path`` is neither a file nor a folder.
            TrackingError: no search was started.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact file or directory {path} does not exist")
        upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        with self._lock:
            self._retry(upload, self._run_of(trial_id), str(path), artifact_path)

    def end_trial(self, trial_id: str, status: str, error: str | None = None, stopped_early: bool = False) -> None:
        """Terminate a trial's run.

        Sets ``metafx.asha_stopped`` to ``true``/``false``; with ``error`` also
        the tag ``metafx.error`` (its last non-empty line, i.e. the exception
        message of a traceback, truncated to 1000 characters) and the artifact
        ``error.txt`` with the full text. A trial that never got a run (it failed
        before ``trial_run``) gets one now, so its failure is recorded.

        Args:
            trial_id: the trial.
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            error: the error message or traceback, if any.
            stopped_early: True when the scheduler (ASHA) stopped the trial.

        Raises:
            ValueError: unknown status.
            TrackingError: no search was started.
        """
        check_status(status)
        with self._lock:
            run_id = self._trial(trial_id)
            tags: dict[str, str] = {TAG_ASHA_STOPPED: "true" if stopped_early else "false"}
            if error:
                tags[TAG_ERROR] = error_summary(error)
            self._write(run_id, tags=tags)
            if error:
                self._retry(self._client.log_text, run_id, error, "error.txt")
            self._retry(self._client.set_terminated, run_id, status)

    def run_id(self, trial_id: str) -> str | None:
        """The child run id of a trial, if it has one (this session or a resumed one).

        Args:
            trial_id: the trial.

        Returns:
            The run id or None.
        """
        with self._lock:
            return self._runs.get(trial_id) or (self._find_child(trial_id) if self.parent_run_id else None)

    # ------------------------------------------------------------------ read back

    @staticmethod
    def read_search(
        tracking_uri: str | None,
        experiment: str,
        search_name: str,
        *,
        history: bool = True,
        artifacts: bool = True,
    ) -> dict[str, Any]:
        """Read a recorded search back through ``MlflowClient``.

        Args:
            tracking_uri: the store; None = :func:`default_tracking_uri`.
            experiment: experiment name.
            search_name: the search's name (tag ``metafx.search_name`` of its parent run).
            history: include every metric's full history (one query per metric).
            artifacts: include the recursive list of artifact file paths.

        Returns:
            ``{"experiment_id", "parent": run, "children": [run, ...]}`` with the
            children ordered by start time; each run is a dict with ``run_id``,
            ``run_name``, ``status``, ``start_time``, ``end_time`` (ms), ``params``,
            ``tags``, ``metrics`` (latest value per key) and, when asked,
            ``history`` (``{key: [(step, value), ...]}`` sorted by step) and
            ``artifacts`` (file paths relative to the run's artifact root); a
            child also has ``trial_id``.

        Raises:
            TrackingError: the experiment or the search does not exist.
        """
        uri = tracking_uri or default_tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrackingError(f"no experiment {experiment!r} in {uri}")
        flt = f"tags.`{TAG_SEARCH_NAME}` = {_q(search_name)}"
        runs = _search_all(client, exp.experiment_id, flt)
        parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
        if not parents:
            raise TrackingError(f"no search {search_name!r} in experiment {experiment!r} at {uri}")
        parent = max(parents, key=lambda r: r.info.start_time or 0)
        children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]
        children.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))

        def info(r: Any) -> dict[str, Any]:
            d: dict[str, Any] = {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "end_time": r.info.end_time,
                "params": dict(r.data.params),
                "tags": dict(r.data.tags),
                "metrics": dict(r.data.metrics),
            }
            if r.data.tags.get(TAG_TRIAL_ID):
                d["trial_id"] = r.data.tags[TAG_TRIAL_ID]
            if history:
                d["history"] = {
                    k: sorted(((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)), key=lambda x: x[0])
                    for k in r.data.metrics
                }
            if artifacts:
                d["artifacts"] = _list_artifacts(client, r.info.run_id)
            return d

        return {"experiment_id": exp.experiment_id, "parent": info(parent), "children": [info(c) for c in children]}

    # ------------------------------------------------------------------ internals

    def _ensure_experiment(self, name: str) -> str:
        try:
            exp = self._retry(self._client.get_experiment_by_name, name)
            if exp is None:
                try:
                    return self._retry(self._client.create_experiment, name,
                                       artifact_location=artifact_location_for(self.tracking_uri),
                                       tags={"metafx.created_by": "metafx.tracking",
                                             EXP_TAG_KIND: EXPERIMENT_KIND})
                except MlflowException as e:
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    # Another process created it between our lookup and create: use theirs.
                    exp = self._retry(self._client.get_experiment_by_name, name)
                    if exp is None:
                        raise TrackingError(f"experiment {name!r} reported as existing but not found in {self.tracking_uri}") from e
            if exp.lifecycle_stage == "deleted":
                log.warning("experiment %r is in the trash; restoring it", name)
                self._retry(self._client.restore_experiment, exp.experiment_id)
            if EXP_TAG_KIND not in exp.tags:
                # Experiments created elsewhere: record the type the UI shows for it.
                self._retry(self._client.set_experiment_tag, exp.experiment_id, EXP_TAG_KIND, EXPERIMENT_KIND)
            return exp.experiment_id
        except MlflowException as e:
            raise TrackingError(f"cannot create or open experiment {name!r} in {self.tracking_uri}: {e}") from e

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise TrackingError("no search started on this Tracker; call start_search first")
        return self.parent_run_id

    def _run_of(self, trial_id: str | None) -> str:
        """Run id of a trial (see :meth:`_trial`), or of the search when ``trial_id`` is None."""
        return self._parent() if trial_id is None else self._trial(trial_id)

    def _trial(self, trial_id: str) -> str:
        """Run id of a trial: cached, else found under the parent, else created (with a warning)."""
        rid = self._runs.get(trial_id)
        if rid is not None:
            return rid
        self._parent()
        rid = self._find_child(trial_id)
        if rid is not None:
            self._runs[trial_id] = rid
            return rid
        log.warning("trial %s has no MLflow run yet (trial_run was not called); creating one", trial_id)
        return self.trial_run(trial_id, {}, {})

    def _find_parents(self, search_name: str) -> list[Any]:
        runs = self._search_runs(f"tags.`{TAG_SEARCH_NAME}` = {_q(search_name)} and tags.`{TAG_ROLE}` = 'search'")
        return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)

    def _find_child(self, trial_id: str) -> str | None:
        runs = self._search_runs(
            f"tags.`{TAG_PARENT}` = {_q(self._parent())} and tags.`{TAG_TRIAL_ID}` = {_q(trial_id)}"
        )
        if len(runs) > 1:
            log.warning("trial %s has %d runs under the search; using the oldest", trial_id, len(runs))
        runs.sort(key=lambda r: r.info.start_time or 0)
        return runs[0].info.run_id if runs else None

    def _search_runs(self, flt: str) -> list[Any]:
        return self._retry(_search_all, self._client, self.experiment_id, flt)

    def _write(
        self,
        run_id: str,
        *,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, Any] | None = None,
        metrics: Iterable[Metric | None] = (),
        existing_params: Mapping[str, str] | None = None,
    ) -> None:
        """Batched write within MLflow's per-request limits; params already logged are skipped."""
        existing_params = existing_params or {}
        ps = []
        for k, v in (params or {}).items():
            if k in existing_params:
                if existing_params[k] != v:
                    log.warning("run %s: param %s is already %r; MLflow cannot change it to %r (kept)",
                                run_id, k, existing_params[k], v)
                continue
            ps.append(Param(k, v))
        ts = [RunTag(k, v) for k, v in _tag_dict(tags or {}).items()]
        ms = [m for m in metrics if m is not None]
        pt = ps + ts  # params + tags share one limit per batch
        for i in range(0, max(len(pt), 1), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = pt[i:i + MAX_PARAMS_TAGS_PER_BATCH]
            cp = [x for x in chunk if isinstance(x, Param)]
            ct = [x for x in chunk if isinstance(x, RunTag)]
            if cp or ct:
                self._retry(self._client.log_batch, run_id, params=cp, tags=ct)
        for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
            self._retry(self._client.log_batch, run_id, metrics=ms[i:i + MAX_METRICS_PER_BATCH])

    @staticmethod
    def _retry(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Call ``fn``; retry a few times, with backoff, while the store reports itself locked."""
        for attempt in range(_RETRIES):
            try:
                return fn(*args, **kw)
            except MlflowException as e:
                transient = "database is locked" in str(e) or e.error_code == "TEMPORARILY_UNAVAILABLE"
                if not transient or attempt == _RETRIES - 1:
                    raise
                delay = 0.2 * 2**attempt
                log.warning("MLflow store busy (%s); retrying in %.1f s", str(e).splitlines()[0][:200], delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------- helpers


def _search_all(client: MlflowClient, experiment_id: str, flt: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _list_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for fi in client.list_artifacts(run_id, path):
        if fi.is_dir:
            out.extend(_list_artifacts(client, run_id, fi.path))
        else:
            out.append(fi.path)
    return sorted(out)


def _q(value: str) -> str:
    """Quote a string for an MLflow filter expression."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for a value containing both quote characters: {value!r}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clean_key(key: Any) -> str | None:
    """A valid MLflow param/metric/tag key, or None (logged) when none can be made."""
    k = _BAD_NAME.sub("_", str(key)).strip()
    k = posixpath.normpath(k).lstrip("/") if k else k
    if not k or k in (".", "..") or k.startswith("../") or len(k) > MAX_ENTITY_KEY_LENGTH:
        log.warning("cannot record key %r in MLflow (empty, a relative path or over %d chars); skipped",
                    key, MAX_ENTITY_KEY_LENGTH)
        return None
    return k


def _param_value(v: Any) -> str:
    if isinstance(v, str):
        s = v
    elif isinstance(v, (list, tuple, dict)):
        s = json.dumps(v, default=str, sort_keys=False)
    elif hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        try:
            s = str(v.item())
        except (ValueError, RuntimeError):
            s = str(v)
    else:
        s = str(v)
    if len(s) > MAX_PARAM_VAL_LENGTH:
        s = s[: MAX_PARAM_VAL_LENGTH - 14] + "...[truncated]"
    return s


def _param_dict(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        ck = _clean_key(k)
        if ck is not None:
            out[ck] = _param_value(v)
    return out


def _tag_dict(tags: Mapping[str, Any]) -> dict[str, str]:
    """MLflow tags: keys as given (cleaned), values as strings within MLflow's length limit."""
    out = {}
    for k, v in tags.items():
        ck = _clean_key(k)
        if ck is None:
            continue
        s = v if isinstance(v, str) else ("" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)))
        out[ck] = s if len(s) <= MAX_TAG_VAL_LENGTH else s[: MAX_TAG_VAL_LENGTH - 14] + "...[truncated]"
    return out


def _flatten_slash(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_slash(v, key + "/"))
        else:
            out[key] = v
    return out


def _metric(key: Any, value: Any, step: int, ts: int | None = None) -> Metric | None:
    """A Metric for a finite real value, else None (bools, strings, None, NaN, inf are not metrics)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return None
    try:
        x = float(value.item() if hasattr(value, "item") and callable(value.item) else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if not math.isfinite(x):
        return None
    k = _clean_key(key)
    if k is None:
        return None
    return Metric(k, x, ts if ts is not None else _now_ms(), int(step))


# --------------------------------------------------------------------------- captures and the model registry

CAPTURE_EXPERIMENT = "capture"  # default experiment of the capture runs (metafx/capture/)
META_MODEL_EXPERIMENT = "meta-models"  # default experiment of the runs that hold registered meta-models
META_MODEL_ARTIFACT = "meta_model"  # artifact folder of a registered meta-model (best.pt, config.yaml, ...)


def log_capture(
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    tags: Mapping[str, Any],
    artifact_dir: Path,
    before_upload: Callable[[str, str], None] | None = None,
) -> tuple[str, str]:
    """Record one capture as a finished MLflow run in its own experiment.

    The run is created, ``before_upload(run_id, tracking_uri)`` is called (the capture writes
    its ``results.json`` with the run id into ``artifact_dir`` there), then params, tags,
    metrics (nested mappings flattened with ``/``; non-finite values skipped) and every file
    under ``artifact_dir`` are logged, and the run ends FINISHED. Any failure on the way ends
    the run FAILED (tag ``metafx.error``) before the error is raised: no capture run is left
    RUNNING or looks complete when it is not.

    Args:
        tracking_uri: the store; None = :func:`default_tracking_uri`.
        experiment: the experiment (created if missing), e.g. :data:`CAPTURE_EXPERIMENT`.
        run_name: the run's name.
        params: run parameters (flattened to dotted keys).
        metrics: run metrics, logged at step 0.
        tags: run tags.
        artifact_dir: a folder whose files become the run's artifacts (same relative paths).
        before_upload: called once the run exists, before anything is uploaded.

    Returns:
        ``(run_id, tracking_uri)``.

    Raises:
        TrackingError: the store cannot be opened or written (the run, if created, is FAILED).
        FileNotFoundError: ``artifact_dir`` is not a folder (checked before the run is created).
    """
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise FileNotFoundError(f"capture artifact folder {artifact_dir} does not exist")
    tracker = Tracker(tracking_uri, experiment)
    client = tracker._client
    try:
        run = tracker._retry(client.create_run, tracker.experiment_id, tags=_tag_dict(tags), run_name=run_name)
    except MlflowException as e:
        raise TrackingError(f"cannot create a capture run in experiment {experiment!r} at {tracker.tracking_uri}: {e}") from e
    run_id = run.info.run_id
    try:
        if before_upload is not None:
            before_upload(run_id, tracker.tracking_uri)
        tracker._write(run_id, params=_param_dict(flatten(dict(params))), tags=tags,
                       metrics=[_metric(k, v, 0) for k, v in _flatten_slash(metrics).items()])
        tracker._retry(client.log_artifacts, run_id, str(artifact_dir))
        tracker._retry(client.set_terminated, run_id, "FINISHED")
    except BaseException as e:
        try:
            tracker._write(run_id, tags={TAG_ERROR: error_summary(f"{type(e).__name__}: {e}")})
            tracker._retry(client.set_terminated, run_id, "FAILED")
        except Exception:  # the store itself failed: report the original error
            log.exception("could not mark capture run %s as FAILED", run_id)
        if isinstance(e, (MlflowException, OSError)):
            raise TrackingError(f"capture run {run_id} in {tracker.tracking_uri} FAILED while logging: {e}") from e
        raise
    return run_id, tracker.tracking_uri


def register_meta_model(
    tracking_uri: str | None,
    name: str,
    checkpoint: Path,
    *,
    files: Sequence[Path] = (),
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    experiment: str = META_MODEL_EXPERIMENT,
    run_id: str | None = None,
) -> str:
    """Register a meta-model checkpoint in the MLflow Model Registry; ``models:/<name>/<version>`` then loads it.

    The checkpoint (``{"model", "step", "val", "config"}``, logged as ``best.pt``) and ``files`` (e.g.
    the study's ``config.yaml`` and the dataset's ``manifest.json``) are logged under
    :data:`META_MODEL_ARTIFACT` of ``run_id`` (default: a new FINISHED run in ``experiment``),
    and a new version of the registered model ``name`` (created if missing) points at them.

    Args:
        tracking_uri: the store; None = :func:`default_tracking_uri`.
        name: the registered model's name (the search's study name).
        checkpoint: the checkpoint file.
        files: more files logged beside it.
        tags: tags of the model version.
        description: the model version's description.
        experiment: where the holding run is created when ``run_id`` is None.
        run_id: an existing run (e.g. the search's parent run) to hold the artifacts.

    Returns:
        The new version number, as a string.

    Raises:
        FileNotFoundError: ``checkpoint`` or a file is missing.
        TrackingError: the store cannot be written.
    """
    for f in (checkpoint, *files):
        if not Path(f).is_file():
            raise FileNotFoundError(f"cannot register {name!r}: {f} does not exist")
    tracker = Tracker(tracking_uri, experiment)
    client = tracker._client
    try:
        own = run_id is None
        if own:
            run_id = tracker._retry(client.create_run, tracker.experiment_id, run_name=f"register {name}",
                                    tags={TAG_ROLE: "meta_model"}).info.run_id
        with tempfile.TemporaryDirectory(prefix="metafx-register-") as tmp:
            d = Path(tmp)
            (d / "best.pt").write_bytes(Path(checkpoint).read_bytes())  # the name every loader looks for
            for f in files:
                (d / Path(f).name).write_bytes(Path(f).read_bytes())
            tracker._retry(client.log_artifacts, run_id, str(d), META_MODEL_ARTIFACT)
        if own:
            tracker._retry(client.set_terminated, run_id, "FINISHED")
        try:
            tracker._retry(client.create_registered_model, name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{META_MODEL_ARTIFACT}"
        mv = tracker._retry(client.create_model_version, name, source, run_id=run_id, tags=_tag_dict(tags or {}),
                            description=description)
        return str(mv.version)
    except MlflowException as e:
        raise TrackingError(f"cannot register meta-model {name!r} in {tracker.tracking_uri}: {e}") from e


def fetch_registered_model(model_uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download the files of a registered model version (``models:/<name>/<version>`` or ``models:/<name>@<alias>``).

    Args:
        model_uri: the model URI.
        dst: an existing folder to download into.
        tracking_uri: the store (its registry); None = :func:`default_tracking_uri`.

    Returns:
        The local folder holding the version's files (e.g. ``best.pt``).

    Raises:
        TrackingError: no such model, version or alias in the store, or the download failed.
    """
    import mlflow.artifacts

    uri = tracking_uri or default_tracking_uri()
    spec = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    name, sep, ref = spec.rpartition("@") if "@" in spec else spec.rpartition("/")
    if not name or not ref or "/" in name:
        raise TrackingError(f"{model_uri!r} is not a model URI: use models:/<name>/<version>, models:/<name>/latest or "
                            f"models:/<name>@<alias>")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if sep == "@":
            version = client.get_model_version_by_alias(name, ref).version
        elif ref == "latest":
            versions = client.search_model_versions(f"name = {_q(name)}")
            if not versions:
                raise TrackingError(f"cannot load {model_uri}: the registry at {uri} has no version of {name!r}")
            version = str(max(int(v.version) for v in versions))
        else:
            version = ref
        source = client.get_model_version_download_uri(name, version)
        out = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri)
    except MlflowException as e:
        raise TrackingError(f"cannot load {model_uri} from the registry at {uri}: {str(e).splitlines()[0]}; "
                            f"list the registered models in the MLflow UI (Models), or pass a checkpoint path") from e
    return Path(out)
