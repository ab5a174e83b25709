"""Meta-training of one trial: the loop, its checkpoints and its reports; no Ray, no MLflow.

``meta_train(cfg, taskset, report)`` is the whole of a trial: ``report(metrics, checkpoint_dir)``
is how the caller (Ray Tune in :mod:`metafx.search`, or ``launch/train.py``) hears about progress.
The method is the adaptation engine of ``maml.method`` (:func:`metafx.engines.engine_for`); the
final evaluation and every baseline are :mod:`metafx.evaluate`.

Metric names during training, every ``maml.eval_every`` meta-steps: ``support_l1_pre``,
``support_l1_post``, ``query_l1_post`` (training tasks, averaged since the last report),
``val/query_<metric>_{pre,post}`` for every evaluation metric (fixed validation episodes:
:data:`metafx.config.VAL_METRICS`), ``step``; at the end the test metrics of
:func:`metafx.evaluate.evaluate_test`.

The model evaluated at the end (and saved as ``best.pt``) is the one of the report with the best
validation value of ``search.metric`` (``val/query_l1_post`` when the search metric is a training
metric), so a trial is judged by the metric the search optimizes.

Determinism: the episodes of meta-step ``s`` are drawn from a generator seeded with
``(maml.seed, s)`` (:meth:`metafx.data.tasks.EpisodeSampler.for_step`), and all state (model,
optimizer, history, best model) lives in the checkpoint, so a run resumed from a checkpoint
produces the same weights as one that never stopped.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from metafx.config import Config
from metafx.data.tasks import EpisodeSampler, TaskSet
from metafx.engines import engine_for, make_outer_optimizer
from metafx.evaluate import evaluate_test, fixed_test_episodes, to_device, val_metrics
from metafx.models import count_params

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], "Path | None"], None]
CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_CURVES = ("support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss")


def pick_device() -> torch.device:
    """CUDA when present (cluster GPUs), else CPU. Honors METAFX_DEVICE."""
    want = os.environ.get("METAFX_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    """What :func:`meta_train` returns: final metrics, the report history, example signals, size and time."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    examples: list[dict[str, Any]] = field(default_factory=list)
    params: int = 0
    best_step: int = 0
    wall_seconds: float = 0.0


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint loadable with ``torch.load(weights_only=True)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only).

    Raises:
        FileNotFoundError: if ``path`` (or ``path/checkpoint.pt``) does not exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- meta-training


def selection_metric(cfg: Config) -> str:
    """The validation metric that picks a trial's best model: ``search.metric`` if it is one, else ``val/query_l1_post``.

    Args:
        cfg: the study config.

    Returns:
        A key of :data:`metafx.config.VAL_METRICS`.
    """
    return cfg.search.metric if cfg.search.metric.startswith("val/") else "val/query_l1_post"


