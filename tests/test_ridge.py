"""Closed-form ANIL (model.arch arx, maml.method ridge): the fit, the simulation, the meta-gradient, a real trial."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch

from metafx.config import ConfigError, load_config
from metafx.data.tasks import load_taskset
from metafx.engines.base import NonFiniteLossError, make_outer_optimizer
from metafx.engines.ridge import ENGINE
from metafx.models import build_model
from metafx import metrics as M
from metafx.models.arx import CV_RIDGE_SCALES, ARXHead, MetaARX, iir_fft, pole_radius, stabilize
from metafx.train import meta_train
from resume_check import assert_resume_matches_uninterrupted


def _arx_data(b, a, K, L, seed=0):
    """K zero-state slices of white noise through y = B(z)/A(z) x (scipy), float64 (K, 1, L)."""
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.standard_normal((K, L))
    y = scipy.signal.lfilter(b, a, x, axis=-1)
    return torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]


B_TRUE = [0.2, -0.1, 0.05]
A_TRUE = np.poly([0.9 * np.exp(0.3j), 0.9 * np.exp(-0.3j)]).real  # poles at radius 0.9


def test_ridge_fit_recovers_a_known_arx_system():
    """Noise-free data of an ARX(3, 2) system: the equation-error fit returns its coefficients."""
    model = MetaARX(nb=3, na=2, features="none", ridge=1e-14, ridge_a=1e-14).double()
    sx, sy = _arx_data(B_TRUE, A_TRUE, K=3, L=600)
    head = model.fit(sx, sy)
    assert head.b.shape == (2, 3) and head.a.shape == (3,)
    torch.testing.assert_close(head.b[1], torch.tensor(B_TRUE, dtype=torch.float64), atol=1e-8, rtol=0)
    # No DC (the constant channel has a single tap: its lags are collinear inside a slice).
    assert float(head.b[0].detach().abs().sum()) < 1e-8
    torch.testing.assert_close(head.a, torch.tensor(A_TRUE), atol=1e-8, rtol=0)
    # ... and simulating it on new input reproduces the system's output.
    qx, qy = _arx_data(B_TRUE, A_TRUE, K=2, L=500, seed=1)
    torch.testing.assert_close(model.predict(qx, head), qy, atol=1e-8, rtol=0)
    # A batch of tasks gives the same heads as one at a time.
    sx2, sy2 = _arx_data([0.5], [1.0, -0.5], K=3, L=600, seed=2)
    hb = model.fit(torch.stack([sx, sx2]), torch.stack([sy, sy2]))
    torch.testing.assert_close(hb.a[0], head.a)
    # The second task is over-parametrized (ARX(3, 2) for a one-pole system: a pole-zero pair
    # cancels along a null direction that only the 1e-14 ridge pins down), so its coefficients are
    # not identified: batched and single solves round differently along that direction (percent
    # level, depending on the BLAS kernel). What is identified is the response: both must give it.
    h2 = model.fit(sx2, sy2)
    qy2 = torch.from_numpy(scipy.signal.lfilter([0.5], [1.0, -0.5], qx.numpy(), axis=-1))
    torch.testing.assert_close(model.predict(qx, h2), qy2, atol=1e-8, rtol=0)
    torch.testing.assert_close(model.predict(qx, ARXHead(hb.b[1], hb.a[1])), qy2, atol=1e-8, rtol=0)


def test_cv_ridge_picks_light_shrinkage_for_a_clean_system_and_heavy_for_a_noisy_short_support():
    """fit_selected: leave-one-slice-out CV on the support chooses the ridge multiplier per task.

    A clean ARX system (the data pin every coefficient down): the lightest multiplier, and a query
    error below the as-learned fit's. An identity effect seen through heavy noise on four slices of
    64 samples: a heavy multiplier keeps the head near the prior mean (pass-through), and its query
    error against the noise-free identity is a quarter of the as-learned fit's, which fits the noise.
    """
    model = MetaARX(nb=13, na=12, features="none", ridge=1e-4, ridge_a=1e-4).double()
    sx, sy = _arx_data(B_TRUE, A_TRUE, K=4, L=512)
    qx, qy = _arx_data(B_TRUE, A_TRUE, K=4, L=512, seed=5)
    head, scale = model.fit_selected(sx, sy)
    assert scale == min(CV_RIDGE_SCALES)
    with torch.no_grad():
        assert float(M.esr(model.predict(qx, head), qy)) < 1e-3 * float(M.esr(model.predict(qx, model.fit(sx, sy)), qy))
    rng = np.random.default_rng(3)
    x = torch.from_numpy(0.3 * rng.standard_normal((4, 1, 64)))
    y = x + torch.from_numpy(0.3 * rng.standard_normal((4, 1, 64)))
    head, scale = model.fit_selected(x, y)
    assert scale >= 1e4
    q = torch.from_numpy(0.3 * rng.standard_normal((4, 1, 512)))
    with torch.no_grad():
        assert float(M.esr(model.predict(q, head), q)) < 0.3 * float(M.esr(model.predict(q, model.fit(x, y)), q))
    # One candidate is used as it is: 1e4 is the fit with that ridge; 1 is exactly the as-learned fit.
    h4, s4 = model.fit_selected(x, y, scales=(1e4,))
    assert s4 == 1e4
    with torch.no_grad():
        ref = model.fit_features(model.feats(x)[None], y[None, :, 0], ridge_scale=1e4)
    torch.testing.assert_close(h4.b, ref.b[0])
    torch.testing.assert_close(h4.a, ref.a[0])
    assert not torch.allclose(h4.b, model.fit(x, y).b.detach())
    head1, scale1 = model.fit_selected(x, y, scales=(1.0,))
    plain = model.fit(x, y)
    assert scale1 == 1.0
    torch.testing.assert_close(head1.b, plain.b.detach())
    torch.testing.assert_close(head1.a, plain.a.detach())


def test_cv_ridge_is_what_the_ridge_engine_adapts_with_when_set():
    """model.arx.cv_ridge: the engine's adaptation is fit_selected's head; off, it is fit's."""
    cfg = load_config("arx.yaml", "smoke", ["model.arx.cv_ridge=true"])
    model = ENGINE.build_learner(cfg).double()
    assert model.cv_ridge
    x = torch.from_numpy(0.3 * np.random.default_rng(3).standard_normal((4, 1, 64)))
    y = x + torch.from_numpy(0.3 * np.random.default_rng(4).standard_normal((4, 1, 64)))
    q = torch.from_numpy(0.3 * np.random.default_rng(5).standard_normal((2, 1, 256)))
    head, _ = model.fit_selected(x, y)
    with torch.no_grad():
        torch.testing.assert_close(ENGINE.adapt(model, x, y, cfg.maml)(q), model.predict(q, head))
        model.cv_ridge = False
        torch.testing.assert_close(ENGINE.adapt(model, x, y, cfg.maml)(q), model.predict(q, model.fit(x, y)))


