"""The search driver: Ray Tune schedules the trials Optuna samples, ASHA prunes them, MLflow records them.

This module holds the driver (:func:`run_search`, its interruption handling and its
summary), the trainable that runs one trial in a Ray worker, and the Tune callback
that bridges trials to MLflow. The Optuna space is :mod:`metafx.search_space`, Ray
start-up and node facts are :mod:`metafx.cluster`, the MLflow writes are
:mod:`metafx.tracking`.

Data flow: the driver renders (or reuses) the task set once into the
content-addressed cache, before any trial starts. On a multi-node cluster whose
nodes all see the cache directory (``METAFX_CACHE`` on shared storage) that render
is spread over the cluster, one Ray task per family x chunk of tasks
(:func:`metafx.data.distributed.render_on_ray`; ``METAFX_DISTRIBUTED_RENDER=auto|1|0``).
Every trial on a node opens the same files memory-mapped (read-only), so the node
holds one copy in its page cache however many trials run (see ``launch/bench.py
sharing``). A node without the cache (multi-node, no shared file system) renders
it once itself: the cache is atomic and keyed by content, so concurrent trials
agree on one copy.

Resources: a trial asks for ``search.cpus_per_trial`` CPUs and, on a cluster with
GPUs, ``search.gpus_per_trial`` GPUs (a fraction packs several trials on one GPU).
The trial records the accelerator ids Ray assigned it and the torch device it used
(MLflow tags ``metafx.gpu_ids``, ``metafx.device``); a trial without a GPU is pinned
to the CPU (:func:`metafx.cluster.pin_device`).

MLflow: one writer. A Tune callback in the driver records every trial
(:class:`metafx.tracking.Tracker`); trials never open the tracking store, they leave
their artifacts in their final checkpoint, from where the driver logs them. A trial's
run is named ``trial 3: lstm hidden=32 ...`` and gets only metafx's metrics.

The best trial has one definition (:func:`metafx.records.best_definition`): the trial that
finished (ran its test evaluation) with the lowest value of ``search.metric`` at any of
its validation reports, which is the checkpoint it was tested with; trials ASHA stopped
rank after every finished one. The trial table's order, the summary, ``best_config.yaml``,
the best checkpoint and the parent run's tags and ``best/`` metrics all use it
(:func:`_summarize`).

Output: metafx's own line per trial event (:class:`ProgressPrinter`); Ray's own output
(Tune's tables, its log lines, the workers' output, colour codes) only with
``verbose_ray`` (``launch/search.py --verbose-ray``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from metafx.cluster import check_storage, cluster_gpus, init_ray, worker_facts
from metafx.config import REPO_ROOT, Config, ConfigError, SearchConfig, dump_config
from metafx.records import (
    FAILED,
    FINISHED,
    STOPPED,
    TAG_BUDGET,
    TAG_DATASET_HASH,
    TAG_DEVICE,
    TAG_GPU_IDS,
    TAG_HOSTNAME,
    TAG_MODEL,
    TAG_MRSTFT_RESOLUTIONS,
    TAG_NODE,
    TAG_NODE_ID,
    TAG_RAY_TRIAL_ID,
    TAG_STFT_RESOLUTION,
    TAG_TRIAL_NUMBER,
    SearchSummary,
    best_definition,
    error_summary,
    failure_kinds,
    rank_rows,
    resolution_text,
    trial_run_name,
)
from metafx.search_space import DefineByRun, check_space, sampler, trial_config

log = logging.getLogger(__name__)

DEFAULT_STORAGE = REPO_ROOT / "ray_results"
NONFINITE_KEY = "error_nonfinite"  # result key of a trial ended by a non-finite loss


# --------------------------------------------------------------------------- trainable


def _trainable(config: dict[str, Any], study: Config) -> None:
    """Runs inside a Ray worker: one trial of meta-training, reporting to Tune.

    Args:
        config: the values Optuna sampled for this trial, under their dotted keys.
        study: the study config the search runs (budget applied).
    """
    import torch
    from ray import tune

    from metafx.data.tasks import load_taskset
    from metafx.engines import NonFiniteLossError
    from metafx.train import meta_train

    from metafx.metrics import mrstft_resolutions, stft_resolution

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    node = worker_facts()
    cfg = trial_config(study, config)
    # What the test STFT metrics of this trial are computed with (they fall back to smaller FFTs
    # on short slices): recorded beside them (MLflow tags, the trial table).
    node["stft_resolution"] = resolution_text([stft_resolution(cfg.maml.slice_len)])
    node["mrstft_resolutions"] = resolution_text(mrstft_resolutions(cfg.maml.slice_len))
    taskset = load_taskset(cfg.data, progress=False)
    ckpt = tune.get_checkpoint()
    resume = None
    if ckpt is not None:
        resume = Path(ckpt.to_directory()) / "checkpoint.pt"

    def report(metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        m = {**metrics, **node}
        if ckpt_dir is not None:
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        else:
            tune.report(m)

    try:
        # The checkpoints meta_train writes go to its own temporary folder, outside the trial directory: Tune syncs
        # that directory to the storage while the trial runs, and a checkpoint being written there
        # (checkpoint.tmp, renamed a moment later) failed the driver's sync with FileNotFoundError (seen in
        # `make run`). Tune copies every reported checkpoint into the storage itself (checkpoint_NNNNNN).
        meta_train(cfg, taskset, report, resume_from=resume, baselines=False, artifacts=True)
    except NonFiniteLossError as e:
        # Divergence is deterministic: retrying from a checkpoint would diverge again. End the
        # trial with its message (the MLflow run is marked FAILED) and let the search go on.
        tune.report({"step": cfg.maml.meta_steps + 1, cfg.search.metric: math.inf,
                     NONFINITE_KEY: f"{type(e).__name__}: {str(e)[-2000:]}", **node})


# --------------------------------------------------------------------------- MLflow callback


_TRACKERS: dict[str, Any] = {}  # search name -> Tracker of this driver process
#: The metrics a trial reports besides the ``val/`` and ``test/`` ones (:func:`metafx.train.meta_train`).
_REPORTED = ("support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss", "best_step", "params", "wall_seconds")
_TEST_COLUMNS = ("test/query_esr_post", "test/lsfir/query_esr_post", "test/arx/query_esr_post",
                 "test/identity/query_esr_post",
                 "test/query_l1_post", "test/query_l1_pre", "test/identity_l1", "test/lsfir/query_l1_post",
                 "test/query_stft_post", "test/lsfir/query_stft_post", "test/arx/query_stft_post",
                 "test/query_hf_post", "test/lsfir/query_hf_post")


def metafx_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metafx metrics of a Tune result: its numbers under ``val/``, ``test/`` and :data:`_REPORTED`.

    Ray's own keys (``time_since_restore``, ``pid``, ``timestamp``, ``training_iteration``, ...)
    and the node facts are left out: they are not results of the trial.

    Args:
        result: a Tune result dict (or a trial's last result).

    Returns:
        Key -> value, numbers only.
    """
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (k.startswith(("val/", "test/")) or k in _REPORTED)}


