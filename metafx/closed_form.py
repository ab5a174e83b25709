"""Closed-form adaptation (``maml.method: ridge``): meta-training of :class:`metafx.models.arx.MetaARX`.

The same interface as :mod:`metafx.maml` (``meta_step``, ``adapt_and_predict``; the outer
optimizer is :func:`metafx.maml.make_outer_optimizer`), selected by :func:`metafx.train.adaptation_engine`. The inner
loop is not a gradient loop but an exact solve: per task, the linear ARX head is fitted
by ridge regression on the support slices (equation error, float64 normal equations:
:meth:`MetaARX.fit_features`) and simulated on the query slices from a zero state (FFT
IIR with pole clamping: :meth:`MetaARX.predict_features`). The outer loss of that
prediction is backpropagated through the solve into the feature network, the
per-coefficient log-ridge and the ridge prior mean (R2-D2, Bertinetto et al. 2019;
ALPaCA, Harrison et al. 2018; ANIL, Raghu et al. 2020; see metafx/models/arx.py).

Settings of the ``maml`` section that are used: ``outer_lr`` (in the optimizer),
``meta_steps`` (the cosine schedule), ``grad_clip``, ``outer_loss``. Not used: ``backend``,
``first_order``, ``inner_steps``, ``inner_lr``, ``inner_loss`` (there are no inner steps).

Outer learning-rate schedule: with ``model.arx.cosine_lr`` (the prototype's setting) the
learning rate of every parameter group at meta-step ``s`` (1-based) is
``initial_lr * (1 + cos(pi (s - 1) / maml.meta_steps)) / 2``; ``initial_lr`` is stored in the
optimizer's param groups (so it is in every checkpoint and a resumed run is identical).
The log-ridge parameters move ``model.arx.ridge_lr_scale`` times faster than the others
through their parametrization, so one Adam group at ``maml.outer_lr`` is enough.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from metafx.config import MAMLConfig
from metafx.maml import NonFiniteLossError, describe_episode
from metafx.metrics import l1, make_loss
from metafx.models.arx import ARXHead, MetaARX, pole_radius

LossFn = Callable[[Tensor, Tensor], Tensor]


def cosine_factor(step: int, total: int) -> float:
    """``(1 + cos(pi (step - 1) / total)) / 2`` for 1-based ``step``, clipped to [0, 1]."""
    s = min(max(step - 1, 0), total)
    return 0.5 * (1.0 + math.cos(math.pi * s / max(total, 1)))


def apply_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    """Set every group's lr to ``initial_lr * cosine_factor(step, total)``; ``initial_lr`` is kept in the
    optimizer's param groups (so it is in every checkpoint and a resumed run is identical)."""
    f = cosine_factor(step, total)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * f


def _check_model(model: nn.Module) -> MetaARX:
    if not isinstance(model, MetaARX):
        raise TypeError(f"maml.method 'ridge' needs model.arch 'arx' (MetaARX), got {type(model).__name__}")
    return model


