"""Benchmarks; results are written to benchmarks/ in the repo.

    python launch/bench.py render   [--budget local]   # render speed (x real time), peak memory
    python launch/bench.py metastep [--budget local]   # seconds / meta-step, peak memory, per model/backend/order
    python launch/bench.py quality  [--budget local]   # the paper's Table 1 shape, with baselines
    python launch/bench.py sharing                     # task set held once by 4 concurrent trials
    python launch/bench.py leaderboard [-- --jobs 2]   # every family x method on the same held-out episodes
    python launch/bench.py methods -- --part steps|speed|stability|rows   # methods beyond the paper
    python launch/bench.py universal [--budget local]   # one meta-model for every family, and left-out families
    python launch/bench.py arx_selection               # classical ARX as a cross-validation candidate (validation)
    python launch/bench.py capture                     # capture every family's held-out setting (issue 13)
    python launch/bench.py export_rtf                  # exported model speed: model.ts and model.so, every family
    python launch/bench.py universal_capture           # capture families the meta-model never saw (issue 14)
    python launch/bench.py bank                        # when a capture offers the Wiener bank (validation settings)
    python launch/bench.py ceiling                     # single-task ceiling per architecture, to convergence
    python launch/bench.py gpu                         # the GPU path on one GPU, a few minutes (issue 15)
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metafx import cli  # noqa: E402
from metafx.config import BUDGETS  # noqa: E402

SUITES = {
    "render": "metafx.bench.render",
    "metastep": "metafx.bench.metastep",
    "quality": "metafx.bench.quality",
    "sharing": "metafx.bench.sharing",
    "leaderboard": "metafx.bench.leaderboard",
    "methods": "metafx.bench.methods",
    "universal": "metafx.bench.universal",
    "arx_selection": "metafx.bench.arx_selection",  # [-- --steps 40 --episodes 8]: cv_classical on validation
    "capture": "metafx.bench.capture",  # python launch/bench.py capture [-- --families a,b --support 0.5,1,3,10]
    "export_rtf": "metafx.bench.export_rtf",  # [-- --families a,b --support 3 --seconds 10]: model.ts vs model.so
    "universal_capture": "metafx.bench.universal_capture",  # [-- --families a,b --steps 500 --jobs 2 --workdir D]
    "bank": "metafx.bench.bank_rule",  # python launch/bench.py bank [-- --per-family 2 --support 0.5,1,2,3]
    "ceiling": "metafx.bench.ceiling",  # python launch/bench.py ceiling [-- --archs lstm,tcn,transformer --steps 2000]
    "gpu": "metafx.bench.gpu",  # python launch/bench.py gpu [-- --device cpu] (CUDA by default)
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=cli.EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--budget", default="local", choices=BUDGETS)
    ap.add_argument("--space", default="lstm.yaml")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/ in the repo)")
    args, rest = ap.parse_known_args(argv)
    return cli.run(lambda: importlib.import_module(SUITES[args.suite]).main(args, rest))


if __name__ == "__main__":
    raise SystemExit(main())
