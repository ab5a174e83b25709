"""Render a task set spread over a Ray cluster: one Ray task per family x chunk of tasks.

At the paper budget (120 tasks x 10 min at 48 kHz, 13.9 GB) one node renders at about
650x real time; spread over the cluster, every node's CPUs render parts at once. The
result is the same dataset, byte for byte, as :func:`metafx.data.render.render_taskset`
writes on one machine (same hash, same ``input.npy`` and ``targets.npy``, the same
manifest but for ``created`` and ``render``), in the same content-addressed cache:

1. The driver runs the local render's checks (task plan, split feasibility, Faust
   compilation of every family, slider names, disk space) before any task starts.
2. Each part (``metafx.data.plan.Part``: consecutive tasks of one family) is a Ray task
   with ``num_cpus=cpus_per_part``. The driver deals the parts to the nodes: each alive node
   gets as many at a time as it has CPU slots, and the next part whenever one of its parts
   finishes (soft node affinity: a part whose node died runs elsewhere). It rebuilds the
   configuration on its node from the study's raw mapping (as trials do), checks that its
   node computes the same dataset hash (same .dsp files, source, dawdreamer and numpy),
   renders with ``cpus_per_part`` threads of its own process (DAWDreamer engines are created
   on that process's single control thread, see ``render.py``), and writes its part into
   ``<cache>/<hash>.parts/`` atomically, with a record naming the node.
3. The driver copies the parts, in task order and checked against their sha256, into a
   temporary dataset directory and renames it to ``<hash>`` last (``cache.build_dataset``).
   The manifest's ``render.distributed`` lists every part with its node.

An interrupted distributed render (Ctrl-C, ``ray job stop``, a crash) leaves no dataset
directory, only finished parts (reused by the next render of the same hash) and possibly
``.tmp-`` files; a part whose node dies is retried by Ray on another node. The cache
directory must be on storage every node sees (``METAFX_CACHE`` on NFS, for example);
:func:`nodes_not_seeing` checks that, and the search uses it to decide
(:func:`should_distribute`).

Ray is imported here (lazily), in :mod:`metafx.cluster` and in :mod:`metafx.search`.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metafx.config import Config, DataConfig
    from metafx.data.cache import RenderResult

log = logging.getLogger(__name__)

ENV_MODE = "METAFX_DISTRIBUTED_RENDER"  # auto (default) | 1 | 0
# No ray.cancel here on a task that may be running: in Ray 2.60 a cancel that lands after a
# task's reply has arrived but before the reply is processed fails the task (TASK_CANCELLED), and processing the
# reply then fails a Ray-internal check ("Tried to complete task that was not pending", task_manager.cc) that ends
# the driver with status 1, whatever the driver was doing (seen in CI on SIGTERM; reproduced with force=False too).
# Running tasks end with the driver's job instead.


# --------------------------------------------------------------------------- does every node see a directory?


def nodes_not_seeing(directory: str | os.PathLike[str], timeout: float = 180.0) -> list[str] | None:
    """The alive Ray nodes that do not see ``directory`` as this process does.

    Writes a random file into ``directory`` and reads it back from a zero-CPU task pinned
    to every alive node.

    Returns:
        ``"<address> (<node id prefix>)"`` of each node that did not read it (empty: every
        node sees it), or None if the check did not finish within ``timeout`` seconds.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    token = secrets.token_hex(16)
    marker = Path(directory) / f".metafx-shared-check-{token}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str, expected: str) -> bool:
        try:
            with open(path) as fh:
                return fh.read() == expected
        except OSError:
            return False

    try:
        refs = {n["NodeID"]: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token) for n in alive}
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout)))
        except ray.exceptions.GetTimeoutError:
            return None  # not cancelled (no ray.cancel: see the top of the module): a zero-CPU check task ends with the job
    finally:
        marker.unlink(missing_ok=True)
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in alive if not seen.get(n["NodeID"])]


