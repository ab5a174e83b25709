"""One meta-model for every family, and families it has never seen: benchmarks/universal.{json,md}.

    python launch/bench.py universal [--budget local] [-- --steps N --families a,b --seeds 1]

On one rendered multi-family task set (search_spaces/universal.yaml at the budget), per family
``F``, on the same held-out test episodes of ``F`` (``eval.test_episodes`` drawn with
``eval.test_seed`` from ``F``'s test tasks):

* ``in_family``, method of the study: the universal meta-model, meta-trained on every family;
* ``left_out``: a universal meta-model meta-trained with ``F`` left out entirely
  (``TaskSet(left_out=[F])``: no task of ``F`` in meta-training or validation);
* ``in_family``, ``per_family``: the same method meta-trained on ``F`` alone (the specialist);
* ``lsfir``, ``arx`` (classical ARX, no meta-learning) and ``identity``: fitted on the same
  support slices of the same episodes.

Every meta-model is selected on validation episodes only (its best ``val/query_l1_post``
checkpoint); the test episodes are used for the table alone. Each row records the seconds of
meta-training it took. ESR is the whole-signal error-to-signal ratio of
:func:`metafx.metrics.esr` (per episode over all query samples, averaged over episodes).
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from metafx.bench.report_files import write_report
from metafx.config import REPO_ROOT, load_config

log = logging.getLogger(__name__)
COLUMNS = ("esr", "esr_pe", "mae", "stft", "mrstft")


def _cols(m: dict[str, float], prefix: str) -> dict[str, float | None]:
    get = lambda k: None if m.get(prefix + k) is None else float(m[prefix + k])  # noqa: E731
    return {"esr": get("query_esr_post"), "esr_pe": get("query_esr_pe_post"), "mae": get("query_l1_post"),
            "stft": get("query_stft_post"), "mrstft": get("query_mrstft_post")}


def train_best(cfg, taskset, workdir: Path):
    """Meta-train on ``taskset``'s train split (validation picks the checkpoint); the best learner and seconds."""
    import torch

    from metafx.engines import engine_for
    from metafx.train import load_checkpoint, meta_train

    t = time.time()
    meta_train(cfg, taskset, None, workdir=workdir, evaluate=False)
    seconds = time.time() - t
    best = load_checkpoint(workdir / "checkpoint" / "best.pt")
    learner = engine_for(cfg).build_learner(cfg)
    learner.load_state_dict(best["model"])
    torch.manual_seed(0)
    return learner.eval(), seconds, int(best["step"])


def _evaluate(learner, cfg, episodes, device) -> dict[str, float]:
    from metafx.evaluate import evaluate_adaptation, mean_rows

    rows, _ = evaluate_adaptation(learner, episodes, cfg, device)
    return mean_rows(rows, "test/")