def _tensors(ep: Any, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    out = []
    for name in ("support_x", "support_y", "query_x", "query_y"):
        t = getattr(ep, name, None)
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[1] != 1:
            raise ValueError(f"episode ({describe_episode(ep)}): {name} must be a (K, 1, L) tensor")
        out.append(t.to(device=device, dtype=dtype))
    return out


def _head_detached(h: ARXHead) -> ARXHead:
    return ARXHead(h.b.detach(), h.a.detach())


def meta_step(
    model: nn.Module,
    episodes: Sequence[Any],
    cfg: MAMLConfig,
    optimizer: torch.optim.Optimizer,
    inner_loss_fn: LossFn | None = None,
    outer_loss_fn: LossFn | None = None,
    *,
    step: int = 0,
    with_stats: bool = True,
) -> dict[str, float]:
    """One meta-update: per task, fit the head on the support set, backprop the query loss.

    For each episode (task): features of the support slices, the ridge fit (float64),
    simulation on the query slices, ``outer_loss_fn(pred, query_y) / n_tasks`` backpropagated
    (one task's graph in memory at a time). Then optional clipping (``cfg.grad_clip > 0``),
    the cosine learning rate (``model.cosine_lr``) and ``optimizer.step()``.

    Args:
        model: a :class:`MetaARX` (updated in place).
        episodes: the meta-batch; objects with ``support_x``, ``support_y``, ``query_x``,
            ``query_y`` (K, 1, L) and optionally ``task``, ``family``, ``params``.
        cfg: the ``maml`` section (grad_clip, meta_steps, outer_loss).
        optimizer: e.g. :func:`metafx.maml.make_outer_optimizer`.
        inner_loss_fn: unused (the fit is a least-squares solve); accepted for the shared interface.
        outer_loss_fn: query loss; default ``make_loss(cfg.outer_loss)``.
        step: the 1-based meta-step (error messages and the learning-rate schedule).
        with_stats: also compute ``support_l1_pre`` / ``support_l1_post`` (prior-mean head and
            fitted head simulated on the support slices, no graph); otherwise NaN.

    Returns:
        Floats averaged over the meta-batch: ``support_l1_pre``, ``support_l1_post``,
        ``query_l1_post``, ``outer_loss``; plus ``grad_norm`` (before clipping), ``lr`` (of the
        first group) and ``pole_radius_max`` (largest fitted pole radius before clamping).

    Raises:
        NonFiniteLossError: a query loss or the meta-gradient is not finite, or the normal
            equations are singular; names ``step`` and the task. No update is applied.
        TypeError: the model is not a MetaARX. ValueError: empty meta-batch or bad episode shapes.
    """
    model = _check_model(model)
    if not episodes:
        raise ValueError("meta_step: empty meta-batch")
    outer_loss_fn = outer_loss_fn or make_loss(cfg.outer_loss)
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = len(episodes)
    sums = {"support_l1_pre": 0.0, "support_l1_post": 0.0, "query_l1_post": 0.0, "outer_loss": 0.0}
    rmax_seen = 0.0

    if model.cosine_lr:
        apply_cosine_lr(optimizer, step, cfg.meta_steps)

    optimizer.zero_grad(set_to_none=True)
    for i, ep in enumerate(episodes):
        where = f"meta-step {step}, episode {i} of the meta-batch ({describe_episode(ep)})"
        sx, sy, qx, qy = _tensors(ep, device, dtype)
        try:
            fs = model.feats(sx)[None]  # (1, Ks, M, L)
            head = model.fit_features(fs, sy[None, :, 0])  # b (1, M, nb), a (1, na + 1)
            qpred = model.predict_features(model.feats(qx)[None], head)[0][:, None]  # (Kq, 1, L)
        except torch.linalg.LinAlgError as e:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"{where}: the ridge normal equations are singular ({e}); "
                                     "raise model.arx.ridge / ridge_a") from e
        qloss = outer_loss_fn(qpred, qy)
        if not bool(torch.isfinite(qloss.detach())):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"{where}: non-finite query (outer) loss ({qloss.item()}); "
                                     "lower maml.outer_lr or set maml.grad_clip")
        (qloss / n).backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"{where}: non-finite meta-gradient after this task's query loss")
        sums["outer_loss"] += qloss.item()
        sums["query_l1_post"] += l1(qpred.detach(), qy).item()
        with torch.no_grad():
            if model.na:
                rmax_seen = max(rmax_seen, float(pole_radius(head.a).max()))
            if with_stats:
                fsd = fs.detach()
                prior = model.prior_head()
                pre = model.predict_features(fsd, ARXHead(prior.b[None], prior.a[None]))[0][:, None]
                post = model.predict_features(fsd, _head_detached(head))[0][:, None]
                sums["support_l1_pre"] += l1(pre, sy).item()
                sums["support_l1_post"] += l1(post, sy).item()
        del fs, head, qpred, qloss

    grads = [p.grad for p in trainable if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if cfg.grad_clip > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(trainable, cfg.grad_clip, norm)
    optimizer.step()
    out = {k: v / n for k, v in sums.items()}
    if not with_stats:
        out["support_l1_pre"] = out["support_l1_post"] = float("nan")
    out["grad_norm"] = float(norm)
    out["lr"] = float(optimizer.param_groups[0]["lr"])
    out["pole_radius_max"] = rmax_seen
    return out


def adapt_and_predict(
    model: nn.Module,
    episode: Any,
    cfg: MAMLConfig,
    inner_loss_fn: LossFn | None = None,
    steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Query predictions before (prior-mean head) and after (head fitted on the support set) adaptation.

    Args:
        model: a :class:`MetaARX` (not modified).
        episode: object with ``support_x``, ``support_y``, ``query_x`` (K, 1, L).
        cfg: the ``maml`` section (unused; shared interface).
        inner_loss_fn, steps: unused (shared interface with :func:`metafx.maml.adapt_and_predict`).

    Returns:
        ``(pred_pre, pred_post)``, each (Kq, 1, L), detached, on the model's device.

    Raises:
        NonFiniteLossError: singular normal equations or a non-finite fitted head (names the task).
    """
    model = _check_model(model)
    p0 = next(model.parameters())
    sx, sy, qx, _ = _tensors(episode, p0.device, p0.dtype)
    with torch.no_grad():
        pre = model(qx)
        try:
            head = model.fit(sx, sy)
        except torch.linalg.LinAlgError as e:
            raise NonFiniteLossError(f"evaluation, episode ({describe_episode(episode)}): singular ridge normal "
                                     f"equations ({e}); raise model.arx.ridge / ridge_a") from e
        if not (bool(torch.isfinite(head.b).all()) and bool(torch.isfinite(head.a).all())):
            raise NonFiniteLossError(f"evaluation, episode ({describe_episode(episode)}): non-finite fitted head")
        post = model.predict(qx, head)
    return pre.detach(), post.detach()


__all__ = ["adapt_and_predict", "apply_cosine_lr", "cosine_factor", "meta_step"]
