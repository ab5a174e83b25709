"""The paper's Table 1 at the local budget, with the baselines on the same test episodes.

    python launch/bench.py quality [--budget local] [--models lstm,tcn,transformer] [--steps N] [--report-only]

Each row meta-trains one model with its study's settings (search_spaces/<model>.yaml
at the budget; ``--steps`` caps the meta-steps), then evaluates on the fixed test
episodes: ESR, MAE and STFT after adaptation, and the baselines identity, least-squares
FIR, joint training (+ the same inner loop) and single-task training, all on those
episodes. Results: benchmarks/quality.md and benchmarks/quality.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from metafx.bench.report_files import write_report
from metafx.config import REPO_ROOT, load_config

BASELINES = ("identity", "lsfir", "joint", "single_task")


def main(args, rest) -> int:
    import torch

    from metafx.data.tasks import load_taskset
    from metafx.train import meta_train

    ap = argparse.ArgumentParser(prog="bench.py quality")
    ap.add_argument("--models", default="lstm,tcn,transformer")
    ap.add_argument("--steps", type=int, default=None, help="cap on meta-steps per model")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--report-only", action="store_true", help="rewrite quality.md from the quality.json in --out")
    opts = ap.parse_args(rest)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    if opts.report_only:
        (out / "quality.md").write_text(report(json.loads((out / "quality.json").read_text())))
        return 0
    torch.set_num_threads(1)
    rows = []
    for arch in opts.models.split(","):
        over = list(opts.set)
        if opts.steps:
            over += [f"maml.meta_steps={opts.steps}", f"eval.joint_steps={opts.steps}",
                     f"eval.single_task_steps={opts.steps}"]
        if arch == "transformer":
            over.append("maml.first_order=true")  # second order: ~28 s per meta-step on this CPU
        cfg = load_config(f"{arch}.yaml", args.budget, over)
        ts = load_taskset(cfg.data, progress=False)
        t0 = time.time()
        res = meta_train(cfg, ts, None)
        wall = time.time() - t0
        m = res.metrics
        mc = cfg.maml
        common = {"model": arch, "params": res.params, "inner_steps": mc.inner_steps, "inner_lr": mc.inner_lr,
                  "outer_lr": mc.outer_lr, "first_order": mc.first_order, "meta_steps": mc.meta_steps,
                  "slice_len": mc.slice_len}
        rows.append({**common, "method": "maml", "esr": m["test/query_esr_post"], "mae": m["test/query_l1_post"],
                     "stft": m["test/query_stft_post"], "hf_error": m.get("test/query_hf_post"), "mae_pre": m["test/query_l1_pre"],
                     "stft_pre": m["test/query_stft_pre"], "wall_seconds": wall})
        for b in BASELINES:
            if f"test/{b}/query_l1_post" in m:
                rows.append({**common, "method": b, "esr": m.get(f"test/{b}/query_esr_post"), "mae": m[f"test/{b}/query_l1_post"],
                             "stft": m[f"test/{b}/query_stft_post"], "hf_error": m.get(f"test/{b}/query_hf_post"),
                             "mae_pre": m.get(f"test/{b}/query_l1_noadapt")})  # joint: before its inner loop
        print(f"{arch}: MAE {m['test/query_l1_post']:.4f} STFT {m['test/query_stft_post']:.3f} ({wall:.0f} s)",
              flush=True)
    cmd = f"python launch/bench.py quality --budget {args.budget} " + " ".join(rest)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": cmd.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "torch_threads": 1}
    md = report({**meta, "rows": rows})
    write_report(out, "quality", {**meta, "rows": rows}, md)
    print(md)
    return 0


def report(result: dict) -> str:
    """benchmarks/quality.md from the JSON (``--report-only`` rewrites it from an existing quality.json)."""
    meta, rows = result, result["rows"]

    def f(v, p=4):
        return "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))

    def g(v):  # ESR spans decades: significant digits, not decimals
        return "" if v is None else f"{v:.4g}"

    lines = ["# Table 1 at the local budget (held-out Moog tasks)", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['cores']} cores, one torch thread, "
             f"load average {meta['load_average'][0]:.1f} at the end).", "",
             "ESR, MAE and STFT (auraloss STFTLoss defaults) on the query slices of the fixed test episodes, after "
             "adaptation. ESR: error energy over target energy over all query samples of an episode, averaged over "
             "the episodes. HF = `hf_error`, the dB error of the spectrum above each task's cutoff. Baselines on "
             "the same episodes: identity (input as output), lsfir (256-tap least-squares FIR on the support "
             "slices), joint (trained on all training tasks without MAML, then the same inner loop), "
             "single_task (trained on the test task's own audio, query slices excluded). MAE pre: before adaptation "
             "(maml: the meta-learned initialization; joint: the jointly trained model before the inner loop).", "",
             "| model | method | params | inner steps | inner lr | outer lr | order | ESR | MAE | STFT | HF dB | "
             "MAE pre | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['params']} | {r['inner_steps']} | {r['inner_lr']:g} | "
                     f"{r['outer_lr']:g} | {'1st' if r['first_order'] else '2nd'} | {g(r.get('esr'))} | {f(r['mae'])} | "
                     f"{f(r['stft'], 3)} | {f(r['hf_error'], 1)} | {f(r.get('mae_pre'))} | "
                     f"{f(r.get('wall_seconds'), 0)} |")
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines += ["", "Each model's rows use its own study's test episodes: " + ", ".join(
        f"{mdl} {next(r['slice_len'] for r in rows if r['model'] == mdl)}-sample slices" for mdl in models)
        + " (so the identity and LS-FIR rows differ between studies of different slice lengths)."]
    for mdl in models:
        missing = [b for b in ("joint", "single_task") if not any(r["model"] == mdl and r["method"] == b for r in rows)]
        if missing:
            lines.append(f"No {' or '.join(missing)} row for {mdl}: its study skips "
                         f"{'them' if len(missing) > 1 else 'it'} at this budget (eval.joint_steps / "
                         "eval.single_task_steps 0).")
    lines += ["", "Paper, Table 1 (its own data): LSTM 0.031 / 2.353, LSTM-small 0.038 / 2.538, "
              "TCN (10 steps) 0.036 / 4.353, Transformer 0.052 / 4.942.", ""]
    return "\n".join(lines)