def main(args, rest) -> int:
    import torch

    from metafx.data.tasks import TaskSet, load_taskset
    from metafx.evaluate import baseline_rows, classical_arx, fixed_test_episodes, lsfir
    from metafx.baselines import identity_predict

    ap = argparse.ArgumentParser(prog="bench.py universal")
    ap.add_argument("--steps", type=int, default=None, help="cap on meta-steps per meta-model")
    ap.add_argument("--families", default=None, help="comma-separated subset of the study's families to report")
    ap.add_argument("--no-per-family", action="store_true", help="skip the per-family specialists")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    opts = ap.parse_args([a for a in rest if a != "--"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    over = list(opts.set) + ([f"maml.meta_steps={opts.steps}"] if opts.steps else [])
    cfg = load_config(args.space if args.space != "lstm.yaml" else "universal.yaml", args.budget, over)
    device = torch.device("cpu")
    full = load_taskset(cfg.data, progress=False)
    families = opts.families.split(",") if opts.families else full.families
    rows: list[dict[str, Any]] = []
    base = {"method": cfg.maml.method, "model": cfg.model.arch}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="metafx-universal-") as tmp:
        tmp = Path(tmp)
        universal, uni_s, uni_step = train_best(cfg, full, tmp / "universal")
        log.info("universal model: %.1f s of meta-training", uni_s)
        arx_cfg = replace(cfg, maml=replace(cfg.maml, method="ridge"))
        for fam in families:
            eps = fixed_test_episodes(cfg, full, fam)
            common = {"family": fam, "test_episodes": len(eps), "test_tasks": len(full.split("test", fam))}
            rows.append({**common, "setting": "in_family", **base, "variant": "universal",
                         "meta_train_seconds": round(uni_s, 1), "best_step": uni_step,
                         **_cols(_evaluate(universal, cfg, eps, device), "test/")})
            left, s, step = train_best(cfg, TaskSet(full.path, left_out=[fam]), tmp / f"out-{fam}")
            rows.append({**common, "setting": "left_out", **base, "variant": "universal",
                         "meta_train_seconds": round(s, 1), "best_step": step,
                         **_cols(_evaluate(left, cfg, eps, device), "test/")})
            if not opts.no_per_family:
                others = [f for f in full.families if f != fam]
                spec, s, step = train_best(cfg, TaskSet(full.path, left_out=others), tmp / f"only-{fam}")
                rows.append({**common, "setting": "in_family", **base, "variant": "per_family",
                             "meta_train_seconds": round(s, 1), "best_step": step,
                             **_cols(_evaluate(spec, cfg, eps, device), "test/")})
            m = baseline_rows("lsfir", lambda ep: lsfir(ep, cfg), eps, cfg)
            rows.append({**common, "setting": "in_family", "method": "lsfir", "model": f"fir{cfg.eval.lsfir_taps}",
                         "variant": "baseline", "meta_train_seconds": 0.0, **_cols(m, "test/lsfir/")})
            m = _evaluate(classical_arx(arx_cfg.model), arx_cfg, eps, device)
            rows.append({**common, "setting": "in_family", "method": "arx", "model": "arx", "variant": "baseline",
                         "meta_train_seconds": 0.0, **_cols(m, "test/")})
            m = baseline_rows("identity", lambda ep: identity_predict(ep.query_x), eps, cfg)
            rows.append({**common, "setting": "in_family", "method": "identity", "model": "identity",
                         "variant": "baseline", "meta_train_seconds": 0.0, **_cols(m, "test/identity/")})
            log.info("%s done", fam)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python launch/bench.py universal " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["universal"] else sys.argv[1:])
    result = {"command": cmd.strip(), "budget": args.budget, "study": cfg.source_file.name, "families": families,
              "tasks": len(full), "seconds_per_task": full.seconds, "machine": platform.machine(),
              "cores": __import__("os").cpu_count(), "wall_seconds": round(time.time() - t0, 1),
              "config": {"method": cfg.maml.method, "model": cfg.model.arch, "features": cfg.model.arx.features,
                         "meta_steps": cfg.maml.meta_steps, "slice_len": cfg.maml.slice_len,
                         "k_support": cfg.maml.k_support, "k_query": cfg.maml.k_query},
              "rows": rows}
    write_report(out, "universal", result, report(result))
    print(report(result))
    return 0


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, read off the rows: left-out ESR <= 0.05 and below LS-FIR and ARX; universal within 1.5x."""
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["family"], {})[(r["setting"], r["variant"], r["method"])] = r
    for fam, d in by.items():
        uni = next((r for k, r in d.items() if k[:2] == ("in_family", "universal")), None)
        left = next((r for k, r in d.items() if k[:2] == ("left_out", "universal")), None)
        spec = next((r for k, r in d.items() if k[:2] == ("in_family", "per_family")), None)
        fir, arx = d.get(("in_family", "baseline", "lsfir")), d.get(("in_family", "baseline", "arx"))
        parts = []
        if left and fir and arx:
            ok = left["esr"] <= 0.05 and left["esr"] < fir["esr"] and left["esr"] < arx["esr"]
            parts.append(f"left-out ESR {_f(left['esr'])} (LS-FIR {_f(fir['esr'])}, ARX {_f(arx['esr'])}): "
                         f"{'met' if ok else 'NOT met'}")
        if uni and spec:
            ok = uni["esr"] <= 1.5 * spec["esr"]
            parts.append(f"universal {_f(uni['esr'])} vs per-family {_f(spec['esr'])}: {'met' if ok else 'NOT met'}")
        out.append(f"* {fam}: " + "; ".join(parts))
    return out


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = ["# One meta-model for many effects, and effects it has never seen",
             "",
             f"Command: `{result['command']}` ({result['budget']} budget, study `{result['study']}`, "
             f"{result['tasks']} tasks of {result['seconds_per_task']:.0f} s, {result['cores']} cores, "
             f"{result['wall_seconds']:.0f} s in all).",
             "",
             f"Meta-model: method `{result['config']['method']}`, model `{result['config']['model']}` "
             f"(features `{result['config']['features']}`), {result['config']['meta_steps']} meta-steps, "
             f"{result['config']['k_support']} support slices of {result['config']['slice_len']} samples per task. "
             "Checkpoints chosen on validation episodes only. ESR: error energy over target energy over all query "
             "samples of an episode, averaged over the family's test episodes (the same episodes in every row of a "
             "family).",
             "",
             "| family | setting | variant | method | ESR | ESR (pre-emph.) | MAE | STFT | MR-STFT | meta-training s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['setting']} | {r['variant']} | {r['method']} | {_f(r['esr'])} | "
                     f"{_f(r['esr_pe'])} | {_f(r['mae'])} | {_f(r['stft'])} | {_f(r['mrstft'])} | "
                     f"{r['meta_train_seconds']:.0f} |")
    lines += ["", "## Targets", "", "Left-out families: ESR <= 0.05 and below LS-FIR and classical ARX. In-family: "
              "the universal model's ESR within 1.5x of the per-family model.", ""] + targets(rows)
    return "\n".join(lines) + "\n"
