"""Classical ARX as a candidate of the ridge head's per-task cross-validation, on validation episodes.

    python launch/bench.py arx_selection [--budget local] [-- --steps 40 --episodes 8 --seed 777]

``model.arx.cv_classical`` (:meth:`metafx.models.arx.MetaARX.fit_selected`) lets the leave-one-slice-out
cross-validation on a task's support keep classical ARX on ``[1, x]`` where it predicts the left-out
slices better than the meta-learned head. Whether to turn it on is a setting, so it is measured on
validation episodes (the study's val split), never on the test episodes: the universal meta-model of
search_spaces/universal.yaml (its best checkpoint, chosen on its own validation episodes) is adapted
with the option off and on, beside classical ARX itself, on the same ``--episodes`` validation
episodes per family (seed ``--seed``, not the seed training validates with). ESR: whole-signal, per
episode over all query samples (:func:`metafx.metrics.esr`), then the mean over episodes.
Writes benchmarks/arx_selection.{json,md}.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from metafx.bench.report_files import write_report
from metafx.config import REPO_ROOT, load_config

log = logging.getLogger(__name__)
VARIANTS = ("off", "on", "classical_arx")


def main(args, rest) -> int:
    import torch

    from metafx.bench.universal import train_best
    from metafx.data.tasks import EpisodeSampler, load_taskset
    from metafx.engines import engine_for
    from metafx.evaluate import classical_arx, evaluate_adaptation

    ap = argparse.ArgumentParser(prog="bench.py arx_selection")
    ap.add_argument("--steps", type=int, default=40, help="meta-steps of the universal model (the universal bench's 40)")
    ap.add_argument("--episodes", type=int, default=8, help="validation episodes per family")
    ap.add_argument("--seed", type=int, default=777, help="seed of those episodes")
    opts = ap.parse_args([a for a in rest if a != "--"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    space = args.space if args.space != "lstm.yaml" else "universal.yaml"
    cfg = load_config(space, args.budget, [f"maml.meta_steps={opts.steps}", "model.arx.cv_ridge=true"])
    on = replace(cfg, model=replace(cfg.model, arx=replace(cfg.model.arx, cv_classical=True)))
    off = replace(cfg, model=replace(cfg.model, arx=replace(cfg.model.arx, cv_classical=False)))
    arx_cfg = replace(off, maml=replace(off.maml, method="ridge"))
    device = torch.device("cpu")
    full = load_taskset(cfg.data, progress=False)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="metafx-arxsel-") as tmp:
        learner, seconds, step = train_best(off, full, Path(tmp) / "universal")
    learners = {"off": learner, "on": engine_for(on).build_learner(on)}
    learners["on"].load_state_dict(learner.state_dict())
    learners["on"].eval()
    cfgs = {"off": off, "on": on, "classical_arx": arx_cfg}
    learners["classical_arx"] = classical_arx(arx_cfg.model)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for fam in full.families:
            eps = EpisodeSampler(full, "val", cfg.maml.k_support, cfg.maml.k_query, cfg.maml.slice_len,
                                 seed=opts.seed, family=fam).fixed(opts.episodes, seed=opts.seed)
            for v in VARIANTS:
                ep_rows, _ = evaluate_adaptation(learners[v], eps, cfgs[v], device)
                for i, r in enumerate(ep_rows):
                    rows.append({"family": fam, "variant": v, "episode": i, "esr": float(r["query_esr_post"]),
                                 "mrstft": float(r["query_mrstft_post"])})
            log.info("%s done", fam)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python launch/bench.py " + " ".join(sys.argv[1:])
    result = {"command": cmd.strip(), "budget": args.budget, "study": cfg.source_file.name, "split": "val",
              "episodes_per_family": opts.episodes, "episode_seed": opts.seed, "meta_steps": opts.steps,
              "best_step": step, "meta_train_seconds": round(seconds, 1), "wall_seconds": round(time.time() - t0, 1),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.machine(), "cores": os.cpu_count(),
              "rows": rows}
    write_report(out, "arx_selection", result, report(result))
    print(report(result))
    return 0


def _stats(rows: list[dict[str, Any]], variant: str, family: str | None = None) -> tuple[float, float]:
    v = [r["esr"] for r in rows if r["variant"] == variant and (family is None or r["family"] == family)]
    return statistics.mean(v), statistics.median(v)


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    lines = ["# Classical ARX as a candidate of the ridge head's cross-validation (validation episodes)", "",
             f"Command: `{result['command']}` ({result['budget']} budget, study `{result['study']}`, {result['date']}, "
             f"{result['cores']} cores, {result['wall_seconds']:.0f} s in all).", "",
             f"The universal meta-model ({result['meta_steps']} meta-steps, best validation checkpoint at step "
             f"{result['best_step']}, {result['meta_train_seconds']:.0f} s of meta-training) adapted with "
             "`model.arx.cv_classical` off and on (`cv_ridge` on in both), and classical ARX alone, on the same "
             f"{result['episodes_per_family']} validation episodes per family (seed {result['episode_seed']}; the test "
             "episodes are not used). ESR: whole-signal per episode, mean (median) over the episodes.", "",
             "| family | off | on | classical ARX |", "|---|---|---|---|"]
    for fam in fams + [None]:
        cells = [f"{m:.4g} ({md:.3g})" for m, md in (_stats(rows, v, fam) for v in VARIANTS)]
        lines.append(f"| {fam or '**all**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
