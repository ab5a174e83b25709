"""The Ray cluster a search runs on: starting or joining Ray, the storage check, and node facts.

Ray core is imported here (lazily); besides, :mod:`metafx.search` imports Ray Tune (the search
driver), :mod:`metafx.data.distributed` Ray's tasks (rendering spread over the cluster) and
:mod:`metafx.bench.sharing` Ray's actors and object store (what it measures).
:func:`init_ray` is the one way metafx starts or joins Ray (the search, ``launch/render.py
--ray`` and the benchmarks use it) and :func:`shutdown_ray` the one way it leaves;
:func:`cluster_gpus` counts the cluster's GPUs; :func:`check_storage` refuses trial storage that
not every node sees; :func:`worker_facts` says, inside a trial, which node and device it runs on.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Mapping

from metafx.config import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- start or join


#: Seconds a local Ray's raylet waits for a new worker process to register before it kills it
#: (Ray's ``worker_register_timeout_seconds``, 60 by default). A trial's worker imports Ray,
#: torch and metafx; on a loaded 2-core machine that took longer than 60 s, the raylet killed
#: the worker, the trial's actor died ("Some workers have not registered within the timeout"),
#: Tune counted an errored trial and retried it. ``RAY_worker_register_timeout_seconds`` in the
#: environment still wins.
WORKER_REGISTER_TIMEOUT_S = 600


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    Does nothing when Ray is already initialized in this process.

    Local (no ``RAY_ADDRESS``): a single node whose every server listens on 127.0.0.1 only,
    no dashboard, usage stats off, and Ray's token authentication on as Ray 2.59+ ships it
    for ``ray.init()`` (a token is generated into ``~/.ray/auth_token`` if none exists).

    Cluster (``RAY_ADDRESS=host:port``): a driver launched by ``ray job submit`` inherits
    ``RAY_AUTH_MODE`` and the token location from the cluster. A driver started by hand
    must set ``RAY_AUTH_MODE=token`` itself: ``ray.init(address=...)`` never switches
    token mode on by its own, and the GCS then rejects the connection.

    Keeps this process's Python SIGTERM handler: ``ray.init`` installs Ray's C++ failure
    signal handler for SIGTERM in the driver ("*** SIGTERM received ***"), which replaces a
    handler set before (``launch/search.py`` turns SIGTERM into KeyboardInterrupt, so that
    ``ray job stop`` closes the MLflow runs as KILLED). Measured without this: a ``--ray``
    render aborted (SIGABRT), and a search under ``ray job stop`` failed and closed its runs
    as FAILED. The handler is installed again right after ``ray.init``.

    A local Ray gives a starting worker :data:`WORKER_REGISTER_TIMEOUT_S` to register (not 60 s).

    Args:
        num_cpus: CPUs of a local Ray (None: all of this machine's); ignored when joining.
        num_gpus: GPUs of a local Ray (None: those Ray detects; logical GPUs in tests);
            ignored when joining.
        log_to_driver: print the workers' stdout and stderr here (prefixed ``(pid=...)``).

    Raises:
        ConfigError: the cluster at ``RAY_ADDRESS`` cannot be reached or refused us, with the fix.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    saved = signal.getsignal(signal.SIGTERM)
    try:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _join(address, log_to_driver)
        else:
            _start_local(num_cpus, num_gpus, log_to_driver)
    finally:
        if callable(saved) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, saved)


def shutdown_ray() -> None:
    """Leave the Ray cluster this process started or joined (a local one stops); a no-op when not connected."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster offers, over all its nodes (0 when it has none; Ray must be started)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _join(address: str, log_to_driver: bool = True) -> None:
    """``ray.init`` on the cluster at ``address``; a refused connection becomes a ConfigError with the fix."""
    import ray

    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except ConnectionError as e:
        mode = os.environ.get("RAY_AUTH_MODE")
        hint = ("RAY_AUTH_MODE is not 'token' here: a Ray 2.59+ cluster with token authentication rejects "
                "this driver. Set RAY_AUTH_MODE=token and provide the cluster's token in ~/.ray/auth_token, "
                "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN (on the head: `ray get-auth-token`); or submit with "
                "`ray job submit`, whose drivers inherit it" if (mode or "").lower() != "token" else
                "check that the token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN) is the "
                "cluster's (`ray get-auth-token` on the head) and that the GCS port is reachable")
        raise ConfigError(f"cannot join the Ray cluster at RAY_ADDRESS={address!r} ({e}); {hint}") from e


