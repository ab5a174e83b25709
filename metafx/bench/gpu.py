"""GPU path: every model and method meta-steps on CUDA, trials pack on one GPU, things land where they should.

    python launch/bench.py gpu [-- --device cuda --trials 4 --gpus-per-trial 0.25 --steps 3]

One command, a few minutes on one GPU (issue 15, item 3). Three parts, each a list of checks
that pass or fail (the command exits 1 when one fails) plus what it measured:

1. **Meta-steps** (:data:`CASES`): each model (LSTM, TCN, Transformer, SSM, ARX) with each
   method that applies (MAML second and first order, ANIL, CAVIA, the task encoder, ridge), on
   episodes of a real rendered task set (the smoke task set of ``lstm.yaml``) moved to the
   device. Checked: the loss is finite; every parameter and every gradient is on the device;
   during a second-order LSTM step the LSTM runs with cuDNN off (a forward hook records
   ``torch.backends.cudnn.enabled``: cuDNN RNNs have no double backward) and a second-order
   Transformer step completes (the engine puts attention on the math SDPA kernel; the fused
   kernels have no double backward either). Measured: the median of ``--steps`` timed steps
   after one warm-up (``torch.cuda.synchronize`` around each) and the peak device memory.
2. **Placement** (a 4-step :func:`metafx.train.meta_train` on the device): the task set stays
   in host memory (memory-mapped, shared by every trial of a node), episodes are sampled on the
   host and moved to the device, the model trains on the device (``pick_device``), and the
   checkpoints hold CPU tensors (they load on a machine without a GPU).
3. **Packing**: a smoke search of ``lstm.yaml`` with ``--trials`` trials at
   ``search.gpus_per_trial: --gpus-per-trial`` (4 x 0.25 by default) and MLflow; checked: every
   trial finished, each recorded the device it trained on (``metafx.device`` = cuda) and the GPU
   Ray gave it, and the trials ran at the same time on the one GPU (their MLflow runs overlap).

Writes ``benchmarks/gpu.md`` and ``benchmarks/gpu.json`` (or ``--out``), with the command, the
GPU's name, torch and CUDA versions. With ``--device cpu`` the same script runs on a machine
without a GPU (a check of the script; part 3 then uses a logical GPU of Ray and the trials
train on the CPU): its report says so and is not the GPU result.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from metafx.bench.report_files import write_report

#: (study, overrides) per case; sizes are each study's smoke sizes.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lstm maml 2nd order": ("lstm.yaml", {"maml.method": "maml", "maml.first_order": False}),
    "lstm maml 1st order": ("lstm.yaml", {"maml.method": "maml", "maml.first_order": True}),
    "lstm anil": ("lstm.yaml", {"maml.method": "anil", "maml.first_order": False}),
    "lstm cavia": ("lstm.yaml", {"maml.method": "cavia", "model.context_dim": 4, "maml.first_order": False}),
    "lstm encoder": ("lstm.yaml", {"maml.method": "encoder", "model.context_dim": 4, "maml.first_order": False}),
    "tcn maml 2nd order": ("tcn.yaml", {"maml.method": "maml", "maml.first_order": False}),
    "tcn cavia": ("tcn.yaml", {"maml.method": "cavia", "model.context_dim": 4, "maml.first_order": False}),
    "transformer maml 2nd order": ("transformer.yaml", {"maml.method": "maml", "maml.first_order": False}),
    "transformer maml 1st order": ("transformer.yaml", {"maml.method": "maml", "maml.first_order": True}),
    "ssm maml 2nd order": ("all.yaml", {"model.arch": "ssm", "maml.method": "maml", "maml.first_order": False}),
    "ssm encoder": ("all.yaml", {"model.arch": "ssm", "maml.method": "encoder", "model.context_dim": 4,
                                 "maml.first_order": False}),
    "arx ridge": ("arx.yaml", {}),
}


class Checks:
    """Named pass/fail checks with what was seen, in order."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def check(self, part: str, name: str, ok: bool, seen: Any = "") -> bool:
        self.rows.append({"part": part, "check": name, "ok": bool(ok), "seen": str(seen)})
        print(f"[gpu] {'ok  ' if ok else 'FAIL'} {part}: {name}" + (f" ({seen})" if seen != "" else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["ok"]]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _episodes(taskset, cfg, device):
    from metafx.data.tasks import EpisodeSampler
    from metafx.evaluate import to_device

    mc = cfg.maml
    s = EpisodeSampler(taskset, "train", mc.k_support, mc.k_query, mc.slice_len, seed=mc.seed)
    host = s.for_step(mc.seed, 1, mc.meta_batch)
    return host, [to_device(e, device) for e in host]


def meta_steps(checks: Checks, device, cache: Path, steps: int) -> list[dict[str, Any]]:
    """Part 1: one meta-step of every case on ``device``; checks and timings."""
    import torch
    from torch import nn

    from metafx.config import load_config
    from metafx.data.tasks import load_taskset
    from metafx.engines import engine_for, make_outer_optimizer
    from metafx.models import count_params

    rows = []
    tasksets: dict[Any, Any] = {}
    for name, (study, ov) in CASES.items():
        cfg = load_config(study, "smoke", {"data.cache_dir": str(cache), **ov})
        key = cfg.data
        if key not in tasksets:
            tasksets[key] = load_taskset(cfg.data, progress=False)
        torch.manual_seed(0)
        engine = engine_for(cfg)
        learner = engine.build_learner(cfg).to(device)
        opt = make_outer_optimizer(learner, cfg.maml)
        host, eps = _episodes(tasksets[key], cfg, device)
        cudnn_seen: list[bool] = []
        hooks = [m.register_forward_hook(lambda *_: cudnn_seen.append(bool(torch.backends.cudnn.enabled)))
                 for m in learner.modules() if isinstance(m, nn.RNNBase)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        err = ""
        times: list[float] = []
        stats: dict[str, float] = {}
        try:
            for i in range(steps + 1):  # the first is a warm-up
                _sync(device)
                t0 = time.perf_counter()
                stats = engine.meta_step(learner, eps, cfg.maml, opt, i + 1)
                _sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # reported as a failed check, the other cases still run
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for h in hooks:
            h.remove()
        part = f"meta-step {name}"
        if not checks.check(part, "runs", not err, err):
            rows.append({"case": name, "error": err})
            continue
        loss = float(stats.get("outer_loss", float("nan")))
        checks.check(part, "outer loss finite", loss == loss and abs(loss) != float("inf"), f"{loss:.4g}")
        devs = {p.device.type for p in learner.parameters()}
        checks.check(part, "parameters on the device", devs == {device.type}, sorted(devs))
        gdevs = {p.grad.device.type for p in learner.parameters() if p.grad is not None}
        checks.check(part, "gradients on the device", gdevs <= {device.type} and bool(gdevs), sorted(gdevs))
        checks.check(part, "episodes sampled on the host, moved to the device",
                     all(e.support_x.device.type == "cpu" for e in host)
                     and all(e.support_x.device.type == device.type for e in eps))
        second = not cfg.maml.first_order and cfg.maml.method != "ridge"
        if cudnn_seen and second:
            checks.check(part, "cuDNN off in the LSTM during a second-order step", not any(cudnn_seen),
                         f"cudnn.enabled seen {sorted(set(cudnn_seen))}")
        rows.append({"case": name, "study": study, "arch": cfg.model.arch, "method": cfg.maml.method,
                     "order": "first" if cfg.maml.first_order or cfg.maml.method == "ridge" else "second",
                     "params": count_params(learner), "slice_len": cfg.maml.slice_len, "meta_batch": cfg.maml.meta_batch,
                     "k_support": cfg.maml.k_support, "k_query": cfg.maml.k_query, "inner_steps": cfg.maml.inner_steps,
                     "median_s": statistics.median(times) if times else None,
                     "peak_mem_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None})
    return rows


def placement(checks: Checks, device, cache: Path, work: Path) -> dict[str, Any]:
    """Part 2: a short meta_train on the device; where the task set, model and checkpoints live."""
    import numpy as np
    import torch

    from metafx.config import load_config
    from metafx.data.tasks import load_taskset
    from metafx.train import meta_train, pick_device

    os.environ["METAFX_DEVICE"] = str(device)
    cfg = load_config("lstm.yaml", "smoke", {"data.cache_dir": str(cache), "maml.meta_steps": 4,
                                             "maml.eval_every": 2, "maml.checkpoint_every": 2})
    ts = load_taskset(cfg.data, progress=False)
    part = "placement"
    checks.check(part, "pick_device() is the device", pick_device().type == device.type, pick_device())
    arrays = [ts.input, ts.targets]
    checks.check(part, "task set memory-mapped in host memory", all(isinstance(a, np.memmap) for a in arrays),
                 [type(a).__name__ for a in arrays])
    t0 = time.perf_counter()
    res = meta_train(cfg, ts, None, workdir=work / "train", evaluate=True, baselines=False)
    secs = time.perf_counter() - t0
    checks.check(part, "test metrics finite after training on the device",
                 all(v == v for k, v in res.metrics.items() if k.startswith("test/")),
                 f"test MAE {res.metrics.get('test/query_l1_post', float('nan')):.4g}")
    for f in ("checkpoint.pt", "best.pt"):
        st = torch.load(work / "train" / "checkpoint" / f, map_location="cpu", weights_only=True)
        devs = {t.device.type for t in st["model"].values()}
        checks.check(part, f"{f} holds CPU tensors", devs == {"cpu"}, sorted(devs))
    return {"train_seconds": secs, "meta_steps": cfg.maml.meta_steps}


def packing(checks: Checks, device, cache: Path, work: Path, trials: int, share: float) -> dict[str, Any]:
    """Part 3: a smoke search packing ``trials`` trials at ``share`` of one GPU, tracked in MLflow."""
    from metafx.cluster import cluster_gpus, init_ray, shutdown_ray
    from metafx.config import load_config
    from metafx.search import run_search
    from metafx.tracking import Tracker

    os.environ.pop("METAFX_DEVICE", None)  # the trials pin their own device from what Ray gave them
    shutdown_ray()
    cpus = max(trials, min(os.cpu_count() or trials, 2 * trials))
    init_ray(cpus, num_gpus=1 if device.type != "cuda" else None, log_to_driver=False)
    cfg = load_config("lstm.yaml", "smoke", {
        "data.cache_dir": str(cache), "search.num_samples": trials, "search.max_concurrent": trials,
        "search.scheduler": "fifo", "search.cpus_per_trial": 1, "search.gpus_per_trial": share})
    uri = f"sqlite:///{work}/mlflow.db"
    t0 = time.perf_counter()
    try:
        gpus = cluster_gpus()
        out = run_search(cfg, name="gpu-packing", storage=str(work / "ray"), tracking_uri=uri, verbose=0)
    finally:
        shutdown_ray()
    secs = time.perf_counter() - t0
    part = f"packing {trials} x {share} GPU"
    checks.check(part, "Ray sees one GPU", gpus >= 1, gpus)
    status = [r["status"] for r in out.table]
    checks.check(part, "every trial finished", status == ["finished"] * trials, status)
    rec = Tracker.read_search(uri, cfg.name, "gpu-packing", history=False, artifacts=False)
    checks.check(part, "MLflow holds this search", rec["parent"]["run_id"] == out.parent_run_id,
                 rec["parent"]["run_id"])
    kids = rec["children"]
    devs = sorted({r["tags"].get("metafx.device", "") for r in kids})
    want = "cuda" if device.type == "cuda" else "cpu"
    checks.check(part, f"every trial trained on {want}", devs == [want], devs)
    ids = sorted({r["tags"].get("metafx.gpu_ids", "") for r in kids})
    checks.check(part, "every trial got GPU 0 from Ray", ids == ["0"], ids)
    events = sorted([(r["start_time"], 1) for r in kids] + [(r["end_time"], -1) for r in kids])
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    checks.check(part, "trials ran at the same time on the one GPU", most >= min(trials, 2),
                 f"at most {most} at once")
    return {"search_seconds": secs, "concurrent_max": most, "trials": trials, "gpus_per_trial": share}


def _markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        "# GPU path", "",
        f"Command: `{rep['command']}`", "",
        f"{rep['date']}; device **{m['device']}** ({m.get('gpu_name') or 'no CUDA device'}), torch {m['torch']}, "
        f"CUDA {m.get('cuda') or '-'}, cuDNN {m.get('cudnn') or '-'}; {m['cpus']} CPUs; {rep['wall_seconds']:.0f} s in all.",
        "",
    ]
    if m["device"] != "cuda":
        lines += ["**Not a GPU result**: this run checked the script on the CPU (`--device cpu`).", ""]
    lines += [f"**{len(rep['failed'])} of {len(rep['checks'])} checks failed.**" if rep["failed"]
              else f"All {len(rep['checks'])} checks passed.", "",
              "## Meta-steps", "",
              "| case | params | slice x (K_s + K_q) x tasks | inner steps | median s / meta-step | peak device MB |",
              "|---|---|---|---|---|---|"]
    for r in rep["meta_steps"]:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | |")
            continue
        med = "-" if r["median_s"] is None else f"{r['median_s']:.4f}"
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['case']} | {r['params']} | {r['slice_len']} x ({r['k_support']} + {r['k_query']}) x "
                     f"{r['meta_batch']} | {r['inner_steps']} | {med} | {mem} |")
    p, k = rep["placement"], rep["packing"]
    lines += ["", "## Placement and packing", "",
              f"A {p['meta_steps']}-step smoke meta_train with test evaluation took {p['train_seconds']:.1f} s. A smoke "
              f"search of {k['trials']} trials at {k['gpus_per_trial']} GPU each took {k['search_seconds']:.1f} s, with "
              f"up to {k['concurrent_max']} trials running at once.", "",
              "## Checks", "", "| part | check | result | seen |", "|---|---|---|---|"]
    for c in rep["checks"]:
        lines.append(f"| {c['part']} | {c['check']} | {'ok' if c['ok'] else '**FAIL**'} | {c['seen']} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the three parts; write the report; 1 when a check failed, 2 when the device is missing."""
    import torch

    from metafx.config import REPO_ROOT

    ap = argparse.ArgumentParser(prog="bench.py gpu")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script, not a GPU result)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--gpus-per-trial", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=3, help="timed meta-steps per case (after one warm-up)")
    opts = ap.parse_args([a for a in rest if a != "--"])
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: bench gpu: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine "
              "with a CUDA build of torch, or pass -- --device cpu to check the script", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    if device.type != "cuda" and not args.out:
        out_dir = Path(tempfile.mkdtemp(prefix="metafx-bench-gpu-"))  # never overwrite the GPU result
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python launch/bench.py gpu" + (" -- " + shlex.join(opts_argv) if (opts_argv := [a for a in rest if a != "--"])
                                              else "")
    checks = Checks()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metafx-gpu-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        steps = meta_steps(checks, device, cache, opts.steps)
        place = placement(checks, device, cache, work)
        pack = packing(checks, device, cache, work, opts.trials, opts.gpus_per_trial)
    machine = {"device": device.type, "torch": torch.__version__, "cpus": os.cpu_count(),
               "python": platform.python_version()}
    if device.type == "cuda":
        machine.update(gpu_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version())
    rep = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine,
           "wall_seconds": time.perf_counter() - t0, "meta_steps": steps, "placement": place, "packing": pack,
           "checks": checks.rows, "failed": checks.failed}
    write_report(out_dir, "gpu", rep, _markdown(rep))
    print(f"wrote {out_dir / 'gpu.md'} and {out_dir / 'gpu.json'}: {len(checks.failed)} of {len(checks.rows)} checks "
          f"failed" if checks.failed else f"wrote {out_dir / 'gpu.md'} and {out_dir / 'gpu.json'}: all "
          f"{len(checks.rows)} checks passed")
    return 1 if checks.failed else 0