def should_distribute(data: "DataConfig", mode: str | None = None) -> tuple[bool, str]:
    """Whether the search renders its (missing) task set over the cluster, and why.

    ``mode`` (default ``$METAFX_DISTRIBUTED_RENDER``, else ``auto``): ``0``/``off`` never,
    ``1``/``on`` always (a one-node cluster too), ``auto`` when the dataset is not in the
    cache yet, the Ray cluster has more than one alive node and every node sees
    ``data.cache_dir``. Needs Ray initialized.

    Raises:
        ValueError: an unknown mode.
    """
    import ray

    from metafx.data.cache import is_complete
    from metafx.data.plan import dataset_path

    mode = (mode if mode is not None else os.environ.get(ENV_MODE, "auto")).strip().lower() or "auto"
    if mode in ("0", "off", "false", "no"):
        return False, f"{ENV_MODE}={mode}"
    if mode not in ("1", "on", "true", "yes", "auto"):
        raise ValueError(f"{ENV_MODE}={mode!r}: expected auto, 1 (on) or 0 (off)")
    if is_complete(dataset_path(data)):
        return False, "the task set is in the cache already"
    if mode != "auto":
        return True, f"{ENV_MODE}={mode}"
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    if alive < 2:
        return False, "one node"
    blind = nodes_not_seeing(data.cache_dir, timeout=120)
    if blind is None:
        return False, f"could not check within 120 s that every node sees data.cache_dir {data.cache_dir}"
    if blind:
        return False, (f"node(s) {', '.join(blind)} do not see data.cache_dir {data.cache_dir}; every node renders its "
                       "own copy. Point METAFX_CACHE (or data.cache_dir) at storage every node mounts to render "
                       "once, spread over the cluster")
    return True, f"{alive} nodes share data.cache_dir {data.cache_dir}"


# --------------------------------------------------------------------------- the Ray task


def _part_task(base: dict[str, Any], source: str, h: str, out_dir: str, part: dict[str, Any], threads: int
               ) -> dict[str, Any]:
    """Runs in a Ray worker on any node: rebuild the data config there and render one part."""
    import ray

    from metafx.config import config_from_dict
    from metafx.data.plan import Part
    from metafx.data.render import render_part

    data = config_from_dict(base, Path(source)).data
    ctx = ray.get_runtime_context()
    extra = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    p = Part(int(part["family_index"]), str(part["family"]), tuple(int(i) for i in part["indices"]))
    return render_part(data, h, out_dir, p, threads=threads, extra=extra)


