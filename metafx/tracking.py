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
    EXPERIMENT_KIND,
    TAG_ASHA_STOPPED,
    TAG_CLOSED_BY,
    TAG_ERROR,
    TAG_NOTE,
    TAG_PARENT,
    TAG_RAY_TRIAL_ID,
    TAG_ROLE,
    TAG_SEARCH_NAME,
    TAG_TRIAL_ID,
    SearchSummary,
    artifact_location_for,
    check_status,
    default_tracking_uri,
    error_summary,
    search_tags,
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
            with tempfile.TemporaryDirectory(prefix="metafx-track-") as tmp:
                write_inputs(cfg, search_name, manifest, Path(tmp))
                self._retry(self._client.log_artifacts, run_id, tmp)
            return run_id

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
                    md = write_summary(summary, d)
                    if md is not None:
                        note = f"## Search {self.search_name}: {len(summary.table)} trials\n\n{md}"
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
