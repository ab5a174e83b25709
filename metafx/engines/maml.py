"""Plain MAML, the paper's method: every weight adapted by SGD, with the func or the higher backend.

Model-agnostic meta-learning (Finn et al. 2017) as in the paper (section 4.2): per task,
``maml.inner_steps`` SGD steps on the support loss at ``maml.inner_lr``; the meta-loss is the
query loss after adaptation averaged over a meta-batch, minimized by Adam at ``maml.outer_lr``.
Second-order by default, first-order (FOMAML: inner gradients treated as constants) as an option.

Backends (``maml.backend``):

* ``"func"`` (default): ``torch.func.functional_call`` with a dict of parameter tensors and the
  pure inner loop :func:`inner_sgd` (also used by :mod:`metafx.engines.gradient`);
* ``"higher"``: ``higher.innerloop_ctx`` with SGD, the library the paper used, kept to reproduce
  it (the only ``higher`` import). ``higher`` detaches the fast weights when it does not track
  higher gradients, so for first order they are re-attached to the initial weights through the
  identity (the FOMAML gradient), as the func backend does.

``tests/test_maml.py`` checks that both give the same meta-gradient for every model, first and
second order, and a float64 finite-difference check of the second-order meta-gradient.

The inner loop is pure in the learn2learn sense: it takes a dict of tensors and returns a new
dict, mutates neither the model nor the tensors, and logs nothing. Tasks are looped over, not
vmapped (vmap does not support LSTMs).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import higher
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metafx.config import BACKENDS, Config, MAMLConfig
from metafx.engines.base import (
    LossFn,
    NonFiniteLossError,
    Predictor,
    TaskOutcome,
    checked,
    outer_step,
)
from metafx.metrics import crop_like, l1, make_loss
from metafx.models import build_model

Forward = Callable[[dict[str, Tensor], Tensor], Tensor]  # (adapted tensors, x (K, 1, L)) -> (K, 1, L')
LrFn = Callable[[str, int], "Tensor | float"]  # (adapted tensor's name, inner step) -> learning rate


def inner_sgd(
    forward: Forward,
    adapted: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LrFn,
    loss_fn: LossFn,
    first_order: bool,
    query_x: Tensor | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The MAML inner loop: ``steps`` SGD steps on the support loss; pure.

    Args:
        forward: the model as a function of the adapted tensors.
        adapted: name -> tensor of what is adapted (weights, or a context); those that do not
            require grad are kept as they are.
        support_x, support_y: (K, 1, L); the target is cropped to the model's output.
        steps: inner steps (0 returns ``adapted`` unchanged, in a new dict).
        lr: the learning rate of a tensor at an inner step (a float, or a learned tensor).
        loss_fn: ``(pred, target) -> scalar``.
        first_order: FOMAML (the inner gradients are constants).
        query_x: when given, the query prediction after every step is returned too.

    Returns:
        ``(adapted, query_preds)``: new tensors, differentiable functions of the given ones (fully
        for second order, through the identity for first order), and the query predictions after
        steps 1..steps (empty without ``query_x``).

    Raises:
        NonFiniteLossError: a support loss is not finite (names the inner step).
        ValueError: steps > 0 and nothing requires grad.
    """
    adapted = dict(adapted)
    names = [n for n, t in adapted.items() if t.requires_grad]
    if steps > 0 and not names:
        raise ValueError("adapt: no parameter requires grad; pass tensors with requires_grad=True")
    qpreds: list[Tensor] = []
    for i in range(steps):
        pred = forward(adapted, support_x)  # (K, 1, L')
        loss = checked(loss_fn(pred, crop_like(support_y, pred)), f"inner-loop support loss at inner step {i}")
        grads = torch.autograd.grad(loss, [adapted[n] for n in names], create_graph=not first_order, allow_unused=True)
        new = dict(adapted)
        for n, g in zip(names, grads):
            if g is None:  # not used by this forward
                continue
            if first_order:
                g = g.detach()
            new[n] = adapted[n] - lr(n, i) * g
        adapted = new
        if query_x is not None:
            qpreds.append(forward(adapted, query_x))
    return adapted, qpreds


def _adapt_higher(model: nn.Module, params: dict[str, Tensor], support_x: Tensor, support_y: Tensor,
                  cfg: MAMLConfig, loss_fn: LossFn, first_order: bool) -> tuple[dict[str, Tensor], Any]:
    """higher's inner loop; returns the fast weights and the patched module for more forwards."""
    names = [n for n, _ in model.named_parameters()]
    init = [params[n] for n in names]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr)  # only read for its hyperparameters by higher
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=not first_order) as (fmodel, diffopt):
        fmodel.update_params(init)  # start from the given tensors
        for i in range(cfg.inner_steps):
            pred = fmodel(support_x)  # (K, 1, L')
            loss = checked(loss_fn(pred, crop_like(support_y, pred)), f"inner-loop support loss at inner step {i}")
            diffopt.step(loss)
        fast = list(fmodel.fast_params)
    if first_order and cfg.inner_steps > 0:
        # higher returns detached leaves when not tracking higher grads; the FOMAML gradient
        # flows to the initial weights through the identity. Installed with update_params: a
        # patched module whose forward is never called (MultiheadAttention's out_proj, read as
        # a weight by its parent) only sees parameters installed that way.
        fast = [p0 + (p - p0).detach() for p0, p in zip(init, fast)]
        fmodel.update_params(fast)
    return dict(zip(names, fast)), fmodel


