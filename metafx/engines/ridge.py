"""Closed-form adaptation (``maml.method: ridge``): a ridge-regression ARX head on meta-learned features.

The inner loop is not a gradient loop but an exact solve: per task, the linear ARX head of a
:class:`metafx.models.arx.MetaARX` is fitted by ridge regression on the support slices (equation
error, float64 normal equations: :meth:`MetaARX.fit_features`) and simulated on the query slices
from a zero state (FFT IIR with pole clamping: :meth:`MetaARX.predict_features`). The outer loss of
that prediction is backpropagated through the solve into the feature network, the per-coefficient
log-ridge and the ridge prior mean (R2-D2, Bertinetto et al. 2019; ALPaCA, Harrison et al. 2018;
ANIL, Raghu et al. 2020; see metafx/models/arx.py).

Settings of the ``maml`` section that are used: ``outer_lr`` (in the optimizer), ``meta_steps``
(the cosine schedule), ``grad_clip``, ``outer_loss``. There are no inner steps, so ``backend``,
``first_order``, ``inner_steps``, ``inner_lr`` and ``inner_loss`` play no part.

Outer learning-rate schedule: with ``model.arx.cosine_lr`` (the prototype's setting) the outer
learning rate is annealed over ``maml.meta_steps`` (:func:`metafx.engines.base.apply_cosine_lr`).
The log-ridge parameters move ``model.arx.ridge_lr_scale`` times faster than the others through
their parametrization, so one Adam group at ``maml.outer_lr`` is enough.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from metafx.config import Config, MAMLConfig
from metafx.engines.base import NonFiniteLossError, Predictor, TaskOutcome, outer_step
from metafx.metrics import l1, make_loss
from metafx.models import build_model
from metafx.models.arx import ARXHead, MetaARX, pole_radius

_SINGULAR_FIX = "raise model.arx.ridge / ridge_a"


def _check(model: nn.Module) -> MetaARX:
    if not isinstance(model, MetaARX):
        raise TypeError(f"maml.method 'ridge' needs model.arch 'arx' (MetaARX), got {type(model).__name__}")
    return model


class RidgeEngine:
    """Closed-form ridge fit of an ARX head per task; the features and the ridge prior are meta-learned."""

    def build_learner(self, cfg: Config) -> nn.Module:
        return build_model(cfg.model)

    def meta_step(self, learner: nn.Module, episodes: Sequence[Any], cfg: MAMLConfig,
                  optimizer: torch.optim.Optimizer, step: int, *, with_stats: bool = True) -> dict[str, float]:
        model = _check(learner)
        outer_loss = make_loss(cfg.outer_loss)

        def task(t: list[Tensor]) -> TaskOutcome:
            sx, sy, qx, qy = t
            try:
                fs = model.feats(sx)[None]  # (1, Ks, M, L)
                head = model.fit_features(fs, sy[None, :, 0])  # b (1, M, nb), a (1, na + 1)
                qpred = model.predict_features(model.feats(qx)[None], head)[0][:, None]  # (Kq, 1, L)
            except torch.linalg.LinAlgError as e:
                raise NonFiniteLossError(f"the ridge normal equations are singular ({e}); {_SINGULAR_FIX}") from e

            def support_stats() -> tuple[float, float]:
                with torch.no_grad():
                    fsd, prior = fs.detach(), model.prior_head()
                    pre = model.predict_features(fsd, ARXHead(prior.b[None], prior.a[None]))[0][:, None]
                    post = model.predict_features(fsd, ARXHead(head.b.detach(), head.a.detach()))[0][:, None]
                    return l1(pre, sy).item(), l1(post, sy).item()

            with torch.no_grad():
                rmax = float(pole_radius(head.a).max()) if model.na else 0.0
            return TaskOutcome(outer_loss(qpred, qy), qpred, support_stats, {"pole_radius_max": rmax})

        return outer_step(model, episodes, cfg, optimizer, step, task, cosine=model.cosine_lr, with_stats=with_stats,
                          hint="; lower maml.outer_lr or set maml.grad_clip")

    def adapt(self, learner: nn.Module, support_x: Tensor, support_y: Tensor, cfg: MAMLConfig) -> Predictor:
        model = _check(learner)
        with torch.no_grad():
            try:
                if model.cv_ridge and support_x.dim() == 3:
                    head, _ = model.fit_selected(support_x, support_y)
                else:
                    head = model.fit(support_x, support_y)
            except torch.linalg.LinAlgError as e:
                raise NonFiniteLossError(f"singular ridge normal equations ({e}); {_SINGULAR_FIX}") from e
        if not (bool(torch.isfinite(head.b).all()) and bool(torch.isfinite(head.a).all())):
            raise NonFiniteLossError("non-finite fitted head")
        return lambda x: model.predict(x, head)

    def before(self, learner: nn.Module) -> Predictor:
        return _check(learner)  # forward is the prior-mean head


ENGINE = RidgeEngine()

__all__ = ["ENGINE", "RidgeEngine"]
