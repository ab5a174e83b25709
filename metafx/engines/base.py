"""The adaptation-engine interface and what every engine shares: the outer step and its pieces.

An *adaptation engine* turns a meta-learned object (a "learner") and a few support slices of
a new task into a predictor for that task, and meta-trains the learner so that this works
(:class:`AdaptationEngine`). The engines differ only in how one task is adapted and scored
(a gradient inner loop, a closed-form solve, none at all); the outer step around that is the
same for every one of them and is written once here (:func:`outer_step`): zero the
gradients, per task backpropagate ``query_loss / n_tasks`` (one task's graph in memory at a
time), check finiteness, clip, step, average the statistics.

Every hyperparameter is read from the ``maml`` config section at call time (never stored in
the learner when it is built), so a config replaced after building cannot silently disagree
with the learner.

Pitfalls handled here (docs/design.md, "Known pitfalls"), by :func:`second_order_safe`:
second-order through a cuDNN RNN has no double backward (cuDNN is switched off for models with
an RNN) and second-order through attention has no double backward for the fused SDPA kernels
(the math kernel is forced for models with attention).
"""
from __future__ import annotations

import inspect
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metafx.config import Config, MAMLConfig

LossFn = Callable[[Tensor, Tensor], Tensor]
Predictor = Callable[[Tensor], Tensor]  # (B, 1, T) -> (B, 1, T'), the model adapted to one task


class NonFiniteLossError(RuntimeError):
    """A loss or meta-gradient became NaN/inf; the message names the meta-step and the task."""


@runtime_checkable
class AdaptationEngine(Protocol):
    """How one family of methods adapts a learner to a task and meta-trains it.

    Implementations: :mod:`metafx.engines.maml` (plain MAML, the paper's), :mod:`metafx.engines.gradient`
    (ANIL, CAVIA, the task encoder, MAML++), :mod:`metafx.engines.ridge` (closed-form head) and
    :mod:`metafx.engines.joint` (no inner loop in training). ``tests/test_engines.py`` checks the
    contract for every ``maml.method``.
    """

    def build_learner(self, cfg: Config) -> nn.Module:
        """The meta-learned module of a study config (on the CPU, float32)."""
        ...

    def meta_step(self, learner: nn.Module, episodes: Sequence[Any], cfg: MAMLConfig,
                  optimizer: torch.optim.Optimizer, step: int, *, with_stats: bool = True) -> dict[str, float]:
        """One meta-update over a meta-batch; returns statistics averaged over it.

        Returns at least ``support_l1_pre``, ``support_l1_post``, ``query_l1_post``, ``outer_loss`` and
        ``grad_norm``. Raises :class:`NonFiniteLossError` naming ``step`` and the task; no update then.
        """
        ...

    def adapt(self, learner: nn.Module, support_x: Tensor, support_y: Tensor, cfg: MAMLConfig) -> Predictor:
        """The learner adapted to the task of the support slices (K, 1, L); the learner is not modified."""
        ...

    def before(self, learner: nn.Module) -> Predictor:
        """The learner before adaptation (what it predicts knowing nothing of the task)."""
        ...


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

    When ``first_order`` is False, a model with an RNN (``nn.RNNBase``) runs with cuDNN disabled
    ("Double backwards is not supported for CuDNN RNNs"; nothing changes on CPU) and a model with
    attention (``nn.MultiheadAttention``) with the math SDPA kernel (the fused kernels have no
    double backward). First order needs neither, and the context does nothing.

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


# --------------------------------------------------------------------------- small shared pieces


def checked(loss: Tensor, where: str) -> Tensor:
    """``loss`` unchanged when finite.

    Raises:
        NonFiniteLossError: ``non-finite <where> (<value>)``.
    """
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(f"non-finite {where} ({loss.detach().item()})")
    return loss


