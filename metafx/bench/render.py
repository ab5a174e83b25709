"""Benchmark: task-set render speed (multiple of real time) and peak memory.

    python launch/bench.py render [--budget local] [--space lstm.yaml] [-- --workers N --tmp DIR --keep]

One run renders the study's task set at the budget into a fresh temporary cache
directory (so nothing is reused), in a subprocess so that its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. It reports:

* wall time of ``render_taskset`` (source synthesis, Faust compilation, rendering,
  writing and fsyncing the arrays, manifest) and the pure render time;
* audio seconds rendered (tasks x source seconds) and the speed as a multiple of
  real time (audio seconds / wall seconds);
* peak RSS of the rendering process, the dataset size on disk;
* opening the :class:`~metafx.data.tasks.TaskSet` (memory-mapped) and drawing 100
  episodes at the budget's slice sizes: time and RSS growth, which shows that the
  arrays are not copied into the process.

The temporary directory is deleted afterwards unless ``--keep``. Results are
merged into ``benchmarks/render.json`` (keyed by study and budget) and
``benchmarks/render.md`` is regenerated from it, with the exact command and the
machine (cores, memory, CPU, date).

Options after the suite name: ``--workers N`` (render threads; default the
study's ``data.render_workers``), ``--tmp DIR`` (where the temporary cache goes;
default the system temp dir; the paper budget needs about 14 GB there),
``--keep`` (do not delete the rendered task set), ``--timeout S`` (3600).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from metafx.bench.machine import cpu_model
from metafx.bench.report_files import write_report

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rss_mb() -> dict[str, float]:
    """Resident memory of this process from /proc/self/status, MB: total, private (anon) and file-backed.

    File-backed pages of a memory-mapped dataset are shared page cache (one copy per node);
    private (anonymous) growth would mean the arrays were copied.
    """
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Render one budget into ``spec["cache"]`` in this process and measure it."""
    from metafx.config import load_config
    from metafx.data.render import render_taskset
    from metafx.data.tasks import EpisodeSampler, TaskSet

    ov = {"data.cache_dir": spec["cache"]}
    if spec.get("workers") is not None:
        ov["data.render_workers"] = spec["workers"]
    cfg = load_config(spec["space"], spec["budget"], overrides=ov)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    path = render_taskset(cfg.data, progress=True).path
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    maxrss_render = ru.ru_maxrss / 1024  # KB -> MB on Linux
    m = json.loads((path / "manifest.json").read_text())

    rss1 = _rss_mb()
    t1 = time.perf_counter()
    ts = TaskSet(path)
    mc = cfg.maml
    s = EpisodeSampler(ts, "train", mc.k_support, mc.k_query, mc.slice_len, seed=0)
    for _ in range(100):
        s.sample()
    open_s = time.perf_counter() - t1
    rss2 = _rss_mb()
    size = sum(p.stat().st_size for p in path.iterdir())
    r = m["render"]
    return {
        "space": spec["space"],
        "budget": spec["budget"],
        "tasks": m["num_tasks"],
        "dropped": len(m["dropped"]),
        "families": [f["name"] for f in m["families"]],
        "sample_rate": m["sample_rate"],
        "source_seconds": m["seconds"],
        "audio_seconds": m["num_tasks"] * m["seconds"],
        "workers": r["workers"],
        "wall_seconds": round(wall, 3),
        "synth_seconds": r["source_seconds"],
        "render_seconds": r["render_seconds"],
        "speed_x_realtime": round(m["num_tasks"] * m["seconds"] / wall, 1),
        "render_only_x_realtime": round(m["num_tasks"] * m["seconds"] / r["render_seconds"], 1),
        "peak_rss_mb": round(maxrss_render, 1),
        "cpu_user_seconds": round(ru.ru_utime, 1),  # whole process up to the end of the render (incl. imports)
        "cpu_system_seconds": round(ru.ru_stime, 1),
        "rss_before_render_mb": round(rss0["VmRSS"], 1),
        "dataset_gb": round(size / 1e9, 3),
        "open_and_100_episodes_seconds": round(open_s, 3),
        "private_rss_growth_open_and_episodes_mb": round(rss2["RssAnon"] - rss1["RssAnon"], 1),
        "shared_file_rss_growth_open_and_episodes_mb": round(rss2["RssFile"] - rss1["RssFile"], 1),
        "slice": f"{mc.k_support}+{mc.k_query} x {mc.slice_len}",
    }


