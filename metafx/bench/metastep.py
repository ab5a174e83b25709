"""Benchmark: seconds per MAML meta-step and peak memory, per model, backend and order.

    python launch/bench.py metastep [--budget local] [--space lstm.yaml] [-- options]

For each model (lstm, tcn, transformer), both backends (func, higher) and first and
second order, one meta-step at the budget's ``maml.slice_len``, ``k_support``,
``k_query``, ``meta_batch`` and ``inner_steps``, on synthetic episodes (white noise
through a one-pole low-pass with a random cutoff per task: the shape of the real
work without rendering). Model sizes come from ``load_config(space, budget,
overrides={"model.arch": arch})``. If the study's TCN does not fit the slice
(receptive field > slice_len), the TCN sizes of ``search_spaces/tcn.yaml`` at the same
budget are used instead and the row says so.

Each configuration runs in a fresh subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; tracemalloc does not see
torch's allocator. One warm-up meta-step, then the median of at least ``--repeats``
timed ones and about ``--min-time`` seconds of them (at most 20; 1 when the warm-up
took longer than ``--slow`` seconds).

Options after the suite name: ``--repeats N`` (3), ``--min-time S`` (5), ``--slow S`` (20),
``--archs lstm,tcn,transformer``, ``--threads N`` torch threads per worker (1: a search
runs one trial per core, ``search.cpus_per_trial: 1``; also far less sensitive to other
load on the machine than 2 spinning OpenMP threads), ``--per-arch-space`` (each model
from its own ``search_spaces/<arch>.yaml``, e.g. the transformer study's shorter local
slices), ``--timeout S`` per configuration (600).

Writes ``benchmarks/metastep.json`` and ``benchmarks/metastep.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from metafx.bench.report_files import write_report
from metafx.config import BACKENDS

BENCH_ARCHS = ("lstm", "tcn", "transformer")  # the paper's models
ORDERS = (("second", False), ("first", True))


# --------------------------------------------------------------------------- worker (one configuration)


def synthetic_episodes(n: int, k_support: int, k_query: int, slice_len: int, seed: int = 0) -> list[Any]:
    """``n`` episodes of one-pole low-passed white noise, random cutoff per task, float32 (K, 1, L)."""
    import numpy as np
    import scipy.signal
    import torch

    eps = []
    for t in range(n):
        rng = np.random.default_rng([seed, t])
        fc = float(rng.uniform(200.0, 6000.0))
        a = np.exp(-2 * np.pi * fc / 48000)
        K = k_support + k_query
        x = 0.125 * rng.standard_normal(K * slice_len)
        y = scipy.signal.lfilter([1 - a], [1, -a], x)
        xs = torch.from_numpy(x.reshape(K, 1, slice_len)).float()
        ys = torch.from_numpy(y.reshape(K, 1, slice_len)).float()
        eps.append(SimpleNamespace(task=t, family="onepole", params={"cutoff": fc},
                                   support_x=xs[:k_support], support_y=ys[:k_support],
                                   query_x=xs[k_support:], query_y=ys[k_support:]))
    return eps


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time meta-steps of one configuration in this process; returns times and memory."""
    import torch

    from metafx.config import load_config
    from metafx.engines import engine_for, make_outer_optimizer
    from metafx.models import count_params

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["space"], spec["budget"], overrides=spec["overrides"])
    mc = cfg.maml
    torch.manual_seed(0)
    mc = replace(mc, backend=spec["backend"], first_order=spec["first_order"])
    engine = engine_for(mc)
    model = engine.build_learner(cfg)  # the learner of the method; the settings replaced above are read per step
    opt = make_outer_optimizer(model, mc)
    eps = synthetic_episodes(mc.meta_batch, mc.k_support, mc.k_query, mc.slice_len)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    engine.meta_step(model, eps, mc, opt, 0, with_stats=False)  # warm-up
    warm = time.perf_counter() - t0
    # At least `repeats` timed steps and about `min_time` seconds of them (at most 20),
    # a single one when the warm-up alone was slow: the median resists a busy machine.
    times: list[float] = []
    while len(times) < (1 if warm > spec["slow"] else 20):
        t0 = time.perf_counter()
        engine.meta_step(model, eps, mc, opt, len(times) + 1, with_stats=False)
        times.append(time.perf_counter() - t0)
        if len(times) >= spec["repeats"] and sum(times) >= spec["min_time"]:
            break
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "params": count_params(model),
        "warmup_s": warm,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_rss_mb": peak_kb / 1024,
        "baseline_rss_mb": base_kb / 1024,
        "step_rss_mb": (peak_kb - base_kb) / 1024,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver


