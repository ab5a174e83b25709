"""The main job: a distributed hyperparameter search over MAML trials.

    python launch/search.py --space lstm.yaml [--budget smoke|local|paper] [--num-samples N]
        [--resume] [--name NAME] [--storage PATH_OR_URI] [--tracking-uri URI]

Without RAY_ADDRESS an embedded local Ray starts (bound to 127.0.0.1); with it
(as under `ray job submit`) the search joins that cluster. Results and
checkpoints go to --storage (default ray_results/ in the repo), MLflow records go
to --tracking-uri (default: SQLite in mlruns/).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from metafx.config import ConfigError, load_config  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="lstm.yaml", help="study name in search_spaces/ or a YAML path")
    ap.add_argument("--budget", choices=["smoke", "local", "paper"], default=None, help="default: local")
    ap.add_argument("--num-samples", type=int, default=None, help="override search.num_samples")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted search: the one named by --name, else the latest of this study")
    ap.add_argument("--name", default=None, help="search name (default <study>-<budget>-<date>-<time>)")
    ap.add_argument("--storage", default=None, help="Tune storage: a folder, or shared storage (s3://, NFS)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite in mlruns/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--no-tracking", action="store_true", help="do not record to MLflow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (a scheduler or `ray job stop`) unwinds like Ctrl-C, so open MLflow runs are closed as KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cfg = load_config(args.space, args.budget, args.set)
        if args.num_samples is not None and args.num_samples < 1:
            raise ConfigError(f"--num-samples {args.num_samples}: need at least 1 trial")
        from metafx.search import run_search
        from metafx.search_space import check_space

        check_space(cfg)  # before Ray starts
        out = run_search(cfg, name=args.name, storage=args.storage, tracking_uri=args.tracking_uri,
                         resume=args.resume, num_samples=args.num_samples, track=not args.no_tracking)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with  python launch/search.py --space "
              f"{args.space} --resume" + (f" --name {args.name}" if args.name else ""), file=sys.stderr)
        return 130
    cols = [c for c in ("trial", "status", "step") if any(c in r for r in out.table)]
    metric_cols = [cfg.search.metric, "test/query_l1_post", "test/query_stft_post", "test/lsfir/query_l1_post"]
    param_cols = sorted({k for r in out.table for k in r if "." in k and k not in metric_cols})
    key = cfg.search.metric
    rows = sorted(out.table, key=lambda r: (r.get(key) is None, r.get(key) if r.get(key) is not None else 0),
                  reverse=cfg.search.mode == "max")
    print("\nTrials (best first):\n")
    from metafx.plots import trial_table_markdown

    print(trial_table_markdown(rows, cols + [c for c in metric_cols if any(c in r for r in rows)] + param_cols))
    if out.best_config_path:
        m = out.best_metrics
        print(f"best {key} = {m.get(key):.5g}; test MAE {m.get('test/query_l1_post', float('nan')):.4f} "
              f"(before adaptation {m.get('test/query_l1_pre', float('nan')):.4f}, identity "
              f"{m.get('test/identity_l1', float('nan')):.4f}, LS-FIR {m.get('test/lsfir/query_l1_post', float('nan')):.4f})")
        print(f"best configuration: {out.best_config_path}")
        print(f"  rerun: python launch/train.py --space {out.best_config_path}")
        print(f"best checkpoint:    {out.best_checkpoint}")
    else:
        print("no trial finished its evaluation; see the table above")
    print(f"experiment: {out.experiment_path}")
    if out.parent_run_id:
        print(f"MLflow parent run: {out.parent_run_id} (open with: make ui)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
