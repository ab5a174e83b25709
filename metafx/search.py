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
their artifacts in their final checkpoint, from where the driver logs them.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from metafx.cluster import check_storage, init_ray, worker_facts
from metafx.config import REPO_ROOT, Config, ConfigError, dump_config
from metafx.records import (
    TAG_BUDGET,
    TAG_DATASET_HASH,
    TAG_DEVICE,
    TAG_GPU_IDS,
    TAG_HOSTNAME,
    TAG_MODEL,
    TAG_NODE,
    TAG_NODE_ID,
    TAG_RAY_TRIAL_ID,
    SearchSummary,
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

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    node = worker_facts()
    cfg = trial_config(study, config)
    trial_dir = Path(tune.get_context().get_trial_dir())
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
        meta_train(cfg, taskset, report, resume_from=resume, workdir=trial_dir / "work",
                   baselines=False, artifacts=True)
    except NonFiniteLossError as e:
        # Divergence is deterministic: retrying from a checkpoint would diverge again. End the
        # trial with its message (the MLflow run is marked FAILED) and let the search go on.
        tune.report({"step": cfg.maml.meta_steps + 1, cfg.search.metric: math.inf,
                     NONFINITE_KEY: str(e)[-2000:], **node})


# --------------------------------------------------------------------------- MLflow callback


_TRACKERS: dict[str, Any] = {}  # search name -> Tracker of this driver process
_REPORTED = ("support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss", "best_step", "params", "wall_seconds")


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
        self.tagged: dict[str, str] = {}

    @property
    def tracker(self):
        return _TRACKERS.get(self.search_name) or _NullTracker()

    def on_trial_start(self, iteration, trials, trial, **info):
        tcfg = trial_config(self.study, trial.config)
        params = {**tcfg.flat(), **{f"sampled.{k}": v for k, v in trial.config.items()}}
        self.tracker.trial_run(trial.trial_id, params=params, tags={
            TAG_MODEL: tcfg.model.arch, TAG_BUDGET: tcfg.budget, TAG_DATASET_HASH: self.dataset_hash,
            TAG_RAY_TRIAL_ID: trial.trial_id})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        step = int(result.get("step", result.get("training_iteration", 0)))
        nums = {k: float(v) for k, v in result.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and ("/" in k or k in _REPORTED)}
        self.tracker.log_metrics(trial.trial_id, nums, step=step)
        if "node_ip" in result and self.tagged.get(trial.trial_id) != result.get("node_id"):
            # The node changes when a retry lands on another node.
            self.tagged[trial.trial_id] = result.get("node_id")
            self.tracker.set_tags(trial.trial_id, {TAG_NODE: result["node_ip"],
                                                   TAG_NODE_ID: result.get("node_id", ""),
                                                   TAG_HOSTNAME: result.get("hostname", ""),
                                                   TAG_GPU_IDS: result.get("gpu_ids", ""),
                                                   TAG_DEVICE: result.get("device", "")})

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


def _trial_error(trial) -> str:
    try:
        path = trial.error_file
        if path and os.path.isfile(path):
            return Path(path).read_text()[-20000:]
    except Exception:  # noqa: BLE001 - error text is best effort; the status is what matters
        pass
    return str(getattr(trial, "error_msg", None) or "trial failed (see Ray logs)")


# --------------------------------------------------------------------------- driver


def run_search(
    cfg: Config,
    *,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    track: bool = True,
    verbose: int = 1,
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

    Returns:
        SearchSummary with the best configuration written as a study YAML.

    Raises:
        ConfigError: a bad search section, before Ray starts.
        KeyboardInterrupt: Ctrl-C or SIGTERM (``ray job stop``, a batch scheduler): the
            parent run and the running trials' runs are closed as KILLED first.
    """
    with _sigterm_interrupts():
        return _run_search(cfg, name=name, storage=storage, tracking_uri=tracking_uri, resume=resume,
                           num_samples=num_samples, track=track, verbose=verbose)


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


def _run_search(cfg: Config, *, name: str | None, storage: str | None, tracking_uri: str | None, resume: bool,
                num_samples: int | None, track: bool, verbose: int) -> SearchSummary:
    check_space(cfg)
    storage = storage or str(DEFAULT_STORAGE)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    name = name or (latest_search(storage, cfg) if resume else None) or \
        f"{cfg.name}-{cfg.budget}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    s = cfg.search

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    init_ray()
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
    if s.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) > 0:
        resources["gpu"] = s.gpus_per_trial
    trainable = tune.with_resources(trainable, resources)

    callbacks = []
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
                space=DefineByRun(s.params, cfg.to_dict()), metric=s.metric, mode=s.mode, sampler=sampler(s))
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
                                            num_samples=num_samples or s.num_samples,
                                            max_concurrent_trials=s.max_concurrent),
                run_config=run_config,
            )
        results = tuner.fit()
        target, ended = num_samples or s.num_samples, results.num_terminated + results.num_errors
        if len(results) < target or ended < len(results):
            # Tune handles SIGINT itself and returns early: the search was interrupted, not finished,
            # so it ends as on SIGTERM (parent and unfinished trials KILLED; --resume continues it).
            raise KeyboardInterrupt(f"search interrupted: {ended} of {target} trials finished")
        summary = _summarize(cfg, name, exp_path, results, parent)
        status = "FINISHED"
        if tracker:
            tracker.end_search("FINISHED", summary, _summary_files(cfg, summary, exp_path))
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker:
            tracker.close_dangling("KILLED" if status != "FAILED" else "FAILED")


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


def _completed(results) -> list:
    out = []
    for r in results:
        if r.error is None and r.metrics and "test/query_l1_post" in r.metrics:
            out.append(r)
    return out


def _local_dir(exp_path: str, name: str) -> Path:
    """Where the driver writes a search's summary files: the experiment folder, or ``ray_results/<name>``
    for remote storage."""
    return Path(exp_path) if "://" not in exp_path else REPO_ROOT / "ray_results" / name


def _summarize(cfg: Config, name: str, exp_path: str, results, parent: str | None) -> SearchSummary:
    """The trial table and the best trial of Tune's ``results``; the best config is written as a study YAML."""
    s = cfg.search
    table = []
    for r in results:
        m = r.metrics or {}
        row = {"trial": m.get("trial_id") or (Path(r.path).name.split("_")[2] if r.path else "?"),
               "status": "ERROR" if r.error or NONFINITE_KEY in m else
               ("done" if "test/query_l1_post" in m else "stopped"), "step": m.get("step")}
        row.update({k: v for k, v in (r.config or {}).items()})
        for k in (s.metric, "test/query_l1_post", "test/query_stft_post", "test/lsfir/query_l1_post"):
            if k in m:
                row[k] = m[k]
        table.append(row)
    done = _completed(results)
    best_cfg_path, best_ckpt, best_metrics = None, None, {}
    if done:
        sign = 1 if s.mode == "min" else -1
        best = min(done, key=lambda r: sign * r.metrics.get(s.metric, math.inf))
        best_metrics = {k: v for k, v in best.metrics.items() if isinstance(v, (int, float))}
        tcfg = trial_config(cfg, best.config)
        raw = tcfg.to_dict()
        raw.pop("search", None)
        out_dir = _local_dir(exp_path, name)
        out_dir.mkdir(parents=True, exist_ok=True)
        best_cfg_path = out_dir / "best_config.yaml"
        dump_config(raw, best_cfg_path, header=(
            f"# Best configuration of search {name!r} ({s.metric} = {best.metrics.get(s.metric):.5g}).\n"
            f"# Rerun: python launch/train.py --space {best_cfg_path}"))
        best_ckpt = best.checkpoint.path if best.checkpoint else None
    return SearchSummary(name, exp_path, best_cfg_path, best_ckpt, best_metrics, table, parent)


def _summary_files(cfg: Config, summary: SearchSummary, exp_path: str) -> list[Path]:
    """Optuna's history and importance plots for the parent MLflow run.

    The study is rebuilt from the trial table: the searcher's own study does not
    survive ``Tuner.restore``. (The tracker writes the trial table and best config itself.)
    """
    from metafx.plots import ArtifactError, optuna_plots, study_from_rows

    out = _local_dir(exp_path, summary.name)
    try:
        study = study_from_rows([r for r in summary.table if r["status"] != "ERROR"], cfg.search.metric,
                                cfg.search.mode, cfg.search.params)
        return optuna_plots(study, out / "plots")
    except ArtifactError as e:
        log.warning("Optuna plots skipped: %s", e)
        return []
