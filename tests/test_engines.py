"""The AdaptationEngine contract, run over every ``maml.method`` (as optuna tests every sampler).

For each method (plain MAML on both backends, stabilized MAML, ANIL, CAVIA, the task encoder,
the closed-form ridge head and joint training) on tiny synthetic one-pole tasks:

* meta-steps lower the outer (query) loss on the tasks they train on;
* the adapted prediction has the model's output shape, and adapting does not modify the learner;
* a run resumed from a state saved after some steps equals one that never stopped, exactly;
* a non-finite loss raises NonFiniteLossError naming the meta-step and the task, and applies no update.
"""
from __future__ import annotations

import copy
import io
from dataclasses import replace

import pytest
import torch

from metafx.config import METHODS, load_config
from metafx.engines import ENGINES, AdaptationEngine, NonFiniteLossError, adapt_and_predict, engine_for, make_outer_optimizer
from metafx.engines import gradient, maml
from test_maml import make_episode

SMALL = {"maml.inner_steps": 2, "maml.inner_lr": 0.05, "maml.outer_lr": 3e-3, "maml.slice_len": 64,
         "maml.k_support": 2, "maml.k_query": 2, "model.lstm.hidden": 6}
CASES = {
    "maml": ("lstm.yaml", {"maml.method": "maml", "maml.first_order": False}),
    "maml-higher": ("lstm.yaml", {"maml.method": "maml", "maml.backend": "higher", "maml.first_order": False}),
    "maml-stabilized": ("lstm.yaml", {"maml.method": "maml", "maml.learn_inner_lr": True, "maml.multi_step_loss": True,
                                      "maml.outer_schedule": "cosine"}),
    "anil": ("lstm.yaml", {"maml.method": "anil"}),
    "cavia": ("lstm.yaml", {"maml.method": "cavia", "model.context_dim": 3}),
    "encoder": ("lstm.yaml", {"maml.method": "encoder", "model.context_dim": 3, "model.encoder_hidden": 8,
                              "model.encoder_bands": 4}),
    "ridge": ("arx.yaml", {"maml.method": "ridge", "model.arx.features": "learned"}),
    "joint": ("lstm.yaml", {"maml.method": "joint"}),
}
EPISODES = [make_episode(1, L=64, dtype=torch.float32), make_episode(2, L=64, dtype=torch.float32)]


def test_every_method_has_an_engine_and_a_case():
    assert set(ENGINES) == set(METHODS)
    assert {c.split("-")[0] for c in CASES} == set(METHODS)
    for eng in ENGINES.values():
        assert isinstance(eng, AdaptationEngine)


def setup(case: str, seed: int = 0):
    space, over = CASES[case]
    cfg = load_config(space, "smoke", {**(SMALL if space == "lstm.yaml" else {}), **over,
                                       "maml.meta_steps": 20})
    eng = engine_for(cfg)
    torch.manual_seed(seed)
    learner = eng.build_learner(cfg)
    return cfg, eng, learner, make_outer_optimizer(learner, cfg.maml)


def outer_loss(eng: AdaptationEngine, learner, cfg) -> float:
    """The engine's own statistic of the meta-objective on EPISODES, without changing the learner."""
    probe = copy.deepcopy(learner)
    stats = eng.meta_step(probe, EPISODES, cfg.maml, torch.optim.SGD(probe.parameters(), lr=0.0), 1, with_stats=False)
    return stats["outer_loss"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_steps_lower_the_query_loss(case):
    cfg, eng, learner, opt = setup(case)
    before = outer_loss(eng, learner, cfg)
    for s in range(1, 16):
        stats = eng.meta_step(learner, EPISODES, cfg.maml, opt, s)
        for k in ("support_l1_pre", "support_l1_post", "query_l1_post", "outer_loss", "grad_norm"):
            assert k in stats, k
    after = outer_loss(eng, learner, cfg)
    assert after < before, (case, before, after)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapted_prediction_has_the_output_shape_and_the_learner_is_unchanged(case):
    cfg, eng, learner, _ = setup(case)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = EPISODES[0]
    with torch.no_grad():
        pre, post = adapt_and_predict(eng, learner, ep, cfg.maml)
    expected = eng.before(learner)(ep.query_x).shape
    assert pre.shape == post.shape == expected
    assert expected[:2] == ep.query_x.shape[:2] and expected[-1] <= ep.query_x.shape[-1]
    assert not torch.equal(pre, post)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k


def _save(learner, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": learner.state_dict(), "optimizer": opt.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_is_exact(case):
    cfg, eng, straight, opt = setup(case)
    for s in range(1, 5):
        eng.meta_step(straight, EPISODES, cfg.maml, opt, s)
    _, _, first, opt1 = setup(case)
    for s in range(1, 3):
        eng.meta_step(first, EPISODES, cfg.maml, opt1, s)
    blob = _save(first, opt1)
    _, _, resumed, opt2 = setup(case, seed=123)  # other initial weights: everything must come from the state
    st = torch.load(io.BytesIO(blob), weights_only=True)
    resumed.load_state_dict(st["model"])
    opt2.load_state_dict(st["optimizer"])
    for s in range(3, 5):
        eng.meta_step(resumed, EPISODES, cfg.maml, opt2, s)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{case}: {k} differs after resume"


@pytest.mark.parametrize("case", sorted(CASES))
def test_non_finite_loss_names_step_and_task_and_applies_no_update(case):
    cfg, eng, learner, opt = setup(case)
    bad = replace(EPISODES[1], support_y=EPISODES[1].support_y.clone(), query_y=EPISODES[1].query_y.clone())
    bad.support_y[0, 0, 5] = float("nan")
    bad.query_y[0, 0, 5] = float("nan")
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"meta-step 7.*task"):
        eng.meta_step(learner, [EPISODES[0], bad], cfg.maml, opt, 7)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_hyperparameters_are_read_from_the_config_at_call_time():
    """A config replaced after the learner was built is the one used (no second channel)."""
    cfg, eng, learner, _ = setup("anil")
    ep = EPISODES[0]
    with torch.no_grad():
        _, slow = adapt_and_predict(eng, learner, ep, replace(cfg.maml, inner_lr=1e-6))
        _, fast = adapt_and_predict(eng, learner, ep, replace(cfg.maml, inner_lr=0.5))
        _, none = adapt_and_predict(eng, learner, ep, replace(cfg.maml, inner_steps=0))
        pre = eng.before(learner)(ep.query_x)
    assert torch.allclose(none, pre)
    assert (slow - pre).abs().max() < (fast - pre).abs().max()
    # Learned learning rates are built for a number of inner steps: another number is refused.
    cfg, eng, learner, _ = setup("maml-stabilized")
    with pytest.raises(ValueError, match="inner_steps"):
        eng.adapt(learner, ep.support_x, ep.support_y, replace(cfg.maml, inner_steps=3))


def test_the_engines_share_one_inner_loop():
    assert gradient.inner_sgd is maml.inner_sgd
