"""The local Ray metafx starts gives its workers time to register on a loaded machine (issue 12, item 7).

On a loaded 2-core machine a trial's worker (Python importing Ray, torch and metafx) took longer
than Ray's default ``worker_register_timeout_seconds`` (60 s) to register with the raylet; the
raylet killed it ("Some workers of the worker process(...) have not registered within the
timeout"), the trial's actor died, and Tune printed an errored trial it then retried. The check
reads the setting the running GCS server was started with (it hands it to every raylet).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest


@pytest.fixture
def local_ray(monkeypatch):
    import ray

    from metafx.cluster import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_worker_register_timeout_seconds", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    init_ray(1)
    try:
        yield ray
    finally:
        ray.shutdown()


def _gcs_config(ray) -> dict:
    """The system config of the running GCS server, from its command line (``--config_list=<base64 JSON>``)."""
    node = ray._private.worker._global_node
    pid = node.all_processes["gcs_server"][0].process.pid
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    encoded = next(a.split("=", 1)[1] for a in args if a.startswith("--config_list="))
    return json.loads(base64.b64decode(encoded))


def test_local_ray_gives_workers_ten_minutes_to_register(local_ray):
    conf = _gcs_config(local_ray)
    assert conf.get("worker_register_timeout_seconds", 60) >= 600, conf  # Ray's default is 60
    from metafx.cluster import WORKER_REGISTER_TIMEOUT_S

    assert conf["worker_register_timeout_seconds"] == WORKER_REGISTER_TIMEOUT_S
    # And the local Ray still works: a task runs.
    assert local_ray.get(local_ray.remote(lambda: 41 + 1).remote()) == 42