def _arch_overrides(space: str, budget: str, arch: str) -> tuple[dict[str, Any], str]:
    """Overrides for ``arch`` in ``space``; falls back to tcn.yaml's TCN if the study's does not fit."""
    from metafx.config import SPACES_DIR, ConfigError, load_config
    from metafx.models.tcn import tcn_receptive_field

    ov: dict[str, Any] = {"model.arch": arch}
    try:
        cfg = load_config(space, budget, overrides=ov)
        t = cfg.model.tcn
        rf = tcn_receptive_field(t.kernel, t.blocks, t.dilation_growth)
        problem = f"a {rf}-sample receptive field > slice_len {cfg.maml.slice_len}" if arch == "tcn" and rf > cfg.maml.slice_len else ""
    except ConfigError as e:
        if arch != "tcn":
            raise
        problem = str(e).split(": ", 1)[-1]
    if not problem:
        return ov, ""
    own = SPACES_DIR / "tcn.yaml"
    if not own.is_file():
        raise SystemExit(f"{space}: the TCN does not fit ({problem}) and there is no tcn.yaml to fall back on")
    t2 = load_config(own, budget).model.tcn
    ov.update({f"model.tcn.{k}": getattr(t2, k) for k in ("channels", "blocks", "kernel", "dilation_growth")})
    load_config(space, budget, overrides=ov)  # must validate now
    return ov, f"{Path(space).name} at budget {budget}: {problem}; TCN sizes taken from tcn.yaml"


