"""Cluster scale on one machine: a two-node Ray cluster, an MLflow tracking server and `ray job submit`.

Real processes, loopback only, no mocks:

* a head node and a second node, each started with ``ray start`` (through
  ``cluster/ray_loopback.py``, the stock CLI with every server kept on 127.0.0.1),
  each with one CPU and its own ``--temp-dir``, token authentication on
  (``RAY_AUTH_MODE=token``, a fresh token in a temporary ``RAY_AUTH_TOKEN_PATH``; the
  user's ``~/.ray/auth_token`` is neither read nor written), usage stats off;
* ``mlflow server`` with a SQLite backend and a served artifact store;
* smoke searches submitted with ``ray job submit --working-dir <repo>``: the search renders
  its task set spread over both nodes (a fresh shared cache), runs trials on both nodes and
  records to the server; local storage without ``METAFX_SHARED_STORAGE=1`` is refused before
  any trial; ``ray job stop`` closes the MLflow runs as KILLED; the second node is killed
  mid-search and its trial continues on the head from its checkpoint;
* ``launch/render.py --ray`` as a job: parts rendered on both nodes, the dataset identical,
  byte for byte, to a local render.

Every process is found by process group / parent / an environment marker and stopped by
its own pid at teardown, even when a test fails. Never ``ray stop`` (it would stop every
Ray on the machine). The node-kill test must stay last: it removes the second node.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from metafx.config import REPO_ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY_CLI = [sys.executable, str(REPO_ROOT / "cluster" / "ray_loopback.py")]
RUNTIME_ENV = REPO_ROOT / "cluster" / "runtime_env.yaml"  # the shipped runtime env (excludes, env_vars)
MARKER = "METAFX_CLUSTER_TEST"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# --------------------------------------------------------------------------- processes by pid


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) of every process, from /proc/<pid>/stat."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(d)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def _has_marker(pid: int, marker: str) -> bool:
    try:
        return f"{MARKER}={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _group_pids(pgid: int, marker: str) -> set[int]:
    """The live processes of one `ray start` / server: its process group, its marker, their descendants.

    `ray start` daemonizes (the daemons keep the new session's group); Ray workers start
    their own group under the raylet, hence the parent walk; the marker catches orphans.
    """
    table = _proc_table()
    pids = {p for p, (_, g, st) in table.items() if st != "Z" and (g == pgid or _has_marker(p, marker))}
    grew = True
    while grew:
        kids = {p for p, (pp, _, st) in table.items() if pp in pids and p not in pids and st != "Z"}
        pids |= kids
        grew = bool(kids)
    pids.discard(os.getpid())
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pids: set[int], grace: float = 10.0) -> None:
    """SIGTERM each pid, then SIGKILL whatever is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return


class Group:
    """Processes started by one command in a new session, tracked and stopped by pid."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.cmd, self.marker, self.log = name, cmd, f"{env[MARKER]}-{name}", log
        env = {**env, MARKER: self.marker}
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=tempfile.gettempdir())
        self.pgid = self.proc.pid

    def wait_exit_ok(self, timeout: float = 180) -> None:
        """For `ray start`: it returns once its daemons are up."""
        rc = self.proc.wait(timeout=timeout)
        assert rc == 0, f"{self.name}: {' '.join(self.cmd)} exited {rc}\n{self.log.read_text()[-4000:]}"

    def pids(self) -> set[int]:
        return _group_pids(self.pgid, self.marker)

    def kill(self, sig_kill_only: bool = False) -> set[int]:
        pids = self.pids()
        if sig_kill_only:
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            _stop(pids)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        return pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by these pids (from /proc/net)."""
    owners = {}
    for p in pids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                link = os.readlink(f"/proc/{p}/fd/{fd}")
                if link.startswith("socket:["):
                    owners[link[8:-1]] = p
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in owners:  # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            out.append((owners[f[9]], addr, int(hexport, 16)))
    return out


# --------------------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, root: Path, raytmp: Path):
        self.root, self.raytmp = root, raytmp
        self.groups: dict[str, Group] = {}
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "METAFX_", "MLFLOW_")) and k not in ("VIRTUAL_ENV_PROMPT",)}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job entrypoint = this venv
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "OMP_NUM_THREADS": "1",
            MARKER: uuid.uuid4().hex[:12],
        })
        self.env = env
        self.gcs_port, self.dash_port, self.mlflow_port = _free_port(), _free_port(), _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.node_ids: dict[str, str] = {}

    # --- start

    def _node_ports(self) -> list[str]:
        return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    def start(self) -> None:
        # The shipped start script: SQLite in MLFLOW_HOME/mlflow.db, artifacts in MLFLOW_HOME/artifacts, 127.0.0.1.
        mlflow_env = {**self.env, "MLFLOW_HOME": str(self.root), "MLFLOW_PORT": str(self.mlflow_port),
                      "MLFLOW_WORKERS": "1", "PYTHON": sys.executable}
        self._launch("mlflow", ["bash", str(REPO_ROOT / "cluster" / "mlflow_server.sh")], mlflow_env)
        self._launch("head", RAY_CLI + [
            "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}", "--num-cpus=1", "--num-gpus=0",
            f"--ray-client-server-port={_free_port()}", f"--temp-dir={self.raytmp / 'head'}",
            "--disable-usage-stats"] + self._node_ports()).wait_exit_ok()
        self.start_worker()
        self.node_ids["head"] = self._raylet_node_id("head")
        self._wait(lambda: self.alive_nodes() == 2, 120, "two alive nodes")
        self._wait(self._mlflow_up, 180, f"MLflow server\n{(self.root / 'mlflow.log').read_text()[-3000:]}")

    def start_worker(self) -> None:
        self._launch("worker", RAY_CLI + [
            "start", f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--num-gpus=0", f"--temp-dir={self.raytmp / 'worker'}", "--disable-usage-stats"]
            + self._node_ports()).wait_exit_ok()
        self.node_ids["worker"] = self._raylet_node_id("worker")

    def _launch(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Group:
        """Start a group and register it at once, so teardown finds it even if it then fails."""
        g = self.groups[name] = Group(name, cmd, env or self.env, self.root / f"{name}.log")
        return g

    def _raylet_node_id(self, name: str) -> str:
        for p in self.groups[name].pids():
            try:
                args = Path(f"/proc/{p}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if args and args[0].endswith("/raylet"):
                return next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
        raise AssertionError(f"no raylet found for the {name} node")

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if cond():
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def _mlflow_up(self) -> bool:
        with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=5) as r:
            return r.status == 200

    # --- talk to the job server (HTTP with the token, as the CLI does)

    def api(self, path: str, token: str | None = "ours") -> tuple[int, object]:
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token_path.read_text() if token == 'ours' else token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, json.loads(body) if body[:1] in (b"{", b"[") else body
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def alive_nodes(self) -> int:
        code, body = self.api("/nodes?view=summary")
        assert code == 200, body
        return sum(1 for n in body["data"]["summary"] if n["raylet"]["state"] == "ALIVE")

    def ray(self, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO_ROOT))

    def submit(self, sid: str, search_args: list[str], env_vars: dict[str, str] | None = None) -> None:
        """`ray job submit` of launch/search.py with cluster/runtime_env.yaml, plus `env_vars` when given."""
        self.submit_cmd(sid, ["python", "launch/search.py", "--space", "lstm.yaml", "--budget", "smoke",
                              "--tracking-uri", self.tracking_uri, *search_args], env_vars)

    def submit_cmd(self, sid: str, entrypoint: list[str], env_vars: dict[str, str] | None = None) -> None:
        """`ray job submit --no-wait` of any entrypoint with cluster/runtime_env.yaml, plus `env_vars` when given."""
        if env_vars is None:
            rt = ["--runtime-env", str(RUNTIME_ENV)]
        else:
            runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
            rt = ["--runtime-env-json", json.dumps(runtime_env)]
        r = self.ray("job", "submit", "--address", self.dashboard, "--submission-id", sid, "--no-wait",
                     "--working-dir", str(REPO_ROOT), *rt, "--", *entrypoint)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def job(self, sid: str) -> dict:
        code, body = self.api(f"/api/jobs/{sid}")
        assert code == 200, body
        return body

    def wait_job(self, sid: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(sid)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(2)
        self.ray("job", "stop", "--address", self.dashboard, sid)
        raise AssertionError(f"job {sid} not done after {timeout} s:\n{self.logs(sid)[-5000:]}")

    def logs(self, sid: str) -> str:
        r = self.ray("job", "logs", "--address", self.dashboard, sid)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    # --- stop

    def stop(self) -> None:
        """Stop every process we started, by pid: both nodes and the MLflow server, all at once."""
        pids = set()
        for g in self.groups.values():
            pids |= g.pids()
        _stop(pids, grace=5.0)  # the GCS takes its time over SIGTERM; SIGKILL after 5 s
        for g in self.groups.values():
            if g.proc.poll() is None:
                g.proc.wait(timeout=30)
        left = {p for g in self.groups.values() for p in g.pids() if _alive(p)}
        assert not left, f"still running after teardown: {sorted(left)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    # Ray's unix sockets live under --temp-dir and must stay short (AF_UNIX paths < 108 bytes).
    raytmp = Path(tempfile.mkdtemp(prefix="mfx-", dir="/tmp"))
    c = Cluster(root, raytmp)
    try:
        c.start()
        yield c
    finally:
        try:
            c.stop()
        finally:
            shutil.rmtree(raytmp, ignore_errors=True)


def _mlflow_search(c: Cluster, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(c.tracking_uri)
    exp = client.get_experiment_by_name("lstm")
    assert exp is not None, "no experiment 'lstm' on the tracking server"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`metafx.search_name` = '{name}'",
                              max_results=500)
    parents = [r for r in runs if r.data.tags.get("metafx.role") == "search"]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags.get("metafx.role")) for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def _results(exp_dir: Path) -> dict[str, list[dict]]:
    """Tune's result.json rows per trial directory name."""
    out = {}
    for f in exp_dir.glob("*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        out[f.parent.name] = rows
    return out


# --------------------------------------------------------------------------- tests


def test_cluster_is_loopback_only_and_token_protected(cluster):
    c = cluster
    assert c.alive_nodes() == 2
    assert c.node_ids["head"] != c.node_ids["worker"]
    # Every listening socket of every process we started is on loopback.
    pids = set().union(*(g.pids() for g in c.groups.values()))
    socks = _listening(pids)
    assert any(port == c.dash_port for _, _, port in socks) and any(port == c.gcs_port for _, _, port in socks)
    exposed = [(p, a, port) for p, a, port in socks if a not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The job server wants the token: none -> 401, a wrong one -> 403, ours -> 200.
    assert c.api("/api/jobs/", token=None)[0] == 401
    assert c.api("/api/jobs/", token="0" * 64)[0] == 403
    assert c.api("/api/jobs/")[0] == 200
    # The Jobs CLI sends the token only in token mode (RAY_AUTH_MODE=token): without it, refused.
    env = {k: v for k, v in c.env.items() if k != "RAY_AUTH_MODE"}
    r = c.ray("job", "list", "--address", c.dashboard, env=env, timeout=120)
    assert r.returncode != 0 and "Authentication" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    # The MLflow server answers on loopback.
    assert c._mlflow_up()


def test_job_submit_smoke_search_runs_on_both_nodes_into_the_tracking_server(cluster):
    c = cluster
    assert c.alive_nodes() == 2
    storage = c.root / "shared"
    cache = c.root / "search-cache"  # a fresh dataset cache that both nodes see (one file system)
    c.submit("metafx-smoke", ["--storage", str(storage), "--name", "cluster-smoke"],
             {"METAFX_SHARED_STORAGE": "1", "METAFX_CACHE": str(cache)})
    info = c.wait_job("metafx-smoke", 420)
    logs = c.logs("metafx-smoke")
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    assert "best configuration:" in logs and "MLflow parent run:" in logs

    # Two nodes sharing the cache: the search rendered its task set spread over both (automatic choice).
    assert "rendering the task set over the Ray cluster (2 nodes share data.cache_dir" in logs, logs[-6000:]
    (dataset,) = [d for d in cache.iterdir() if (d / "manifest.json").is_file()]
    dist = json.loads((dataset / "manifest.json").read_text())["render"]["distributed"]
    assert set(dist["nodes"]) == {c.node_ids["head"], c.node_ids["worker"]}, dist
    assert sorted(p.name for p in cache.iterdir()) == [dataset.name], "parts or tmp dirs left in the cache"

    # Trial results and checkpoints are on the (shared) storage path.
    exp = storage / "cluster-smoke"
    results = _results(exp)
    assert len(results) == 4, sorted(results)
    assert glob.glob(str(exp / "*" / "checkpoint_*" / "checkpoint.pt"))

    # The runs are in the server's store, one child per trial, on both nodes, none left RUNNING.
    client, parent, children = _mlflow_search(c, "cluster-smoke")
    assert parent.info.status == "FINISHED"
    assert len(children) == 4, [ch.info.run_name for ch in children]
    assert all(ch.info.status == "FINISHED" for ch in children), [(ch.info.run_name, ch.info.status) for ch in children]
    nodes = {ch.data.tags.get("metafx.node_id") for ch in children}
    assert nodes == {c.node_ids["head"], c.node_ids["worker"]}, (nodes, c.node_ids)
    assert all(ch.data.tags.get("metafx.node") == "127.0.0.1" for ch in children)
    # Artifacts went through the server into its artifact store (--artifacts-destination).
    done = [ch for ch in children if "test/query_l1_post" in ch.data.metrics]
    assert done
    assert client.list_artifacts(done[0].info.run_id), "no artifacts on the finished trial"
    assert list((c.root / "artifacts").rglob("*.wav")), "no artifacts in the server's artifact store"
    assert (c.root / "mlflow.db").is_file()


def test_local_storage_on_two_nodes_is_refused_before_any_trial(cluster):
    c = cluster
    assert c.alive_nodes() == 2
    storage = c.root / "not-declared"
    c.submit("metafx-refused", ["--storage", str(storage), "--name", "cluster-refused"])  # runtime_env.yaml as shipped
    info = c.wait_job("metafx-refused", 300)
    logs = c.logs("metafx-refused")
    assert info["status"] == "FAILED", info
    assert "exit code 2" in (info.get("message") or ""), info.get("message")
    assert "this Ray cluster has 2 nodes" in logs and "is a local path" in logs and "METAFX_SHARED_STORAGE=1" in logs, \
        logs[-3000:]
    assert not (storage / "cluster-refused").exists(), "Tune started although the storage was refused"


def _same_dataset(a: Path, b: Path) -> None:
    """The job resolved the .dsp files in its uploaded working directory: compare them by name."""
    from test_render_distributed import assert_same_dataset

    assert_same_dataset(a, b, dsp_by_name=True)


def test_distributed_render_job_spreads_parts_over_both_nodes(cluster):
    """`ray job submit -- python launch/render.py --ray`: parts render on both nodes; the dataset is a local render's."""
    from metafx.config import load_config
    from metafx.data.plan import dataset_hash
    from metafx.data.render import render_taskset

    c = cluster
    assert c.alive_nodes() == 2
    cache = c.root / "render-cache"
    sid = "metafx-render"
    c.submit_cmd(sid, ["python", "launch/render.py", "--space", "lstm.yaml", "--budget", "smoke", "--ray", "--quiet",
                       "--tasks-per-part", "3", "--set", f"data.cache_dir={cache}"], {})
    info = c.wait_job(sid, 300)
    logs = c.logs(sid)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    assert "on Ray: 4 parts of <= 3 tasks x 1 CPU on 2 node(s)" in logs, logs[-3000:]

    cfg = load_config("lstm.yaml", "smoke", overrides={"data.cache_dir": str(cache)})
    h = dataset_hash(cfg.data)
    assert sorted(p.name for p in cache.iterdir()) == [h], "parts or tmp dirs left in the cache"
    dist = json.loads((cache / h / "manifest.json").read_text())["render"]["distributed"]
    on = {p["name"]: p["node_id"] for p in dist["parts"]}
    assert len(on) == 4 and set(on.values()) == {c.node_ids["head"], c.node_ids["worker"]}, on
    assert dist["nodes"] == {n: list(on.values()).count(n) for n in set(on.values())}
    local = load_config("lstm.yaml", "smoke", overrides={"data.cache_dir": str(c.root / "local-cache")})
    _same_dataset(cache / h, render_taskset(local.data, progress=False))


def test_ray_job_stop_closes_the_mlflow_runs_as_killed(cluster):
    """`ray job stop` mid-search (SIGTERM to the driver): the parent and the running trials' runs end KILLED."""
    from mlflow import MlflowClient

    c = cluster
    assert c.alive_nodes() == 2
    name, sid = "cluster-stop", "metafx-stop"
    c.submit(sid, ["--storage", str(c.root / "shared"), "--name", name, "--num-samples", "4",
                   "--set", "search.scheduler=fifo", "--set", "maml.meta_steps=400",
                   "--set", "maml.eval_every=4", "--set", "maml.checkpoint_every=4"],
             {"METAFX_SHARED_STORAGE": "1"})
    client = MlflowClient(c.tracking_uri)
    running: list[str] = []
    deadline = time.time() + 300
    while not running and time.time() < deadline:
        info = c.job(sid)
        assert info["status"] in ("PENDING", "RUNNING"), f"{info}\n{c.logs(sid)[-5000:]}"
        exp = client.get_experiment_by_name("lstm")
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`metafx.search_name` = '{name}'")
            running = [r.info.run_id for r in runs
                       if "mlflow.parentRunId" in r.data.tags and r.info.status == "RUNNING"]
        if not running:
            time.sleep(1)
    assert running, f"no trial run became RUNNING:\n{c.logs(sid)[-5000:]}"

    r = c.ray("job", "stop", "--address", c.dashboard, sid)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = c.wait_job(sid, 120)
    assert info["status"] == "STOPPED", info
    logs = c.logs(sid)
    # The driver unwound through KeyboardInterrupt (not Ray's abort, not the SIGKILL after the grace period).
    assert "interrupted: continue with" in logs and "SIGTERM received" not in logs, logs[-5000:]
    # The job supervisor says which way the driver went: it exited within the grace period after
    # SIGTERM, or it was force-killed with SIGKILL when the period ran out. Its log line is written
    # once the driver is gone, whatever the machine's speed; wait for it, not for a time.
    sup = c.raytmp / "head" / "session_latest" / "logs" / "jobs" / f"supervisor-{sid}.log"
    c._wait(lambda: "terminated gracefully" in sup.read_text() or "force-killed" in sup.read_text(), 180,
            f"the job supervisor's verdict in {sup}")
    verdict = sup.read_text()
    assert "has been terminated gracefully with SIGTERM" in verdict and "force-killed" not in verdict, verdict[-3000:]

    client, parent, children = _mlflow_search(c, name)
    assert parent.info.status == "KILLED", parent.info.status
    assert parent.data.tags.get("metafx.closed_by") == "close_dangling"
    status = {ch.info.run_id: ch.info.status for ch in children}
    assert all(status[rid] == "KILLED" for rid in running), (running, status)
    assert set(status.values()) <= {"KILLED", "FINISHED"}, status  # none RUNNING


def test_node_killed_mid_search_trials_resume_on_the_survivor(cluster):
    """Must run last: the second node is killed for good."""
    c = cluster
    assert c.alive_nodes() == 2
    storage = c.root / "shared"
    name, sid = "cluster-kill", "metafx-kill"
    steps, every = 16, 4
    # FIFO so that every trial runs to the end; second-order MAML makes a trial last ~10 s. Four
    # trials on two one-CPU nodes: whichever node frees first takes the third, the other the fourth,
    # so a trial always runs on the second node after one has finished.
    c.submit(sid, ["--storage", str(storage), "--name", name, "--num-samples", "4",
                   "--set", "search.scheduler=fifo", "--set", f"maml.meta_steps={steps}",
                   "--set", f"maml.checkpoint_every={every}", "--set", f"maml.eval_every={every}",
                   "--set", "search.params.maml.first_order=null", "--set", "maml.first_order=false",
                   "--set", "search.params.maml.inner_steps=null", "--set", "maml.inner_steps=1",
                   "--set", "search.params.model.lstm.hidden=null", "--set", "model.lstm.hidden=16"],
             {"METAFX_SHARED_STORAGE": "1"})
    exp = storage / name
    worker = c.node_ids["worker"]

    # Wait until a trial has finished and another one, running on the second node, has checkpointed.
    victim = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline:
        info = c.job(sid)
        assert info["status"] in ("PENDING", "RUNNING"), f"{info}\n{c.logs(sid)[-5000:]}"
        res = _results(exp)
        finished = [t for t, rows in res.items() if any(r.get("done") for r in rows)]
        running_there = [t for t, rows in res.items() if rows and not any(r.get("done") for r in rows)
                         and rows[-1].get("node_id") == worker and rows[-1].get("checkpoint_dir_name")
                         and rows[-1].get("step", 0) < steps - every]
        if finished and running_there:
            victim = running_there[0]
        else:
            time.sleep(0.3)
    assert victim is not None, f"no trial on the second node to interrupt:\n{c.logs(sid)[-5000:]}"
    before = _results(exp)
    finished_before = {t: rows for t, rows in before.items() if any(r.get("done") for r in rows)}

    killed = c.groups["worker"].kill(sig_kill_only=True)  # the whole node: raylet, agents, workers
    assert killed
    c._wait(lambda: c.alive_nodes() == 1, 120, "the head to see the second node dead")

    info = c.wait_job(sid, 420)
    logs = c.logs(sid)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"

    # Tune's view: every trial finished; the victim failed once and was restored, the others never failed.
    state_file = max(exp.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    trials = {}
    for trial_json, meta_json in json.loads(state_file.read_text())["trial_data"]:
        t, meta = json.loads(trial_json), json.loads(meta_json)
        trials[t["trial_id"]] = (t["status"], meta["num_failures"])
    assert len(trials) == 4 and all(st == "TERMINATED" for st, _ in trials.values()), trials
    after = _results(exp)
    vid = after[victim][0]["trial_id"]
    assert trials[vid][1] >= 1, trials

    # The victim continued on the head from its last checkpoint: no restart from step 1.
    rows = after[victim]
    moved = [i for i, r in enumerate(rows) if r.get("node_id") != worker]
    assert moved, "the victim never ran on the head"
    first_after = rows[moved[0]]
    ckpt_steps = {r["step"] for r in rows[:moved[0]] if r.get("checkpoint_dir_name")}
    assert first_after["node_id"] == c.node_ids["head"]
    assert first_after["step"] > every and first_after["step"] - every in ckpt_steps, \
        ([(r.get("step"), r.get("node_id", "")[:8]) for r in rows], sorted(ckpt_steps))
    assert any(r.get("done") and "test/query_l1_post" in r for r in rows)

    # No finished trial was lost or rerun.
    for t, rows_before in finished_before.items():
        assert after[t] == rows_before, f"finished trial {t} changed after the node died"
        assert trials[rows_before[0]["trial_id"]][1] == 0

    # MLflow: one run per trial, all FINISHED (none RUNNING), the victim's history continuous to the end.
    client, parent, children = _mlflow_search(c, name)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4, [ch.info.run_name for ch in children]
    assert all(ch.info.status == "FINISHED" for ch in children), [(ch.info.run_name, ch.info.status) for ch in children]
    run = next(ch for ch in children if ch.data.tags.get("metafx.ray_trial_id") == vid)
    hist = sorted({h.step for h in client.get_metric_history(run.info.run_id, "val/query_l1_post")})
    assert hist[0] == every and hist[-1] == steps, hist
    assert set(range(every, steps + 1, every)) <= set(hist), hist
    assert "test/query_l1_post" in run.data.metrics
