"""Held-out evaluation of a meta-learned model and every baseline, on the same fixed episodes.

Metric names (the paper's Figure 3 and Table 1), on fixed test episodes (``eval.test_episodes``
drawn with ``eval.test_seed``, identical for every method and baseline):
``test/query_{l1,stft,mrstft,esr,esr_pe,hf}_{pre,post}`` of the meta-learned model and
``test/<baseline>/query_{l1,stft,mrstft,esr,esr_pe,hf}_post`` for the baselines

* ``identity``: the dry input as the prediction;
* ``lsfir``: a least-squares FIR fitted on the support slices (:mod:`metafx.baselines`);
* ``arx``: classical ARX (no meta-learning, :func:`classical_arx`) of the study's ``model.arx``
  orders, ridge-fitted on the support slices: the closed-form head without any network, so a
  head on a network's features (``model.arx.features: lstm``...) is credited only with what it
  adds to this;
* ``joint``: the same model trained on every training task without an inner loop, then adapted
  with the same inner loop (:func:`joint_baseline`);
* ``single_task``: the same model trained normally on one test task's own audio, query slices
  excluded (:func:`single_task_baseline`): the ceiling meta-learning approaches;

plus the aliases ``test/identity_l1`` and ``test/identity_stft``.

``esr`` is the field's error-to-signal ratio: error energy over target energy summed over all query
samples of an episode (:func:`metafx.metrics.esr`), then averaged over episodes like every metric;
``esr_pe`` the same after Wright & Valimaki's pre-emphasis. ``hf`` is :func:`metafx.metrics.hf_error`, the spectral error above each task's cutoff (only for
families with a cutoff parameter, :func:`metafx.config.is_cutoff_param`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from metafx import metrics as M
from metafx.baselines import identity_predict, lsfir_fit, lsfir_predict
from metafx.config import EVAL_METRICS, VAL_METRICS, Config, ModelConfig, is_cutoff_param
from metafx.data.tasks import Episode, EpisodeSampler, TaskSet
from metafx.engines import NonFiniteLossError, adapt_and_predict, engine_for
from metafx.metrics import crop_like
from metafx.models import build_model

EXAMPLE_SECONDS = 3.0  # audio per example task: long enough to judge by ear


def to_device(ep: Episode, device: torch.device) -> Episode:
    """The episode with its slices on ``device`` (the same object on the CPU)."""
    if device.type == "cpu":
        return ep
    return replace(ep, **{k: getattr(ep, k).to(device) for k in ("support_x", "support_y", "query_x", "query_y")})


def task_cutoff(ep: Episode) -> float | None:
    """The episode's cutoff in Hz, when its family has a cutoff parameter."""
    for k, v in (ep.params or {}).items():
        if is_cutoff_param(k):
            return float(v)
    return None


def metric_row(pred: torch.Tensor, target: torch.Tensor, ep: Episode, cfg: Config, suffix: str) -> dict[str, float]:
    """All evaluation metrics of one prediction on one episode's query slices, keyed ``query_<metric>_<suffix>``."""
    target = crop_like(target, pred)
    out = {f"query_{m}_{suffix}": float(M.METRICS[m](pred, target)) for m in EVAL_METRICS}
    cutoff = task_cutoff(ep)
    if cutoff is not None:
        out[f"query_hf_{suffix}"] = float(M.hf_error(pred, target, cutoff, cfg.data.sample_rate, margin=cfg.eval.hf_margin))
    return out