def render_on_ray(cfg: "Config", *, cpus_per_part: int = 1, tasks_per_part: int | None = None,
                  progress: bool = True) -> "RenderResult":
    """Render (or reuse) the task set of ``cfg`` spread over the Ray cluster this process is connected to.

    Args:
        cfg: the study config (its raw mapping is shipped to the tasks, which resolve it on their node).
        cpus_per_part: ``num_cpus`` of each Ray task = render threads in its process.
        tasks_per_part: tasks per part (default: about two parts per CPU slot of the cluster).
        progress: report progress on stderr.

    Returns:
        The complete dataset directory ``data.cache_dir / <hash>``, identical to a local render's,
        and whether this call rendered it (False: it was in the cache).

    Raises:
        ConfigError, RenderError, SourceError: as :func:`metafx.data.render.render_taskset`; a
            RenderError also when a node computes another dataset hash or does not share the cache.
        RuntimeError: Ray is not initialized.
    """
    import ray

    from metafx.config import ConfigError
    from metafx.data import render  # the dawdreamer import, in the driver for the checks and the assembly
    from metafx.data.cache import Progress, RenderResult, check_disk, clean_stale_parts, is_complete, read_part
    from metafx.data.plan import RenderError, dataset_key, hash_key, parts_dir, plan_parts
    from metafx.data.sources import SourceError, load_sources

    if not ray.is_initialized():
        raise RuntimeError("render_on_ray needs Ray: call metafx.cluster.init_ray() (or ray.init) first")
    if cpus_per_part < 1:
        raise ValueError(f"cpus_per_part must be >= 1, got {cpus_per_part}")
    data = cfg.data
    t_start = time.perf_counter()
    h = hash_key(dataset_key(data))
    final = Path(data.cache_dir) / h
    if is_complete(final):
        log.info("dataset %s found in the cache; nothing to render", final)
        return RenderResult(final, rendered=False)
    Path(data.cache_dir).mkdir(parents=True, exist_ok=True)
    prep = render.prepare(data)  # the local render's checks, before any task starts
    planned = prep.planned
    N = len(planned)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_part))
    tpp = tasks_per_part or max(1, math.ceil(N / (2 * slots)))
    parts = plan_parts(planned, tpp)
    out = parts_dir(data, h)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_parts(out)

    t0 = time.perf_counter()
    x = load_sources(data.source, data.sample_rate)  # for T (and the disk check); the tasks load their own
    T = int(x.size)
    del x
    t_source = time.perf_counter() - t0
    records: dict[str, dict[str, Any]] = {}
    reused: set[str] = set()
    for p in parts:
        rec = read_part(out, p, T)
        if rec is not None:
            records[p.name] = rec
            reused.add(p.name)
    todo = [p for p in parts if p.name not in records]
    todo_tasks = sum(len(p.indices) for p in todo)
    check_disk(out, (todo_tasks + N + 1) * T * 4, "the parts plus the assembled dataset")
    if reused:
        log.info("reusing %d finished part(s) of an earlier render in %s", len(reused), out)
    log.info("rendering %d tasks x %.1f s in %d part(s) of <= %d tasks over the Ray cluster (%d CPU slot(s) of %d "
             "CPU(s)), parts in %s", todo_tasks, T / data.sample_rate, len(todo), tpp, slots, cpus_per_part, out)

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=cpus_per_part, max_retries=2, retry_exceptions=False)(_part_task)
    base, source = cfg.to_dict(), str(cfg.source_file)
    base_ref = ray.put(base)
    # Each node gets as many parts at a time as it has CPU slots; a node that finishes a part gets
    # the next one (the driver deals the work; faster nodes take more). Soft affinity: a part whose
    # node died runs elsewhere (and Ray retries it). Nodes without a slot (a CPU: 0 head) get none.
    slots_by_node = [(n["NodeID"], int(n.get("Resources", {}).get("CPU", 0) // cpus_per_part))
                     for n in ray.nodes() if n.get("Alive")]
    slots_by_node = [(nid, k) for nid, k in slots_by_node if k >= 1] or [(None, slots)]
    queue = list(reversed(todo))  # pop() takes the next part in task order
    pending: dict[Any, tuple[Any, str | None]] = {}

    def submit(node: str | None) -> None:
        p = queue.pop()
        strategy = NodeAffinitySchedulingStrategy(node, soft=True) if node else "DEFAULT"
        ref = task.options(scheduling_strategy=strategy).remote(
            base_ref, source, h, str(out),
            {"family_index": p.family_index, "family": p.family, "indices": list(p.indices)}, cpus_per_part)
        pending[ref] = (p, node)

    t0 = time.perf_counter()
    bar = Progress(todo_tasks, f"render {h[:8]} on Ray", progress and todo_tasks > 0)
    done_tasks = 0
    try:
        for r in range(max(k for _, k in slots_by_node)):  # round-robin: the first parts alternate nodes
            for node, k in slots_by_node:
                if r < k and queue:
                    submit(node)
        bar.update(0)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p, node = pending.pop(ref)
                if queue:
                    submit(node)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayError as e:  # a task's exception, or its worker / node lost after retries
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, (RenderError, ConfigError, SourceError)):
                        raise cause from None
                    raise RenderError(f"rendering part {p.name} failed: {e}") from e
                records[p.name] = rec
                done_tasks += len(p.indices)
                bar.update(done_tasks)
    except BaseException:
        # Interrupted or failed: the parts still running are not cancelled (see the top of the module). They end with
        # this driver's job (the local Ray it started shuts down; on a cluster the raylets kill a finished job's
        # workers), and a part that finishes first is kept for reuse like any other.
        log.info("render %s stopped with %d part(s) still running; Ray ends them with this job", h[:8], len(pending))
        raise
    t_render = time.perf_counter() - t0

    # A part whose record the driver cannot read back was written where the driver does not look.
    for p in parts:
        if read_part(out, p, T) is None:
            rec = records[p.name]
            raise RenderError(
                f"part {p.name} rendered on {rec.get('node_ip')} (node {str(rec.get('node_id'))[:8]}) is not in {out} "
                f"as seen from this node: data.cache_dir must be on storage every node mounts at the same path "
                f"(set METAFX_CACHE), or render locally")
    ordered = [records[p.name] for p in parts]
    nodes: dict[str, int] = {}
    for r in ordered:
        nodes[r.get("node_id", "?")] = nodes.get(r.get("node_id", "?"), 0) + 1
    total_audio = (N - sum(len(r["unstable"]) for r in ordered)) * T / data.sample_rate  # as a local render counts
    info = {
        "workers": cpus_per_part,
        "block_size": render.BLOCK_SIZE,
        "source_seconds": round(t_source, 3),
        "render_seconds": round(t_render, 3),
        "audio_seconds": total_audio,
        "distributed": {
            "cpus_per_part": cpus_per_part,
            "tasks_per_part": tpp,
            "nodes": nodes,
            "parts": [{"name": r["name"], "family": r["family"], "tasks": r["rows"], "node_id": r.get("node_id"),
                       "node_ip": r.get("node_ip"), "host": r.get("host"), "pid": r.get("pid"),
                       "seconds": r.get("seconds"), "reused": r["name"] in reused} for r in ordered],
        },
    }
    info["total_seconds"] = round(time.perf_counter() - t_start, 3)  # before assembly; assemble_seconds is added
    info["speed_x_realtime"] = round(total_audio / info["total_seconds"], 1) if info["total_seconds"] > 0 else None
    result = render.assemble_parts(data, h, prep, ordered, info)
    shutil.rmtree(out, ignore_errors=True)
    return result