def _trial_number(trial) -> int | None:
    """Tune's counter of a trial (the ``3`` of ``_trainable_<id>_3_...``), from its experiment tag."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _trial_label(study: Config, number: int | None, sampled: dict[str, Any]) -> str:
    """A trial's readable name (:func:`metafx.records.trial_run_name`) from its sampled values."""
    try:
        tcfg = trial_config(study, sampled)
        arch, method = tcfg.model.arch, tcfg.maml.method
    except ConfigError:
        arch, method = study.model.arch, study.maml.method
    return trial_run_name(number, sampled, arch, method)


def _callback_base():
    from ray.tune import Callback

    return Callback


class _NullTracker:
    """Stands in when a search runs with tracking off."""

    def __getattr__(self, name):
        return lambda *a, **k: None


class MLflowTracking(_callback_base()):
    """Records each trial as a nested MLflow run, from the driver (the single writer).

    Tune pickles its callbacks into the experiment state; the Tracker (a live store
    connection) is not pickled but looked up by search name, so a restored search
    reattaches to the tracker of the resuming driver.

    A trial's run is named by :func:`metafx.records.trial_run_name` (``trial 3: lstm hidden=32
    ...``); it gets only the metafx metrics of each report (:func:`metafx_metrics`), and the
    STFT resolution its test metrics use as tags.

    Args:
        search_name: the search's name (the key of its Tracker in this driver).
        study: the study config (budget applied); a trial's config is rebuilt from it.
        dataset_hash: the task set's content hash (tag of every trial run).
    """

    def __init__(self, search_name: str, study: Config, dataset_hash: str) -> None:
        self.search_name = search_name
        self.study = study
        self.dataset_hash = dataset_hash
        self.last: dict[str, dict] = {}
        self.tagged: dict[str, tuple] = {}

    @property
    def tracker(self):
        return _TRACKERS.get(self.search_name) or _NullTracker()

    def on_trial_start(self, iteration, trials, trial, **info):
        tcfg = trial_config(self.study, trial.config)
        params = {**tcfg.flat(), **{f"sampled.{k}": v for k, v in trial.config.items()}}
        number = _trial_number(trial)
        self.tracker.trial_run(trial.trial_id, params=params, tags={
            TAG_MODEL: tcfg.model.arch, TAG_BUDGET: tcfg.budget, TAG_DATASET_HASH: self.dataset_hash,
            TAG_RAY_TRIAL_ID: trial.trial_id, TAG_TRIAL_NUMBER: "" if number is None else number},
            run_name=trial_run_name(number, trial.config, tcfg.model.arch, tcfg.maml.method))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        step = int(result.get("step", result.get("training_iteration", 0)))
        self.tracker.log_metrics(trial.trial_id, metafx_metrics(result), step=step)
        facts = (result.get("node_id"), result.get("stft_resolution"))
        if "node_ip" in result and self.tagged.get(trial.trial_id) != facts:
            # The node changes when a retry lands on another node.
            self.tagged[trial.trial_id] = facts
            self.tracker.set_tags(trial.trial_id, {TAG_NODE: result["node_ip"],
                                                   TAG_NODE_ID: result.get("node_id", ""),
                                                   TAG_HOSTNAME: result.get("hostname", ""),
                                                   TAG_GPU_IDS: result.get("gpu_ids", ""),
                                                   TAG_DEVICE: result.get("device", ""),
                                                   TAG_STFT_RESOLUTION: result.get("stft_resolution", ""),
                                                   TAG_MRSTFT_RESOLUTIONS: result.get("mrstft_resolutions", "")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        if NONFINITE_KEY in last:
            self.tracker.end_trial(trial.trial_id, "FAILED", error=str(last[NONFINITE_KEY]))
            return
        finished = "test/query_l1_post" in last  # else ASHA stopped it before the final evaluation
        if finished and trial.checkpoint is not None:
            # as_directory: a local folder even when the storage is s3:// or another remote store.
            with trial.checkpoint.as_directory() as d:
                path = Path(d)
                if (path / "artifacts").is_dir():
                    self.tracker.log_artifacts(trial.trial_id, path / "artifacts")
                for f in ("best.pt", "checkpoint.pt"):
                    if (path / f).is_file():
                        self.tracker.log_artifacts(trial.trial_id, path / f, "checkpoint")
        self.tracker.end_trial(trial.trial_id, "FINISHED", stopped_early=not finished)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.end_trial(trial.trial_id, "FAILED", error=_trial_error(trial))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["last"], state["tagged"] = {}, {}
        return state


class ProgressPrinter(_callback_base()):
    """metafx's own progress lines, in place of Ray Tune's status tables (``--verbose-ray`` shows those).

    One line when a trial starts, one when it ends (finished with its best value and test
    MAE, stopped by ASHA, or failed with its error's last line), and one when Ray restarts a
    trial after a failure (a lost worker, a killed node) from its last checkpoint.

    Args:
        study: the study config (budget applied).
        stream: where to print; None = ``sys.stdout`` at print time.
    """

    def __init__(self, study: Config, stream=None) -> None:
        self.study = study
        self.metric, self.mode = study.search.metric, study.search.mode
        self.max_failures = study.search.max_failures
        self.stream = stream
        self.best: dict[str, tuple[float, int]] = {}
        self.retries: dict[str, int] = {}

    def _print(self, trial, text: str) -> None:
        label = _trial_label(self.study, _trial_number(trial), dict(trial.config))
        print(f"{time.strftime('%H:%M:%S')} {label}: {text}", file=self.stream or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._print(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            old = self.best.get(trial.trial_id)
            if old is None or (v < old[0] if self.mode == "min" else v > old[0]):
                self.best[trial.trial_id] = (float(v), int(result.get("step", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        best = self.best.get(trial.trial_id)
        best_txt = f"best {self.metric} {best[0]:.4g} at step {best[1]}" if best else f"no {self.metric} reported"
        if NONFINITE_KEY in last:
            self._print(trial, f"failed: {error_summary(str(last[NONFINITE_KEY]))}")
        elif "test/query_l1_post" in last:
            self._print(trial, f"finished, {best_txt}; test MAE {last['test/query_l1_post']:.4g} (LS-FIR "
                               f"{last.get('test/lsfir/query_l1_post', math.nan):.4g})")
        else:
            self._print(trial, f"stopped by ASHA at step {last.get('step', '?')}, {best_txt}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trial, f"failed: {error_summary(_trial_error(trial))}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        n = self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        self._print(trial, f"Ray lost it ({error_summary(_trial_error(trial))}); restarting it from its last "
                           f"checkpoint (retry {n} of {self.max_failures})")


def _trial_error(trial) -> str:
    try:
        path = trial.error_file
        if path and os.path.isfile(path):
            return Path(path).read_text()[-20000:]
    except Exception:  # noqa: BLE001 - error text is best effort; the status is what matters
        pass
    return str(getattr(trial, "error_msg", None) or "trial failed (see Ray logs)")


# --------------------------------------------------------------------------- driver


def first_points(s: SearchConfig) -> list[dict[str, Any]] | None:
    """The trials of ``search.first`` that will run, as Optuna's enqueued points (None: none).

    Only ``search.num_samples`` trials run in all, so a longer ``search.first`` (a quick
    ``--set search.num_samples=2`` on a study that names four) runs its first ``num_samples``
    entries. That is allowed, with a warning that names the ones left out.

    Args:
        s: the study's search section.

    Returns:
        One ``{searched key: value}`` mapping per enqueued trial, in file order, or None.
    """
    points = [dict(point) for point in s.first]
    if len(points) > s.num_samples:
        log.warning("search.first lists %d trials but search.num_samples = %d: only the first %d run (%s left out); "
                    "raise search.num_samples to run them all", len(points), s.num_samples, s.num_samples,
                    ", ".join(str(p) for p in points[s.num_samples:]))
        points = points[: s.num_samples]
    return points or None


def run_search(
    cfg: Config,
    *,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    track: bool = True,
    verbose: int | None = None,
    verbose_ray: bool = False,
    progress: bool = True,
) -> SearchSummary:
    """Run (or resume) the search described by ``cfg.search``.

    Args:
        cfg: the study config (budget applied).
        name: search name (Tune experiment and MLflow parent run); default ``<study>-<budget>``.
        storage: Tune storage path or URI; default ``ray_results/`` in the repo.
        tracking_uri: MLflow tracking URI; default the SQLite store in ``mlruns/``.
        resume: continue the interrupted search of this name.
        num_samples: override ``search.num_samples``.
        track: record to MLflow.
        verbose: Ray Tune's verbosity (0 silent, 1 status tables, 2 every result); default 1 with
            ``verbose_ray``, else 0.
        verbose_ray: show what Ray prints itself: Tune's status tables and log lines, the trial
            workers' output, ANSI colours. Off: only metafx's progress lines
            (:class:`ProgressPrinter`), warnings and errors.
        progress: print metafx's progress lines.

    Returns:
        SearchSummary with the best configuration written as a study YAML.

    Raises:
        ConfigError: a bad search section, before Ray starts.
        KeyboardInterrupt: Ctrl-C or SIGTERM (``ray job stop``, a batch scheduler): the
            parent run and the running trials' runs are closed as KILLED first.
    """
    with _sigterm_interrupts():
        with _ray_output(verbose_ray):
            return _run_search(cfg, name=name, storage=storage, tracking_uri=tracking_uri, resume=resume,
                               num_samples=num_samples, track=track,
                               verbose=(1 if verbose_ray else 0) if verbose is None else verbose,
                               verbose_ray=verbose_ray, progress=progress)


class _sigterm_interrupts:
    """While a search runs in the main thread: SIGTERM raises KeyboardInterrupt, as Ctrl-C does.

    ``ray job stop`` sends SIGTERM to the driver (SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S``).
    Unhandled, SIGTERM ends the process at once (runs stay RUNNING), or Ray's failure handler
    (installed by ``ray.init``) takes it and the runs end FAILED. A handler the caller installed
    (``launch/search.py`` has one) is kept; otherwise this one is installed for the search's
    duration and the previous one restored after.
    """

    def __enter__(self):
        import signal
        import threading

        self.prev = None
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if not callable(prev):
                self.prev = prev
                signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        import signal

        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


#: Ray's driver-side loggers whose lines are Ray's view of the search, not metafx's: Tune's
#: experiment-state warnings, its "Trial task failed" tracebacks (a trial Ray retries, and
#: that then finishes, read as a crash), the searcher's notes. metafx prints its own line per
#: failure and retry (:class:`ProgressPrinter`), and the error text goes to MLflow.
_RAY_LOGGERS = {"ray.tune": logging.ERROR, "ray.tune.execution.tune_controller": logging.CRITICAL,
                "ray.train": logging.ERROR, "ray.air": logging.ERROR}


@contextmanager
def _ray_output(verbose_ray: bool) -> Iterator[None]:
    """Keep Ray's own output out of a search's, unless ``verbose_ray``.

    Quiet: Ray's driver loggers at ERROR (:data:`_RAY_LOGGERS`), Optuna's at WARNING, no
    ANSI colour in the worker-log prefixes (``RAY_COLOR_PREFIX=0``), Tune's legacy output
    engine (``RAY_AIR_NEW_OUTPUT=0``: at ``verbose=0`` it prints nothing, where the new one
    still prints its experiment table and a TensorBoard hint). Tune's status tables and the
    workers' output are switched off by :func:`_run_search` (``verbose=0``,
    ``log_to_driver=False``). Levels and variables are restored after.
    """
    if verbose_ray:
        yield
        return
    from metafx.search_space import quiet_optuna

    saved = {name: logging.getLogger(name).level for name in _RAY_LOGGERS}
    # Tune's new output engine prints its experiment table and a TensorBoard hint at any
    # verbosity; the legacy engine at verbose=0 prints nothing.
    env = {"RAY_COLOR_PREFIX": "0", "RAY_AIR_NEW_OUTPUT": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    for name, level in _RAY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.update(env)
    try:
        with quiet_optuna():
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_search(cfg: Config, *, name: str | None, storage: str | None, tracking_uri: str | None, resume: bool,
                num_samples: int | None, track: bool, verbose: int, verbose_ray: bool,
                progress: bool) -> SearchSummary:
    check_space(cfg)
    storage = storage or str(DEFAULT_STORAGE)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    name = name or (latest_search(storage, cfg) if resume else None) or \
        f"{cfg.name}-{cfg.budget}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    s = cfg.search

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    init_ray(log_to_driver=verbose_ray)
    check_storage(storage)  # refuse a bad --storage before a long render
    # The task set is rendered (or reused) once, here, before any trial starts.
    taskset = _driver_taskset(cfg)
    manifest = dict(taskset.manifest)

    tracker = None
    parent = None
    if track:
        from metafx.tracking import Tracker

        tracker = Tracker(tracking_uri, experiment=cfg.name)
        parent = tracker.start_search(cfg, name, manifest, resume=resume)

    trainable = tune.with_parameters(_trainable, study=cfg)
    resources = {"cpu": s.cpus_per_trial}
    if s.gpus_per_trial > 0 and cluster_gpus() > 0:
        resources["gpu"] = s.gpus_per_trial
    trainable = tune.with_resources(trainable, resources)

    callbacks = [ProgressPrinter(cfg)] if progress else []
    if tracker:
        _TRACKERS[name] = tracker
        callbacks.append(MLflowTracking(name, cfg, taskset.hash))
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=verbose,
    )
    status = "FAILED"
    try:
        if resume:
            if not tune.Tuner.can_restore(exp_path):
                raise ConfigError(f"--resume: no search named {name!r} to resume under {storage} "
                                  "(check --name and --storage)")
            # Finished trials stay finished; unfinished ones continue from their checkpoints; the
            # searcher's state (Optuna study) comes back from the experiment state.
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False)
        else:
            searcher = OptunaSearch(
                space=DefineByRun(s.params, cfg.to_dict()), metric=s.metric, mode=s.mode, sampler=sampler(s),
                points_to_evaluate=first_points(s))  # enqueued: run before any sampling
            searcher = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
            if s.scheduler == "asha":
                # max_t one past the last meta-step: ASHA stops a trial that reaches max_t, and the
                # final report (test metrics, artifacts) comes after the last meta-step's report.
                scheduler = ASHAScheduler(time_attr="step", max_t=cfg.maml.meta_steps + 1, grace_period=s.grace_period,
                                          reduction_factor=s.reduction_factor)
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                            num_samples=num_samples or s.num_samples),
                run_config=run_config,
            )
        results = tuner.fit()
        target, ended = num_samples or s.num_samples, results.num_terminated + results.num_errors
        if len(results) < target or ended < len(results):
            # Tune handles SIGINT itself and returns early: the search was interrupted, not finished,
            # so it ends as on SIGTERM (parent and unfinished trials KILLED; --resume continues it).
            raise KeyboardInterrupt(f"search interrupted: {ended} of {target} trials finished")
        summary = _summarize(cfg, name, exp_path, results, parent)
        if tracker:
            summary = dataclasses.replace(summary, view_path=tracker.view_path(),
                                          model_uri=_register_best(cfg, summary, manifest, tracker.tracking_uri))
        # A search none of whose trials finished its evaluation has no result: its run FAILED.
        status = "FINISHED" if summary.best_trial is not None else "FAILED"
        if tracker:
            tracker.end_search(status, summary, _summary_files(cfg, summary, exp_path))
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker:
            tracker.close_dangling("KILLED" if status != "FAILED" else "FAILED")


def _register_best(cfg: Config, summary: SearchSummary, manifest: dict, tracking_uri: str) -> str | None:
    """Register the best trial's meta-model in the MLflow Model Registry under the study's name.

    The version holds the trial's ``best.pt`` (the checkpoint the search tested), its
    configuration (``best_config.yaml``) and the dataset manifest, in the search's parent run
    (artifacts ``meta_model/``); ``launch/capture.py --model models:/<study>/<version>`` loads it.
    A failure here does not undo a finished search: it is logged as a warning naming the
    checkpoint (which ``--model`` also takes as a path) and the search's result stands.

    Args:
        cfg: the study (its name is the registered model's name).
        summary: the search's summary (best checkpoint, config, trial, metric).
        manifest: the task set's manifest.
        tracking_uri: the search's MLflow store (tracking and registry).

    Returns:
        ``models:/<study>/<version>``, or None (no finished trial, or the registration failed).
    """
    if summary.best_checkpoint is None or summary.best_config_path is None:
        return None
    from ray.train import Checkpoint

    from metafx.tracking import TrackingError, register_meta_model

    try:
        with Checkpoint(summary.best_checkpoint).as_directory() as d, \
                tempfile.TemporaryDirectory(prefix="metafx-register-") as tmp:
            ckpt = Path(d) / "best.pt"
            if not ckpt.is_file():
                ckpt = Path(d) / "checkpoint.pt"
            man = Path(tmp) / "manifest.json"
            man.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), encoding="utf-8")
            version = register_meta_model(
                tracking_uri, cfg.name, ckpt, files=[summary.best_config_path, man], run_id=summary.parent_run_id,
                tags={"metafx.search_name": summary.name, "metafx.trial": summary.best_trial or "",
                      "metafx.metric": summary.metric, "metafx.value": summary.best_value,
                      "metafx.dataset_hash": manifest.get("hash", "")},
                description=f"best trial {summary.best_trial} of search {summary.name}: {summary.metric} = "
                            f"{summary.best_value:.5g} ({summary.definition})")
    except (TrackingError, OSError, ValueError) as e:
        log.warning("the best meta-model was not registered in the MLflow Model Registry (%s); pass its checkpoint "
                    "%s to launch/capture.py --model instead", e, summary.best_checkpoint)
        return None
    return f"models:/{cfg.name}/{version}"


def _driver_taskset(cfg: Config):
    """The driver's task set: reused from the cache, rendered over the cluster, or rendered here.

    Distributed when :func:`metafx.data.distributed.should_distribute` says so (several
    nodes that all see ``data.cache_dir``, or ``METAFX_DISTRIBUTED_RENDER=1``).
    """
    from metafx.data.distributed import render_on_ray, should_distribute
    from metafx.data.tasks import TaskSet, load_taskset

    try:
        spread, why = should_distribute(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if spread:
        log.info("rendering the task set over the Ray cluster (%s)", why)
        return TaskSet(render_on_ray(cfg))
    if why != "the task set is in the cache already":
        log.info("rendering the task set on the driver (%s)", why)
    return load_taskset(cfg.data)


def latest_search(storage: str, cfg: Config) -> str | None:
    """The most recent search of this study and budget under a local ``storage`` (for ``--resume``).

    Args:
        storage: the Tune storage path (a URI has no listing here).
        cfg: the study config (its name and budget start the search names).

    Returns:
        The name of the newest ``<study>-<budget>-*`` folder, or None (none, or remote storage).
    """
    if "://" in storage or not Path(storage).is_dir():
        return None
    cands = [p for p in Path(storage).glob(f"{cfg.name}-{cfg.budget}-*") if p.is_dir()]
    return max(cands, key=lambda p: p.stat().st_mtime).name if cands else None


def _local_dir(exp_path: str, name: str) -> Path:
    """Where the driver writes a search's summary files: the experiment folder, or ``ray_results/<name>``
    for remote storage."""
    return Path(exp_path) if "://" not in exp_path else REPO_ROOT / "ray_results" / name


_TRIAL_DIR = re.compile(r"_([0-9a-f]{5,})_(\d+)_")  # <trainable>_<trial id>_<number>_<params>...


def _best_of(r, metric: str, mode: str) -> tuple[float | None, int | None]:
    """A trial's best value of ``metric`` over all its reports, and the step of that report.

    From the trial's whole result history (Tune's ``progress.csv``); the last result when the
    history is not readable.
    """
    df = getattr(r, "metrics_dataframe", None)
    if df is not None and metric in getattr(df, "columns", ()):
        import numpy as np

        vals = np.asarray(df[metric], dtype=float)
        ok = np.isfinite(vals)
        if ok.any():
            i = int(np.nanargmin(np.where(ok, vals, np.inf)) if mode == "min" else
                    np.nanargmax(np.where(ok, vals, -np.inf)))
            step = df["step"].iloc[i] if "step" in df.columns else None
            return float(vals[i]), (int(step) if step is not None and step == step else None)
    v = (r.metrics or {}).get(metric)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v), (r.metrics or {}).get("step")
    return None, None


def _summarize(cfg: Config, name: str, exp_path: str, results, parent: str | None) -> SearchSummary:
    """The trial table, ranked by :func:`metafx.records.best_definition`, and the best trial.

    The best configuration is written as a study YAML; failures are grouped by kind.
    """
    s = cfg.search
    col = f"best {s.metric}"
    rows, errors = [], []
    for r in results:
        m = r.metrics or {}
        found = _TRIAL_DIR.search(Path(r.path).name) if r.path else None
        tid = m.get("trial_id") or (found.group(1) if found else "?")
        number = int(found.group(2)) if found else None
        sampled = dict(r.config or {})
        label = _trial_label(cfg, number, sampled)
        if r.error is not None or NONFINITE_KEY in m:
            status = FAILED
            errors.append((label, str(m[NONFINITE_KEY]) if NONFINITE_KEY in m else _result_error(r)))
        else:
            status = FINISHED if "test/query_l1_post" in m else STOPPED
        value, step = (None, None) if status == FAILED else _best_of(r, s.metric, s.mode)
        row = {"trial": number, "name": label, "status": status, "step": m.get("step"), col: value,
               "best step": step}
        row.update({k: m[k] for k in _TEST_COLUMNS if k in m})
        if m.get("stft_resolution"):
            row["stft"] = m["stft_resolution"]
        row.update(sampled)
        row["trial_id"] = tid
        rows.append((row, r))
    ranked = rank_rows([row for row, _ in rows], s.metric, s.mode)
    by_id = {row["trial_id"]: r for row, r in rows}
    definition = best_definition(s.metric, s.mode)
    best_row = next((row for row in ranked if row["status"] == FINISHED and row.get(col) is not None), None)
    best_cfg_path, best_ckpt, best_metrics = None, None, {}
    if best_row is not None:
        best = by_id[best_row["trial_id"]]
        best_metrics = {**metafx_metrics(best.metrics), s.metric: best_row[col]}
        tcfg = trial_config(cfg, best.config)
        raw = tcfg.to_dict()
        raw.pop("search", None)
        out_dir = _local_dir(exp_path, name)
        out_dir.mkdir(parents=True, exist_ok=True)
        best_cfg_path = out_dir / "best_config.yaml"
        dump_config(raw, best_cfg_path, header=(
            f"# Best configuration of search {name!r}: {best_row['name']}, {s.metric} = {best_row[col]:.5g}\n"
            f"# ({definition}).\n"
            f"# Rerun: python launch/train.py --space {best_cfg_path}"))
        best_ckpt = best.checkpoint.path if best.checkpoint else None
    return SearchSummary(name, exp_path, best_cfg_path, best_ckpt, best_metrics, ranked, parent,
                         metric=s.metric, best_trial=best_row["name"] if best_row else None,
                         best_value=best_row[col] if best_row else None, definition=definition,
                         failures=failure_kinds(errors))


def _result_error(r) -> str:
    """The error text of a failed trial's Tune result (its exception, or Ray's error file)."""
    err = r.error
    text = str(err) if err is not None else ""
    return text or "trial failed (see Ray logs)"


def _summary_files(cfg: Config, summary: SearchSummary, exp_path: str) -> list[Path]:
    """Optuna's history and importance plots for the parent MLflow run.

    The study is rebuilt from the trial table: the searcher's own study does not
    survive ``Tuner.restore``. (The tracker writes the trial table and best config itself.)
    """
    from metafx.plots import optuna_plots
    from metafx.search_space import study_from_rows

    out = _local_dir(exp_path, summary.name)
    try:
        study = study_from_rows([r for r in summary.table if r["status"] != FAILED], f"best {cfg.search.metric}",
                                cfg.search.mode, cfg.search.params)
        return optuna_plots(study, out / "plots")
    except ValueError as e:  # no finite metric in any row (study_from_rows), or a malformed plot (ArtifactError)
        log.warning("Optuna plots skipped: %s", e)
        return []