def mean_rows(rows: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    """Per-key means over ``rows`` (keys missing in some rows are averaged where present), prefixed."""
    keys = sorted({k for r in rows for k in r})
    return {f"{prefix}{k}": float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def evaluate_adaptation(learner, episodes: Sequence[Episode], cfg: Config, device) -> tuple[list[dict], list]:
    """Pre- and post-adaptation metrics of ``learner`` on each episode's query slices.

    Returns:
        ``(rows, predictions)``: rows[i] holds ``query_<metric>_{pre,post}``; predictions[i] is
        ``(pred_pre, pred_post)``, each (K_q, 1, T'), on the CPU.

    Raises:
        NonFiniteLossError: an adaptation failed (names the task).
    """
    engine = engine_for(cfg)
    rows, preds = [], []
    for ep in episodes:
        ep = to_device(ep, device)
        pre, post = adapt_and_predict(engine, learner, ep, cfg.maml)
        r = metric_row(pre, ep.query_y, ep, cfg, "pre")
        r.update(metric_row(post, ep.query_y, ep, cfg, "post"))
        rows.append(r)
        preds.append((pre.detach().cpu(), post.detach().cpu()))
    return rows, preds


def val_metrics(learner, episodes: Sequence[Episode], cfg: Config, device) -> dict[str, float]:
    """:data:`~metafx.config.VAL_METRICS` (every evaluation metric, before and after adaptation) on the validation episodes."""
    rows, _ = evaluate_adaptation(learner, episodes, cfg, device)
    means = mean_rows(rows, "val/")
    return {k: means[k] for k in VAL_METRICS}


def baseline_rows(name: str, predict: Callable[[Episode], torch.Tensor], episodes, cfg: Config) -> dict[str, float]:
    """``test/<name>/query_<metric>_post`` of a predictor that sees one episode at a time."""
    rows = []
    for ep in episodes:
        with torch.no_grad():
            pred = predict(ep)
        rows.append(metric_row(pred, ep.query_y, ep, cfg, "post"))
    return mean_rows(rows, f"test/{name}/")


def lsfir(ep: Episode, cfg: Config) -> torch.Tensor:
    """The least-squares FIR baseline fitted on the episode's support slices, on its query input."""
    h = lsfir_fit(ep.support_x, ep.support_y, cfg.eval.lsfir_taps, cfg.eval.lsfir_ridge)
    return lsfir_predict(h, ep.query_x)


def classical_arx(model: ModelConfig) -> torch.nn.Module:
    """Classical ARX (no meta-learning): a :class:`metafx.models.arx.MetaARX` of ``model.arx``'s orders and ridge
    with ``features: none``.

    Evaluated with the ridge engine, it is an ARX(nb, na) on ``[1, x]`` fitted by ridge on the
    support slices of each task; a capture fits the default one (``ModelConfig()``) continuously
    (:func:`metafx.capture.adapt.classical_arx_fit`).

    Args:
        model: a study's model section (only its ``arx`` orders and ridge are read).
    """
    return build_model(replace(model, arch="arx", context_dim=0, arx=replace(model.arx, features="none")))


def arx_baseline(cfg: Config, episodes: Sequence[Episode], device) -> dict[str, float]:
    """``test/arx/query_<metric>_post``: classical ARX of ``cfg.model.arx``'s orders, fitted on each episode's support.

    Args:
        cfg: the study config (``model.arx.nb`` / ``na``, ``maml``'s slices).
        episodes: the test episodes.
        device: where to fit.

    Returns:
        The metrics of the ``arx`` baseline, averaged over the episodes.
    """
    arx_cfg = replace(cfg, model=replace(cfg.model, arch="arx"), maml=replace(cfg.maml, method="ridge"))
    rows, _ = evaluate_adaptation(classical_arx(arx_cfg.model).to(device), episodes, arx_cfg, device)
    return mean_rows([{k: v for k, v in r.items() if k.endswith("_post")} for r in rows], "test/arx/")


def train_plain(model, sample_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
                loss_fn, device, clip: float, after: Callable[[int], None] | None = None, cosine: bool = False) -> None:
    """Ordinary supervised training (no inner loop): the joint and single-task baselines.

    Args:
        model: the model, trained in place with Adam at ``lr`` for ``steps`` steps.
        sample_batch: step -> (x, y), (B, 1, L) each.
        loss_fn: (pred, target) -> loss.
        device: where the batches go.
        clip: gradient-norm clip (0 = none).
        after: called with the number of steps done after each step (a learning curve; the
            callee puts the model back in train mode if it changes it).
        cosine: anneal the rate to 0 over ``steps`` (cosine): a constant rate keeps the last
            steps as noisy as the first and the result depends on where training stops.

    Raises:
        NonFiniteLossError: a training loss is not finite.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps)) if cosine else None
    model.train()
    for s in range(steps):
        x, y = sample_batch(s)
        x, y = x.to(device), y.to(device)
        pred = model(x)
        loss = loss_fn(pred, crop_like(y, pred))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"baseline training: non-finite loss at step {s}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        if after is not None:
            after(s + 1)


def joint_baseline(cfg: Config, taskset: TaskSet, test_eps, device) -> dict[str, float]:
    """The same model trained on all training tasks without MAML, then adapted with plain MAML's inner loop."""
    torch.manual_seed(cfg.maml.seed)
    model = build_model(cfg.model).to(device)
    mc = cfg.maml
    sampler = EpisodeSampler(taskset, "train", mc.k_support, mc.k_query, mc.slice_len, seed=mc.seed)

    def batch(s: int):
        eps = sampler.for_step(mc.seed + 7919, s, mc.meta_batch)
        x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in eps])
        y = torch.cat([torch.cat([e.support_y, e.query_y]) for e in eps])
        return x, y

    train_plain(model, batch, cfg.eval.joint_steps, mc.outer_lr, M.make_loss(mc.outer_loss), device, mc.grad_clip)
    joint_cfg = replace(cfg, maml=replace(mc, method="joint"))
    rows, _ = evaluate_adaptation(model, test_eps, joint_cfg, device)
    return mean_rows([{k.replace("_pre", "_noadapt"): v for k, v in r.items()} for r in rows], "test/joint/")