def _start_local(num_cpus: int | None, num_gpus: int | None, log_to_driver: bool = True) -> None:
    """A one-node Ray on the loopback address only.

    On Linux Ray rewrites ``127.0.0.1`` to the host's routable address and then binds its
    gRPC servers (GCS, raylet, workers) to 0.0.0.0; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    set while the node starts (its processes inherit it), keeps the loopback address. It
    is only set for a node this function starts: no other node can join it.
    """
    import ray
    from ray._private import ray_constants

    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by the GCS, raylet and workers
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable at import
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level=logging.WARNING, log_to_driver=log_to_driver,
                 _system_config=local_system_config())
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def local_system_config() -> dict[str, object]:
    """Ray system settings of a local Ray started by metafx (see :func:`init_ray`).

    Returns:
        ``worker_register_timeout_seconds`` (unless ``RAY_worker_register_timeout_seconds`` is
        set: Ray reads it itself).
    """
    conf: dict[str, object] = {}
    if not os.environ.get("RAY_worker_register_timeout_seconds"):
        conf["worker_register_timeout_seconds"] = WORKER_REGISTER_TIMEOUT_S
    return conf


# --------------------------------------------------------------------------- storage


def check_storage(storage: str) -> None:
    """Refuse trial storage that not every node of the cluster sees (before any trial starts).

    Multi-node Tune needs ``storage_path`` on shared storage: since Ray 2.7 nothing is
    synced to the head node, so a trial that is retried or restored on another node finds
    its checkpoints only there. A URI (``s3://``, ``gs://``, ...) is shared. A local path
    (or ``file://``) on a cluster of more than one node is refused unless
    ``METAFX_SHARED_STORAGE=1`` declares it shared (an NFS/Lustre mount on every node);
    the declaration is then checked: a file the driver writes there must be readable, with
    the same content, from a task on every alive node.

    Args:
        storage: the Tune storage path or URI; Ray must be initialized (:func:`init_ray`).

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


# --------------------------------------------------------------------------- node facts


def worker_facts() -> dict[str, str]:
    """Where this Ray worker runs and on which device, after pinning a worker without a GPU to the CPU.

    Call it once at the start of a trial, before torch picks a device (see :func:`pin_device`).

    Returns:
        ``{"node_ip", "node_id", "hostname", "gpu_ids", "device"}``: the node's address (the
        hostname outside a Ray worker), Ray's node id (it tells two nodes on one host apart),
        the host name, the comma-separated accelerator ids Ray assigned (logical ids; empty
        without a GPU) and the torch device the worker uses.
    """
    accel = _accelerator_ids()
    device = pin_device(accel)
    return {"node_ip": _node_ip(), "node_id": _node_id(), "hostname": socket.gethostname(),
            "gpu_ids": ",".join(accel.get("GPU", [])), "device": device}


def pin_device(accel: Mapping[str, list[str]]) -> str:
    """The torch device this trial uses, after pinning a trial without a GPU to the CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned (so ``cuda`` is the trial's
    own GPU, shared with other trials when ``gpus_per_trial`` < 1) but leaves it untouched
    for a trial that asked for none: such a trial would see every GPU of its node and
    :func:`metafx.train.pick_device` would take one it did not reserve. So it gets
    ``METAFX_DEVICE=cpu`` unless the user set ``METAFX_DEVICE``. A trial assigned a GPU
    on a node where CUDA is not usable (no driver, a CPU build of torch, or a logical GPU
    as in the tests) runs on the CPU: ``pick_device`` checks ``torch.cuda.is_available()``.

    Args:
        accel: the accelerator ids Ray assigned to this worker, e.g. ``{"GPU": ["0"]}``.

    Returns:
        The device's name, e.g. ``cpu`` or ``cuda``.
    """
    from metafx.train import pick_device

    if not accel.get("GPU") and not os.environ.get("METAFX_DEVICE"):
        os.environ["METAFX_DEVICE"] = "cpu"
    return str(pick_device())


def _accelerator_ids() -> dict[str, list[str]]:
    """The accelerator ids Ray assigned to this worker, e.g. ``{"GPU": ["0"]}`` (logical ids)."""
    import ray

    return {k: [str(i) for i in v] for k, v in ray.get_runtime_context().get_accelerator_ids().items()}


def _node_id() -> str:
    """Ray's node id: distinguishes two nodes on one host (the loopback cluster test)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _node_ip() -> str:
    """This node's address as Ray sees it; the hostname outside a Ray worker."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker the hostname is enough
        return socket.gethostname()