def _lin(x):
    return scipy.signal.lfilter(B_TRUE, A_TRUE, x, axis=-1)


def _pairs(f, K, L, seed):
    x = 0.3 * np.random.default_rng(seed).standard_normal((K, L))
    return torch.from_numpy(x)[:, None], torch.from_numpy(f(x))[:, None]


def test_fit_classical_is_the_classical_arx_baseline_head():
    """MetaARX.fit_classical on a learned-feature model is exactly the head classical_arx fits on the same support
    (its [1, x] rows; the learned channels' rows zero), and it simulates to the same output through this model."""
    from metafx.evaluate import classical_arx

    cfg = load_config("universal.yaml", "smoke")
    model = ENGINE.build_learner(cfg).double()
    carx = classical_arx(cfg.model).double()
    assert model.channels > 2 and carx.channels == 2
    x, y = _pairs(lambda v: np.tanh(2 * _lin(v)), 4, 512, 1)
    q, _ = _pairs(_lin, 3, 1024, 2)
    with torch.no_grad():
        for scale in (1.0, 1e4):
            h = model.fit_classical(model.feats(x)[None], y[None, :, 0], ridge_scale=scale)
            hc = carx.fit_features(carx.feats(x)[None], y[None, :, 0], ridge_scale=scale)
            torch.testing.assert_close(h.b[0, :2], hc.b[0], rtol=1e-9, atol=1e-12)
            assert bool((h.b[0, 2:] == 0).all())
            torch.testing.assert_close(h.a, hc.a, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(model.predict(q, ARXHead(h.b[0], h.a[0])),
                                       carx.predict(q, ARXHead(hc.b[0], hc.a[0])), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("effect, L, want_classical", [("linear", 160, True), ("linear", 512, True),
                                                        ("tanh", 512, False), ("tanh", 2048, False)])
def test_cv_classical_keeps_classical_arx_only_where_it_predicts_left_out_slices_better(effect, L, want_classical):
    """model.arx.cv_classical: a linear system on short slices overfits the learned head's 364 coefficients (the
    cross-validation keeps classical ARX, whose query error is then far below the learned head's); a memoryless
    curve, which [1, x] cannot fit, keeps the learned head (the same head as without the option)."""
    f = _lin if effect == "linear" else (lambda v: np.tanh(3 * v))
    cfg = load_config("universal.yaml", "smoke", ["model.arx.cv_classical=true"])
    model = ENGINE.build_learner(cfg).double()
    assert model.cv_ridge and model.cv_classical
    x, y = _pairs(f, 4, L, 1)
    q, qy = _pairs(f, 4, 2048, 2)
    with torch.no_grad():
        head, scale = model.fit_selected(x, y)
        model.cv_classical = False
        learned, _ = model.fit_selected(x, y)
        assert not learned.classical
        model.cv_classical = True
        assert head.classical == want_classical
        if want_classical:
            ref = model.fit_classical(model.feats(x)[None], y[None, :, 0], ridge_scale=scale)
            torch.testing.assert_close(head.b, ref.b[0])
            torch.testing.assert_close(head.a, ref.a[0])
            assert float(M.esr(model.predict(q, head), qy)) < 1e-3 * float(M.esr(model.predict(q, learned), qy))
        else:
            torch.testing.assert_close(head.b, learned.b)
            torch.testing.assert_close(head.a, learned.a)
        # what the ridge engine adapts with
        torch.testing.assert_close(ENGINE.adapt(model, x, y, cfg.maml)(q), model.predict(q, head))


def test_cv_classical_needs_cv_ridge():
    with pytest.raises(ConfigError, match="cv_classical.*cv_ridge: true"):
        load_config("arx.yaml", "smoke", ["model.arx.cv_classical=true"])


def test_fft_iir_simulation_matches_lfilter():
    rng = np.random.default_rng(3)
    poles = [0.97 * np.exp(0.05j), 0.97 * np.exp(-0.05j), 0.6, -0.5]
    a = np.poly(poles).real
    u = rng.standard_normal((2, 3, 1000))
    ref = scipy.signal.lfilter([1.0], a, u, axis=-1)
    got = iir_fft(torch.from_numpy(u), torch.from_numpy(a)[None].expand(2, -1), pad=4)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-9)
    # The whole head (MA part on [1, x] + AR part) against lfilter.
    model = MetaARX(nb=4, na=4, features="none").double()
    b = torch.zeros(2, 4, dtype=torch.float64)
    b[1] = torch.tensor([0.3, -0.2, 0.1, 0.05])
    head = ARXHead(b=b, a=torch.from_numpy(a))
    x = torch.from_numpy(rng.standard_normal((3, 1, 800)))
    ref = scipy.signal.lfilter(b[1].numpy(), a, x.numpy(), axis=-1)
    np.testing.assert_allclose(model.predict(x, head).numpy(), ref, atol=1e-9)


def test_pole_clamping_keeps_an_unstable_fit_finite():
    """Data of an unstable system (pole at 1.01): the fit is unstable, the simulation is clamped and finite."""
    a_unstable = np.poly([1.01, 0.5]).real
    sx, sy = _arx_data([1.0], a_unstable, K=2, L=400)  # grows by 1.01^400 ~ 54: still fine to fit
    model = MetaARX(nb=1, na=2, features="none", ridge=1e-12, ridge_a=1e-12, rmax=0.999).double()
    with torch.no_grad():
        head = model.fit(sx, sy)
    assert float(pole_radius(head.a)) == pytest.approx(1.01, abs=1e-6)
    a_clamped, r = stabilize(head.a[None], 0.999)
    assert float(r[0]) > 1.0 and float(pole_radius(a_clamped)[0]) == pytest.approx(0.999, abs=1e-9)
    qx, _ = _arx_data([1.0], [1.0], K=2, L=20000, seed=5)  # long query: unclamped it would reach 1.01^20000
    free = scipy.signal.lfilter(head.b[1].numpy(), head.a.numpy(), qx.numpy(), axis=-1)
    assert not np.isfinite(free).all() or np.abs(free).max() > 1e30
    with torch.no_grad():
        pred = model.predict(qx, head)
    assert torch.isfinite(pred).all() and pred.abs().max() < 1e4


def _tiny_learned(dtype=torch.float64) -> MetaARX:
    torch.manual_seed(0)
    m = MetaARX(nb=2, na=2, features="learned", hidden=3, n_point=2, n_env=2, n_gate=2, n_start=1,
                ridge=1e-3, ridge_a=1e-3, ridge_feat=1e-2).to(dtype)
    with torch.no_grad():  # a prior that uses every channel, so every parameter matters
        m.prior.normal_(0, 0.05)
    return m


class _FitPredict(torch.nn.Module):
    """forward = fit on the support set, simulate on the query set (for torch.func.functional_call)."""

    def __init__(self, model: MetaARX):
        super().__init__()
        self.m = model

    def forward(self, sx, sy, qx):
        return self.m.predict(qx, self.m.fit(sx, sy))


def test_meta_gradient_through_the_solve_matches_finite_differences():
    """float64: d(query loss)/d(features, log-ridges, prior mean) through the ridge solve and the FFT IIR."""
    fp = _FitPredict(_tiny_learned())
    sx, sy = _arx_data(B_TRUE, A_TRUE, K=2, L=48, seed=7)
    qx, qy = _arx_data(B_TRUE, A_TRUE, K=2, L=48, seed=8)
    sy, qy = torch.tanh(3 * sy), torch.tanh(3 * qy)  # a mildly nonlinear target
    names = [n for n, _ in fp.named_parameters()]
    buffers = dict(fp.named_buffers())

    def query_loss(*flat):
        pred = torch.func.functional_call(fp, ({**dict(zip(names, flat)), **buffers}), (sx, sy, qx))
        return ((pred - qy) ** 2).mean()

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in fp.parameters())
    assert torch.autograd.gradcheck(query_loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-4)
    grads = torch.autograd.grad(query_loss(*inputs), inputs)
    for n, g in zip(names, grads):  # every meta-parameter matters
        assert g.abs().sum() > 0, n


