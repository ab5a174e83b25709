"""metafx.engines.gradient: ANIL, CAVIA, the amortized encoder and the MAML++ stabilizers.

Synthetic one-pole episodes from tests/test_maml.py (no rendering); the end-to-end
training and resume on a real rendered task set are at the end.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from torch.func import functional_call

from metafx.config import ConfigError, MAMLConfig, load_config
from metafx.engines import base, gradient as meta
from metafx.engines.base import NonFiniteLossError, make_outer_optimizer
from metafx.engines.gradient import ENGINE, MetaLearner
from metafx.engines.maml import ENGINE as PLAIN
from metafx.metrics import crop_like
from metafx.models.lstm import LSTMModel
from metafx.models.ssm import SSM
from metafx.models.tcn import TCN
from resume_check import assert_resume_matches_uninterrupted
from test_maml import make_episode

NETS = {
    "lstm": lambda c: LSTMModel(hidden=6, context_dim=c),
    "tcn": lambda c: TCN(channels=4, blocks=2, kernel=3, dilation_growth=2, context_dim=c),
    "ssm": lambda c: SSM(channels=4, state=4, layers=2, context_dim=c),
}


def learner(arch: str, method: str, *, steps: int = 2, lr: float = 0.05, learn_lr: bool = False, dtype=torch.float64):
    torch.manual_seed(0)
    c = 3 if method in ("cavia", "encoder") else 0
    return MetaLearner(NETS[arch](c), method, learned_lrs=(steps, lr) if learn_lr else None,
                       context_dim=c, encoder_hidden=8, encoder_bands=4).to(dtype)


def mcfg(**kw) -> MAMLConfig:
    base = dict(inner_steps=2, inner_lr=0.05, outer_lr=1e-3, first_order=False, meta_steps=10)
    base.update(kw)
    return MAMLConfig(**base)


def inner(lrn, params, buffers, ep, *, steps, first_order, lr=0.05):
    """The gradient engine's inner loop with ``steps`` L1 steps at ``lr`` (unless learned)."""
    return meta.inner_loop(lrn, params, buffers, ep.support_x, ep.support_y, mcfg(inner_steps=steps, inner_lr=lr),
                           first_order=first_order)


def net_call(lrn, net_p, x, ctx):
    return functional_call(lrn.net, (net_p, {}), (x,), {"ctx": ctx} if lrn.context_dim else {})


def test_msl_weights_anneal_from_uniform_to_last_step():
    assert meta.msl_weights(4, 0, 100) == pytest.approx([0.25] * 4)
    assert meta.msl_weights(4, 100, 100) == pytest.approx([0, 0, 0, 1])
    mid = meta.msl_weights(4, 50, 100)
    assert sum(mid) == pytest.approx(1) and mid[-1] > mid[0] > 0
    assert meta.msl_weights(0, 5, 10) == []


@pytest.mark.parametrize("arch", sorted(NETS))
@pytest.mark.parametrize("method", meta.GRADIENT_METHODS)
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_step_updates_every_meta_parameter(arch, method, first_order):
    lrn = learner(arch, method, learn_lr=True)
    cfg = mcfg(method=method, first_order=first_order, learn_inner_lr=True, multi_step_loss=True, grad_clip=10.0)
    opt = make_outer_optimizer(lrn, cfg)
    before = {k: v.detach().clone() for k, v in lrn.named_parameters()}
    stats = ENGINE.meta_step(lrn, [make_episode(1), make_episode(2)], cfg, opt, 1)
    for k in ("support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss", "grad_norm", "inner_lr_mean"):
        assert torch.isfinite(torch.tensor(stats[k])), k
    if method != "encoder":  # "pre" is the zero context; the encoder's context is a different start
        assert stats["support_l1_post"] < stats["support_l1_pre"]  # the inner loop helps on its support set
    for k, v in lrn.named_parameters():
        assert not torch.equal(v.detach(), before[k]), f"{method}/{arch}: {k} was not updated"


@pytest.mark.parametrize("arch", sorted(NETS))
def test_anil_adapts_only_the_head(arch):
    lrn = learner(arch, "anil")
    names = lrn.adapted_names()
    assert names and all(n.startswith("head.") for n in names)
    ep = make_episode(3)
    params, buffers = dict(lrn.named_parameters()), dict(lrn.named_buffers())
    net_p, ctx, _ = inner(lrn, params, buffers, ep, steps=2, first_order=False)
    assert ctx is None
    for n, t in net_p.items():
        if n in names:
            assert not torch.equal(t.detach(), params["net." + n].detach())
        else:
            assert t is params["net." + n]


