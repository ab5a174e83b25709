"""Rendering a task set spread over Ray (metafx.data.distributed): real Ray, real DAWDreamer, no mocks.

The default tests run on a local one-node Ray (``ray.init`` with 2 CPUs, loopback only, as
the search starts it): the parts are separate Ray tasks in separate worker processes, and
the dataset they assemble must equal a local render byte for byte. That parts land on
several nodes is shown on the two-node loopback cluster in ``tests/test_cluster.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from metafx.config import REPO_ROOT, load_config
from metafx.data.cache import HOST, is_complete
from metafx.data.plan import RenderError, dataset_hash, parts_dir, plan_parts
from metafx.data.render import prepare, render_part, render_taskset

UNSTABLE_MOOG = {"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [1000, 10000], "resonance": [0.0, 0.9]}}


def study(cache: Path, families: list[dict] | None = None, **overrides):
    ov = {"data.cache_dir": str(cache), **{k.replace("__", "."): v for k, v in overrides.items()}}
    if families is not None:
        ov["data.families"] = families
    return load_config("lstm.yaml", "smoke", overrides=ov)


def assert_same_dataset(a: Path, b: Path, *, dsp_by_name: bool = False) -> None:
    """Byte-identical arrays; manifests equal except creation time and the render report.

    ``dsp_by_name``: compare the families' .dsp paths by file name only (a job resolves them in its
    uploaded working directory; the hash covers the files' content, which is equal).
    ``a`` and ``b`` are dataset directories (or what a render returned: ``RenderResult`` is path-like).
    """
    a, b = Path(a), Path(b)
    assert a.name == b.name  # the same content hash
    for f in ("input.npy", "targets.npy"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created"), m.pop("render")
        if dsp_by_name:
            for fam in m["families"]:
                fam["dsp"] = Path(fam["dsp"]).name
    assert ma == mb


@pytest.fixture(scope="module")
def local_ray():
    """The search's own local Ray (loopback only) with 2 CPUs, shut down after the module."""
    import ray

    from metafx.cluster import init_ray

    started = not ray.is_initialized()
    init_ray(2)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def test_distributed_render_equals_local_render(local_ray, tmp_path):
    """Three families (one with an unstable setting, dropped), parts of 2 tasks: same bytes as a local render."""
    from metafx.data.distributed import render_on_ray

    fb = tmp_path / "fb.dsp"
    fb.write_text('process = + ~ *(hslider("fb", 0.5, 0, 2, 0.001));')
    fams = [UNSTABLE_MOOG, {"name": "fb", "dsp": str(fb), "params": {"fb": [0.5, 0.9, 0.99, 1.5]}},
            {"name": "cubicnl", "dsp": "cubicnl.dsp", "params": {"drive": [0.2, 0.5, 0.8, 1.0]}}]
    kw = {"data__val_fraction": 0.2, "data__test_fraction": 0.2}
    local = study(tmp_path / "local", fams, **kw)
    dist = study(tmp_path / "dist", fams, **kw)
    assert dataset_hash(local.data) == dataset_hash(dist.data)

    result = render_on_ray(dist, tasks_per_part=2, progress=False)
    assert result.rendered
    path = result.path
    ref = render_taskset(local.data, progress=False)
    assert ref.rendered
    assert_same_dataset(path, ref.path)

    m = json.loads((path / "manifest.json").read_text())
    assert len(m["dropped"]) == 2 and m["num_tasks"] == 10  # moog 10 kHz / 0.9 and fb 1.5
    d = m["render"]["distributed"]
    assert [p["tasks"] for p in d["parts"]] == [2, 2, 2, 2, 2, 2]  # family x chunk: 4 + 4 + 4 tasks
    assert [p["family"] for p in d["parts"]] == ["moog_vcf"] * 2 + ["fb"] * 2 + ["cubicnl"] * 2
    node = local_ray.get_runtime_context().get_node_id()
    assert all(p["node_id"] == node and not p["reused"] for p in d["parts"])
    assert len({p["pid"] for p in d["parts"]}) >= 1 and all(p["pid"] != os.getpid() for p in d["parts"])
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [path.name], "parts and tmp dirs are gone"

    again = render_on_ray(dist, progress=False)
    assert again.path == path and not again.rendered  # cached: no render


def test_failed_distributed_render_leaves_no_dataset(local_ray, tmp_path):
    """on_unstable: fail raises the local render's error from the part that found it; no dataset, no tmp dir."""
    from metafx.data.distributed import render_on_ray

    cfg = study(tmp_path / "c", [UNSTABLE_MOOG], data__on_unstable="fail", data__val_fraction=0.25,
                data__test_fraction=0.25)
    with pytest.raises(RenderError) as e:
        render_on_ray(cfg, tasks_per_part=1, progress=False)
    for part in ("moog_vcf", "'cutoff': 10000.0", "'resonance': 0.9", "not finite", "on_unstable: drop"):
        assert part in str(e.value), (part, str(e.value))
    h = dataset_hash(cfg.data)
    left = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert h not in left and not any(".tmp-" in n for n in left), left
    assert all(n == f"{h}.parts" for n in left), left  # at most the finished parts, kept for the next render


