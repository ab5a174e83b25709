"""Gradient meta-learning beyond plain MAML: ANIL, CAVIA, an amortized task encoder, MAML++ stabilizers.

The paper adapts every weight of the network in the inner loop (plain MAML,
:mod:`metafx.engines.maml`). That is slow (second order through an LSTM), unstable, and, on
a few seconds of support audio, over-parameterized: the task is a handful of knob
settings. This engine adapts less, and learns how to adapt:

``maml.method``

* ``maml`` with a MAML++ stabilizer: every weight, as the paper, with the stabilizers below.
* ``anil`` (Raghu et al. 2020): only the output head (the model's ``head_prefixes``); the
  body is meta-learned features. Second order is cheap: the inner gradient only
  goes through the head.
* ``cavia`` (Zintgraf et al. 2019): only a context vector of ``model.context_dim``
  numbers, zero at the start of every task, that conditions the network through
  FiLM (``forward(x, ctx)`` of the LSTM, TCN and SSM); every weight is meta-learned.
* ``encoder``: amortized inference (the paper's "black-box meta-learning" future
  work): :class:`TaskEncoder` maps the support pairs to the context in one forward
  pass, then ``maml.inner_steps`` CAVIA steps refine it (0 = pure amortized
  inference: no inner loop, no second order, one forward per task).

MAML++ stabilizers (Antoniou et al. 2019), any of them with any method:

* ``maml.learn_inner_lr``: one learned inner learning rate per inner step and per
  adapted tensor (LSLR), initialized at ``maml.inner_lr``, meta-learned with the rest;
* ``maml.multi_step_loss``: the outer loss is a weighted sum of the query losses after
  every inner step; weights go from uniform to the last step over ``maml.msl_steps``
  meta-steps (the first steps get a gradient signal from the start);
* ``maml.outer_schedule: cosine``: cosine annealing of the outer learning rate over
  ``maml.meta_steps`` (``initial_lr`` stored in the optimizer, so resume is exact);
* ``maml.grad_clip``: clipping of the meta-gradient norm.

The meta-learned object is a :class:`MetaLearner`: the network (``net``), the encoder
and the learned learning rates, one ``nn.Module`` so that the outer optimizer,
checkpoints and parameter counts see all of it. The inner loop is :func:`metafx.engines.maml.inner_sgd`;
func backend only (``higher`` stays the reproduction path of plain MAML; the config refuses
other combinations).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metafx.config import CONTEXT_METHODS, Config, MAMLConfig
from metafx.engines.base import Predictor, TaskOutcome, outer_step
from metafx.engines.maml import inner_sgd
from metafx.metrics import crop_like, l1, make_loss
from metafx.models import build_model

GRADIENT_METHODS = ("maml", "anil", "cavia", "encoder")


# --------------------------------------------------------------------------- task encoder


class TaskEncoder(nn.Module):
    """Support pairs -> FiLM context, in one forward pass.

    Features with an audio-effect prior, computed from all support slices at once:

    * per log-spaced frequency band ``b`` (``bands`` of them between the first FFT bin
      and Nyquist), the least-squares transfer function
      ``H_b = sum Y X* / (sum |X|^2 + eps)`` as ``log |H_b|``, ``cos arg H_b``, ``sin arg H_b``
      (what a linear filter is), and the power ratio ``log (sum |Y|^2 / sum |X|^2)``
      (differs from ``|H|^2`` when the effect adds harmonics or noise: distortion);
    * levels: log RMS of the input, of the output, and of the output minus the input
      (drive, compression).

    then an MLP (``hidden`` wide, GELU) to ``context_dim`` numbers.

    Shape:
        forward: support_x, support_y (K, 1, L) -> (1, context_dim).
    """

    def __init__(self, context_dim: int, hidden: int = 64, bands: int = 32):
        super().__init__()
        if context_dim < 1 or hidden < 1 or bands < 2:
            raise ValueError(f"TaskEncoder: context_dim, hidden >= 1 and bands >= 2 needed, got "
                             f"{context_dim}, {hidden}, {bands}")
        self.bands = bands
        n_in = 4 * bands + 3
        self.mlp = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, context_dim)
        )

    def _band_matrix(self, n_bins: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(bands, n_bins) 0/1 matrix: bin f belongs to band b (log-spaced edges from bin 1)."""
        edges = torch.logspace(0, math.log10(n_bins), self.bands + 1, device=device, dtype=torch.float64)
        f = torch.arange(n_bins, device=device, dtype=torch.float64)
        m = (f[None] >= edges[:-1, None]) & (f[None] < edges[1:, None])
        m[-1, -1] = True  # Nyquist bin
        empty = ~m.any(dim=1)
        if bool(empty.any()):  # narrow low bands of short slices: give each its nearest bin
            idx = edges[:-1].round().clamp(max=n_bins - 1).long()
            m[empty, idx[empty]] = True
        return m.to(dtype)

    def features(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """(4 * bands + 3,) features of the support set (see the class docstring)."""
        x, y = support_x[:, 0], crop_like(support_y, support_x)[:, 0]  # (K, L)
        L = x.shape[-1]
        win = torch.hann_window(L, device=x.device, dtype=x.dtype)
        X, Y = torch.fft.rfft(x * win), torch.fft.rfft(y * win)  # (K, F)
        M = self._band_matrix(X.shape[-1], x.device, x.dtype)  # (bands, F)
        sxx = (X.abs() ** 2).sum(0) @ M.T  # (bands,)
        syy = (Y.abs() ** 2).sum(0) @ M.T
        sxy = (Y * X.conj()).sum(0)  # (F,) complex
        cr, ci = sxy.real @ M.T, sxy.imag @ M.T
        eps = 1e-8 * (sxx.sum() + 1e-12)
        h_re, h_im = cr / (sxx + eps), ci / (sxx + eps)
        mag = torch.sqrt(h_re**2 + h_im**2 + 1e-12)
        feats = [
            torch.log(mag + 1e-6),
            h_re / mag,
            h_im / mag,
            torch.log((syy + eps) / (sxx + eps)),
        ]
        rms = lambda s: 0.5 * torch.log(s.pow(2).mean() + 1e-10)  # noqa: E731
        lv = torch.stack([rms(x), rms(y), rms(y - x)])
        return torch.cat(feats + [lv])

    def forward(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        return self.mlp(self.features(support_x, support_y))[None]  # (1, context_dim)


# --------------------------------------------------------------------------- the meta-learned object


def _lr_key(name: str) -> str:
    return name.replace(".", "__")


class MetaLearner(nn.Module):
    """The network plus what is meta-learned around it: the task encoder and the inner learning rates.

    Args:
        net: the audio-effect model (``forward(x, ctx=None)`` for context methods).
        method: one of :data:`GRADIENT_METHODS`.
        learned_lrs: with ``(inner_steps, inner_lr)``, one learned rate per inner step and adapted
            tensor (the context counts as one tensor), initialized at ``inner_lr``; None: the rate
            is ``maml.inner_lr``, read at every call.
        context_dim: size of the FiLM context (context methods).
        encoder_hidden, encoder_bands: the :class:`TaskEncoder` (method ``encoder``).

    Raises:
        ValueError: unknown method, a context method without a context, ANIL on a model without a head.
    """

    def __init__(self, net: nn.Module, method: str, *, learned_lrs: tuple[int, float] | None = None,
                 context_dim: int = 0, encoder_hidden: int = 64, encoder_bands: int = 32):
        super().__init__()
        if method not in GRADIENT_METHODS:
            raise ValueError(f"MetaLearner: unknown method {method!r}; allowed: {', '.join(GRADIENT_METHODS)}")
        if method in CONTEXT_METHODS and context_dim < 1:
            raise ValueError(f"method {method!r} needs model.context_dim >= 1")
        self.net = net
        self.method = method
        self.context_dim = context_dim
        self.encoder = TaskEncoder(context_dim, encoder_hidden, encoder_bands) if method == "encoder" else None
        names = self.adapted_names()
        if method == "anil" and not names:
            raise ValueError(f"method 'anil': {type(net).__name__} declares no head parameters (head_prefixes)")
        self.inner_lrs: nn.ParameterDict | None = None
        if learned_lrs is not None and learned_lrs[0] > 0:
            steps, lr0 = learned_lrs
            keys = ["ctx"] if method in CONTEXT_METHODS else [_lr_key(n) for n in names]
            self.inner_lrs = nn.ParameterDict({k: nn.Parameter(torch.full((steps,), float(lr0))) for k in keys})

    def adapted_names(self) -> list[str]:
        """Names (in ``net``) of the weights adapted in the inner loop; empty for context methods."""
        if self.method in CONTEXT_METHODS:
            return []
        names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        if self.method == "anil":
            prefixes = tuple(getattr(self.net, "head_prefixes", ()))
            names = [n for n in names if prefixes and n.startswith(prefixes)]
        return names

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        """The network on ``x`` with context ``ctx`` (zero context by default): the pre-adaptation model."""
        return self.net(x, ctx) if self.context_dim else self.net(x)


def build_meta_learner(cfg: Config) -> MetaLearner:
    """The :class:`MetaLearner` of a study config (network from ``cfg.model``)."""
    m, mc = cfg.model, cfg.maml
    return MetaLearner(build_model(m), mc.method, learned_lrs=(mc.inner_steps, mc.inner_lr) if mc.learn_inner_lr else None,
                       context_dim=m.context_dim, encoder_hidden=m.encoder_hidden, encoder_bands=m.encoder_bands)


def _check(model: nn.Module, cfg: MAMLConfig) -> MetaLearner:
    if not isinstance(model, MetaLearner):
        raise TypeError(f"the gradient engine needs a MetaLearner (build_meta_learner), got {type(model).__name__}")
    if model.inner_lrs is not None:
        steps = next(iter(model.inner_lrs.values())).shape[0]
        if steps != cfg.inner_steps:
            raise ValueError(f"the learner has learned inner learning rates for {steps} inner steps but "
                             f"maml.inner_steps = {cfg.inner_steps}: rebuild the learner from this config")
    return model


def _sub(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def _net_call(learner: MetaLearner, net_p: dict[str, Tensor], net_b: dict[str, Tensor], x: Tensor,
              ctx: Tensor | None) -> Tensor:
    kwargs = {"ctx": ctx} if learner.context_dim else {}
    return functional_call(learner.net, (net_p, net_b), (x,), kwargs)


# --------------------------------------------------------------------------- inner loop


def inner_loop(
    learner: MetaLearner,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    cfg: MAMLConfig,
    *,
    first_order: bool,
    query_x: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor | None, list[Tensor]]:
    """Adapt to one task; pure (returns new tensors, mutates nothing).

    Args:
        learner: the :class:`MetaLearner` (its own parameter values are not used).
        params: name -> tensor for every parameter of ``learner`` (``net.*``, ``encoder.*``, ``inner_lrs.*``).
        buffers: name -> tensor for its buffers.
        support_x, support_y: (K, 1, L).
        cfg: ``inner_steps``, ``inner_lr`` (unless learned) and ``inner_loss``.
        first_order: inner gradients are constants (FOMAML); learned learning rates still get a gradient.
        query_x: when given, the query prediction after every step is returned (multi-step loss).

    Returns:
        ``(net_params, ctx, query_preds)``: the adapted network weights (``net`` names), the
        adapted context (None without one), and the query predictions after steps 1..steps
        (empty without ``query_x``).

    Raises:
        NonFiniteLossError: a support loss is not finite (names the inner step).
    """
    net_p, net_b = _sub(params, "net."), _sub(buffers, "net.")
    ctx = None
    if learner.method == "cavia":
        p0 = next(iter(net_p.values()))
        ctx = torch.zeros(1, learner.context_dim, device=p0.device, dtype=p0.dtype, requires_grad=True)
    elif learner.method == "encoder":
        ctx = functional_call(learner.encoder, (_sub(params, "encoder."), _sub(buffers, "encoder.")), (support_x, support_y))
        if not ctx.requires_grad:  # evaluation under detached parameters: the context is still adapted
            ctx = ctx.detach().requires_grad_(True)

    def lr(name: str, step: int) -> Tensor | float:
        return cfg.inner_lr if learner.inner_lrs is None else params["inner_lrs." + _lr_key(name)][step]

    common = dict(steps=cfg.inner_steps, lr=lr, loss_fn=make_loss(cfg.inner_loss), first_order=first_order,
                  query_x=query_x)
    if learner.method in CONTEXT_METHODS:
        out, qpreds = inner_sgd(lambda a, x: _net_call(learner, net_p, net_b, x, a["ctx"]), {"ctx": ctx},
                                support_x, support_y, **common)
        return net_p, out["ctx"], qpreds
    names = learner.adapted_names()
    out, qpreds = inner_sgd(lambda a, x: _net_call(learner, {**net_p, **a}, net_b, x, None),
                            {n: net_p[n] for n in names}, support_x, support_y, **common)
    return {**net_p, **out}, None, qpreds


def msl_weights(n_steps: int, meta_step: int, anneal_steps: int) -> list[float]:
    """Multi-step loss weights of the query losses after inner steps 1..n: uniform -> last step only.

    ``w = (1 - a) / n + a * [i == n]`` with ``a = min(1, meta_step / anneal_steps)``: sums to 1.
    """
    if n_steps <= 0:
        return []
    a = min(1.0, max(meta_step, 0) / max(anneal_steps, 1))
    return [(1.0 - a) / n_steps + (a if i == n_steps - 1 else 0.0) for i in range(n_steps)]


# --------------------------------------------------------------------------- the engine


class GradientEngine:
    """ANIL, CAVIA, the task encoder and stabilized MAML over a :class:`MetaLearner`."""

    def build_learner(self, cfg: Config) -> nn.Module:
        return build_meta_learner(cfg)

    def meta_step(self, learner: nn.Module, episodes: Sequence[Any], cfg: MAMLConfig,
                  optimizer: torch.optim.Optimizer, step: int, *, with_stats: bool = True) -> dict[str, float]:
        lrn = _check(learner, cfg)
        outer_loss = make_loss(cfg.outer_loss)
        params = dict(lrn.named_parameters())
        buffers = dict(lrn.named_buffers())
        net_p0, net_b = _sub(params, "net."), _sub(buffers, "net.")  # the meta-learned network, for every task
        weights = msl_weights(cfg.inner_steps, step, cfg.msl_steps) if cfg.multi_step_loss else []

        def task(t: list[Tensor]) -> TaskOutcome:
            sx, sy, qx, qy = t
            net_p, ctx, qpreds = inner_loop(lrn, params, buffers, sx, sy, cfg, first_order=cfg.first_order,
                                            query_x=qx if weights else None)
            if weights:
                qpred = qpreds[-1]
                qloss = sum(w * outer_loss(p, crop_like(qy, p)) for w, p in zip(weights, qpreds) if w > 0)
            else:
                qpred = _net_call(lrn, net_p, net_b, qx, ctx)
                qloss = outer_loss(qpred, crop_like(qy, qpred))

            def support_stats() -> tuple[float, float]:
                with torch.no_grad():
                    pre = _net_call(lrn, net_p0, net_b, sx, None if ctx is None else torch.zeros_like(ctx))
                    post = _net_call(lrn, {k: v.detach() for k, v in net_p.items()}, net_b, sx,
                                     None if ctx is None else ctx.detach())
                    return l1(pre, crop_like(sy, pre)).item(), l1(post, crop_like(sy, post)).item()

            return TaskOutcome(qloss, qpred, support_stats)

        stats = outer_step(lrn, episodes, cfg, optimizer, step, task, safe_for=lrn.net,
                           cosine=cfg.outer_schedule == "cosine", with_stats=with_stats,
                           hint="; lower maml.inner_lr / outer_lr or set maml.grad_clip")
        if lrn.inner_lrs is not None:
            stats["inner_lr_mean"] = float(torch.cat([p.detach().flatten() for p in lrn.inner_lrs.values()]).mean())
        return stats

    def adapt(self, learner: nn.Module, support_x: Tensor, support_y: Tensor, cfg: MAMLConfig) -> Predictor:
        lrn = _check(learner, cfg)
        names = set(lrn.adapted_names())
        params = {k: v.detach().requires_grad_(k[4:] in names if k.startswith("net.") else False)
                  for k, v in lrn.named_parameters()}
        nb = _sub(dict(lrn.named_buffers()), "net.")
        with torch.enable_grad():  # first order: nothing is backpropagated through an evaluation
            net_p, ctx, _ = inner_loop(lrn, params, dict(lrn.named_buffers()), support_x, support_y, cfg, first_order=True)
        net_p = {k: v.detach() for k, v in net_p.items()}
        ctx = None if ctx is None else ctx.detach()
        return lambda x: _net_call(lrn, net_p, nb, x, ctx)

    def before(self, learner: nn.Module) -> Predictor:
        # The meta-learned network with a zero context: no support information.
        return learner


ENGINE = GradientEngine()

__all__ = ["ENGINE", "GRADIENT_METHODS", "GradientEngine", "MetaLearner", "TaskEncoder", "build_meta_learner",
           "inner_loop", "msl_weights"]