def single_task_baseline(cfg: Config, taskset: TaskSet, test_eps, device, curve_at: Sequence[int] = ()
                         ) -> dict[str, float]:
    """The same model trained normally on one test task's own audio (query slices excluded).

    The ceiling meta-learning approaches: Adam at ``eval.single_task_lr`` (its own rate: the
    meta-update's ``maml.outer_lr`` is tuned for another job and was far too low here), annealed
    to 0 by a cosine over ``eval.single_task_steps`` steps, on batches of ``k_support + k_query`` slices, with the
    study's ``maml.outer_loss``.

    Args:
        cfg: the study.
        taskset: the task set (the test task's whole audio, minus its query slices, trains it).
        test_eps: the fixed test episodes; the first ``eval.single_task_tasks`` distinct tasks.
        device: where it trains.
        curve_at: step counts at which the query metrics are also recorded, as
            ``test/single_task@<steps>/...`` (a learning curve: has it converged?).

    Returns:
        ``test/single_task/query_<metric>_post`` averaged over the tasks (and the curve's keys).
    """
    rows = []
    curve: dict[int, list[dict[str, float]]] = {int(s): [] for s in curve_at}
    mc = cfg.maml
    L = mc.slice_len
    done: set[int] = set()
    for ep in test_eps:
        if ep.task in done:
            continue
        if len(done) >= cfg.eval.single_task_tasks:
            break
        done.add(ep.task)
        torch.manual_seed(mc.seed)
        model = build_model(cfg.model).to(device)
        x_all = taskset.input
        y_all = taskset.targets[ep.task]
        n = x_all.shape[0]
        q_starts = [int(p) for p in ep.positions[mc.k_support:]]
        allowed = np.ones(max(n - L, 1), dtype=bool)
        for q in q_starts:  # never train on audio that overlaps a query slice
            allowed[max(0, q - L + 1): q + L] = False
        starts = np.flatnonzero(allowed)
        if starts.size == 0:
            continue
        rng = np.random.default_rng([mc.seed, ep.task])
        B = mc.k_support + mc.k_query

        def batch(s: int):
            idx = rng.choice(starts, size=B)
            x = torch.from_numpy(np.stack([np.asarray(x_all[i:i + L]) for i in idx]))[:, None]
            y = torch.from_numpy(np.stack([np.asarray(y_all[i:i + L]) for i in idx]))[:, None]
            return x.float(), y.float()

        e = to_device(ep, device)

        def score() -> dict[str, float]:
            model.eval()
            with torch.no_grad():
                pred = model(e.query_x)
            model.train()
            return metric_row(pred.cpu(), ep.query_y, ep, cfg, "post")

        def after(done: int) -> None:
            if done in curve:
                curve[done].append(score())

        train_plain(model, batch, cfg.eval.single_task_steps, cfg.eval.single_task_lr, M.make_loss(mc.outer_loss),
                    device, mc.grad_clip, after=after if curve else None, cosine=True)
        rows.append(score())
    out = mean_rows(rows, "test/single_task/") if rows else {}
    for s, r in curve.items():
        if r:
            out.update(mean_rows(r, f"test/single_task@{s}/"))
    return out


