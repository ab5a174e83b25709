"""One trial: meta-train a model on the training tasks, then evaluate it honestly.

``meta_train(cfg, taskset, report)`` is the whole of a trial and knows nothing of
Ray or MLflow: ``report(metrics, checkpoint_dir)`` is how the caller (Ray Tune in
:mod:`metafx.search`, or ``launch/train.py``) hears about progress.

Metric names (the paper's Figure 3 and Table 1):

* during training, every ``maml.eval_every`` meta-steps: ``support_l1_pre``,
  ``support_l1_post``, ``query_l1_post`` (training tasks, averaged since the last
  report), ``val/query_l1_pre`` and ``val/query_l1_post`` (fixed validation
  episodes), ``step``;
* at the end, on fixed test episodes (``eval.test_episodes`` drawn with
  ``eval.test_seed``, identical for every method and baseline):
  ``test/query_{l1,stft,mrstft,esr,hf}_{pre,post}`` of the meta-learned model and
  ``test/<baseline>/query_{l1,stft,mrstft,esr,hf}_post`` for the baselines
  ``identity``, ``lsfir``, ``joint`` and ``single_task``; plus the aliases
  ``test/identity_l1`` and ``test/identity_stft``.

``hf`` is :func:`metafx.metrics.hf_error`, the spectral error above each task's
cutoff (only for families with a ``cutoff`` parameter).

Determinism: the episodes of meta-step ``s`` are drawn from a generator seeded
with ``(maml.seed, s)``, and all state (model, optimizer, RNG, history, best
model) lives in the checkpoint, so a run resumed from a checkpoint produces the
same weights as one that never stopped.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from metafx import maml as engine
from metafx import metrics as M
from metafx.baselines import identity_predict, lsfir_fit, lsfir_predict
from metafx.config import Config
from metafx.data.tasks import Episode, EpisodeSampler, TaskSet
from metafx.models import build_model, count_params, crop_like

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], "Path | None"], None]
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_METRICS = ("l1", "stft", "mrstft", "esr")


def pick_device() -> torch.device:
    """CUDA when present (cluster GPUs), else CPU. Honors METAFX_DEVICE."""
    want = os.environ.get("METAFX_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
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


# --------------------------------------------------------------------------- episodes


def _episodes_for_step(sampler: EpisodeSampler, seed: int, step: int, n: int) -> list[Episode]:
    """The ``n`` episodes of meta-step ``step``: a pure function of (seed, step), so resuming is exact."""
    rng = np.random.default_rng([seed, step])
    return [sampler.sample(rng) for _ in range(n)]


def joint_step(model, eps: Sequence[Episode], mc, opt, loss_fn, *, step: int) -> dict[str, float]:
    """One step of ordinary multi-task training on support + query slices (no inner loop).

    The ``maml.method: joint`` ablation: the standard check that MAML's inner loop is doing anything.
    """
    xs = torch.cat([torch.cat([e.support_x, e.query_x]) for e in eps])  # (B*(Ks+Kq), 1, L)
    ys = torch.cat([torch.cat([e.support_y, e.query_y]) for e in eps])
    pred = model(xs)
    loss = loss_fn(pred, crop_like(ys, pred))
    if not torch.isfinite(loss):
        raise engine.NonFiniteLossError(
            f"non-finite training loss at meta-step {step} (tasks {[e.task for e in eps]}); "
            "lower maml.outer_lr or set maml.grad_clip")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if mc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), mc.grad_clip)
    opt.step()
    with torch.no_grad():
        # Support and query L1 of the same forward pass (no adaptation: pre == post).
        n_s = [e.support_x.shape[0] for e in eps]
        parts = pred.split([k + e.query_x.shape[0] for k, e in zip(n_s, eps)])  # per episode
        sup = torch.cat([p[:k] for p, k in zip(parts, n_s)])
        qry = torch.cat([p[k:] for p, k in zip(parts, n_s)])
        ysup = torch.cat([e.support_y for e in eps])
        yq = torch.cat([e.query_y for e in eps])
        s_l1 = float(M.l1(sup, crop_like(ysup, sup)))
        q_l1 = float(M.l1(qry, crop_like(yq, qry)))
    return {"support_l1_pre": s_l1, "support_l1_post": s_l1, "query_l1_post": q_l1, "outer_loss": loss.detach().item()}


def _to(ep: Episode, device: torch.device) -> Episode:
    if device.type == "cpu":
        return ep
    return Episode(**{**ep.__dict__, **{k: getattr(ep, k).to(device) for k in
                                        ("support_x", "support_y", "query_x", "query_y")}})


# --------------------------------------------------------------------------- evaluation


def _metric_row(pred: torch.Tensor, target: torch.Tensor, ep: Episode, cfg: Config, suffix: str) -> dict[str, float]:
    """All evaluation metrics of one prediction on one episode's query slices."""
    target = crop_like(target, pred)
    out = {f"query_{m}_{suffix}": float(M.METRICS[m](pred, target)) for m in EVAL_METRICS}
    cutoff = _cutoff(ep)
    if cutoff is not None:
        out[f"query_hf_{suffix}"] = float(M.hf_error(pred, target, cutoff, cfg.data.sample_rate, margin=cfg.eval.hf_margin))
    return out


