"""MAML engine: a pure inner loop, two backends, the meta-step and adapted evaluation.

Model-agnostic meta-learning (Finn et al. 2017) as in the paper (section 4.2): per
task, SGD on the support loss for ``inner_steps`` steps at ``inner_lr`` (L1 by
default); the meta-loss is the query loss after adaptation averaged over a meta-batch
of tasks, minimized by Adam at ``outer_lr``. Second-order by default (the meta-gradient
differentiates through the inner gradients), first-order (FOMAML: inner gradients
treated as constants) as an option.

Backends, one interface (``maml.backend``):

* ``"func"`` (default): ``torch.func.functional_call`` with a dict of parameter
  tensors; the inner gradients come from ``torch.autograd.grad`` with
  ``create_graph = not first_order``.
* ``"higher"``: ``higher.innerloop_ctx`` with SGD, ``copy_initial_weights=False``,
  ``track_higher_grads = not first_order``; the library the paper used, kept to
  reproduce it. ``higher`` detaches the fast weights when it does not track higher
  gradients, so for first order the engine re-attaches them to the initial weights
  through the identity (the FOMAML gradient), as the func backend does.

tests/test_maml.py checks that both give the same meta-gradient for every model, first
and second order, and a float64 finite-difference check of the second-order
meta-gradient.

Pitfalls handled here, not in the config (DESIGN.md, "Known pitfalls"), by
:func:`second_order_safe`: second-order through a cuDNN RNN has no double backward
(cuDNN is switched off for models with an RNN), and second-order through attention
on CPU has no double backward for the fused SDPA kernels (the math kernel is forced
for models with attention). Tasks are looped over, not vmapped (vmap does not
support LSTMs). A non-finite loss or meta-gradient raises :class:`NonFiniteLossError`
naming the meta-step and the task instead of training on NaN.

The inner loop (:func:`adapt`) is pure in the learn2learn sense: it takes a dict of
tensors and returns a new dict, mutates neither the model nor the tensors, and logs
nothing. Models must not update buffers in forward (see metafx/models: the TCN's
BatchNorm uses batch statistics, no running buffers). :func:`meta_step` neither
changes the model's train/eval mode.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import higher
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metafx.config import MAMLConfig
from metafx.metrics import l1, make_loss
from metafx.models import crop_like

LossFn = Callable[[Tensor, Tensor], Tensor]
BACKENDS = ("func", "higher")


class NonFiniteLossError(RuntimeError):
    """A loss or meta-gradient became NaN/inf; the message names the meta-step and the task."""


# --------------------------------------------------------------------------- second-order safety


def _has_module(model: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(m, kinds) for m in model.modules())


def _cudnn_disabled():
    # cudnn.flags() resets benchmark/deterministic/... to its own defaults unless they
    # are given; None keeps the current values for every flag this torch version has.
    keep = {k: None for k in inspect.signature(torch.backends.cudnn.flags).parameters if k != "enabled"}
    return torch.backends.cudnn.flags(enabled=False, **keep)


@contextmanager
def second_order_safe(model: nn.Module, first_order: bool) -> Iterator[None]:
    """Run forwards (and backwards) so that second-order gradients exist.

    When ``first_order`` is False:

    * a model with an RNN (``nn.RNNBase``) runs with cuDNN disabled: cuDNN RNNs have
      no double backward ("Double backwards is not supported for CuDNN RNNs"); the
      native kernels are used on GPU, nothing changes on CPU;
    * a model with attention (``nn.MultiheadAttention``) runs with the math SDPA
      kernel: the fused CPU/GPU kernels have no double backward
      ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
      not implemented").

    First order needs neither, and the context does nothing.

    Args:
        model: the model whose modules decide what is switched.
        first_order: True for FOMAML (no second derivatives).
    """
    with ExitStack() as stack:
        if not first_order:
            if _has_module(model, (nn.RNNBase,)):
                stack.enter_context(_cudnn_disabled())
            if _has_module(model, (nn.MultiheadAttention,)):
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


# --------------------------------------------------------------------------- inner loop


def _checked(loss: Tensor, where: str) -> Tensor:
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(f"non-finite {where} ({loss.detach().item()})")
    return loss


def _adapt_func(
    model: nn.Module,
    params: dict[str, Tensor],
    buffers: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    steps: int,
    lr: float,
    loss_fn: LossFn,
    first_order: bool,
) -> dict[str, Tensor]:
    trainable = [n for n, p in params.items() if p.requires_grad]
    if steps > 0 and not trainable:
        raise ValueError("adapt: no parameter requires grad; pass tensors with requires_grad=True")
    for i in range(steps):
        pred = functional_call(model, (params, dict(buffers)), (support_x,))  # (K, 1, L')
        loss = _checked(loss_fn(pred, crop_like(support_y, pred)), f"inner-loop support loss at inner step {i}")
        grads = torch.autograd.grad(loss, [params[n] for n in trainable], create_graph=not first_order, allow_unused=True)
        new = dict(params)
        for n, g in zip(trainable, grads):
            if g is None:  # parameter not used by this forward
                continue
            if first_order:
                g = g.detach()  # FOMAML: the inner gradient is a constant
            new[n] = params[n] - lr * g
        params = new
    return params


def _adapt_higher(
    model: nn.Module,
    params: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    steps: int,
    lr: float,
    loss_fn: LossFn,
    first_order: bool,
) -> tuple[dict[str, Tensor], Any]:
    """higher's inner loop; returns the fast weights and the patched module for more forwards."""
    names = [n for n, _ in model.named_parameters()]
    if set(names) != set(params):
        raise ValueError(
            "adapt(backend='higher') needs one tensor for every model parameter; "
            f"missing {sorted(set(names) - set(params))}, unknown {sorted(set(params) - set(names))}"
        )
    init = [params[n] for n in names]
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # only read for its hyperparameters by higher
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=not first_order) as (fmodel, diffopt):
        fmodel.update_params(init)  # start from the given tensors (the model's own in meta_step)
        for i in range(steps):
            pred = fmodel(support_x)  # (K, 1, L')
            loss = _checked(loss_fn(pred, crop_like(support_y, pred)), f"inner-loop support loss at inner step {i}")
            diffopt.step(loss)
        fast = list(fmodel.fast_params)
    if first_order and steps > 0:
        # higher returns detached leaves when not tracking higher grads; the FOMAML
        # gradient flows to the initial weights through the identity.
        fast = [p0 + (p - p0).detach() for p0, p in zip(init, fast)]
        # Install them with update_params, not forward(params=...): a patched module
        # whose forward is never called (MultiheadAttention's out_proj, read as a
        # weight by its parent) only sees parameters installed by update_params.
        fmodel.update_params(fast)
    return dict(zip(names, fast)), fmodel


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: float,
    loss_fn: LossFn,
    first_order: bool,
    backend: str = "func",
) -> dict[str, Tensor]:
    """MAML inner loop: ``steps`` SGD steps on the support loss, from ``params``.

    Pure: returns new tensors, mutates neither ``model`` nor ``params``, logs nothing.
    ``params`` are usually ``dict(model.named_parameters())``; the returned tensors
    are differentiable functions of them: fully (second order, ``first_order=False``)
    or through the identity only (first order, inner gradients are constants).

    Args:
        model: the architecture; its own parameter values are not used by "func".
        params: name -> tensor for every parameter (those not requiring grad are kept).
        buffers: name -> tensor for the model's buffers ("func"; "higher" uses the
            module's own buffers).
        support_x: dry support slices, (K, 1, L).
        support_y: wet support slices, (K, 1, L); cropped to the model's output.
        steps: inner SGD steps (0 returns ``params`` unchanged, in a new dict).
        lr: inner SGD learning rate.
        loss_fn: ``(pred, target) -> scalar``, e.g. :func:`metafx.metrics.make_loss`.
        first_order: FOMAML if True.
        backend: "func" or "higher".

    Returns:
        name -> adapted tensor, same keys as ``params``.

    Raises:
        NonFiniteLossError: a support loss is NaN/inf (the message names the inner step).
        ValueError: unknown backend, or no parameter requires grad.
    """
    if backend == "func":
        return _adapt_func(model, dict(params), buffers, support_x, support_y, steps, lr, loss_fn, first_order)
    if backend == "higher":
        fast, _ = _adapt_higher(model, dict(params), support_x, support_y, steps, lr, loss_fn, first_order)
        return fast
    raise ValueError(f"unknown MAML backend {backend!r}; allowed: {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- episodes


def describe_episode(episode: Any) -> str:
    """``task=3, task_id='moog_vcf:...', family='moog_vcf', params={...}`` from the fields that exist."""
    keys = ("task", "task_id", "family", "params")
    parts = [f"{k}={getattr(episode, k)!r}" for k in keys if getattr(episode, k, None) is not None]
    return ", ".join(parts) if parts else "task unknown"


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("MAML needs a model with parameters")
    return p.device, p.dtype


def _episode_tensors(episode: Any, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """support_x, support_y, query_x, query_y on the model's device and dtype, each (K, 1, L)."""
    out = []
    for name in ("support_x", "support_y", "query_x", "query_y"):
        t = getattr(episode, name, None)
        if not isinstance(t, Tensor):
            raise TypeError(f"episode ({describe_episode(episode)}) has no tensor field {name!r}")
        if t.dim() != 3 or t.shape[1] != 1:
            raise ValueError(f"episode ({describe_episode(episode)}): {name} must be (K, 1, L), got {tuple(t.shape)}")
        out.append(t.to(device=device, dtype=dtype))
    return out[0], out[1], out[2], out[3]


def _grad_norm(params: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


# --------------------------------------------------------------------------- outer loop


def make_outer_optimizer(model: nn.Module, cfg: MAMLConfig) -> torch.optim.Optimizer:
    """Adam on every trainable parameter at ``cfg.outer_lr`` (the paper's outer optimizer)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.outer_lr)


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
    """One MAML meta-update over a meta-batch of tasks.

    For each episode (task): adapt a copy of the parameters on the support slices
    (:func:`adapt`), compute the outer loss of the adapted model on the query slices,
    and backpropagate ``query_loss / n_tasks`` into the model's ``.grad`` (one task's
    graph in memory at a time). The meta-gradient is therefore the mean over tasks of
    the gradient of the post-adaptation query loss. Then optional clipping
    (``cfg.grad_clip > 0``) and ``optimizer.step()``.

    Args:
        model: the meta-learned model (its parameters are updated in place).
        episodes: the meta-batch; objects with ``support_x``, ``support_y``,
            ``query_x``, ``query_y`` tensors (K, 1, L) and optionally ``task``,
            ``family``, ``params`` (used in error messages).
        cfg: the ``maml`` section: backend, first_order, inner_steps, inner_lr,
            grad_clip (the outer lr lives in ``optimizer``).
        optimizer: the outer optimizer, e.g. :func:`make_outer_optimizer`.
        inner_loss_fn: support loss; default ``make_loss(cfg.inner_loss)``.
        outer_loss_fn: query loss; default ``make_loss(cfg.outer_loss)``.
        step: the meta-step index, for error messages.
        with_stats: also compute ``support_l1_pre`` / ``support_l1_post`` (two extra
            forward passes per task without graph); otherwise they are NaN.

    Returns:
        Floats averaged over the meta-batch: ``support_l1_pre``, ``support_l1_post``,
        ``query_l1_post``, ``outer_loss``; and ``grad_norm`` (meta-gradient norm
        before clipping).

    Raises:
        NonFiniteLossError: a support or query loss, or the meta-gradient, is not
            finite; the message names ``step`` and the task. No update is applied.
        ValueError: empty meta-batch, unknown backend.
    """
    if not episodes:
        raise ValueError("meta_step: empty meta-batch")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown maml.backend {cfg.backend!r}; allowed: {', '.join(BACKENDS)}")
    inner_loss_fn = inner_loss_fn or make_loss(cfg.inner_loss)
    outer_loss_fn = outer_loss_fn or make_loss(cfg.outer_loss)
    device, dtype = _model_device_dtype(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = [p for p in params.values() if p.requires_grad]
    n = len(episodes)
    sums = {"support_l1_pre": 0.0, "support_l1_post": 0.0, "query_l1_post": 0.0, "outer_loss": 0.0}

    optimizer.zero_grad(set_to_none=True)
    with second_order_safe(model, cfg.first_order):
        for i, ep in enumerate(episodes):
            where = f"meta-step {step}, episode {i} of the meta-batch ({describe_episode(ep)})"
            sx, sy, qx, qy = _episode_tensors(ep, device, dtype)
            try:
                if with_stats:
                    sums["support_l1_pre"] += _l1_no_grad(model, params, buffers, sx, sy)
                inner = (cfg.inner_steps, cfg.inner_lr, inner_loss_fn, cfg.first_order)
                if cfg.backend == "func":
                    fast = _adapt_func(model, params, buffers, sx, sy, *inner)
                    qpred = functional_call(model, (fast, buffers), (qx,))  # (Kq, 1, L')
                else:
                    fast, fmodel = _adapt_higher(model, params, sx, sy, *inner)
                    qpred = fmodel(qx)  # (Kq, 1, L'), with the adapted fast weights
                qloss = _checked(outer_loss_fn(qpred, crop_like(qy, qpred)), "query (outer) loss")
            except NonFiniteLossError as e:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"{where}: {e}") from e
            (qloss / n).backward()
            if not bool(torch.isfinite(_grad_norm(trainable))):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"{where}: non-finite meta-gradient after this task's query loss")
            sums["outer_loss"] += qloss.item()
            sums["query_l1_post"] += l1(qpred.detach(), qy).item()
            if with_stats:
                sums["support_l1_post"] += _l1_no_grad(model, fast, buffers, sx, sy)
            del fast, qpred, qloss

    norm = _grad_norm(trainable)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(trainable, cfg.grad_clip, norm)
    optimizer.step()
    out = {k: v / n for k, v in sums.items()}
    if not with_stats:
        out["support_l1_pre"] = out["support_l1_post"] = float("nan")
    out["grad_norm"] = float(norm)
    return out


def _l1_no_grad(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        pred = functional_call(model, ({k: v.detach() for k, v in params.items()}, dict(buffers)), (x,))
        return l1(pred, y).item()


# --------------------------------------------------------------------------- evaluation


def adapt_and_predict(
    model: nn.Module,
    episode: Any,
    cfg: MAMLConfig,
    inner_loss_fn: LossFn | None = None,
    steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Predictions on the query slices before and after adapting on the support slices.

    The evaluation of the paper's Table 1 and Figure 3: the meta-learned
    initialization is adapted with the same inner loop (``cfg.inner_steps`` SGD steps at
    ``cfg.inner_lr`` on ``inner_loss_fn``, first order since nothing is
    backpropagated through it) and applied to the query input. The model is not
    modified. Works inside ``torch.no_grad()`` (gradients are enabled only for the
    adaptation).

    Args:
        model: the meta-learned model.
        episode: object with ``support_x``, ``support_y``, ``query_x`` (K, 1, L).
        cfg: the ``maml`` section (inner_steps, inner_lr, backend, inner_loss).
        inner_loss_fn: default ``make_loss(cfg.inner_loss)``.
        steps: inner steps; default ``cfg.inner_steps``.

    Returns:
        ``(pred_pre, pred_post)``, each (Kq, 1, L'), detached, on the model's device.

    Raises:
        NonFiniteLossError: a support loss is not finite (names the task).
    """
    inner_loss_fn = inner_loss_fn or make_loss(cfg.inner_loss)
    steps = cfg.inner_steps if steps is None else steps
    device, dtype = _model_device_dtype(model)
    sx, sy, qx, _ = _episode_tensors(episode, device, dtype)
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        pred_pre = functional_call(model, (params, buffers), (qx,))
    try:
        with torch.enable_grad():
            fast = adapt(
                model, params, buffers, sx, sy,
                steps=steps, lr=cfg.inner_lr, loss_fn=inner_loss_fn, first_order=True, backend=cfg.backend,
            )
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"evaluation, episode ({describe_episode(episode)}): {e}") from e
    with torch.no_grad():
        pred_post = functional_call(model, ({k: v.detach() for k, v in fast.items()}, buffers), (qx,))
    return pred_pre.detach(), pred_post.detach()


__all__ = [
    "BACKENDS",
    "NonFiniteLossError",
    "adapt",
    "adapt_and_predict",
    "describe_episode",
    "make_outer_optimizer",
    "meta_step",
    "second_order_safe",
]