def test_stabilized_maml_matches_the_plain_engine_at_step_one():
    """Method maml with a cosine outer schedule (factor 1 at step 1) is plain MAML: same meta-gradient."""
    ep = [make_episode(4), make_episode(5)]
    torch.manual_seed(0)
    net = TCN(channels=3, blocks=2, kernel=3, dilation_growth=2).double()
    ref = TCN(channels=3, blocks=2, kernel=3, dilation_growth=2).double()
    ref.load_state_dict(net.state_dict())
    lrn = MetaLearner(net, "maml")
    cfg = mcfg(outer_schedule="cosine")
    s1 = ENGINE.meta_step(lrn, ep, cfg, torch.optim.SGD(lrn.parameters(), lr=0.0), 1)
    s2 = PLAIN.meta_step(ref, ep, replace(cfg, outer_schedule="constant"), torch.optim.SGD(ref.parameters(), lr=0.0), 1)
    assert s1["outer_loss"] == pytest.approx(s2["outer_loss"], rel=1e-10)
    for (n, p), (_, q) in zip(lrn.net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=n)


def _query_loss_at(arch: str, method: str, lr_value: float) -> float:
    lrn = learner(arch, method, learn_lr=True)
    with torch.no_grad():
        for p in lrn.inner_lrs.values():
            p.fill_(lr_value)
    ep = make_episode(6)
    params, buffers = dict(lrn.named_parameters()), dict(lrn.named_buffers())
    net_p, ctx, _ = inner(lrn, params, buffers, ep, steps=2, first_order=False)
    q = net_call(lrn, net_p, ep.query_x, ctx)
    return q, ep, lrn


@pytest.mark.parametrize("arch,method", [("ssm", "cavia"), ("tcn", "anil"), ("lstm", "cavia")])
def test_learned_inner_lr_gradient_matches_finite_differences(arch, method):
    """Second order through the inner loop: d(query loss)/d(inner lr) against central differences (float64)."""
    q, ep, lrn = _query_loss_at(arch, method, 0.05)
    loss = torch.nn.functional.mse_loss(q, crop_like(ep.query_y, q))
    grads = torch.autograd.grad(loss, list(lrn.inner_lrs.values()))
    analytic = sum(g.sum() for g in grads).item()  # direction: every learned rate moves together
    h = 1e-5
    fd = []
    for s in (+1, -1):
        qq, e2, _ = _query_loss_at(arch, method, 0.05 + s * h)
        fd.append(torch.nn.functional.mse_loss(qq, crop_like(e2.query_y, qq)).item())
    numeric = (fd[0] - fd[1]) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10)
    assert abs(analytic) > 0


def test_cavia_context_starts_at_zero_and_moves():
    lrn = learner("ssm", "cavia", steps=3, lr=0.5)
    ep = make_episode(7)
    params, buffers = dict(lrn.named_parameters()), dict(lrn.named_buffers())
    net_p, ctx, _ = inner(lrn, params, buffers, ep, steps=0, first_order=True, lr=0.5)
    assert torch.count_nonzero(ctx) == 0
    _, ctx3, _ = inner(lrn, params, buffers, ep, steps=3, first_order=True, lr=0.5)
    assert ctx3.shape == (1, 3) and torch.count_nonzero(ctx3) > 0
    assert all(net_p[n] is params["net." + n] for n in net_p)  # the weights are not adapted


def test_encoder_infers_different_contexts_for_different_tasks_and_learns_in_one_pass():
    lrn = learner("tcn", "encoder", steps=0)
    a, b = make_episode(8), make_episode(9)
    assert a.params["cutoff"] != b.params["cutoff"]
    ca = lrn.encoder(a.support_x, a.support_y)
    cb = lrn.encoder(b.support_x, b.support_y)
    assert ca.shape == (1, 3) and not torch.allclose(ca, cb)
    feats = lrn.encoder.features(a.support_x, a.support_y)
    assert feats.shape == (4 * 4 + 3,) and torch.isfinite(feats).all()
    # No inner step: pure amortized inference, the encoder gets the meta-gradient.
    cfg = mcfg(method="encoder", inner_steps=0)
    opt = make_outer_optimizer(lrn, cfg)
    ENGINE.meta_step(lrn, [a, b], cfg, opt, 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lrn.encoder.parameters())