def test_forward_is_the_prior_head_and_identity_at_start():
    model = MetaARX(nb=3, na=2, features="learned", hidden=4, n_point=2, n_env=1, n_gate=1)
    x = 0.3 * torch.randn(3, 1, 256)
    y = model(x)
    assert y.shape == (3, 1, 256) and model.output_len(256) == 256
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)  # w0 = identity before meta-training
    assert set(model.fit_only_parameters()) <= {n for n, _ in model.named_parameters()}


def test_ridge_and_arx_go_together():
    with pytest.raises(ConfigError, match="needs maml.method = 'ridge'"):
        load_config("arx.yaml", "smoke", {"maml.method": "maml", "maml.inner_steps": 1})
    with pytest.raises(ConfigError, match="needs model.arch = 'arx'"):
        load_config("lstm.yaml", "smoke", {"maml.method": "ridge"})
    with pytest.raises(ConfigError, match="model.arx.n_gate"):
        load_config("arx.yaml", "smoke", {"model.arx.features": "learned", "model.arx.n_env": 0})
    cfg = load_config("arx.yaml", "smoke", {"model.arx.nb": 5})
    assert isinstance(build_model(cfg.model), MetaARX) and cfg.model.arx.nb == 5


# --------------------------------------------------------------------------- a real trial


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cache = tmp_path_factory.mktemp("arx-datasets")
    cfg = load_config("arx.yaml", "smoke", {"data.cache_dir": str(cache)})
    return cfg, load_taskset(cfg.data, progress=False)


