"""Distributed hyperparameter search: Ray Tune schedules trials, Optuna samples, ASHA prunes.

The only module importing optuna; ray is imported here and, for the distributed
render, in :mod:`metafx.data.distributed` (DESIGN.md style rule 1, with one
deliberate exception).

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
to the CPU (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for zero-GPU tasks).

MLflow: one writer. A Tune callback in the driver records every trial
(:class:`metafx.tracking.Tracker`); trials never open the tracking store, they leave
their artifacts in their final checkpoint, from where the driver logs them.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from metafx.config import REPO_ROOT, Config, ConfigError, SearchParam, config_from_dict, dump_config, get_dotted

log = logging.getLogger(__name__)

DEFAULT_STORAGE = REPO_ROOT / "ray_results"
NONFINITE_KEY = "error_nonfinite"  # result key of a trial ended by a non-finite loss


# --------------------------------------------------------------------------- search space


def _active(p: SearchParam, values: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """A conditional parameter exists only when every ``when`` key takes an allowed value."""
    for key, allowed in p.when:
        v = values[key] if key in values else get_dotted(base, key)
        if v not in allowed:
            return False
    return True


class DefineByRun:
    """Optuna define-by-run space from the study's ``search.params`` (no computation inside).

    Parameters are suggested in file order; one with ``when: {model.arch: lstm}`` is
    suggested only in trials whose (sampled or fixed) ``model.arch`` is ``lstm``.
    """

    def __init__(self, params: tuple[SearchParam, ...], base: Mapping[str, Any]):
        self.params = params
        self.base = dict(base)

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for p in self.params:
            if not _active(p, values, self.base):
                continue
            if p.dist == "categorical":
                values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
            elif p.dist == "int":
                values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1))
            else:
                values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)
        return None


def check_space(cfg: Config) -> None:
    """Search-section checks that need the whole config; raises ConfigError before Ray starts."""
    s = cfg.search
    if not s.params:
        raise ConfigError(f"{cfg.source_file}: search.params is empty: give at least one parameter to search")
    searched = {p.key for p in s.params}
    arch_param = next((p for p in s.params if p.key == "model.arch"), None)
    arch_choices = set(arch_param.choices) if arch_param else {cfg.model.arch}
    if arch_param is not None and arch_param.when:  # conditional: the file's default arch applies otherwise
        arch_choices.add(cfg.model.arch)
    for p in s.params:
        parts = p.key.split(".")
        if parts[0] == "model" and len(parts) > 2 and parts[1] in ("lstm", "tcn", "transformer", "arx", "ssm"):
            conds = dict(p.when).get("model.arch")
            possible = set(conds) & arch_choices if conds else arch_choices
            if parts[1] not in possible:
                raise ConfigError(
                    f"{cfg.source_file}: search.params.{p.key}: the model never has this parameter here "
                    f"(model.arch is {sorted(arch_choices)}{' with when ' + str(sorted(conds)) if conds else ''}); "
                    f"remove it, or add `when: {{model.arch: {parts[1]}}}` with {parts[1]} among model.arch choices")
        for key, _ in p.when:
            if key not in searched and get_dotted(cfg.to_dict(), key) is None:
                raise ConfigError(f"{cfg.source_file}: search.params.{p.key}.when: {key!r} is neither searched nor set")
    if s.metric.split("/")[-1] not in ("query_l1_post", "query_l1_pre", "support_l1_post", "support_l1_pre") \
            and not s.metric.startswith("val/"):
        raise ConfigError(f"{cfg.source_file}: search.metric = {s.metric!r}: allowed are the reported training "
                          "metrics, e.g. val/query_l1_post, query_l1_post")


def trial_config(cfg: Config, sampled: Mapping[str, Any]) -> Config:
    """The full configuration of one trial: the study's resolved config plus sampled values."""
    over = {k: v for k, v in sampled.items() if "." in k}
    return config_from_dict(cfg.to_dict(), cfg.source_file, overrides=over)


# --------------------------------------------------------------------------- trainable


