"""Run one trial: meta-train with a study's defaults (or overrides), evaluate, write metrics.

    python launch/train.py --space lstm.yaml [--budget smoke|local|paper] \
        [--set maml.inner_lr=0.05 ...] [--results out.json] [--workdir DIR] [--resume DIR]

No Ray and no MLflow on this path. ``--space`` also accepts the best-config YAML a
search writes. The first lines say which keys the budget replaces (value in the study
-> value used).
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metafx import cli  # noqa: E402
from metafx.config import BUDGETS, ConfigError, check_audio_length  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=cli.EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", required=True, help="study name in search_spaces/ or a YAML path")
    ap.add_argument("--budget", choices=BUDGETS, default=None, help="scale (default: the file's budget, else local)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--results", type=Path, default=None, help="write every metric to this JSON file")
    ap.add_argument("--workdir", type=Path, default=None, help="checkpoints (and artifacts) go here")
    ap.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint file or folder")
    ap.add_argument("--no-baselines", action="store_true", help="skip the joint and single-task baselines")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.run(lambda: _train(args), interrupted=lambda: _interrupted(args, argv))


def _interrupted(args: argparse.Namespace, argv: list[str] | None) -> str:
    """What an interrupted run kept, and how to continue it."""
    train = sys.modules.get("metafx.train")  # not imported yet: interrupted before training, nothing kept
    ckpt = args.workdir / "checkpoint" if args.workdir is not None else None  # where meta_train keeps them
    if train is None or ckpt is None or not (ckpt / train.CHECKPOINT_FILE).is_file():
        return "no checkpoint was kept" + ("" if args.workdir else " (give --workdir DIR to keep them)")
    given = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in given:  # continue from the newest checkpoint, not the one resumed from before
        i = given.index("--resume")
        del given[i:i + 2]
    return f"continue with  python launch/train.py {shlex.join(given + ['--resume', str(ckpt)])}"


def _train(args: argparse.Namespace) -> int:
    cfg = cli.load_study(args.space, args.budget, args.set)

    from metafx.data.tasks import load_taskset
    from metafx.train import CHECKPOINT_FILE, meta_train

    if args.resume is not None:
        f = args.resume / CHECKPOINT_FILE if args.resume.is_dir() else args.resume
        if not f.is_file():
            raise ConfigError(f"--resume {args.resume}: no checkpoint at {f}")

    with cli.naming_study(cfg):
        taskset = load_taskset(cfg.data)
        check_audio_length(cfg, taskset.num_samples)

    def report(metrics: dict, ckpt) -> None:
        shown = {k: round(v, 4) for k, v in metrics.items() if k in
                 ("support_l1_pre", "support_l1_post", "query_l1_post", "val/query_l1_post")}
        print(f"step {int(metrics.get('step', 0)):5d}  {shown}", flush=True)

    res = meta_train(cfg, taskset, report, workdir=args.workdir, resume_from=args.resume,
                     baselines=not args.no_baselines, artifacts=args.workdir is not None)
    m = res.metrics
    print(f"\n{cfg.name} ({cfg.model.arch}, method {cfg.maml.method}, {res.params} parameters, best step {res.best_step}, "
          f"{res.wall_seconds:.1f} s)")
    for name in ("", "identity/", "lsfir/", "joint/", "single_task/"):
        l1 = m.get(f"test/{name}query_l1_post")
        if l1 is None:
            continue
        st = m.get(f"test/{name}query_stft_post", float("nan"))
        hf = m.get(f"test/{name}query_hf_post", float("nan"))
        print(f"  {(name.rstrip('/') or 'meta-learned'):14s} MAE {l1:.4f}  STFT {st:.3f}  HF {hf:.2f} dB")
    if "test/query_l1_pre" in m:
        print(f"  {'before adapt':14s} MAE {m['test/query_l1_pre']:.4f}  STFT {m['test/query_stft_pre']:.3f}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"config": cfg.to_dict(), "metrics": m, "history": res.history,
                                            "params": res.params}, indent=2, default=float))
        print(f"metrics written to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