@pytest.mark.parametrize("method", meta.GRADIENT_METHODS)
def test_adapt_and_predict_is_pure_and_works_under_no_grad(method):
    lrn = learner("ssm", method, learn_lr=True)
    ep = make_episode(10)
    state = {k: v.clone() for k, v in lrn.state_dict().items()}
    with torch.no_grad():
        pre, post = base.adapt_and_predict(ENGINE, lrn, ep, mcfg(method=method))
    assert pre.shape == post.shape == ep.query_y.shape
    assert not pre.requires_grad and not post.requires_grad
    assert not torch.equal(pre, post)
    for k, v in lrn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_non_finite_support_loss_names_step_and_task():
    lrn = learner("lstm", "cavia")
    ep = make_episode(11)
    ep.support_x[0, 0, 5] = float("nan")
    cfg = mcfg(method="cavia")
    with pytest.raises(NonFiniteLossError, match=r"meta-step 7, episode 0 .*task=11.*inner step 0"):
        ENGINE.meta_step(lrn, [ep], cfg, make_outer_optimizer(lrn, cfg), 7)
    assert all(p.grad is None for p in lrn.parameters())


def test_outer_cosine_schedule_reaches_zero_at_the_end():
    lrn = learner("tcn", "maml")
    cfg = mcfg(outer_schedule="cosine", meta_steps=4, outer_lr=0.01)
    opt = make_outer_optimizer(lrn, cfg)
    lrs = [ENGINE.meta_step(lrn, [make_episode(12)], cfg, opt, s, with_stats=False)["lr"] for s in range(1, 5)]
    assert lrs[0] == pytest.approx(0.01) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01 * 0.2


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("over,match", [
    ({"maml.method": "cavia"}, "model.context_dim >= 1"),
    ({"maml.method": "encoder", "model.context_dim": 8, "model.arch": "transformer"}, "model.arch in lstm"),
    ({"maml.method": "anil", "maml.backend": "higher"}, "maml.backend: func"),
    ({"maml.learn_inner_lr": True, "maml.backend": "higher"}, "maml.backend: func"),
    ({"model.context_dim": 4, "model.arch": "transformer"}, "takes no context"),
    ({"maml.outer_schedule": "linear"}, "outer_schedule"),
    ({"model.ssm.r_min": 0.99, "model.ssm.r_max": 0.9}, "must be <= model.ssm.r_max"),
    ({"maml.outer_loss": "five*l1+stft"}, "weighted sum like '5\\*l1\\+stft'"),
])
def test_config_refuses_inconsistent_methods(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config("lstm.yaml", "smoke", over)


def test_loss_given_as_a_weighted_sum_string():
    """What a categorical search can choose (Optuna choices are strings): "5*l1+stft"."""
    cfg = load_config("lstm.yaml", "smoke", {"maml.outer_loss": "5*l1+stft", "maml.inner_loss": "mrstft"})
    assert cfg.maml.outer_loss.terms == (("l1", 5.0), ("stft", 1.0))
    assert cfg.maml.inner_loss.terms == (("mrstft", 1.0),)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from metafx.data.tasks import load_taskset

    cache = tmp_path_factory.mktemp("cache")
    base = load_config("lstm.yaml", "smoke", {"data.cache_dir": str(cache)})
    return str(cache), load_taskset(base.data, progress=False)


def test_meta_train_resume_is_exact_with_learned_lrs_and_schedule(rendered, tmp_path):
    cache, ts = rendered
    cfg = load_config("lstm.yaml", "smoke", {
        "data.cache_dir": cache, "model.arch": "ssm", "model.ssm.channels": 4, "model.ssm.state": 4,
        "model.context_dim": 4, "maml.method": "encoder", "maml.inner_steps": 1, "maml.learn_inner_lr": True,
        "maml.multi_step_loss": True, "maml.outer_schedule": "cosine", "maml.first_order": False,
    })
    first = assert_resume_matches_uninterrupted(cfg, ts, tmp_path)
    assert any(k.startswith("inner_lrs.") for k in first["model"]) and any(k.startswith("encoder.") for k in first["model"])
    assert "initial_lr" in first["optimizer"]["param_groups"][0]  # the cosine schedule's base is saved


def test_meta_train_evaluates_a_context_model_against_the_baselines(rendered, tmp_path):
    from metafx.train import meta_train

    cache, ts = rendered
    cfg = load_config("lstm.yaml", "smoke", {
        "data.cache_dir": cache, "model.arch": "tcn", "model.tcn.channels": 4, "model.tcn.blocks": 2,
        "model.tcn.kernel": 3, "model.tcn.dilation_growth": 2, "model.context_dim": 4, "maml.method": "cavia",
        "maml.inner_lr": 1.0, "maml.first_order": True, "eval.joint_steps": 0, "eval.single_task_steps": 0,
    })
    res = meta_train(cfg, ts, None, workdir=tmp_path)
    m = res.metrics
    for k in ("test/query_l1_post", "test/query_stft_post", "test/lsfir/query_l1_post", "test/identity_l1"):
        assert k in m and m[k] == m[k], k
    assert m["test/query_l1_post"] != m["test/query_l1_pre"]