def _trainable(config: dict[str, Any], base: dict[str, Any], source: str) -> None:
    """Runs inside a Ray worker: one trial of meta-training, reporting to Tune."""
    import torch
    from ray import tune

    from metafx.data.tasks import load_taskset
    from metafx.maml import NonFiniteLossError
    from metafx.train import meta_train

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    accel = _accelerators()
    device = _pin_device(accel)
    cfg = config_from_dict(base, Path(source), overrides={k: v for k, v in config.items() if "." in k})
    trial_dir = Path(tune.get_context().get_trial_dir())
    taskset = load_taskset(cfg.data, progress=False)
    ckpt = tune.get_checkpoint()
    resume = None
    if ckpt is not None:
        resume = Path(ckpt.to_directory()) / "checkpoint.pt"
    node = {"node_ip": _node_ip(), "node_id": _node_id(), "hostname": socket.gethostname(),
            "gpu_ids": ",".join(accel.get("GPU", [])), "device": device}

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


def _accelerators() -> dict[str, list[str]]:
    """The accelerator ids Ray assigned to this worker, e.g. ``{"GPU": ["0"]}`` (logical ids)."""
    import ray

    return {k: [str(i) for i in v] for k, v in ray.get_runtime_context().get_accelerator_ids().items()}


def _pin_device(accel: Mapping[str, list[str]]) -> str:
    """The torch device this trial uses, after pinning a trial without a GPU to the CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned (so ``cuda`` is the trial's
    own GPU, shared with other trials when ``gpus_per_trial`` < 1) but leaves it untouched
    for a trial that asked for none: such a trial would see every GPU of its node and
    :func:`metafx.train.pick_device` would take one it did not reserve. So it gets
    ``METAFX_DEVICE=cpu`` unless the user set ``METAFX_DEVICE``. A trial assigned a GPU
    on a node where CUDA is not usable (no driver, a CPU build of torch, or a logical GPU
    as in the tests) runs on the CPU: ``pick_device`` checks ``torch.cuda.is_available()``.
    """
    from metafx.train import pick_device

    if not accel.get("GPU") and not os.environ.get("METAFX_DEVICE"):
        os.environ["METAFX_DEVICE"] = "cpu"
    return str(pick_device())


def _node_id() -> str:
    """Ray's node id: distinguishes two nodes on one host (the loopback cluster test)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker the hostname is enough
        return socket.gethostname()


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
    """

    def __init__(self, search_name: str, cfg_raw: dict[str, Any], source: str, dataset_hash: str) -> None:
        self.search_name = search_name
        self.cfg_raw = cfg_raw
        self.source = source
        self.dataset_hash = dataset_hash
        self.last: dict[str, dict] = {}
        self.tagged: dict[str, str] = {}

    @property
    def tracker(self):
        return _TRACKERS.get(self.search_name) or _NullTracker()

    def _cfg(self, sampled: Mapping[str, Any]) -> Config:
        return config_from_dict(self.cfg_raw, Path(self.source), overrides={k: v for k, v in sampled.items() if "." in k})

    def on_trial_start(self, iteration, trials, trial, **info):
        tcfg = self._cfg(trial.config)
        params = {**tcfg.flat(), **{f"sampled.{k}": v for k, v in trial.config.items()}}
        from metafx import tracking as T

        self.tracker.trial_run(trial.trial_id, params=params, tags={
            T.TAG_MODEL: tcfg.model.arch, T.TAG_BUDGET: tcfg.budget, T.TAG_DATASET_HASH: self.dataset_hash,
            T.TAG_RAY_TRIAL_ID: trial.trial_id})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        step = int(result.get("step", result.get("training_iteration", 0)))
        nums = {k: float(v) for k, v in result.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and ("/" in k or k in _REPORTED)}
        self.tracker.log_metrics(trial.trial_id, nums, step=step)
        if "node_ip" in result and self.tagged.get(trial.trial_id) != result.get("node_id"):
            from metafx import tracking as T  # the node changes when a retry lands on another node

            self.tagged[trial.trial_id] = result.get("node_id")
            self.tracker.set_tags(trial.trial_id, {T.TAG_NODE: result["node_ip"], "metafx.node_id": result.get("node_id", ""),
                                                   "metafx.hostname": result.get("hostname", ""),
                                                   "metafx.gpu_ids": result.get("gpu_ids", ""),
                                                   "metafx.device": result.get("device", "")})

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
                        self.tracker.log_artifact(trial.trial_id, path / f, "checkpoint")
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


@dataclass
class SearchOutcome:
    name: str
    experiment_path: str
    best_config_path: Path | None
    best_checkpoint: str | None
    best_metrics: dict[str, float]
    table: list[dict[str, Any]]
    parent_run_id: str | None