@pytest.mark.parametrize("features", ["none", "learned"])
def test_meta_training_on_a_rendered_task_set(smoke, features):
    cfg, taskset = smoke
    if features == "learned":
        # A small ridge on the learned channels: with a strong one, the first Adam steps move the prior
        # mean of those channels off zero, and a resonant 1/A(z) amplifies that offset (6 steps cannot undo it).
        cfg = load_config("arx.yaml", "smoke", {"data.cache_dir": str(cfg.data.cache_dir), "model.arx.features": "learned",
                                                "model.arx.hidden": 8, "model.arx.n_point": 4, "model.arx.nb": 4,
                                                "model.arx.na": 4, "model.arx.ridge_feat": 1e-6})
    reports = []
    res = meta_train(cfg, taskset, lambda m, ck: reports.append(m))
    m = res.metrics
    for r in reports:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    for k in ("test/query_l1_post", "test/query_stft_post", "test/query_hf_post", "test/query_l1_pre"):
        assert math.isfinite(m[k]), k
    assert m["test/query_l1_post"] < m["test/identity_l1"]
    assert m["test/query_l1_post"] < 0.5 * m["test/query_l1_pre"], "the fit must improve on the prior head"


def test_resume_matches_uninterrupted(smoke, tmp_path):
    """The cosine schedule and the optimizer state live in the checkpoint: resuming is exact."""
    cfg, taskset = smoke
    assert_resume_matches_uninterrupted(cfg, taskset, tmp_path)