def _sizes(cfg: Any) -> str:
    m = cfg.model
    if m.arch == "lstm":
        return f"hidden {m.lstm.hidden}, skip {m.lstm.skip}"
    if m.arch == "tcn":
        return f"{m.tcn.blocks} blocks x {m.tcn.channels} ch, kernel {m.tcn.kernel}, growth {m.tcn.dilation_growth}"
    t = m.transformer
    return f"d_model {t.d_model}, {t.heads} heads, {t.layers} layers, ff {t.ff}"


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Run every configuration in its own subprocess and write the results."""
    import torch

    from metafx.config import REPO_ROOT, SPACES_DIR, load_config

    ap = argparse.ArgumentParser(prog="bench.py metastep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow", type=float, default=20.0, help="warm-up seconds above which only 1 timed step runs")
    ap.add_argument("--archs", default=",".join(BENCH_ARCHS))
    ap.add_argument("--min-time", type=float, default=5.0, help="keep timing until this many seconds (at most 20 steps)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1 = one trial per core, as search.cpus_per_trial: 1)")
    ap.add_argument("--per-arch-space", action="store_true",
                    help="use search_spaces/<arch>.yaml for each model instead of --space with model.arch overridden")
    ap.add_argument("--timeout", type=float, default=600.0)
    opts = ap.parse_args([a for a in rest if a != "--"])
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = [a for a in opts.archs.split(",") if a]
    for a in archs:
        if a not in BENCH_ARCHS:
            raise SystemExit(f"unknown arch {a!r}; choose from {', '.join(BENCH_ARCHS)}")

    rows: list[dict[str, Any]] = []
    t_start = time.time()
    load_start = os.getloadavg()
    for arch in archs:
        space = str(SPACES_DIR / f"{arch}.yaml") if opts.per_arch_space else str(args.space)
        ov, note = _arch_overrides(space, args.budget, arch)
        cfg = load_config(space, args.budget, overrides=ov)
        mc = cfg.maml
        for backend in BACKENDS:
            for order, first_order in ORDERS:
                spec = {"space": space, "study": Path(space).name, "budget": args.budget, "overrides": ov, "backend": backend,
                        "first_order": first_order, "repeats": opts.repeats, "slow": opts.slow,
                        "min_time": opts.min_time, "threads": opts.threads}
                row = {"arch": arch, "study": Path(space).name, "sizes": _sizes(cfg), "backend": backend, "order": order,
                       "slice_len": mc.slice_len, "k_support": mc.k_support, "k_query": mc.k_query,
                       "meta_batch": mc.meta_batch, "inner_steps": mc.inner_steps, "note": note}
                print(f"[metastep] {arch:11s} {backend:6s} {order:6s} ...", end=" ", flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads)}
                proc = subprocess.run(
                    [sys.executable, "-m", "metafx.bench.metastep", "--worker", json.dumps(spec)],
                    capture_output=True, text=True, timeout=opts.timeout, cwd=str(REPO_ROOT), env=env,
                )
                if proc.returncode != 0:
                    row["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                    print("FAILED:", row["error"])
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(f"{row['median_s']:.3f} s/step, peak {row['peak_rss_mb']:.0f} MB")
                rows.append(row)
    # Ratio of the default backend (func) to higher on the same work.
    for r in rows:
        other = next((o for o in rows if o["arch"] == r["arch"] and o["order"] == r["order"] and o["backend"] == "higher"), None)
        if r["backend"] == "func" and other and "median_s" in r and "median_s" in other:
            r["func_over_higher"] = r["median_s"] / other["median_s"]
            other["func_over_higher"] = r["func_over_higher"]
    meta = {
        "command": f"python launch/bench.py metastep --budget {args.budget} --space {args.space}" + (" " + " ".join(rest) if rest else ""),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, no GPU" if not torch.cuda.is_available() else f"{os.cpu_count()} cores + CUDA",
        "torch": torch.__version__,
        "threads_per_worker": opts.threads,
        "python": platform.python_version(),
        "total_s": time.time() - t_start,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
    }
    write_report(out_dir, "metastep", {"meta": meta, "rows": rows}, _markdown(meta, rows))
    print(f"[metastep] wrote {out_dir / 'metastep.md'} and metastep.json in {meta['total_s']:.0f} s")
    return 0 if all("error" not in r for r in rows) else 1


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# MAML meta-step cost",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, Python {meta['python']}; "
        f"{meta['threads_per_worker']} torch thread(s) per worker; "
        f"total {meta['total_s']:.0f} s; 1/5/15-min load average at start "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])} (other work shares these 2 cores).",
        "",
        "One meta-step = for each of `meta_batch` tasks: adapt on `k_support` slices (`inner_steps` SGD steps), "
        "query loss on `k_query` slices, backward; then Adam. Synthetic one-pole low-pass episodes. "
        "Seconds: median of the timed steps after one warm-up. Peak RSS: whole worker process "
        "(fresh per row; includes Python + torch, about the baseline column); step: peak minus the RSS "
        "before the first meta-step. func/higher: time ratio of the default backend to `higher` on the same work.",
        "",
        "| model | study | sizes | params | backend | order | L | K s/q | tasks | s / meta-step | steps timed | peak RSS MB | step MB | func/higher |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['study']} | {r['sizes']} | | {r['backend']} | {r['order']} | {r['slice_len']} | "
                         f"{r['k_support']}/{r['k_query']} | {r['meta_batch']} | FAILED: {r['error']} | | | | |")
            continue
        ratio = f"{r['func_over_higher']:.2f}" if "func_over_higher" in r else ""
        lines.append(
            f"| {r['arch']} | {r['study']} | {r['sizes']} | {r['params']:,} | {r['backend']} | {r['order']} | {r['slice_len']} | "
            f"{r['k_support']}/{r['k_query']} | {r['meta_batch']} | {r['median_s']:.3f} | {len(r['times_s'])} | "
            f"{r['peak_rss_mb']:.0f} | {r['step_rss_mb']:.0f} | {ratio} |"
        )
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Second over first order (func):", ""]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        s = next((r for r in rows if r["arch"] == arch and r["backend"] == "func" and r["order"] == "second" and "median_s" in r), None)
        f = next((r for r in rows if r["arch"] == arch and r["backend"] == "func" and r["order"] == "first" and "median_s" in r), None)
        if s and f:
            lines.append(f"- {arch}: {s['median_s'] / f['median_s']:.1f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("run through: python launch/bench.py metastep [--budget local]")
