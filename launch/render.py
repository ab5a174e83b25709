"""Render (or reuse) the task set of a study and report it.

    python launch/render.py --space lstm.yaml [--budget smoke|local|paper] [--set key=value ...]
        [--ray [--cpus-per-part N] [--tasks-per-part N]]

Prints the dataset path, tasks per split, seconds of audio, and the render time
and speed as a multiple of real time (or that the set was reused from the cache).

--ray spreads the render over a Ray cluster (metafx.data.distributed): the one named by
RAY_ADDRESS (as under `ray job submit`), else a local Ray on this machine. Each part (a
chunk of tasks of one family) is a Ray task; the cache (data.cache_dir / $METAFX_CACHE)
must be on storage every node sees. The result is the dataset a local render writes.

The first lines say which keys the budget replaces (value in the study -> value used).
An interrupted render (Ctrl-C, SIGTERM) leaves no dataset directory half-written.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metafx import cli  # noqa: E402
from metafx.config import BUDGETS, ConfigError, check_audio_length  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=cli.EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="lstm.yaml", help="study name in search_spaces/ or a path to a study YAML")
    ap.add_argument("--budget", default=None, choices=BUDGETS, help="scale (default: the file's budget, else local)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a dotted config key, e.g. --set data.source.seconds=30 (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--ray", action="store_true",
                    help="spread the render over the Ray cluster at RAY_ADDRESS (else a local Ray)")
    ap.add_argument("--cpus-per-part", type=int, default=1, metavar="N",
                    help="with --ray: CPUs (render threads) of each Ray task (default 1)")
    ap.add_argument("--tasks-per-part", type=int, default=None, metavar="N",
                    help="with --ray: tasks per part (default: about two parts per CPU slot)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.run(lambda: _render(args), interrupted="no dataset was written; finished parts of a --ray render "
                                                     "are kept and reused by the next run")


def _render(args: argparse.Namespace) -> int:
    if args.cpus_per_part < 1 or (args.tasks_per_part is not None and args.tasks_per_part < 1):
        raise ConfigError("--cpus-per-part and --tasks-per-part must be >= 1")
    cfg = cli.load_study(args.space, args.budget, args.overrides)

    from metafx.data.render import render_taskset  # the dawdreamer import
    from metafx.data.tasks import TaskSet

    t0 = time.perf_counter()
    with cli.naming_study(cfg):
        if args.ray:
            from metafx.cluster import init_ray
            from metafx.data.distributed import render_on_ray

            init_ray(None)
            result = render_on_ray(cfg, cpus_per_part=args.cpus_per_part, tasks_per_part=args.tasks_per_part,
                                   progress=not args.quiet)
        else:
            result = render_taskset(cfg.data, progress=not args.quiet)
    wall = time.perf_counter() - t0
    ts, rendered = TaskSet(result.path), result.rendered

    n = len(ts)
    audio = n * ts.seconds
    print(f"study:    {cfg.name} (budget {cfg.budget})")
    print(f"dataset:  {ts.path}")
    print(f"tasks:    {n} (train {len(ts.split('train'))}, val {len(ts.split('val'))}, test {len(ts.split('test'))})"
          + (f", {len(ts.manifest['dropped'])} unstable dropped" if ts.manifest["dropped"] else ""))
    print(f"families: {', '.join(ts.families)}")
    print(f"audio:    {ts.seconds:.1f} s source at {ts.sample_rate} Hz; {audio:.1f} s of targets")
    dist = ts.manifest["render"].get("distributed")
    if rendered and dist:
        per_node = ", ".join(f"{nid[:8]}: {n}" for nid, n in dist["nodes"].items())
        reused = sum(p["reused"] for p in dist["parts"])
        print(f"render:   {wall:.2f} s, {audio / wall:.0f}x real time on Ray: {len(dist['parts'])} parts of <= "
              f"{dist['tasks_per_part']} tasks x {dist['cpus_per_part']} CPU on {len(dist['nodes'])} node(s) "
              f"({per_node})" + (f", {reused} reused" if reused else ""))
    elif rendered:
        print(f"render:   {wall:.2f} s, {audio / wall:.0f}x real time ({ts.manifest['render']['workers']} threads)")
    else:
        r = ts.manifest["render"]
        print(f"render:   reused from cache (originally {r['total_seconds']:.2f} s, {r['speed_x_realtime']:.0f}x real time)")
    check_audio_length(cfg, ts.num_samples)  # the dataset is kept; the study's slices need more audio
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