def describe_episode(episode: Any) -> str:
    """``task=3, task_id='moog_vcf:...', family='moog_vcf', params={...}`` from the fields that exist."""
    keys = ("task", "task_id", "family", "params")
    parts = [f"{k}={getattr(episode, k)!r}" for k in keys if getattr(episode, k, None) is not None]
    return ", ".join(parts) if parts else "task unknown"


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter.

    Raises:
        ValueError: the model has no parameters.
    """
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("an adaptation engine needs a model with parameters")
    return p.device, p.dtype


def episode_tensors(episode: Any, device: torch.device, dtype: torch.dtype,
                    names: tuple[str, ...] = ("support_x", "support_y", "query_x", "query_y")) -> list[Tensor]:
    """The episode's slices on ``device`` / ``dtype``, in the order of ``names``.

    Shape:
        each (K, 1, L).

    Raises:
        TypeError: a field is missing or not a tensor. ValueError: a field is not (K, 1, L).
    """
    out = []
    for name in names:
        t = getattr(episode, name, None)
        if not isinstance(t, Tensor):
            raise TypeError(f"episode ({describe_episode(episode)}) has no tensor field {name!r}")
        if t.dim() != 3 or t.shape[1] != 1:
            raise ValueError(f"episode ({describe_episode(episode)}): {name} must be (K, 1, L), got {tuple(t.shape)}")
        out.append(t.to(device=device, dtype=dtype))
    return out


def grad_norm(params: Sequence[Tensor]) -> Tensor:
    """Total 2-norm of the ``.grad`` of ``params`` (0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


# --------------------------------------------------------------------------- outer optimizer and schedule


def make_outer_optimizer(learner: nn.Module, cfg: MAMLConfig) -> torch.optim.Optimizer:
    """Adam on every trainable parameter of the learner at ``cfg.outer_lr`` (the paper's outer optimizer)."""
    return torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=cfg.outer_lr)


def cosine_factor(step: int, total: int) -> float:
    """``(1 + cos(pi (step - 1) / total)) / 2`` for 1-based ``step``, clipped to [0, 1]."""
    s = min(max(step - 1, 0), total)
    return 0.5 * (1.0 + math.cos(math.pi * s / max(total, 1)))


def apply_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    """Set every group's lr to ``initial_lr * cosine_factor(step, total)``.

    ``initial_lr`` is kept in the optimizer's param groups, so it is in every checkpoint and a
    resumed run is identical to one that never stopped.
    """
    f = cosine_factor(step, total)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * f


# --------------------------------------------------------------------------- the outer step


@dataclass
class TaskOutcome:
    """What an engine computes for one task of a meta-batch.

    Attributes:
        loss: the outer (query) loss, with its graph to the learner's parameters.
        query_pred: the adapted prediction on the query slices, (Kq, 1, L').
        support_stats: called after the backward pass when statistics are wanted: returns
            ``(support_l1_pre, support_l1_post)`` (no graph).
        extra: engine-specific per-task statistics (maxima are taken over the meta-batch).
    """

    loss: Tensor
    query_pred: Tensor
    support_stats: Callable[[], tuple[float, float]] | None = None
    extra: dict[str, float] = field(default_factory=dict)


TaskFn = Callable[[list[Tensor]], TaskOutcome]


