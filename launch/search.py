"""The main job: a distributed hyperparameter search over MAML trials.

    python launch/search.py --space lstm.yaml [--budget smoke|local|paper] [--num-samples N]
        [--resume] [--name NAME] [--storage PATH_OR_URI] [--tracking-uri URI] [--verbose-ray]

Without RAY_ADDRESS an embedded local Ray starts (bound to 127.0.0.1); with it
(as under `ray job submit`) the search joins that cluster. Results and
checkpoints go to --storage (default ray_results/ in the repo), MLflow records go
to --tracking-uri (default: SQLite in mlruns/).

Output: one line per trial event (started; finished with its best validation value and
test MAE; stopped by ASHA; failed; restarted by Ray after a lost worker), then the trials
best first, the best configuration and checkpoint, and the MLflow view of the trials.
Ray's own output (Tune's status tables, its log lines, the trial workers' output) is left
out; --verbose-ray shows it. The best trial is the one defined by
metafx.records.best_definition, stated in the output.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from metafx import cli  # noqa: E402
from metafx.config import ConfigError  # noqa: E402

TABLE_METRICS = ("test/query_esr_post", "test/lsfir/query_esr_post", "test/query_l1_post", "test/identity_l1",
                 "test/lsfir/query_l1_post", "test/query_stft_post", "test/lsfir/query_stft_post")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=cli.EXIT_STATUS_HELP.replace(
        "training (a non-finite loss)", "training (a non-finite loss; no trial of a search finished)"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--verbose-ray", action="store_true",
                    help="also show Ray's own output: Tune's status tables and log lines, the trial workers' "
                         "output (checkpoint notes, warnings), ANSI colours")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose_ray and not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI colour codes in a log file
    interrupted = ("continue with  python launch/search.py --space "
                   f"{args.space} --resume" + (f" --name {args.name}" if args.name else ""))
    return cli.run(lambda: _search(args), interrupted=interrupted)


def _search(args: argparse.Namespace) -> int:
    cfg = cli.load_study(args.space, args.budget, args.set)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples}: need at least 1 trial")
    from metafx.search import run_search
    from metafx.search_space import check_space

    check_space(cfg)  # before Ray starts
    out = run_search(cfg, name=args.name, storage=args.storage, tracking_uri=args.tracking_uri,
                     resume=args.resume, num_samples=args.num_samples, track=not args.no_tracking,
                     verbose_ray=args.verbose_ray)
    return report(out, cfg.search.metric, tracking_uri=args.tracking_uri)


def report(out, metric: str, tracking_uri: str | None = None, stream=None) -> int:
    """Print a search's outcome; the exit status: 0 when a trial finished, 1 when none did.

    Args:
        out: the :class:`metafx.records.SearchSummary`.
        metric: the search metric.
        tracking_uri: where MLflow recorded it (for the UI hint).
        stream: where to print (default stdout; failures go to stderr).

    Returns:
        :data:`metafx.cli.EXIT_OK`, or :data:`metafx.cli.EXIT_FAILED` when no trial finished.
    """
    from metafx.plots import trial_table_markdown

    stream = stream or sys.stdout
    best_col = f"best {metric}"
    rows = out.table
    cols = ["rank", "name", "status", "step", best_col, "best step"]
    cols += [c for c in TABLE_METRICS if any(c in r for r in rows)]
    cols += ["stft"] if any("stft" in r for r in rows) else []
    print(f"\nTrials, best first ({out.definition}):\n", file=stream)
    print(trial_table_markdown(rows, cols), file=stream)
    n = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped", "failed")}
    print(f"{len(rows)} trials: {n['finished']} finished, {n['stopped']} stopped early by ASHA, "
          f"{n['failed']} failed", file=stream)
    if out.best_config_path:
        m = out.best_metrics

        def f(k: str) -> str:
            v = m.get(k, math.nan)
            return f"{v:.4g}"

        print(f"best trial: {out.best_trial}", file=stream)
        print(f"  {metric} = {out.best_value:.5g} (its best validation report; the checkpoint tested)", file=stream)
        print(f"  test ESR {f('test/query_esr_post')} (identity {f('test/identity/query_esr_post')}, LS-FIR "
              f"{f('test/lsfir/query_esr_post')}); STFT {f('test/query_stft_post')} (LS-FIR "
              f"{f('test/lsfir/query_stft_post')})", file=stream)
        print(f"  test MAE {f('test/query_l1_post')} (before adaptation {f('test/query_l1_pre')}, identity "
              f"{f('test/identity_l1')}, LS-FIR {f('test/lsfir/query_l1_post')})", file=stream)
        print(f"best configuration: {out.best_config_path}", file=stream)
        print(f"  rerun: python launch/train.py --space {out.best_config_path}", file=stream)
        print(f"best checkpoint:    {out.best_checkpoint}", file=stream)
        if out.model_uri:
            print(f"best meta-model:    {out.model_uri} (MLflow Model Registry; capture an effect with it: "
                  f"python launch/capture.py --model {out.model_uri} --wet recorded.wav --out DIR)", file=stream)
    print(f"experiment: {out.experiment_path}", file=stream)
    if out.parent_run_id:
        print(f"MLflow parent run: {out.parent_run_id} (open with: make ui)", file=stream)
        if out.view_path:
            print(f"  the trials ranked, in the UI (make ui): http://127.0.0.1:5000/{out.view_path}", file=stream)
    if out.best_config_path:
        return cli.EXIT_OK
    print(f"error: no trial of search {out.name!r} finished its evaluation:", file=sys.stderr)
    for k in out.failures:
        print(f"  {k['count']} trial(s) failed with {k['kind']}; first ({k['trial']}): {k['first']}",
              file=sys.stderr)
    if not out.failures:
        print("  every trial was stopped before its evaluation", file=sys.stderr)
    return cli.EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