def test_finished_parts_of_an_interrupted_render_are_reused(local_ray, tmp_path):
    """A part finished by an earlier (interrupted) render is reused, a stale .tmp- part file removed; same bytes."""
    from metafx.data.distributed import render_on_ray

    cfg = study(tmp_path / "dist")
    prep = prepare(cfg.data)
    parts = plan_parts(prep.planned, 4)
    h = dataset_hash(cfg.data)
    out = parts_dir(cfg.data, h)
    rec = render_part(cfg.data, h, out, parts[1], extra={"node_id": "earlier"})
    # a part file a dead renderer of this host was writing (pid 2**22 + 1 exceeds Linux's pid_max default range)
    dead = out / f"{parts[2].name}.npy.tmp-{HOST}-{2**22 + 1}-00ff"
    dead.write_bytes(b"partial")
    path = render_on_ray(cfg, tasks_per_part=4, progress=False).path
    d = json.loads((path / "manifest.json").read_text())["render"]["distributed"]
    assert [p["reused"] for p in d["parts"]] == [False, True, False]
    assert d["parts"][1]["node_id"] == "earlier" and d["parts"][1]["pid"] == rec["pid"] == os.getpid()
    assert not out.exists()
    assert_same_dataset(path, render_taskset(study(tmp_path / "local").data, progress=False).path)


def test_a_node_with_other_code_is_refused(tmp_path):
    """A part renderer whose node computes another dataset hash (other .dsp, versions) refuses to render."""
    cfg = study(tmp_path / "c")
    prep = prepare(cfg.data)
    part = plan_parts(prep.planned, 4)[0]
    with pytest.raises(RenderError, match="computes dataset hash .* but the driver computed 000"):
        render_part(cfg.data, "000", parts_dir(cfg.data, "000"), part)


HEAVY = """\
    import("stdfaust.lib");
    cutoff = hslider("cutoff", 1000, 20, 20000, 0.01);
    process = seq(i, 8, fi.lowpass(8, cutoff));
"""


@pytest.mark.slow
def test_sigterm_during_a_distributed_render_leaves_no_dataset_then_resumes(tmp_path):
    """launch/render.py --ray on its own local Ray, SIGTERM once a part is finished: exit 130, no dataset
    directory, no .tmp- dataset; the rerun reuses the finished parts and equals a local render byte for byte."""
    heavy = tmp_path / "heavy.dsp"
    heavy.write_text(textwrap.dedent(HEAVY))
    fams = json.dumps([{"name": "heavy", "dsp": str(heavy),
                        "params": {"cutoff": {"low": 500, "high": 5000, "num": 24, "scale": "log"}}}])
    cache = tmp_path / "cache"
    sets = ["--set", f"data.cache_dir={cache}", "--set", f"data.families={fams}", "--set", "data.source.seconds=10"]
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "render.py"), "--space", "lstm.yaml", "--budget", "smoke",
           "--quiet", "--ray", "--tasks-per-part", "2", *sets]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cfg = load_config("lstm.yaml", "smoke", overrides={"data.cache_dir": str(cache), "data.families": json.loads(fams),
                                                       "data.source.seconds": 10})
    h = dataset_hash(cfg.data)
    out = cache / f"{h}.parts"
    log1 = tmp_path / "first.log"
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=open(log1, "w"),
                         stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None and len(list(out.glob("*.json"))) < 2:
            time.sleep(0.05)
        assert p.poll() is None, f"the render ended before it could be interrupted:\n{log1.read_text()[-3000:]}"
        assert len(list(out.glob("*.json"))) >= 2, log1.read_text()[-3000:]
        os.kill(p.pid, signal.SIGTERM)  # the driver only, as `ray job stop` or a scheduler would
        rc = p.wait(timeout=120)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the local Ray the driver started, whatever is left
        except ProcessLookupError:
            pass
        p.wait()
    assert rc == 130, log1.read_text()[-3000:]
    assert "interrupted: no dataset was written" in log1.read_text()
    left = sorted(x.name for x in cache.iterdir())
    assert left == [f"{h}.parts"], left  # no <hash>, no <hash>.tmp-*
    assert not is_complete(cache / h)
    finished = sorted(x.stem for x in out.glob("*.json"))
    assert 2 <= len(finished) < 12, finished

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f", {len(finished)} reused" in second.stdout, second.stdout
    path = cache / h
    d = json.loads((path / "manifest.json").read_text())["render"]["distributed"]
    assert sorted(x["name"] for x in d["parts"] if x["reused"]) == finished
    assert sorted(x.name for x in cache.iterdir()) == [h]
    local = load_config("lstm.yaml", "smoke", overrides={"data.cache_dir": str(tmp_path / "local"),
                                                         "data.families": json.loads(fams), "data.source.seconds": 10})
    assert_same_dataset(path, render_taskset(local.data, progress=False).path)
