"""Plain MAML engine (metafx.engines.maml): backend parity, finite-difference meta-gradients, purity, errors.

Episodes are synthetic: white noise through a one-pole low-pass with a random cutoff
per task (deterministic), the shape of a real task without rendering anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import scipy.signal
import torch
from torch.func import functional_call

from metafx.config import LossConfig, MAMLConfig
from metafx.engines import base
from metafx.engines.base import NonFiniteLossError, make_outer_optimizer, second_order_safe
from metafx.engines.maml import ENGINE, adapt_params
from metafx.metrics import crop_like, esr, l1
from metafx.models.lstm import LSTMModel
from metafx.models.tcn import TCN
from metafx.models.transformer import AudioTransformer


# One torch thread: set for the whole suite in conftest.py.


def meta_step(model, episodes, cfg, opt, step=0, with_stats=True):
    return ENGINE.meta_step(model, episodes, cfg, opt, step, with_stats=with_stats)


def adapt(model, params, buffers, sx, sy, *, steps, lr, loss_fn, first_order, backend="func"):
    """The plain-MAML inner loop with the settings given as arguments (loss l1 or esr)."""
    cfg = MAMLConfig(inner_steps=steps, inner_lr=lr, inner_loss=LossConfig(((loss_fn.__name__, 1.0),)), backend=backend)
    return adapt_params(model, params, buffers, sx, sy, cfg, first_order=first_order)


def adapt_and_predict(model, episode, cfg, steps=None):
    cfg = cfg if steps is None else replace(cfg, inner_steps=steps)
    return base.adapt_and_predict(ENGINE, model, episode, cfg)

SR = 48000


@dataclass
class FakeEpisode:
    """Stand-in for metafx.data.tasks.Episode (same fields)."""

    task: int
    family: str
    params: dict = field(default_factory=dict)
    support_x: torch.Tensor = None
    support_y: torch.Tensor = None
    query_x: torch.Tensor = None
    query_y: torch.Tensor = None


def make_episode(task: int, K: int = 2, L: int = 64, dtype=torch.float64) -> FakeEpisode:
    rng = np.random.default_rng(task)
    fc = float(rng.uniform(300.0, 6000.0))
    a = np.exp(-2 * np.pi * fc / SR)
    x = 0.25 * rng.standard_normal(2 * K * L)
    y = scipy.signal.lfilter([1 - a], [1, -a], x)  # one continuous render, then slices
    xs = torch.from_numpy(x.reshape(2 * K, 1, L)).to(dtype)
    ys = torch.from_numpy(y.reshape(2 * K, 1, L)).to(dtype)
    return FakeEpisode(task, "onepole", {"cutoff": fc}, xs[:K], ys[:K], xs[K:], ys[K:])


MAKERS = {
    "lstm": lambda: LSTMModel(hidden=4, skip=True),
    "tcn": lambda: TCN(channels=3, blocks=2, kernel=3, dilation_growth=2),
    "transformer": lambda: AudioTransformer(d_model=8, heads=2, layers=2, ff=16, max_len=128),
}


def fresh(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MAKERS[arch]().double()


def meta_grad(model, episodes, cfg, **kw) -> torch.Tensor:
    """The meta-gradient meta_step accumulates (SGD with lr 0 leaves the weights)."""
    meta_step(model, episodes, cfg, torch.optim.SGD(model.parameters(), lr=0.0), **kw)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


EPISODES = [make_episode(1), make_episode(2)]


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_backends_give_the_same_meta_gradient(arch, first_order):
    cfg = MAMLConfig(first_order=first_order, inner_steps=2, inner_lr=0.1)
    g_func = meta_grad(fresh(arch), EPISODES, replace(cfg, backend="func"))
    g_higher = meta_grad(fresh(arch), EPISODES, replace(cfg, backend="higher"))
    assert g_func.abs().max() > 0
    torch.testing.assert_close(g_func, g_higher, rtol=1e-10, atol=1e-12)


def _meta_objective(model, params, episodes, cfg, inner, outer) -> float:
    """Mean over tasks of the query loss after second-order-exact adaptation (float64)."""
    total = 0.0
    for ep in episodes:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        fast = adapt(model, p, {}, ep.support_x, ep.support_y, steps=cfg.inner_steps, lr=cfg.inner_lr,
                     loss_fn=inner, first_order=False)
        pred = functional_call(model, fast, (ep.query_x,))
        total += outer(pred, crop_like(ep.query_y, pred)).item()
    return total / len(episodes)


@pytest.mark.parametrize(
    "arch,inner,lr",
    [("lstm", "l1", 0.05), ("lstm", "esr", 0.01), ("tcn", "l1", 0.05), ("tcn", "esr", 1e-3)],
)
def test_second_order_meta_gradient_matches_finite_differences(arch, inner, lr):
    """Directional derivative of the meta-objective: autograd vs central differences, float64."""
    episodes = [make_episode(3, L=48), make_episode(4, L=48)]
    cfg = MAMLConfig(inner_steps=2, inner_lr=lr, inner_loss=LossConfig(((inner, 1.0),)))
    inner_fn = {"l1": l1, "esr": esr}[inner]
    model = fresh(arch)
    g2 = meta_grad(model, episodes, cfg)
    g1 = meta_grad(fresh(arch), episodes, replace(cfg, first_order=True))
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(2):
        v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in theta.items()}
        vflat = torch.cat([t.flatten() for t in v.values()])
        plus = _meta_objective(model, {k: theta[k] + eps * v[k] for k in theta}, episodes, cfg, inner_fn, l1)
        minus = _meta_objective(model, {k: theta[k] - eps * v[k] for k in theta}, episodes, cfg, inner_fn, l1)
        fd = (plus - minus) / (2 * eps)
        d2, d1 = float(g2 @ vflat), float(g1 @ vflat)
        assert d2 == pytest.approx(fd, rel=1e-6, abs=1e-9), (d2, fd, d1)
        # First order is a different (approximate) gradient.
        assert abs(d1 - fd) > 100 * abs(d2 - fd) + 1e-9


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_first_order_differs_from_second_order(arch):
    cfg = MAMLConfig(inner_steps=1, inner_lr=0.1, inner_loss=LossConfig((("esr", 1.0),)))
    g2 = meta_grad(fresh(arch), EPISODES, cfg)
    g1 = meta_grad(fresh(arch), EPISODES, replace(cfg, first_order=True))
    assert (g2 - g1).norm() > 1e-4 * g2.norm()


@pytest.mark.parametrize("backend", ["func", "higher"])
@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_adaptation_lowers_support_loss_and_is_pure(arch, backend):
    model = fresh(arch)
    ep = EPISODES[0]
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    fast = adapt(model, params, dict(model.named_buffers()), ep.support_x, ep.support_y,
                 steps=3, lr=0.01, loss_fn=l1, first_order=False, backend=backend)
    assert set(fast) == set(params)
    for k, v in model.named_parameters():  # neither the model nor the input tensors changed
        assert v is params[k]
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)
    assert any(not torch.equal(fast[k].detach(), before[k]) for k in fast)
    with torch.no_grad():
        pre = l1(functional_call(model, before, (ep.support_x,)), ep.support_y)
        post = l1(functional_call(model, {k: v.detach() for k, v in fast.items()}, (ep.support_x,)), ep.support_y)
    assert post < pre


def test_meta_step_updates_and_reports():
    model = fresh("lstm")
    cfg = MAMLConfig(inner_steps=1, inner_lr=0.1, outer_lr=1e-2)
    opt = make_outer_optimizer(model, cfg)
    w0 = [p.detach().clone() for p in model.parameters()]
    stats = meta_step(model, EPISODES, cfg, opt, step=1)
    assert set(stats) == {"support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss", "grad_norm", "lr"}
    assert all(np.isfinite(v) for v in stats.values())
    assert stats["support_l1_post"] < stats["support_l1_pre"]
    assert stats["outer_loss"] == pytest.approx(stats["query_l1_post"])  # outer loss is L1 by default
    assert any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))
    quick = meta_step(model, EPISODES, cfg, opt, step=2, with_stats=False)
    assert np.isnan(quick["support_l1_pre"]) and np.isfinite(quick["outer_loss"])


def test_gradient_clipping():
    cfg = MAMLConfig(inner_steps=1, inner_lr=0.1, grad_clip=1e-3)
    model = fresh("tcn")
    stats = meta_step(model, EPISODES, cfg, torch.optim.SGD(model.parameters(), lr=0.0))
    assert stats["grad_norm"] > 1e-3
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(clipped) == pytest.approx(1e-3, rel=1e-4)


def test_non_finite_loss_names_step_and_task():
    model = fresh("lstm")
    bad = make_episode(3)
    bad.support_x = bad.support_x.clone()
    bad.support_x[0, 0, 5] = float("nan")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"meta-step 7.*task=3.*inner step 0"):
        meta_step(model, [EPISODES[0], bad], MAMLConfig(), opt, step=7)
    for p, w in zip(model.parameters(), w0):  # no update was applied
        assert torch.equal(p.detach(), w) and p.grad is None
    bad_q = make_episode(4)
    bad_q.query_y = torch.full_like(bad_q.query_y, float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"meta-step 8.*task=4.*query"):
        meta_step(model, [bad_q], MAMLConfig(backend="higher"), opt, step=8)
    with pytest.raises(NonFiniteLossError, match="task=3"):
        adapt_and_predict(model, bad, MAMLConfig())


def test_adapt_and_predict():
    model = fresh("tcn")
    ep = EPISODES[1]
    w0 = [p.detach().clone() for p in model.parameters()]
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.05)
    with torch.no_grad():  # evaluation code may call it under no_grad
        pre, post = adapt_and_predict(model, ep, cfg)
    assert pre.shape == post.shape == (2, 1, model.output_len(64))
    assert not pre.requires_grad and not post.requires_grad
    assert l1(post, ep.query_y) != l1(pre, ep.query_y)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w) and p.grad is None
    pre0, post0 = adapt_and_predict(model, ep, cfg, steps=0)
    torch.testing.assert_close(pre0, post0)
    torch.testing.assert_close(pre0, pre)


def test_float32_episodes_follow_the_model_dtype():
    model = fresh("lstm").float()
    ep = make_episode(5, dtype=torch.float32)
    stats = meta_step(model, [ep], MAMLConfig(), make_outer_optimizer(model, MAMLConfig()))
    assert np.isfinite(stats["outer_loss"])
    model64 = fresh("lstm")
    stats64 = meta_step(model64, [ep], MAMLConfig(), make_outer_optimizer(model64, MAMLConfig()))
    assert stats64["outer_loss"] == pytest.approx(stats["outer_loss"], rel=1e-4)


def test_second_order_safe_switches_cudnn_and_restores_flags():
    lstm, tcn = fresh("lstm"), fresh("tcn")
    enabled, bench = torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with second_order_safe(lstm, first_order=False):
            assert torch.backends.cudnn.enabled is False
            assert torch.backends.cudnn.benchmark is True  # other flags kept
        assert torch.backends.cudnn.enabled == enabled
        with second_order_safe(lstm, first_order=True):
            assert torch.backends.cudnn.enabled == enabled
        with second_order_safe(tcn, first_order=False):
            assert torch.backends.cudnn.enabled == enabled
    finally:
        torch.backends.cudnn.benchmark = bench


def test_unknown_backend():
    model = fresh("lstm")
    with pytest.raises(ValueError, match="backend"):
        adapt(model, dict(model.named_parameters()), {}, EPISODES[0].support_x, EPISODES[0].support_y,
              steps=1, lr=0.1, loss_fn=l1, first_order=True, backend="jax")
