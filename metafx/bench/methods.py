"""Methods beyond the paper: speed per meta-step, time to a target loss, stability over seeds, leaderboard rows.

    python launch/bench.py methods -- --part steps       # s / meta-step of every model x method, same episodes
    python launch/bench.py methods -- --part speed       # time to reach plain 2nd-order LSTM MAML's final val loss
    python launch/bench.py methods -- --part stability   # final val loss over 3 seeds, plain vs stabilized
    python launch/bench.py methods -- --part rows [--families moog_vcf,...]  # gradient-method rows of the leaderboard

All on the Moog family of search_spaces/lstm.yaml at the budget (``--budget local``:
10 s synthesized source, 4 + 4 slices of 2048 samples), one torch thread per process,
the same validation episodes for every run of a seed (drawn with ``maml.seed + 1``).

``VARIANTS`` below names every configuration (dotted overrides of lstm.yaml); a part
takes a list of them with ``--variants``. Writes ``benchmarks/methods_<part>.{md,json}``;
``rows`` merges its rows into ``benchmarks/leaderboard.json`` (replacing rows of the same
family, model and method) and rewrites ``leaderboard.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from metafx.bench.report_files import write_report

log = logging.getLogger(__name__)

SSM = {"model.arch": "ssm", "model.ssm.channels": 16, "model.ssm.state": 16, "model.ssm.layers": 2,
       "maml.first_order": False}
STAB = {"maml.learn_inner_lr": True, "maml.multi_step_loss": True, "maml.outer_schedule": "cosine",
        "maml.grad_clip": 1.0}
SPECTRAL = {"maml.outer_loss": {"l1": 5.0, "stft": 1.0}}

# name -> (space, overrides). Second order unless named _fo.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # the paper's method and model
    # 40 meta-steps (~150-250 s on one CPU thread: the 150 s budget of this configuration)
    "lstm32_maml": ("lstm.yaml", {"maml.first_order": False, "maml.inner_steps": 1, "maml.inner_lr": 0.1,
                                  "maml.meta_steps": 40, "maml.eval_every": 10}),
    "lstm32_maml_fo": ("lstm.yaml", {"maml.first_order": True, "maml.inner_steps": 1, "maml.inner_lr": 0.1}),
    "lstm32_maml++_fo": ("lstm.yaml", {"maml.first_order": True, "maml.inner_steps": 1, "maml.inner_lr": 0.1, **STAB}),
    "lstm32_anil": ("lstm.yaml", {"maml.method": "anil", "maml.first_order": False, "maml.inner_steps": 2, "maml.inner_lr": 0.1}),
    "tcn_maml": ("lstm.yaml", {"model.arch": "tcn", "maml.first_order": False, "maml.inner_steps": 1, "maml.inner_lr": 0.1}),
    # the state-space model (second order: cheap here)
    "ssm_maml": ("lstm.yaml", {**SSM, "maml.inner_steps": 2, "maml.inner_lr": 0.1}),
    "ssm_maml++": ("lstm.yaml", {**SSM, "maml.inner_steps": 2, "maml.inner_lr": 0.1, **STAB}),
    "ssm_anil": ("lstm.yaml", {**SSM, "maml.method": "anil", "maml.inner_steps": 2, "maml.inner_lr": 0.1, **STAB}),
    "ssm_cavia": ("lstm.yaml", {**SSM, "model.context_dim": 16, "maml.method": "cavia", "maml.inner_steps": 2,
                                "maml.inner_lr": 1.0, "maml.outer_lr": 0.003, **STAB}),
    "ssm_encoder": ("lstm.yaml", {**SSM, "model.context_dim": 16, "maml.method": "encoder", "maml.inner_steps": 0,
                                  "maml.outer_lr": 0.003, "maml.outer_schedule": "cosine", "maml.grad_clip": 1.0}),
    "ssm_encoder_stft": ("lstm.yaml", {**SSM, "model.context_dim": 16, "maml.method": "encoder",
                                       "maml.inner_steps": 0, "maml.outer_lr": 0.003, "maml.outer_schedule": "cosine",
                                       "maml.grad_clip": 1.0, **SPECTRAL}),
    # closed-form ANIL (search_spaces/arx.yaml)
    "arx_ridge": ("arx.yaml", {}),
}
DEFAULTS = {
    "steps": ["lstm32_maml", "lstm32_maml_fo", "lstm32_anil", "tcn_maml", "ssm_maml", "ssm_maml++", "ssm_anil",
              "ssm_cavia", "ssm_encoder", "arx_ridge"],
    "speed": ["lstm32_maml", "arx_ridge", "ssm_encoder", "ssm_cavia"],
    "stability": ["ssm_maml", "ssm_maml++", "lstm32_maml_fo", "lstm32_maml++_fo"],
    "rows": ["ssm_encoder", "ssm_encoder_stft", "ssm_cavia", "ssm_anil"],
}


def _cfg(variant: str, budget: str, extra: dict[str, Any]):
    from metafx.config import load_config

    space, over = VARIANTS[variant]
    return load_config(space, budget, {**over, **extra})


def _step_time(cfg, taskset, n: int = 5) -> float:
    """Median seconds of one meta-step on one fixed meta-batch, the same for every variant (after a warm-up)."""
    from metafx.bench.leaderboard import timed_meta_steps

    return timed_meta_steps(cfg, taskset, n, same_batch=True, with_stats=False)


def _curve(cfg, taskset, *, evaluate: bool = False) -> dict[str, Any]:
    """meta_train with (wall seconds, meta-step, val L1) at every report."""
    from metafx.train import meta_train

    t0 = time.time()
    curve: list[tuple[float, int, float]] = []

    def report(m, ck):
        if "done" not in m:
            curve.append((round(time.time() - t0, 2), int(m["step"]), float(m["val/query_l1_post"])))

    res = meta_train(cfg, taskset, report, evaluate=evaluate, baselines=False)
    train_wall = curve[-1][0] if curve else 0.0
    return {"curve": curve, "final_val_l1": curve[-1][2] if curve else None, "train_wall_seconds": train_wall,
            "params": res.params, "metrics": {k: v for k, v in res.metrics.items() if k.startswith("test/")}}


def _run_one(job: tuple[str, str, str, dict[str, Any]]) -> dict[str, Any]:
    part, variant, budget, extra = job
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {variant} %(levelname)s %(name)s: %(message)s")
    from metafx.data.tasks import load_taskset

    cfg = _cfg(variant, budget, extra)
    taskset = load_taskset(cfg.data, progress=False)
    out: dict[str, Any] = {"variant": variant, "extra": extra, "model": cfg.model.arch, "method": cfg.maml.method,
                           "first_order": cfg.maml.first_order, "inner_steps": cfg.maml.inner_steps,
                           "stabilized": cfg.maml.stabilized(), "meta_steps": cfg.maml.meta_steps}
    if part == "steps":
        from metafx.models import count_params
        from metafx.engines import engine_for

        out["params"] = count_params(engine_for(cfg).build_learner(cfg))
        out["seconds_per_meta_step"] = round(_step_time(cfg, taskset), 4)
    else:
        out.update(_curve(cfg, taskset, evaluate=part == "rows"))
        if part == "rows":
            from metafx.engines import engine_for

            lrn = engine_for(cfg).build_learner(cfg)
            names = lrn.adapted_names() if hasattr(lrn, "adapted_names") else None
            out["adapted_params"] = (cfg.model.context_dim if cfg.maml.method in ("cavia", "encoder") else
                                     sum(p.numel() for n, p in lrn.net.named_parameters() if n in names) if names
                                     else None)
            out["seconds_per_meta_step"] = round(_step_time(cfg, taskset), 4)
    log.info("%s %s done", part, variant)
    return out


def _pool(jobs: list, n: int) -> list[dict[str, Any]]:
    if n <= 1:
        return [_run_one(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_run_one, jobs))


def _machine(load0) -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": sys.version.split()[0], "loadavg_start": load0,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


def _desc(v: str) -> str:
    space, over = VARIANTS[v]
    return f"`{v}`: {space} " + (", ".join(f"{k}={json.dumps(x)}" for k, x in over.items()) or "(defaults)")


# --------------------------------------------------------------------------- reports


def report_steps(res: list[dict[str, Any]], head: list[str]) -> list[str]:
    ref = next((r for r in res if r["variant"] == "lstm32_maml"), None)
    L = head + ["| variant | model | method | order | inner steps | params | s / meta-step | vs 2nd-order LSTM |",
                "|---|---|---|---|---|---|---|---|"]
    for r in sorted(res, key=lambda r: r["seconds_per_meta_step"]):
        rel = f"{ref['seconds_per_meta_step'] / r['seconds_per_meta_step']:.1f}x faster" if ref else "—"
        L.append(f"| {r['variant']} | {r['model']} | {r['method']} | {'1st' if r['first_order'] else '2nd'} | "
                 f"{r['inner_steps']} | {r['params']} | {r['seconds_per_meta_step']:.4f} | {rel} |")
    return L


def report_speed(res: list[dict[str, Any]], head: list[str]) -> tuple[list[str], dict[str, Any]]:
    ref = next(r for r in res if r["variant"] == "lstm32_maml")
    target, t_ref = ref["final_val_l1"], ref["train_wall_seconds"]
    L = head + [f"Reference: plain second-order LSTM-32 MAML (`lstm32_maml`), {ref['meta_steps']} meta-steps, "
                f"final validation L1 **{target:.5f}** after **{t_ref:.1f} s** of meta-training (including its "
                "periodic validation). Target of the issue: reach that loss in at most a tenth of that time "
                f"({t_ref / 10:.1f} s).", "",
                "| variant | params | final val L1 | train wall s | first report at or below the target | ratio to the reference | within 1/10 |",
                "|---|---|---|---|---|---|---|"]
    verdict = {}
    for r in res:
        hit = next(((t, s) for t, s, v in r["curve"] if v <= target), None)
        ratio = hit[0] / t_ref if hit else None
        verdict[r["variant"]] = {"reached_at_seconds": hit[0] if hit else None, "at_step": hit[1] if hit else None,
                                 "ratio": ratio, "pass": bool(ratio is not None and ratio <= 0.1)}
        L.append(f"| {r['variant']} | {r['params']} | {r['final_val_l1']:.5f} | {r['train_wall_seconds']:.1f} | "
                 + (f"{hit[0]:.1f} s (meta-step {hit[1]})" if hit else "never") + " | "
                 + (f"{ratio:.3f}" if ratio is not None else "—") + " | "
                 + ("yes" if verdict[r["variant"]]["pass"] else "no") + " |")
    L += ["", "Curves (wall seconds, meta-step, val L1) are in the JSON file. Validation runs every "
          "`maml.eval_every` meta-steps, so a time to target is the first validation at or below it (an upper bound)."]
    return L, verdict


def report_stability(res: list[dict[str, Any]], head: list[str]) -> tuple[list[str], dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in res:
        by.setdefault(r["variant"], []).append(r)
    L = head + ["| variant | stabilizers | seeds | final val L1 per seed | mean | spread (max - min) | std |",
                "|---|---|---|---|---|---|---|"]
    stats = {}
    for v, rs in by.items():
        vals = [r["final_val_l1"] for r in sorted(rs, key=lambda r: r["extra"]["maml.seed"])]
        finite = [x for x in vals if x is not None and x == x]
        spread = max(finite) - min(finite) if finite else None
        stats[v] = {"vals": vals, "mean": statistics.mean(finite) if finite else None, "spread": spread,
                    "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}
        L.append(f"| {v} | {'yes' if rs[0]['stabilized'] else 'no'} | {len(vals)} | "
                 + ", ".join(f"{x:.5f}" for x in vals) + f" | {stats[v]['mean']:.5f} | {spread:.5f} | "
                 f"{stats[v]['std']:.5f} |")
    L.append("")
    for plain, stab in (("ssm_maml", "ssm_maml++"), ("lstm32_maml_fo", "lstm32_maml++_fo")):
        if plain in stats and stab in stats and stats[plain]["spread"]:
            r = stats[stab]["spread"] / stats[plain]["spread"]
            stats[f"{stab}_vs_{plain}"] = r
            L.append(f"- {stab} vs {plain}: spread ratio {r:.2f} (target <= 0.5: {'met' if r <= 0.5 else 'NOT met'}); "
                     f"mean final val L1 {stats[stab]['mean']:.5f} vs {stats[plain]['mean']:.5f}.")
    return L, stats


def merge_rows(res: list[dict[str, Any]], out: Path) -> int:
    """Gradient-method rows into leaderboard.json (same test episodes: checked against its identity row)."""
    from metafx.bench import leaderboard as lb

    path = out / "leaderboard.json"
    board = json.loads(path.read_text())
    n = 0
    for r in res:
        fam = r["family"]
        ident = next(x for x in board["rows"] if x["family"] == fam and x["method"] == "identity")
        m = r["metrics"]
        if abs(m["test/identity_l1"] - ident["mae"]) > 1e-9:
            raise RuntimeError(f"{fam}/{r['variant']}: test episodes differ from the leaderboard's "
                               f"(identity L1 {m['test/identity_l1']} vs {ident['mae']})")
        row = {"family": fam, "tasks": ident["tasks"], "test_tasks": ident["test_tasks"],
               "test_episodes": ident["test_episodes"], "model": r["variant"].split("_")[0],
               "stft_resolution": ident.get("stft_resolution"),  # same episodes (checked above), same slices
               "method": r["method"] + ("++" if r["stabilized"] else "") + ("_stft" if "stft" in r["variant"] else ""),
               "params": r["params"], "adapted_params": r.get("adapted_params"),
               "seconds_per_meta_step": r["seconds_per_meta_step"], "wall_seconds": r["train_wall_seconds"],
               **lb.metric_cols(m, "test/"), "mae_pre": m.get("test/query_l1_pre"),
               "stft_pre": m.get("test/query_stft_pre"), "meta_steps": r["meta_steps"],
               "final_val_l1": r["final_val_l1"], "variant": r["variant"], "overrides": VARIANTS[r["variant"]][1]}
        board["rows"] = [x for x in board["rows"] if not (x["family"] == fam and x.get("variant") == r["variant"])]
        board["rows"].append(row)
        n += 1
    board.setdefault("merged", []).append({"command": "python launch/bench.py methods -- --part rows",
                                           "date": _dt.datetime.now().isoformat(timespec="seconds"),
                                           "variants": sorted({r["variant"] for r in res})})
    lb.write_report(board, out)
    return n


def main(args, rest) -> int:
    ap = argparse.ArgumentParser(prog="bench.py methods")
    ap.add_argument("--part", required=True, choices=sorted(DEFAULTS))
    ap.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (default per part)")
    ap.add_argument("--seeds", type=int, default=3, help="stability: seeds per variant")
    ap.add_argument("--families", default="moog_vcf", help="rows: families of the leaderboard")
    ap.add_argument("--steps", type=int, default=None, help="cap on meta-steps (quick checks)")
    ap.add_argument("--jobs", type=int, default=2)
    opts = ap.parse_args([a for a in rest if a != "--"])
    from metafx.bench.leaderboard import FAMILIES
    from metafx.config import REPO_ROOT

    variants = opts.variants.split(",") if opts.variants else DEFAULTS[opts.part]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    extra = {"maml.meta_steps": opts.steps} if opts.steps else {}
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    if opts.part == "stability":
        jobs = [(opts.part, v, args.budget, {**extra, "maml.seed": s}) for v in variants for s in range(opts.seeds)]
    elif opts.part == "rows":
        jobs = []
        for fam in opts.families.split(","):
            common = {"data.families": [FAMILIES[fam]], "eval.test_episodes": 48, **extra}
            jobs += [(opts.part, v, args.budget, {**common, "_family": fam}) for v in variants]
    else:
        jobs = [(opts.part, v, args.budget, extra) for v in variants]
    if opts.part in ("speed", "stability"):  # losses are compared: the same validation episodes for every variant
        keys = lambda c: (c.data, c.maml.k_support, c.maml.k_query, c.maml.slice_len, c.maml.val_episodes)  # noqa: E731
        ref = keys(_cfg(variants[0], args.budget, extra))
        for v in variants[1:]:
            if keys(_cfg(v, args.budget, extra)) != ref:
                raise SystemExit(f"variant {v} draws other validation episodes than {variants[0]} (data or slices "
                                 "differ between the study files): their losses would not be comparable")
    # "_family" is bookkeeping, not a config key.
    fams = [j[3].pop("_family", None) for j in jobs]
    res = _pool(jobs, opts.jobs)
    for r, f in zip(res, fams):
        r["family"] = f or "moog_vcf"
    cmd = f"python launch/bench.py methods --budget {args.budget} -- " + " ".join(a for a in rest if a != "--")
    head = [f"# Methods bench: {opts.part}", "", f"Regenerate: `{cmd.strip()}`", "",
            f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, 1 torch thread per process, {opts.jobs} "
            f"process(es) at once; load average at start {load0}, at end {[round(x, 2) for x in os.getloadavg()]}. "
            f"Total {(time.time() - t0) / 60:.1f} min. Date {_dt.datetime.now().isoformat(timespec='seconds')}.", "",
            f"Budget `{args.budget}`, Moog family of the study files unless stated. Variants:", ""]
    head += [f"- {_desc(v)}" for v in variants] + [""]
    verdict: Any = None
    if opts.part == "steps":
        lines = report_steps(res, head)
    elif opts.part == "speed":
        lines, verdict = report_speed(res, head)
    elif opts.part == "stability":
        lines, verdict = report_stability(res, head)
    else:
        n = merge_rows(res, out)
        lines = head + [f"Merged {n} rows into leaderboard.json / leaderboard.md."]
        lines += [f"- {r['family']} {r['variant']}: MAE {r['metrics']['test/query_l1_post']:.5f}, STFT "
                  f"{r['metrics']['test/query_stft_post']:.3f}, HF {r['metrics'].get('test/query_hf_post', float('nan')):.2f} dB, "
                  f"ESR {r['metrics'].get('test/query_esr_post', float('nan')):.4g}"
                  for r in res]
    result = {"command": cmd.strip(), "budget": args.budget, "part": opts.part, "machine": _machine(load0),
              "total_seconds": round(time.time() - t0, 1), "variants": {v: VARIANTS[v] for v in variants},
              "results": res, "verdict": verdict}
    write_report(out, f"methods_{opts.part}", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit("run through: python launch/bench.py methods")
