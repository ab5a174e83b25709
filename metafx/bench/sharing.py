"""Is the task set held once per node? Per-process memory of 4 concurrent trial processes.

    python launch/bench.py sharing [--budget local] [--space lstm.yaml]

Four Ray actors (as four concurrent trials would be) open the same rendered task
set and read every sample of it. From /proc/<pid>/smaps_rollup of each we record
RSS (counts shared pages once per process), PSS (shared pages divided among their
users) and USS (private pages). For comparison, the same four actors then each make
a private copy of the arrays, as a loader that reads the files into memory would.
Results go to benchmarks/sharing.md and benchmarks/sharing.json.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from metafx.bench.report_files import write_report
from metafx.config import REPO_ROOT, load_config

N_TRIALS = 4


def _rollup(pid: int | str = "self") -> dict[str, int]:
    """Rss, Pss and private (USS) kB of a process, from /proc/<pid>/smaps_rollup."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return {"rss_mb": out.get("Rss", 0) / 1024, "pss_mb": out.get("Pss", 0) / 1024,
            "uss_mb": (out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)) / 1024}


def main(args, rest) -> int:
    import numpy as np
    import ray

    from metafx.data.tasks import TaskSet, load_taskset

    cfg = load_config(args.space, args.budget)
    ts = load_taskset(cfg.data)
    size_mb = (ts.targets.nbytes + ts.input.nbytes) / 2**20

    @ray.remote(num_cpus=0)
    class Trial:
        def __init__(self, path: str):
            self.ts = TaskSet(path)
            self.copy = None

        def touch(self) -> float:
            # Read every sample (as episodes over all tasks eventually do), without copying.
            acc = 0.0
            for i in range(self.ts.targets.shape[0]):
                acc += float(np.asarray(self.ts.targets[i], dtype=np.float32).sum(dtype=np.float64))
            return acc + float(self.ts.input.sum(dtype=np.float64))

        def private_copy(self) -> float:
            self.copy = (np.array(self.ts.input), np.array(self.ts.targets))
            return float(self.copy[1].sum(dtype=np.float64))

        def memory(self) -> dict:
            return {"pid": os.getpid(), **_rollup()}

    from metafx.cluster import init_ray, shutdown_ray

    init_ray(N_TRIALS)  # the search's own local Ray: loopback only, as trials run
    try:
        actors = [Trial.remote(str(ts.path)) for _ in range(N_TRIALS)]
        t0 = time.time()
        ray.get([a.touch.remote() for a in actors])
        shared = ray.get([a.memory.remote() for a in actors])
        ray.get([a.private_copy.remote() for a in actors])
        copied = ray.get([a.memory.remote() for a in actors])
        wall = time.time() - t0
    finally:
        shutdown_ray()

    def total(rows, key):
        return sum(r[key] for r in rows)

    result = {
        "command": f"python launch/bench.py sharing --budget {args.budget} --space {args.space}",
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "python": sys.version.split()[0], "budget": args.budget, "tasks": len(ts), "seconds": ts.seconds,
        "taskset_mb": size_mb, "trials": N_TRIALS, "memory_mapped": shared, "private_copies": copied,
        "sum_uss_mb_mapped": total(shared, "uss_mb"), "sum_pss_mb_mapped": total(shared, "pss_mb"),
        "sum_uss_mb_copied": total(copied, "uss_mb"), "wall_seconds": wall,
    }
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Task set sharing: 4 concurrent trial processes on one node",
        "",
        f"Command: `{result['command']}` ({result['date']}, {result['machine']}).",
        "",
        f"Task set: {len(ts)} tasks x {ts.seconds:.0f} s at {ts.sample_rate} Hz = {size_mb:.0f} MB "
        "(memory-mapped .npy files in the dataset cache).",
        "",
        "Each of 4 Ray actors opens the task set and reads every sample. Then each makes a private copy",
        "(what a loader that reads the arrays into memory would hold). MB from /proc/<pid>/smaps_rollup:",
        "USS = private pages, PSS = shared pages divided among the processes that map them.",
        "",
        "| process | RSS mapped | PSS mapped | USS mapped | USS with a private copy |",
        "|---|---|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(shared, copied)):
        lines.append(f"| trial {i} | {a['rss_mb']:.0f} | {a['pss_mb']:.0f} | {a['uss_mb']:.0f} | {b['uss_mb']:.0f} |")
    lines += [
        f"| **sum** | {total(shared, 'rss_mb'):.0f} | {total(shared, 'pss_mb'):.0f} | "
        f"{total(shared, 'uss_mb'):.0f} | {total(copied, 'uss_mb'):.0f} |",
        "",
        f"Each worker's own private memory (interpreter, numpy, Ray) is about {shared[0]['uss_mb']:.0f} MB. "
        f"Memory-mapped, reading the whole {size_mb:.0f} MB task set adds nothing private: it is held once, in "
        f"the page cache, and its RSS is shared (PSS = RSS / {N_TRIALS} for those pages). Private copies add "
        f"{(total(copied, 'uss_mb') - total(shared, 'uss_mb')) / N_TRIALS:.0f} MB per process, "
        f"{total(copied, 'uss_mb') - total(shared, 'uss_mb'):.0f} MB for {N_TRIALS} trials.",
        "",
    ]
    write_report(out, "sharing", result, "\n".join(lines))
    print("\n".join(lines))
    return 0
