"""The single-task ceiling per architecture: each model trained on one test task's own audio, to convergence.

    python launch/bench.py ceiling [--budget local] [-- --archs lstm,tcn,transformer --steps 8000,8000,2000 --tasks 1]

What meta-learning approaches from below: the same network trained normally on a held-out task's
own audio (everything but its query slices; :func:`metafx.evaluate.single_task_baseline`), with
its own Adam rate ``eval.single_task_lr`` and the study's outer loss. For each architecture, on
the first ``--tasks`` distinct tasks of its study's fixed test episodes (held-out Moog tasks), the
query metrics along the way (a learning curve at 1/8, 1/4, 1/2 and all of ``--steps``) beside
LS-FIR and the identity on the same episodes.

*Converged* here: the STFT of the last point within 5 % of the one before (half the steps). The
rate is annealed to 0 over the steps (cosine), so a longer run is a different schedule, not a
continuation: the curve is of one run.

Writes ``benchmarks/ceiling.md`` and ``benchmarks/ceiling.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

from metafx.bench.report_files import write_report

CONVERGED_REL = 0.05
METRICS = ("esr", "l1", "stft", "mrstft", "hf")


def _cols(m: dict[str, float], prefix: str) -> dict[str, float | None]:
    return {k: (float(m[f"{prefix}query_{k}_post"]) if f"{prefix}query_{k}_post" in m else None) for k in METRICS}


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Train the ceilings and write the report."""
    import torch

    from metafx.baselines import identity_predict
    from metafx.config import REPO_ROOT, SPACES_DIR, load_config
    from metafx.data.tasks import load_taskset
    from metafx.evaluate import baseline_rows, fixed_test_episodes, lsfir, single_task_baseline

    ap = argparse.ArgumentParser(prog="bench.py ceiling")
    ap.add_argument("--archs", default="lstm,tcn,transformer")
    ap.add_argument("--steps", default="2000", help="training steps: one number, or one per --archs entry (8000,8000,2000)")
    ap.add_argument("--tasks", type=int, default=1, help="distinct test tasks per architecture")
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args([a for a in rest if a != "--"])
    torch.set_num_threads(opts.threads)
    argv = [a for a in rest if a != "--"]
    command = f"python launch/bench.py ceiling --budget {args.budget}" + (" -- " + shlex.join(argv) if argv else "")
    archs = [a for a in opts.archs.split(",") if a]
    steps_of = [int(s) for s in opts.steps.split(",")]
    if len(steps_of) == 1:
        steps_of *= len(archs)
    if len(steps_of) != len(archs):
        raise SystemExit(f"--steps {opts.steps}: give one number or one per architecture ({len(archs)})")
    rows: list[dict[str, Any]] = []
    for arch, steps in zip(archs, steps_of):
        curve = sorted({max(1, steps // 8), max(1, steps // 4), max(1, steps // 2), steps})
        cfg = load_config(SPACES_DIR / f"{arch}.yaml", args.budget, {"eval.single_task_steps": steps,
                                                                    "eval.single_task_tasks": opts.tasks})
        ts = load_taskset(cfg.data, progress=False)
        eps, seen = [], set()
        for ep in fixed_test_episodes(cfg, ts):  # the episodes single_task_baseline uses: first of each task
            if ep.task not in seen and len(seen) < opts.tasks:
                seen.add(ep.task)
                eps.append(ep)
        t0 = time.perf_counter()
        m = single_task_baseline(cfg, ts, eps, torch.device("cpu"), curve_at=curve)
        secs = time.perf_counter() - t0
        pts = [{"steps": s, **_cols(m, f"test/single_task@{s}/")} for s in curve]
        conv = abs(pts[-1]["stft"] - pts[-2]["stft"]) <= CONVERGED_REL * pts[-2]["stft"]
        common = {"arch": arch, "study": f"{arch}.yaml", "tasks": [int(ep.task) for ep in eps],
                  "task_params": [dict(ep.params or {}) for ep in eps]}
        rows.append({**common, "row": "single_task", "steps": steps, "lr": cfg.eval.single_task_lr,
                     "loss": str(cfg.maml.outer_loss), "seconds": round(secs, 1), "converged": conv, "curve": pts,
                     **_cols(m, "test/single_task/")})
        rows.append({**common, "row": "lsfir", **_cols(baseline_rows("lsfir", lambda ep: lsfir(ep, cfg), eps, cfg),
                                                       "test/lsfir/")})
        rows.append({**common, "row": "identity", **_cols(baseline_rows(
            "identity", lambda ep: identity_predict(ep.query_x), eps, cfg), "test/identity/")})
        print(f"[ceiling] {arch}: STFT {rows[-3]['stft']:.3f} (LS-FIR {rows[-2]['stft']:.3f}, identity "
              f"{rows[-1]['stft']:.3f}) after {steps} steps, {secs:.0f} s, converged {conv}", flush=True)
    rep = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"), "budget": args.budget,
           "machine": {"cpus": os.cpu_count(), "threads": opts.threads, "load_average": os.getloadavg(),
                       "python": platform.python_version(), "torch": torch.__version__}, "rows": rows}
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, "ceiling", rep, _markdown(rep))
    print(f"wrote {out / 'ceiling.md'} and {out / 'ceiling.json'}")
    return 0


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _markdown(rep: dict[str, Any]) -> str:
    lines = ["# Single-task ceiling per architecture (held-out Moog tasks)", "",
             f"Command: `{rep['command']}` ({rep['date']}, {rep['machine']['cpus']} cores, "
             f"{rep['machine']['threads']} torch thread(s), load average {rep['machine']['load_average'][0]:.1f}).", "",
             "Each model trained normally (no meta-learning) on the test task's own audio, its query slices "
             "excluded, scored on those query slices; LS-FIR (fitted on the episode's support slices) and the "
             "identity on the same episodes. Converged: the STFT at the last point within "
             f"{100 * CONVERGED_REL:g} % of the STFT at half the steps.", "",
             "| arch | row | steps | Adam lr | ESR | MAE | STFT | MR-STFT | HF dB | converged | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['arch']} | {r['row']} | {r.get('steps', '')} | {r.get('lr', '')} | {_f(r['esr'])} | "
                     f"{_f(r['l1'])} | {_f(r['stft'])} | {_f(r['mrstft'])} | {_f(r['hf'])} | "
                     f"{r.get('converged', '')} | {r.get('seconds', '')} |")
    lines += ["", "Learning curves (query STFT / ESR after n steps):", ""]
    for r in rep["rows"]:
        if r["row"] == "single_task":
            pts = ", ".join(f"{p['steps']}: {_f(p['stft'])} / {_f(p['esr'])}" for p in r["curve"])
            lines.append(f"* {r['arch']}: {pts}")
    return "\n".join(lines) + "\n"