def _machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numpy as np

    try:
        import importlib.metadata as md

        daw = md.version("dawdreamer")
    except Exception:  # noqa: BLE001 - version lookup only
        daw = "?"
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "cpu": cpu_model(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dawdreamer": daw,
    }


def _write(out_dir: Path, result: dict[str, Any], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / "render.json"
    data = json.loads(jpath.read_text()) if jpath.is_file() else {"runs": {}}
    result = {**result, "command": command, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": _machine()}
    data["runs"][f"{result['space']}:{result['budget']}"] = result

    lines = [
        "# Render benchmark",
        "",
        "Task-set rendering with DAWDreamer (Faust), into a fresh temporary cache (nothing reused).",
        "Speed = audio seconds rendered (tasks x source seconds) / wall seconds of `render_taskset`",
        "(source synthesis, Faust compilation, rendering, writing + fsync of the arrays, manifest);",
        "render-only = the same over the thread-pool render phase alone. Peak RSS is the rendering",
        "process's `ru_maxrss`. 'Open + 100 episodes' opens the memory-mapped TaskSet and draws 100",
        "training episodes: growth of private (anonymous) memory, i.e. copies, and of shared file-backed",
        "pages (the page cache every process on the node shares; kernel read-ahead maps more than the slices).",
        "",
        "| study | budget | tasks | source | audio | threads | wall | speed | render-only | peak RSS | dataset | open + 100 episodes | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"].values():
        lines.append(
            f"| {r['space']} | {r['budget']} | {r['tasks']} | {r['source_seconds']:g} s @ {r['sample_rate'] // 1000} kHz "
            f"| {r['audio_seconds']:.0f} s | {r['workers']} | {r['wall_seconds']:.1f} s | {r['speed_x_realtime']:.0f}x "
            f"| {r['render_only_x_realtime']:.0f}x | {r['peak_rss_mb']:.0f} MB | {r['dataset_gb']:.2f} GB "
            f"| {r['open_and_100_episodes_seconds']:.2f} s, private +{r['private_rss_growth_open_and_episodes_mb']:.0f} MB, "
            f"shared +{r['shared_file_rss_growth_open_and_episodes_mb']:.0f} MB | {r['date'][:10]} |"
        )
    lines += ["", "## Commands and machines", ""]
    for r in data["runs"].values():
        mch = r["machine"]
        lines.append(f"- `{r['command']}` ({r['date']}): {mch['cores']} cores, {mch['memory_gib']} GiB, {mch['cpu']}; "
                     f"{mch['os']}; Python {mch['python']}, numpy {mch['numpy']}, dawdreamer {mch['dawdreamer']}. "
                     f"Source synthesis {r['synth_seconds']:.1f} s; render phase {r['render_seconds']:.1f} s; "
                     f"CPU user {r.get('cpu_user_seconds', '?')} s, system {r.get('cpu_system_seconds', '?')} s (whole process); "
                     f"families {', '.join(r['families'])}; {r['dropped']} unstable dropped; slices {r['slice']}.")
    write_report(out_dir, "render", data, "\n".join(lines) + "\n", indent=1)


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Entry point from ``launch/bench.py render``.

    Args:
        args: ``budget``, ``space``, ``out`` from launch/bench.py.
        rest: suite options (see the module docstring).

    Returns:
        Exit status (0 on success).
    """
    ap = argparse.ArgumentParser(prog="bench.py render")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600.0)
    opts = ap.parse_args([r for r in rest if r != "--"])
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    command = " ".join(["python launch/bench.py render", f"--budget {args.budget}", f"--space {args.space}", *rest])

    tmp = Path(tempfile.mkdtemp(prefix="metafx-bench-render-", dir=opts.tmp))
    spec = {"space": args.space, "budget": args.budget, "cache": str(tmp), "workers": opts.workers}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "metafx.bench.render", json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE, text=True, timeout=opts.timeout, cwd=REPO_ROOT)
        if proc.returncode != 0:
            print(f"render benchmark failed (exit {proc.returncode}); see the output above", file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if opts.keep:
            print(f"kept the rendered task set in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    _write(out_dir, result, command)
    print(json.dumps(result, indent=1))
    print(f"wrote {out_dir / 'render.md'} and {out_dir / 'render.json'}")
    return 0


if __name__ == "__main__":  # the measuring subprocess
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run_child(json.loads(sys.argv[1]))))