def meta_train(
    cfg: Config,
    taskset: TaskSet,
    report: ReportFn | None = None,
    *,
    resume_from: Path | None = None,
    workdir: Path | None = None,
    evaluate: bool = True,
    baselines: bool = True,
    artifacts: bool = False,
) -> TrainResult:
    """Meta-train ``cfg.model`` on the training tasks of ``taskset``; evaluate on its test tasks.

    Args:
        cfg: the resolved study configuration (one trial).
        taskset: the rendered task set (memory-mapped, shared).
        report: called as ``report(metrics, checkpoint_dir_or_None)`` every
            ``maml.eval_every`` meta-steps and once at the end with the test metrics.
            A checkpoint directory is passed every ``maml.checkpoint_every`` steps, at every
            report that improves the best validation value (so a trial stopped early keeps
            its best model) and at the end; the caller may copy it (Ray Tune does), it is
            reused afterwards.
        resume_from: a checkpoint file or directory to continue from.
        workdir: where checkpoints are written (a temporary folder by default).
        evaluate: run the final test evaluation.
        baselines: include the joint and single-task baselines (identity and LS-FIR always run).
        artifacts: write WAVs and plots of test examples into ``<final checkpoint>/artifacts``
            (the search driver logs them to MLflow from there).

    Returns:
        TrainResult with the final metrics, the report history and example signals.

    Raises:
        metafx.engines.NonFiniteLossError: a non-finite loss, naming the step and the task.
    """
    t0 = time.time()
    device = pick_device()
    mc = cfg.maml
    torch.manual_seed(mc.seed)
    engine = engine_for(cfg)
    model = engine.build_learner(cfg).to(device)
    opt = make_outer_optimizer(model, mc)
    train_s = EpisodeSampler(taskset, "train", mc.k_support, mc.k_query, mc.slice_len, seed=mc.seed)
    val_s = EpisodeSampler(taskset, "val", mc.k_support, mc.k_query, mc.slice_len, seed=mc.seed + 1)
    val_eps = val_s.fixed(mc.val_episodes, seed=mc.seed + 1)
    test_eps = fixed_test_episodes(cfg, taskset) if evaluate else []  # an empty test split fails here, not after training

    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="metafx-trial-")
        workdir = Path(own_tmp.name)
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoint"

    start, history = 0, []
    select = selection_metric(cfg)
    sign = -1.0 if cfg.search.mode == "max" else 1.0  # best = lowest sign * value
    best = {"val": math.inf, "step": 0, "model": _cpu_state(model)}
    if resume_from is not None:
        st = load_checkpoint(Path(resume_from), map_location="cpu")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, history, best = int(st["step"]), list(st["history"]), dict(st["best"])
        log.info("resumed from %s at meta-step %d", resume_from, start)

    def checkpoint(step: int) -> Path:
        save_checkpoint(ckpt_dir / CHECKPOINT_FILE, {
            "model": _cpu_state(model), "optimizer": opt.state_dict(), "step": step,
            "history": history, "best": best, "config": cfg.to_dict(), "params": count_params(model),
        })
        save_checkpoint(ckpt_dir / "best.pt", {"model": best["model"], "step": best["step"], "val": sign * best["val"],
                                               "metric": select,
                                               "config": cfg.to_dict()})
        return ckpt_dir

    acc: dict[str, list[float]] = {}
    last_ck = start
    for step in range(start + 1, mc.meta_steps + 1):
        model.train()
        eps = [to_device(e, device) for e in train_s.for_step(mc.seed, step, mc.meta_batch)]
        stats = engine.meta_step(model, eps, mc, opt, step)
        for k, v in stats.items():
            acc.setdefault(k, []).append(float(v))
        if step % mc.eval_every == 0 or step == mc.meta_steps:
            row = {k: float(np.mean(v)) for k, v in acc.items() if k in TRAINING_CURVES}
            acc = {}
            row.update(val_metrics(model, val_eps, cfg, device))
            row["step"] = step
            improved = sign * row[select] < best["val"]
            if improved:
                best = {"val": sign * row[select], "step": step, "model": _cpu_state(model)}
            history.append(row)
            # Checkpoint when a checkpoint_every boundary was crossed since the last report, and at every
            # report that improves the best validation value: a trial that ASHA stops at a rung before
            # checkpoint_every then still leaves its best model (best.pt) for capture and inspection.
            prev = history[-2]["step"] if len(history) > 1 else start
            due = step // mc.checkpoint_every > prev // mc.checkpoint_every
            ck = checkpoint(step) if due or improved else None
            if ck is not None:
                last_ck = step
            if report is not None:
                report(dict(row), ck)
    if last_ck < mc.meta_steps and history:
        checkpoint(mc.meta_steps)  # a finished run always leaves its last state and best.pt on disk
    result = TrainResult(metrics=dict(history[-1]) if history else {}, history=history,
                         params=count_params(model), best_step=int(best["step"]))
    if evaluate:
        model.load_state_dict(best["model"])
        test, examples = evaluate_test(model, cfg, taskset, device, baselines=baselines, episodes=test_eps)
        result.metrics.update(test)
        result.metrics["best_step"] = float(best["step"])
        result.metrics["params"] = float(result.params)
        result.examples = examples
        result.metrics["wall_seconds"] = time.time() - t0
        if artifacts:
            from metafx.plots import write_trial_artifacts  # matplotlib only when artifacts are wanted
            write_trial_artifacts(ckpt_dir / "artifacts", examples, history, cfg.data.sample_rate)
        if report is not None:
            final = dict(result.metrics)
            final["step"] = mc.meta_steps
            final["done"] = 1.0
            report(final, checkpoint(mc.meta_steps))
    result.wall_seconds = time.time() - t0
    if own_tmp is not None:
        own_tmp.cleanup()
    return result