def _init_ray(num_cpus: int | None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    Keeps this process's Python SIGTERM handler: ``ray.init`` installs Ray's C++ failure
    signal handler for SIGTERM in the driver ("*** SIGTERM received ***"), which replaces a
    handler set before (``launch/search.py`` turns SIGTERM into KeyboardInterrupt, so that
    ``ray job stop`` closes the MLflow runs as KILLED). Measured without this: a ``--ray``
    render aborted (SIGABRT), and a search under ``ray job stop`` failed and closed its runs
    as FAILED. The handler is installed again right after ``ray.init``.
    """
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    saved = signal.getsignal(signal.SIGTERM)
    try:
        _start_or_join_ray(num_cpus, num_gpus)
    finally:
        if callable(saved) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, saved)


def _start_or_join_ray(num_cpus: int | None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    Local (no ``RAY_ADDRESS``): a single node whose every server listens on 127.0.0.1 only,
    no dashboard, usage stats off, and Ray's token authentication on as Ray 2.59+ ships it
    for ``ray.init()`` (a token is generated into ``~/.ray/auth_token`` if none exists).
    On Linux Ray rewrites ``127.0.0.1`` to the host's routable address and then binds its
    gRPC servers (GCS, raylet, workers) to 0.0.0.0; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    set while the node starts (its processes inherit it), keeps the loopback address. It
    is only set for a node this function starts: no other node can join it.

    Cluster (``RAY_ADDRESS=host:port``): a driver launched by ``ray job submit`` inherits
    ``RAY_AUTH_MODE`` and the token location from the cluster. A driver started by hand
    must set ``RAY_AUTH_MODE=token`` itself: ``ray.init(address=...)`` never switches
    token mode on by its own, and the GCS then rejects the connection.

    Raises:
        ConfigError: the cluster at ``RAY_ADDRESS`` cannot be reached or refused us, with the fix.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:
            mode = os.environ.get("RAY_AUTH_MODE")
            hint = ("RAY_AUTH_MODE is not 'token' here: a Ray 2.59+ cluster with token authentication rejects "
                    "this driver. Set RAY_AUTH_MODE=token and provide the cluster's token in ~/.ray/auth_token, "
                    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN (on the head: `ray get-auth-token`); or submit with "
                    "`ray job submit`, whose drivers inherit it" if (mode or "").lower() != "token" else
                    "check that the token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN) is the "
                    "cluster's (`ray get-auth-token` on the head) and that the GCS port is reachable")
            raise ConfigError(f"cannot join the Ray cluster at RAY_ADDRESS={address!r} ({e}); {hint}") from e
        return

    from ray._private import ray_constants

    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by the GCS, raylet and workers
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable at import
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level=logging.WARNING)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def _check_storage(storage: str) -> None:
    """Refuse trial storage that not every node of the cluster sees (before any trial starts).

    Multi-node Tune needs ``storage_path`` on shared storage: since Ray 2.7 nothing is
    synced to the head node, so a trial that is retried or restored on another node finds
    its checkpoints only there. A URI (``s3://``, ``gs://``, ...) is shared. A local path
    (or ``file://``) on a cluster of more than one node is refused unless
    ``METAFX_SHARED_STORAGE=1`` declares it shared (an NFS/Lustre mount on every node);
    the declaration is then checked: a file the driver writes there must be readable, with
    the same content, from a task on every alive node.

    Raises:
        ConfigError: a local path on a multi-node cluster without the declaration, or a node
            that does not see the declared shared path.
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    local = storage[len("file://"):] if storage.startswith("file://") else storage
    if "://" in local:
        return  # object storage: shared by construction
    declared = os.environ.get("METAFX_SHARED_STORAGE", "").strip().lower() in ("1", "true", "yes")
    if len(alive) <= 1:
        if os.environ.get("RAY_ADDRESS") and not declared:
            log.warning("--storage %s is a local path: fine on this one-node cluster, but trials that move to a "
                        "node added later (autoscaling) lose their checkpoints; use shared storage on a cluster",
                        storage)
        return
    if not declared:
        raise ConfigError(
            f"this Ray cluster has {len(alive)} nodes but --storage {storage!r} is a local path: trial checkpoints "
            "would be lost when a trial moves node. Pass --storage on shared storage (s3://..., gs://..., or an NFS "
            "path mounted on every node, then also set METAFX_SHARED_STORAGE=1 to confirm it is shared)")

    from metafx.data.distributed import nodes_not_seeing

    blind = nodes_not_seeing(local, timeout=180)
    if blind is None:
        log.warning("could not check within 180 s that every node sees --storage %s; trusting "
                    "METAFX_SHARED_STORAGE=1", storage)
        return
    if blind:
        raise ConfigError(
            f"METAFX_SHARED_STORAGE=1 but --storage {storage!r} is not shared: node(s) {', '.join(blind)} do not "
            f"see a file the driver wrote there. Mount it on every node, or use s3://... / gs://...")


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
) -> SearchOutcome:
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
        SearchOutcome with the best configuration written as a study YAML.

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
                num_samples: int | None, track: bool, verbose: int) -> SearchOutcome:
    check_space(cfg)
    storage = storage or str(DEFAULT_STORAGE)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    name = name or (latest_search(storage, cfg) if resume else None) or \
        f"{cfg.name}-{cfg.budget}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    s = cfg.search

    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    _init_ray(None)
    _check_storage(storage)  # refuse a bad --storage before a long render
    # The task set is rendered (or reused) once, here, before any trial starts.
    taskset = _driver_taskset(cfg)
    manifest = dict(taskset.manifest)

    tracker = None
    parent = None
    if track:
        from metafx.tracking import Tracker

        tracker = Tracker(tracking_uri, experiment=cfg.name)
        parent = tracker.start_search(cfg, name, manifest, resume=resume)

    base = cfg.to_dict()
    trainable = tune.with_parameters(_trainable, base=base, source=str(cfg.source_file))
    resources = {"cpu": s.cpus_per_trial}
    if s.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) > 0:
        resources["gpu"] = s.gpus_per_trial
    trainable = tune.with_resources(trainable, resources)

    callbacks = []
    if tracker:
        _TRACKERS[name] = tracker
        callbacks.append(MLflowTracking(name, base, str(cfg.source_file), taskset.hash))
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
                space=DefineByRun(s.params, base), metric=s.metric, mode=s.mode,
                sampler=optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, s.num_samples // 3)),
            )
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
        outcome = _summarize(cfg, name, exp_path, results, parent)
        status = "FINISHED"
        if tracker:
            tracker.end_search("FINISHED", outcome.__dict__, _summary_files(cfg, outcome, exp_path))
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker:
            tracker.close_dangling("KILLED" if status != "FAILED" else "FAILED")


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start the loopback-only local Ray (see :func:`_init_ray`)."""
    _init_ray(num_cpus, num_gpus)


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
    """The most recent search of this study and budget under a local ``storage`` (for ``--resume``)."""
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


def _summarize(cfg: Config, name: str, exp_path: str, results, parent) -> SearchOutcome:
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
        out_dir = Path(exp_path) if "://" not in exp_path else REPO_ROOT / "ray_results" / name
        out_dir.mkdir(parents=True, exist_ok=True)
        best_cfg_path = out_dir / "best_config.yaml"
        dump_config(raw, best_cfg_path, header=(
            f"# Best configuration of search {name!r} ({s.metric} = {best.metrics.get(s.metric):.5g}).\n"
            f"# Rerun: python launch/train.py --space {best_cfg_path}"))
        best_ckpt = best.checkpoint.path if best.checkpoint else None
    return SearchOutcome(name, exp_path, best_cfg_path, best_ckpt, best_metrics, table, parent)


def _summary_files(cfg: Config, outcome: SearchOutcome, exp_path: str) -> list[Path]:
    """Optuna's history and importance plots for the parent MLflow run.

    The study is rebuilt from the trial table: the searcher's own study does not
    survive ``Tuner.restore``. (The tracker writes the trial table and best config itself.)
    """
    from metafx.plots import ArtifactError, optuna_plots, study_from_rows

    out = Path(exp_path) if "://" not in exp_path else REPO_ROOT / "ray_results" / outcome.name
    try:
        study = study_from_rows([r for r in outcome.table if r["status"] != "ERROR"], cfg.search.metric,
                                cfg.search.mode, cfg.search.params)
        return optuna_plots(study, out / "plots")
    except ArtifactError as e:
        log.warning("Optuna plots skipped: %s", e)
        return []


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