def test_non_finite_query_raises_naming_the_task(smoke):
    cfg, taskset = smoke
    from metafx.data.tasks import EpisodeSampler

    model = build_model(cfg.model)
    ep = EpisodeSampler(taskset, "train", 2, 2, cfg.maml.slice_len, seed=0).sample()
    ep.query_y = ep.query_y.clone()
    ep.query_y[0, 0, 5] = float("nan")
    opt = make_outer_optimizer(model, cfg.maml)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"meta-step 3.*task=") as e:
        ENGINE.meta_step(model, [ep], cfg.maml, opt, 3)
    assert ep.task_id in str(e.value)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.fixture
def two_threads():
    """torch on two threads (where MKL's batched LU failed), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_ridge_solve_batched_large_systems_on_two_threads(two_threads):
    """A batch of float64 ridge systems of hundreds of unknowns on two threads (a batched ``torch.linalg.solve`` of
    these failed inside MKL's LU, DLASWP), one of them not positive definite (the LU fallback): each solution is
    the one numpy finds for that system alone."""
    from metafx.models.arx import ridge_solve

    rng = np.random.default_rng(0)
    P = 300
    X = rng.standard_normal((4, P, P + 20))
    A = X @ X.transpose(0, 2, 1) + 1e-3 * np.eye(P)
    A[2] = -A[2]  # negative definite: Cholesky fails, the LU does not
    b = rng.standard_normal((4, P, 2))
    x = ridge_solve(torch.from_numpy(A), torch.from_numpy(b))
    assert x.shape == (4, P, 2) and x.dtype == torch.float64
    for i in range(4):
        np.testing.assert_allclose(x[i].numpy(), np.linalg.solve(A[i], b[i]), rtol=1e-7, atol=1e-9)


def test_universal_heads_fit_per_task_on_two_threads(two_threads):
    """The universal study's ARX head (364 coefficients) fitted on four tasks at once on two threads: the ridge
    engine's per-slice fits of its validation stopped on MKL's batched LU. Each task's head equals its own fit."""
    cfg = load_config("universal.yaml", "local")
    model = build_model(cfg.model).double()
    assert model.n_coef >= 300
    g = torch.Generator().manual_seed(0)
    sx = 0.3 * torch.randn(4, 3, 1, 2048, generator=g, dtype=torch.float64)
    sy = torch.tanh(2 * sx) + 0.01 * torch.randn(sx.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        head = model.fit(sx, sy)
        one = model.fit(sx[1], sy[1])
    assert torch.isfinite(head.b).all() and torch.isfinite(head.a).all()
    torch.testing.assert_close(head.b[1], one.b, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(head.a[1], one.a, rtol=1e-6, atol=1e-8)