def _cutoff(ep: Episode) -> float | None:
    for k, v in (ep.params or {}).items():
        if "cutoff" in k.lower() or k.lower() in ("freq", "fc", "frequency"):
            return float(v)
    return None


def _mean_rows(rows: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {f"{prefix}{k}": float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def adaptation_engine(cfg: Config):
    """The module implementing ``meta_step`` and ``adapt_and_predict`` for ``cfg.maml.method``.

    Plain MAML as in the paper (``maml`` without MAML++ stabilizers) and ``joint`` use
    :mod:`metafx.maml` (both backends); ``anil``, ``cavia``, ``encoder`` and any method with a
    stabilizer use :mod:`metafx.meta`; ``ridge`` (closed-form adaptation of a linear head) uses
    :mod:`metafx.closed_form`.
    """
    if cfg.maml.method == "ridge":
        from metafx import closed_form

        return closed_form
    if cfg.maml.method in ("anil", "cavia", "encoder") or (cfg.maml.method == "maml" and cfg.maml.stabilized()):
        from metafx import meta

        return meta
    return engine


def build_learner(cfg: Config) -> torch.nn.Module:
    """The meta-learned module of ``cfg``: the bare model, or a :class:`metafx.meta.MetaLearner`."""
    eng = adaptation_engine(cfg)
    if eng.__name__ == "metafx.meta":
        return eng.build(cfg)
    return build_model(cfg.model)


def evaluate_adaptation(model, episodes: Sequence[Episode], cfg: Config, device, inner_loss) -> tuple[list[dict], list]:
    """Pre- and post-adaptation metrics of ``model`` on each episode's query slices.

    Returns:
        (rows, predictions) where rows[i] holds ``query_<metric>_{pre,post}`` and
        predictions[i] = (pred_pre, pred_post) tensors of shape (K_q, 1, T').
    """
    rows, preds = [], []
    for ep in episodes:
        ep = _to(ep, device)
        pre, post = adaptation_engine(cfg).adapt_and_predict(model, ep, cfg.maml, inner_loss)
        r = _metric_row(pre, ep.query_y, ep, cfg, "pre")
        r.update(_metric_row(post, ep.query_y, ep, cfg, "post"))
        rows.append(r)
        preds.append((pre.detach().cpu(), post.detach().cpu()))
    return rows, preds


def _val_metrics(model, episodes, cfg, device, inner_loss) -> dict[str, float]:
    rows, _ = evaluate_adaptation(model, episodes, cfg, device, inner_loss)
    return {
        "val/query_l1_pre": float(np.mean([r["query_l1_pre"] for r in rows])),
        "val/query_l1_post": float(np.mean([r["query_l1_post"] for r in rows])),
    }


def _baseline_rows(name: str, predict: Callable[[Episode], torch.Tensor], episodes, cfg) -> dict[str, float]:
    rows = []
    for ep in episodes:
        with torch.no_grad():
            pred = predict(ep)
        rows.append(_metric_row(pred, ep.query_y, ep, cfg, "post"))
    return _mean_rows(rows, f"test/{name}/")


def _lsfir(ep: Episode, cfg: Config) -> torch.Tensor:
    h = lsfir_fit(ep.support_x, ep.support_y, cfg.eval.lsfir_taps, cfg.eval.lsfir_ridge)
    return lsfir_predict(h, ep.query_x)


def _train_plain(model, sample_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
                 loss_fn, device, clip: float) -> None:
    """Ordinary supervised training (no inner loop): the joint and single-task baselines."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for s in range(steps):
        x, y = sample_batch(s)
        x, y = x.to(device), y.to(device)
        pred = model(x)
        loss = loss_fn(pred, crop_like(y, pred))
        if not torch.isfinite(loss):
            raise engine.NonFiniteLossError(f"baseline training: non-finite loss at step {s}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def joint_baseline(cfg: Config, taskset: TaskSet, test_eps, device, inner_loss) -> dict[str, float]:
    """The same model trained on all training tasks without MAML, then adapted with the same inner loop."""
    torch.manual_seed(cfg.maml.seed)
    model = build_model(cfg.model).to(device)
    sampler = EpisodeSampler(taskset, "train", cfg.maml.k_support, cfg.maml.k_query, cfg.maml.slice_len, seed=cfg.maml.seed)

    def batch(s: int):
        eps = _episodes_for_step(sampler, cfg.maml.seed + 7919, s, cfg.maml.meta_batch)
        x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in eps])
        y = torch.cat([torch.cat([e.support_y, e.query_y]) for e in eps])
        return x, y

    _train_plain(model, batch, cfg.eval.joint_steps, cfg.maml.outer_lr, M.make_loss(cfg.maml.outer_loss), device,
                 cfg.maml.grad_clip)
    rows, _ = evaluate_adaptation(model, test_eps, cfg, device, inner_loss)
    return _mean_rows([{k.replace("_pre", "_noadapt"): v for k, v in r.items()} for r in rows], "test/joint/")


def single_task_baseline(cfg: Config, taskset: TaskSet, test_eps, device) -> dict[str, float]:
    """The same model trained normally on one test task's own audio (query slices excluded)."""
    rows = []
    L = cfg.maml.slice_len
    done: set[int] = set()
    for ep in test_eps:
        if ep.task in done:
            continue
        if len(done) >= cfg.eval.single_task_tasks:
            break
        done.add(ep.task)
        torch.manual_seed(cfg.maml.seed)
        model = build_model(cfg.model).to(device)
        x_all = taskset.input
        y_all = taskset.targets[ep.task]
        n = x_all.shape[0]
        q_starts = [int(p) for p in ep.positions[cfg.maml.k_support:]]
        allowed = np.ones(max(n - L, 1), dtype=bool)
        for q in q_starts:  # never train on audio that overlaps a query slice
            allowed[max(0, q - L + 1): q + L] = False
        starts = np.flatnonzero(allowed)
        if starts.size == 0:
            continue
        rng = np.random.default_rng([cfg.maml.seed, ep.task])
        B = cfg.maml.k_support + cfg.maml.k_query

        def batch(s: int):
            idx = rng.choice(starts, size=B)
            x = torch.from_numpy(np.stack([np.asarray(x_all[i:i + L]) for i in idx]))[:, None]
            y = torch.from_numpy(np.stack([np.asarray(y_all[i:i + L]) for i in idx]))[:, None]
            return x.float(), y.float()

        _train_plain(model, batch, cfg.eval.single_task_steps, cfg.maml.outer_lr, M.make_loss(cfg.maml.outer_loss),
                     device, cfg.maml.grad_clip)
        model.eval()
        e = _to(ep, device)
        with torch.no_grad():
            pred = model(e.query_x)
        rows.append(_metric_row(pred.cpu(), ep.query_y, ep, cfg, "post"))
    return _mean_rows(rows, "test/single_task/") if rows else {}


def evaluate_test(model, cfg: Config, taskset: TaskSet, device, inner_loss, *, baselines: bool = True,
                  n_examples: int = 2) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Final evaluation on the fixed test episodes, with the baselines on the same episodes."""
    sampler = EpisodeSampler(taskset, "test", cfg.maml.k_support, cfg.maml.k_query, cfg.maml.slice_len,
                             seed=cfg.eval.test_seed)
    test_eps = sampler.fixed(cfg.eval.test_episodes, seed=cfg.eval.test_seed)
    rows, preds = evaluate_adaptation(model, test_eps, cfg, device, inner_loss)
    out = _mean_rows(rows, "test/")
    out.update(_baseline_rows("identity", lambda ep: identity_predict(ep.query_x), test_eps, cfg))
    out["test/identity_l1"] = out["test/identity/query_l1_post"]
    out["test/identity_stft"] = out["test/identity/query_stft_post"]
    out.update(_baseline_rows("lsfir", lambda ep: _lsfir(ep, cfg), test_eps, cfg))
    if baselines and cfg.eval.joint_steps > 0 and cfg.maml.method != "joint":
        out.update(joint_baseline(cfg, taskset, test_eps, device, inner_loss))
    if baselines and cfg.eval.single_task_steps > 0:
        out.update(single_task_baseline(cfg, taskset, test_eps, device))
    examples = []
    for ep, (pre, post) in list(zip(test_eps, preds))[:n_examples]:
        examples.append({
            "task_id": ep.task_id, "family": ep.family, "params": dict(ep.params),
            "input": ep.query_x[0, 0].numpy().copy(), "target": ep.query_y[0, 0].numpy().copy(),
            "pred_pre": pre[0, 0].numpy().copy(), "pred_post": post[0, 0].numpy().copy(),
        })
    return out, examples


# --------------------------------------------------------------------------- meta-training


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
            A checkpoint directory is passed every ``maml.checkpoint_every`` steps and at
            the end; the caller may copy it (Ray Tune does), it is reused afterwards.
        resume_from: a checkpoint file or directory to continue from.
        workdir: where checkpoints are written (a temporary folder by default).
        evaluate: run the final test evaluation.
        baselines: include the joint and single-task baselines (identity and LS-FIR always run).
        artifacts: write WAVs and plots of test examples into ``<final checkpoint>/artifacts``
            (the search driver logs them to MLflow from there).

    Returns:
        TrainResult with the final metrics, the report history and example signals.

    Raises:
        metafx.maml.NonFiniteLossError: a non-finite loss, naming the step and the task.
    """
    t0 = time.time()
    device = pick_device()
    mc = cfg.maml
    torch.manual_seed(mc.seed)
    model = build_learner(cfg).to(device)
    opt = engine.make_outer_optimizer(model, mc)
    inner_loss = M.make_loss(mc.inner_loss)
    outer_loss = M.make_loss(mc.outer_loss)
    train_s = EpisodeSampler(taskset, "train", mc.k_support, mc.k_query, mc.slice_len, seed=mc.seed)
    val_s = EpisodeSampler(taskset, "val", mc.k_support, mc.k_query, mc.slice_len, seed=mc.seed + 1)
    val_eps = val_s.fixed(mc.val_episodes, seed=mc.seed + 1)

    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="metafx-trial-")
        workdir = Path(own_tmp.name)
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoint"

    start, history = 0, []
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
        save_checkpoint(ckpt_dir / "best.pt", {"model": best["model"], "step": best["step"], "val": best["val"],
                                               "config": cfg.to_dict()})
        return ckpt_dir

    acc: dict[str, list[float]] = {}
    for step in range(start + 1, mc.meta_steps + 1):
        model.train()
        eps = [_to(e, device) for e in _episodes_for_step(train_s, mc.seed, step, mc.meta_batch)]
        if mc.method == "joint":
            stats = joint_step(model, eps, mc, opt, outer_loss, step=step)
        else:
            stats = adaptation_engine(cfg).meta_step(model, eps, mc, opt, inner_loss, outer_loss, step=step)
        for k, v in stats.items():
            acc.setdefault(k, []).append(float(v))
        if step % mc.eval_every == 0 or step == mc.meta_steps:
            row = {k: float(np.mean(v)) for k, v in acc.items() if k in ("support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss")}
            acc = {}
            row.update(_val_metrics(model, val_eps, cfg, device, inner_loss))
            row["step"] = step
            if row["val/query_l1_post"] < best["val"]:
                best = {"val": row["val/query_l1_post"], "step": step, "model": _cpu_state(model)}
            history.append(row)
            # Checkpoint when a checkpoint_every boundary was crossed since the last report.
            prev = history[-2]["step"] if len(history) > 1 else start
            ck = checkpoint(step) if step // mc.checkpoint_every > prev // mc.checkpoint_every else None
            if report is not None:
                report(dict(row), ck)
    result = TrainResult(metrics=dict(history[-1]) if history else {}, history=history,
                         params=count_params(model), best_step=int(best["step"]))
    if evaluate:
        model.load_state_dict(best["model"])
        test, examples = evaluate_test(model, cfg, taskset, device, inner_loss, baselines=baselines)
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