def outer_step(
    learner: nn.Module,
    episodes: Sequence[Any],
    cfg: MAMLConfig,
    optimizer: torch.optim.Optimizer,
    step: int,
    task: TaskFn,
    *,
    safe_for: nn.Module | None = None,
    cosine: bool = False,
    with_stats: bool = True,
    hint: str = "",
) -> dict[str, float]:
    """One meta-update: per task ``task(tensors)``, backpropagate ``loss / n``, then clip and step.

    The meta-gradient is the mean over the meta-batch of the gradient of each task's outer
    loss; one task's graph is in memory at a time.

    Args:
        learner: the meta-learned module (updated in place by ``optimizer``).
        episodes: the meta-batch; objects with ``support_x``, ``support_y``, ``query_x``,
            ``query_y`` (K, 1, L) and optionally ``task``, ``family``, ``params`` (error messages).
        cfg: the ``maml`` section (first_order, grad_clip, meta_steps).
        optimizer: the outer optimizer (:func:`make_outer_optimizer`).
        step: the 1-based meta-step (error messages and the cosine schedule).
        task: the engine's per-task computation, given ``[sx, sy, qx, qy]`` on the learner's
            device and dtype.
        safe_for: the module whose layers decide :func:`second_order_safe` (default: learner).
        cosine: anneal the outer learning rate over ``cfg.meta_steps`` (:func:`apply_cosine_lr`).
        with_stats: call each outcome's ``support_stats``; otherwise the support statistics are NaN.
        hint: appended to the message of a non-finite loss (what to change).

    Returns:
        Floats averaged over the meta-batch: ``support_l1_pre``, ``support_l1_post``,
        ``query_l1_post``, ``outer_loss``; ``grad_norm`` (before clipping), ``lr`` (first group) and
        the maxima of the outcomes' ``extra`` statistics.

    Raises:
        NonFiniteLossError: a loss or the meta-gradient is not finite; names ``step`` and the
            task. The gradients are cleared and no update is applied.
        ValueError: an empty meta-batch.
    """
    from metafx.metrics import l1

    if not episodes:
        raise ValueError("meta_step: empty meta-batch")
    device, dtype = device_dtype(learner)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    n = len(episodes)
    sums = {"support_l1_pre": 0.0, "support_l1_post": 0.0, "query_l1_post": 0.0, "outer_loss": 0.0}
    extra: dict[str, float] = {}
    if cosine:
        apply_cosine_lr(optimizer, step, cfg.meta_steps)
    optimizer.zero_grad(set_to_none=True)
    with second_order_safe(safe_for if safe_for is not None else learner, cfg.first_order):
        for i, ep in enumerate(episodes):
            where = f"meta-step {step}, episode {i} of the meta-batch ({describe_episode(ep)})"
            tensors = episode_tensors(ep, device, dtype)
            try:
                out = task(tensors)
                loss = checked(out.loss, "query (outer) loss")
            except NonFiniteLossError as e:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"{where}: {e}{hint}") from e
            (loss / n).backward()
            if not bool(torch.isfinite(grad_norm(trainable))):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"{where}: non-finite meta-gradient after this task's query loss")
            sums["outer_loss"] += loss.item()
            sums["query_l1_post"] += l1(out.query_pred.detach(), tensors[3]).item()
            if with_stats and out.support_stats is not None:
                pre, post = out.support_stats()
                sums["support_l1_pre"] += pre
                sums["support_l1_post"] += post
            for k, v in out.extra.items():
                extra[k] = max(extra.get(k, v), v)
            del out, loss

    norm = grad_norm(trainable)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(trainable, cfg.grad_clip, norm)
    optimizer.step()
    stats = {k: v / n for k, v in sums.items()}
    if not with_stats:
        stats["support_l1_pre"] = stats["support_l1_post"] = float("nan")
    stats["grad_norm"] = float(norm)
    stats["lr"] = float(optimizer.param_groups[0]["lr"])
    stats.update(extra)
    return stats


def adapt_and_predict(engine: AdaptationEngine, learner: nn.Module, episode: Any,
                      cfg: MAMLConfig) -> tuple[Tensor, Tensor]:
    """Query predictions of one episode before and after adapting on its support slices.

    The evaluation of the paper's Table 1 and Figure 3. Works inside ``torch.no_grad()``; the
    learner is not modified.

    Returns:
        ``(pred_pre, pred_post)``, each (Kq, 1, L'), detached, on the learner's device.

    Raises:
        NonFiniteLossError: the adaptation failed (names the task).
    """
    device, dtype = device_dtype(learner)
    sx, sy, qx = episode_tensors(episode, device, dtype, ("support_x", "support_y", "query_x"))
    with torch.no_grad():
        pre = engine.before(learner)(qx)
    try:
        predictor = engine.adapt(learner, sx, sy, cfg)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"evaluation, episode ({describe_episode(episode)}): {e}") from e
    with torch.no_grad():
        post = predictor(qx)
    return pre.detach(), post.detach()
