"""`ray` CLI for a rehearsal cluster whose every node lives on 127.0.0.1 of one host.

    python cluster/ray_loopback.py start --head --node-ip-address=127.0.0.1 --port=6379 ...
    python cluster/ray_loopback.py start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 ...

Why this exists (Ray 2.60, Linux): ``ray start`` rewrites a loopback
``--node-ip-address`` / ``--address`` to the host's routable address (the
interface towards 8.8.8.8; ``services.resolve_ip_for_localhost``), and Ray's
gRPC servers (GCS, raylet, object manager, workers) listen on 0.0.0.0 unless the
node address is exactly 127.0.0.1. A "two nodes on loopback" cluster for tests
therefore needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes Ray keep
127.0.0.1 (``services.get_node_ip_address`` returns the loopback address) in this
process and in every daemon and worker it starts (they inherit the variable). The
same switch also makes ``ray start --address`` refuse to add a second node
("Multi-node Ray clusters are not supported on Windows and OSX"); this wrapper lifts
only that refusal, nothing else. Everything else is the stock ``ray`` CLI.

Not for real clusters: there every node has its own private address and the Ray
ports must be reachable between nodes (see docs/cluster.md).
"""
from __future__ import annotations

import os
import sys
import types

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: read at import

import ray._private.ray_constants as _rc  # noqa: E402
import ray.scripts.scripts as _scripts  # noqa: E402


class _Constants(types.ModuleType):
    """ray_constants as the CLI sees it: identical, except multi-node start is allowed."""

    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name: str):
        return getattr(_rc, name)


_scripts.ray_constants = _Constants("ray_constants")

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(_scripts.main())