def predict_long(predictor, x: torch.Tensor, window: int) -> torch.Tensor:
    """A predictor trained on slices of ``window`` samples, run over a long signal.

    Overlapping windows of ``window`` samples, hop ``h`` = half a window (or the model's output
    length if shorter); each window contributes the last ``h`` samples of its output, so every
    output sample has at least ``window - h`` samples of context, as in training. The signal is
    preceded by zeros: the start is predicted from a zero state.

    Shape:
        x (T,) -> (T,).
    """
    T = x.shape[-1]
    with torch.no_grad():
        out_len = predictor(x.new_zeros(1, 1, window)).shape[-1]
        hop = max(1, min(window // 2, out_len))
        n_win = -(-T // hop)
        xp = torch.cat([x.new_zeros(window - hop), x, x.new_zeros(n_win * hop - T)])
        frames = xp.unfold(0, window, hop)[:n_win]  # (n_win, window)
        outs = [predictor(f[:, None])[:, 0, -hop:] for f in frames.split(64)]  # (b, hop) each
    return torch.cat(outs).reshape(-1)[:T]


def example_signals(learner, cfg: Config, taskset: TaskSet, episodes: Sequence[Episode], device,
                    n: int) -> list[dict[str, Any]]:
    """Seconds of audio of ``n`` distinct test tasks: input, target and the predictions before and after adaptation.

    Each task is adapted on its episode's support slices (as in the evaluation), then run over
    :data:`EXAMPLE_SECONDS` of the task's audio starting at the episode's first query slice.

    Returns:
        dicts with ``task_id``, ``family``, ``params`` and 1-D float32 arrays ``input``, ``target``,
        ``pred_pre``, ``pred_post`` of one length.
    """
    engine = engine_for(cfg)
    seen: set[int] = set()
    out = []
    seg = int(EXAMPLE_SECONDS * cfg.data.sample_rate)
    for ep in episodes:
        if len(out) >= n:
            break
        if ep.task in seen:  # a small test split cycles: one example per task
            continue
        seen.add(ep.task)
        start = int(ep.positions[cfg.maml.k_support])
        start = max(0, min(start, taskset.num_samples - seg))
        stop = min(start + seg, taskset.num_samples)
        x = torch.from_numpy(np.array(taskset.input[start:stop], dtype=np.float32))
        y = np.asarray(taskset.targets[ep.task][start:stop], dtype=np.float32)
        e = to_device(ep, device)
        p = next(learner.parameters())
        xd = x.to(device=p.device, dtype=p.dtype)
        after = engine.adapt(learner, e.support_x.to(p.dtype), e.support_y.to(p.dtype), cfg.maml)
        pre = predict_long(engine.before(learner), xd, cfg.maml.slice_len)
        post = predict_long(after, xd, cfg.maml.slice_len)
        out.append({"task_id": ep.task_id, "family": ep.family, "params": dict(ep.params),
                    "input": x.numpy().copy(), "target": y.copy(),
                    "pred_pre": pre.float().cpu().numpy(), "pred_post": post.float().cpu().numpy()})
    return out


def fixed_test_episodes(cfg: Config, taskset: TaskSet, family: str | None = None) -> list[Episode]:
    """The fixed test episodes of a study (of one family): identical for every method and baseline."""
    sampler = EpisodeSampler(taskset, "test", cfg.maml.k_support, cfg.maml.k_query, cfg.maml.slice_len,
                             seed=cfg.eval.test_seed, family=family)
    return sampler.fixed(cfg.eval.test_episodes, seed=cfg.eval.test_seed)


def evaluate_test(learner, cfg: Config, taskset: TaskSet, device, *, baselines: bool = True,
                  n_examples: int = 2, episodes: Sequence[Episode] | None = None
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Final evaluation on the fixed test episodes, with the baselines on the same episodes.

    Args:
        learner: the meta-learned module of ``cfg`` (its engine is ``engine_for(cfg)``).
        cfg: the study config.
        taskset: the task set whose test split is used.
        device: where the learner lives.
        baselines: include the joint and single-task baselines (identity and LS-FIR always run).
        n_examples: how many test tasks to return as example signals.
        episodes: the test episodes, when already drawn (:func:`fixed_test_episodes`).

    Returns:
        ``(metrics, examples)``; examples are :func:`example_signals` of up to ``n_examples``
        distinct test tasks.
    """
    test_eps = list(episodes) if episodes is not None else fixed_test_episodes(cfg, taskset)
    rows, preds = evaluate_adaptation(learner, test_eps, cfg, device)
    out = mean_rows(rows, "test/")
    out.update(baseline_rows("identity", lambda ep: identity_predict(ep.query_x), test_eps, cfg))
    out["test/identity_l1"] = out["test/identity/query_l1_post"]
    out["test/identity_stft"] = out["test/identity/query_stft_post"]
    out.update(baseline_rows("lsfir", lambda ep: lsfir(ep, cfg), test_eps, cfg))
    out.update(arx_baseline(cfg, test_eps, device))
    if baselines and cfg.eval.joint_steps > 0 and cfg.maml.method != "joint":
        out.update(joint_baseline(cfg, taskset, test_eps, device))
    if baselines and cfg.eval.single_task_steps > 0:
        out.update(single_task_baseline(cfg, taskset, test_eps, device))
    examples = example_signals(learner, cfg, taskset, test_eps, device, n_examples)
    return out, examples
