"""Render (or reuse) the task set of a study and report it.

    python launch/render.py --space lstm.yaml [--budget smoke|local|paper] [--set key=value ...]

Prints the dataset path, tasks per split, seconds of audio, and the render time
and speed as a multiple of real time (or that the set was reused from the cache).
Exit status 2 on a configuration error, 1 on a render or source error.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metafx.config import BUDGETS, ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="lstm.yaml", help="study name in search_spaces/ or a path to a study YAML")
    ap.add_argument("--budget", default=None, choices=BUDGETS, help="scale (default: the file's budget, else local)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a dotted config key, e.g. --set data.source.seconds=30 (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_config(args.space, args.budget, overrides=args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from metafx.data import render  # noqa: E402  (the dawdreamer import)
    from metafx.data.sources import SourceError
    from metafx.data.tasks import TaskSet

    before = render.renders_started
    t0 = time.perf_counter()
    try:
        ts = TaskSet(render.render_taskset(cfg.data, progress=not args.quiet))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (render.RenderError, SourceError) as e:
        print(f"render error: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    rendered = render.renders_started > before

    n = len(ts)
    audio = n * ts.seconds
    print(f"study:    {cfg.name} (budget {cfg.budget})")
    print(f"dataset:  {ts.path}")
    print(f"tasks:    {n} (train {len(ts.split('train'))}, val {len(ts.split('val'))}, test {len(ts.split('test'))})"
          + (f", {len(ts.manifest['dropped'])} unstable dropped" if ts.manifest["dropped"] else ""))
    print(f"families: {', '.join(ts.families)}")
    print(f"audio:    {ts.seconds:.1f} s source at {ts.sample_rate} Hz; {audio:.1f} s of targets")
    if rendered:
        print(f"render:   {wall:.2f} s, {audio / wall:.0f}x real time ({ts.manifest['render']['workers']} threads)")
    else:
        r = ts.manifest["render"]
        print(f"render:   reused from cache (originally {r['total_seconds']:.2f} s, {r['speed_x_realtime']:.0f}x real time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