def adapt_params(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                 support_x: Tensor, support_y: Tensor, cfg: MAMLConfig, *, first_order: bool) -> dict[str, Tensor]:
    """Plain MAML adaptation of every parameter, with the backend of ``cfg``; pure.

    Args:
        model: the architecture; its own parameter values are not used.
        params: name -> tensor for every parameter (those not requiring grad are kept).
        buffers: name -> tensor for the model's buffers.
        support_x, support_y: (K, 1, L).
        cfg: ``inner_steps``, ``inner_lr``, ``inner_loss``, ``backend``.
        first_order: FOMAML if True.

    Returns:
        name -> adapted tensor, the keys of ``params``.

    Raises:
        NonFiniteLossError: a support loss is not finite. ValueError: unknown backend.
    """
    loss_fn = make_loss(cfg.inner_loss)
    if cfg.backend == "func":
        def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(model, (p, dict(buffers)), (x,))

        fast, _ = inner_sgd(forward, params, support_x, support_y, steps=cfg.inner_steps, lr=lambda n, i: cfg.inner_lr,
                            loss_fn=loss_fn, first_order=first_order)
        return fast
    if cfg.backend == "higher":
        missing = {n for n, _ in model.named_parameters()} ^ set(params)
        if missing:
            raise ValueError(f"backend 'higher' needs one tensor for every model parameter; mismatch: {sorted(missing)}")
        fast, _ = _adapt_higher(model, dict(params), support_x, support_y, cfg, loss_fn, first_order)
        return fast
    raise ValueError(f"unknown maml.backend {cfg.backend!r}; allowed: {', '.join(BACKENDS)}")


def _l1_no_grad(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        pred = functional_call(model, ({k: v.detach() for k, v in params.items()}, dict(buffers)), (x,))
        return l1(pred, y).item()


class MAMLEngine:
    """Plain MAML (``maml.method: maml`` without the MAML++ stabilizers): the bare model is the learner."""

    def build_learner(self, cfg: Config) -> nn.Module:
        return build_model(cfg.model)

    def meta_step(self, learner: nn.Module, episodes: Sequence[Any], cfg: MAMLConfig,
                  optimizer: torch.optim.Optimizer, step: int, *, with_stats: bool = True) -> dict[str, float]:
        if cfg.backend not in BACKENDS:
            raise ValueError(f"unknown maml.backend {cfg.backend!r}; allowed: {', '.join(BACKENDS)}")
        outer_loss = make_loss(cfg.outer_loss)
        params = dict(learner.named_parameters())
        buffers = dict(learner.named_buffers())

        def task(t: list[Tensor]) -> TaskOutcome:
            sx, sy, qx, qy = t
            if cfg.backend == "func":
                fast = adapt_params(learner, params, buffers, sx, sy, cfg, first_order=cfg.first_order)
                qpred = functional_call(learner, (fast, buffers), (qx,))  # (Kq, 1, L')
            else:
                fast, fmodel = _adapt_higher(learner, params, sx, sy, cfg, make_loss(cfg.inner_loss), cfg.first_order)
                qpred = fmodel(qx)  # with the adapted fast weights
            return TaskOutcome(
                outer_loss(qpred, crop_like(qy, qpred)), qpred,
                lambda: (_l1_no_grad(learner, params, buffers, sx, sy), _l1_no_grad(learner, fast, buffers, sx, sy)))

        return outer_step(learner, episodes, cfg, optimizer, step, task, with_stats=with_stats)

    def adapt(self, learner: nn.Module, support_x: Tensor, support_y: Tensor, cfg: MAMLConfig) -> Predictor:
        # Detached copies: nothing is backpropagated through an evaluation, so first order.
        params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in learner.named_parameters()}
        buffers = dict(learner.named_buffers())
        with torch.enable_grad():
            fast = adapt_params(learner, params, buffers, support_x, support_y, cfg, first_order=True)
        fast = {k: v.detach() for k, v in fast.items()}
        return lambda x: functional_call(learner, (fast, buffers), (x,))

    def before(self, learner: nn.Module) -> Predictor:
        return learner


ENGINE = MAMLEngine()

__all__ = ["ENGINE", "MAMLEngine", "NonFiniteLossError", "adapt_params", "inner_sgd"]
