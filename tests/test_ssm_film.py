"""The diagonal SSM model and the FiLM task context of the lstm, tcn and ssm models."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metafx.config import LSTMConfig, ModelConfig, SSMConfig, TCNConfig
from metafx.models import CONTEXT_ARCHS, MODELS, build_model, count_params
from metafx.models.lstm import LSTMModel, lstm_param_count
from metafx.models.ssm import SSM, ssm_param_count
from metafx.models.tcn import TCN
from metafx.models.transformer import AudioTransformer

# One torch thread: set for the whole suite in conftest.py.

CTX = 3  # context size of the conditioned test models


def tiny(arch: str, context_dim: int = CTX) -> torch.nn.Module:
    """Small lstm / tcn / ssm with a context (receptive field of the TCN: 15 samples)."""
    if arch == "lstm":
        return LSTMModel(hidden=6, context_dim=context_dim)
    if arch == "tcn":
        return TCN(channels=4, blocks=3, kernel=3, dilation_growth=2, context_dim=context_dim)
    return SSM(channels=4, state=3, layers=2, context_dim=context_dim)


# --------------------------------------------------------------------------- SSM


def test_ssm_contract_shape_finite_gradients_and_scale():
    torch.manual_seed(0)
    model = SSM(channels=8, state=6, layers=2, skip=False)
    assert count_params(model) == ssm_param_count(8, 6, 2)
    assert not list(model.buffers())
    x = torch.randn(3, 1, 300)
    y = model(x)
    assert y.shape == (3, 1, 300) and model.output_len(300) == 300
    assert torch.isfinite(y).all()
    ratio = (y.std() / x.std()).item()
    assert 0.1 < ratio < 10, f"output std / input std = {ratio}"
    y.abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_ssm_init_pole_radii_and_validation():
    torch.manual_seed(0)
    model = SSM(channels=8, state=16, layers=1, r_min=0.5, r_max=0.99)
    r = torch.exp(-model.blocks[0].log_nu.exp())
    assert r.min() >= 0.5 - 1e-6 and r.max() <= 0.99 + 1e-6
    theta = model.blocks[0].theta
    assert theta.min() >= 0 and theta.max() <= torch.pi
    with pytest.raises(ValueError, match="r_min <= r_max"):
        SSM(r_min=0.99, r_max=0.9)
    with pytest.raises(ValueError, match="r_min <= r_max"):
        SSM(r_max=1.0)
    with pytest.raises(ValueError, match="channels, state and layers"):
        SSM(channels=4, state=0)
    with pytest.raises(ValueError, match=r"\(B, 1, T\)"):
        model(torch.zeros(2, 3))
    cfg = SSMConfig(channels=5, state=2, layers=3, r_min=0.8, r_max=0.95, skip=False)
    built = build_model(ModelConfig(arch="ssm", ssm=cfg))
    assert isinstance(built, SSM) and built.channels == 5 and len(built.blocks) == 3 and not built.skip


def test_ssm_is_causal_without_wraparound():
    """A change at sample t0 leaves every earlier output unchanged (FFT conv: no circular wrap-around)."""
    torch.manual_seed(0)
    model = SSM(channels=4, state=5, layers=2, r_min=0.99, r_max=0.9999).double()
    T = 100
    x = 0.3 * torch.randn(2, 1, T, dtype=torch.float64)
    for t0 in (1, 60, T - 1):  # T - 1: a wrap-around would leak into the first samples
        x2 = x.clone()
        x2[..., t0] += 0.5
        y, y2 = model(x), model(x2)
        torch.testing.assert_close(y[..., :t0], y2[..., :t0], rtol=0, atol=1e-12)
        assert (y[..., t0:] - y2[..., t0:]).abs().max() > 1e-6


def test_ssm_block_equals_the_stepped_recurrence():
    """FFT convolution of the closed-form kernel == the diagonal complex recurrence stepped sample by sample."""
    torch.manual_seed(0)
    block = SSM(channels=3, state=4, layers=1, r_min=0.8, r_max=0.999).double().blocks[0]
    h = torch.randn(2, 3, 50, dtype=torch.float64)
    nu = block.log_nu.exp()
    lam = torch.exp(torch.complex(-nu, block.theta))  # (C, N)
    b = torch.complex(block.b_re, block.b_im) * torch.sqrt(1 - torch.exp(-2 * nu))
    c = torch.complex(block.c_re, block.c_im)
    s = torch.zeros(2, 3, 4, dtype=torch.complex128)
    ys = []
    for t in range(h.shape[-1]):
        s = lam * s + b * h[..., t : t + 1]  # (B, C, N)
        ys.append((c * s).sum(-1).real + block.d * h[..., t])
    y = torch.stack(ys, dim=-1)  # (B, C, T)
    expected = h + block.mix(torch.nn.functional.gelu(y))
    torch.testing.assert_close(block(h), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 1000])
def test_ssm_kernel_factorization(T):
    """The (C, J, N) @ (C, N, M) factorization of the kernel == Re(sum_n w_n lambda_n^t) summed directly."""
    torch.manual_seed(0)
    block = SSM(channels=2, state=5, layers=1, r_min=0.9, r_max=0.9999).double().blocks[0]
    nu = block.log_nu.exp()
    lam_log = torch.complex(-nu, block.theta)  # log lambda, (C, N)
    norm = torch.sqrt(1 - torch.exp(-2 * nu))  # sqrt(1 - r^2)
    w = torch.complex(block.c_re, block.c_im) * torch.complex(block.b_re, block.b_im) * norm
    t = torch.arange(T, dtype=torch.float64)
    direct = (w.unsqueeze(-1) * torch.exp(lam_log.unsqueeze(-1) * t)).sum(1).real  # (C, T)
    torch.testing.assert_close(block.kernel(T), direct, rtol=1e-10, atol=1e-12)


def test_ssm_second_order_gradients_and_finite_difference():
    """MAML needs d/dtheta of inner gradients: double backward exists, is finite, and matches finite differences."""
    torch.manual_seed(0)
    model = SSM(channels=3, state=4, layers=2, r_min=0.9, r_max=0.999).double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    x = 0.3 * torch.randn(2, 1, 64, dtype=torch.float64)
    target = 0.3 * torch.randn(2, 1, 64, dtype=torch.float64)

    # L1 (the inner-loop loss): grad of the sum of the gradients w.r.t. every parameter.
    loss = (functional_call(model, params, (x,)) - target).abs().mean()
    g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    gg = torch.autograd.grad(sum(gi.sum() for gi in g), [params[n] for n in names], allow_unused=True)
    assert all(t is not None and torch.isfinite(t).all() for t in gg)
    assert sum(t.abs().sum() for t in gg) > 0

    # A smooth loss for the finite-difference check of v^T H v along a random direction v.
    def grad_dot_v(p: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        pred = functional_call(model, p, (x,))
        L = ((pred - target) ** 2).mean()
        gs = torch.autograd.grad(L, [p[n] for n in names], create_graph=create_graph)
        return sum((gi * v[n]).sum() for gi, n in zip(gs, names))

    v = {n: torch.randn_like(p) for n, p in params.items()}
    gv = grad_dot_v(params, create_graph=True)
    hv = torch.autograd.grad(gv, [params[n] for n in names])
    vhv = sum((hi * v[n]).sum() for hi, n in zip(hv, names)).item()
    eps = 1e-5
    plus = {n: (p + eps * v[n]).detach().requires_grad_(True) for n, p in params.items()}
    minus = {n: (p - eps * v[n]).detach().requires_grad_(True) for n, p in params.items()}
    fd = ((grad_dot_v(plus, False) - grad_dot_v(minus, False)) / (2 * eps)).item()
    assert fd == pytest.approx(vhv, rel=1e-4, abs=1e-8)


# --------------------------------------------------------------------------- context_dim = 0: unchanged models


def test_no_context_models_are_unchanged():
    """context_dim 0: the paper's parameter counts and names, no FiLM module."""
    n = lambda cfg: count_params(build_model(cfg))  # noqa: E731
    assert n(ModelConfig(arch="lstm", lstm=LSTMConfig(hidden=256))) == 265_473
    assert n(ModelConfig(arch="lstm", lstm=LSTMConfig(hidden=64))) == 17_217
    assert n(ModelConfig(arch="tcn", tcn=TCNConfig(channels=32, blocks=4, kernel=5, dilation_growth=10))) == 16_065
    assert {k for k, _ in LSTMModel(hidden=4).named_parameters()} == {
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0", "head.weight", "head.bias"
    }
    for arch in CONTEXT_ARCHS:
        assert not any("film" in k for k, _ in tiny(arch, 0).named_parameters()), arch
    # The same random init as before the context existed: an LSTM built from the same seed equals
    # a bare nn.LSTM + nn.Linear built from that seed.
    torch.manual_seed(0)
    model = LSTMModel(hidden=5, skip=True)
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(1, 5, batch_first=True), torch.nn.Linear(5, 1)
    x = 0.3 * torch.randn(2, 1, 40)
    ref = head(lstm(x.transpose(1, 2))[0]).transpose(1, 2) + x
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_context_param_counts():
    assert count_params(LSTMModel(hidden=6, context_dim=CTX)) == lstm_param_count(6, CTX)
    assert count_params(SSM(channels=4, state=3, layers=2, context_dim=CTX)) == ssm_param_count(4, 3, 2, CTX)
    tcn0, tcn1 = tiny("tcn", 0), tiny("tcn", CTX)
    assert count_params(tcn1) - count_params(tcn0) == 3 * (CTX + 1) * 2 * 4


# --------------------------------------------------------------------------- FiLM context


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_context_shapes_broadcast_and_errors(arch):
    torch.manual_seed(0)
    model = tiny(arch)
    B, T = 3, 40
    x = 0.3 * torch.randn(B, 1, T)
    c = torch.randn(CTX)
    y = model(x, c)
    assert y.shape == (B, 1, model.output_len(T)) and torch.isfinite(y).all()
    torch.testing.assert_close(model(x, c.unsqueeze(0)), y)
    torch.testing.assert_close(model(x, ctx=c.expand(B, CTX)), y)
    # A batch of contexts: entry i uses context i (the TCN's batch-statistics BatchNorm aside).
    if arch != "tcn":
        cs = torch.randn(B, CTX)
        yb = model(x, cs)
        for i in range(B):
            torch.testing.assert_close(yb[i : i + 1], model(x[i : i + 1], cs[i]), rtol=1e-5, atol=1e-6)
    # None = zero context.
    torch.testing.assert_close(model(x), model(x, torch.zeros(CTX)))
    for bad in (torch.zeros(CTX + 1), torch.zeros(2, CTX), torch.zeros(B, CTX, 1), torch.zeros(B, CTX + 1)):
        with pytest.raises(ValueError, match=rf"ctx must have shape \({CTX},\), \(1, {CTX}\) or \({B}, {CTX}\)"):
            model(x, bad)
    with pytest.raises(ValueError, match="context_dim = 0"):
        tiny(arch, 0)(x, c)


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_context_changes_output_and_has_gradient_at_zero(arch):
    """CAVIA starts from a zero context: the gradient w.r.t. it must not vanish there."""
    torch.manual_seed(0)
    model = tiny(arch)
    for name, p in model.named_parameters():
        if "film" in name and name.endswith("bias"):
            assert (p == 0).all(), name
        if "film" in name and name.endswith("weight"):
            assert p.abs().sum() > 0, name
    x = 0.3 * torch.randn(2, 1, 40)
    assert (model(x, torch.zeros(CTX)) - model(x, torch.ones(CTX))).abs().max() > 1e-4
    ctx = torch.zeros(CTX, requires_grad=True)
    target = 0.3 * torch.randn_like(model(x))
    (model(x, ctx) - target).abs().mean().backward()
    assert torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0
    # Every parameter is used with a nonzero context (at ctx = 0 the FiLM weights' gradient,
    # dL/dgamma ctx^T, is zero: they learn from the adapted context).
    model.zero_grad()
    (model(x, torch.randn(CTX)) - target).abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_functional_call_with_context(arch):
    """The inner loop's call: functional_call(model, params, (x,), {"ctx": ctx}), differentiable in params and ctx."""
    torch.manual_seed(0)
    model = tiny(arch)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ctx = torch.zeros(1, CTX, requires_grad=True)
    x = 0.3 * torch.randn(2, 1, 40)
    y = functional_call(model, params, (x,), {"ctx": ctx})
    torch.testing.assert_close(y, model(x, ctx.detach()))
    loss = y.abs().mean()
    (g_ctx,) = torch.autograd.grad(loss, [ctx], create_graph=True)
    # One CAVIA inner step on the context, then the meta-gradient w.r.t. the parameters (second order).
    ctx1 = ctx - 0.1 * g_ctx
    meta = functional_call(model, params, (x,), {"ctx": ctx1}).abs().mean()
    grads = torch.autograd.grad(meta, list(params.values()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_head_prefixes_name_the_head():
    for cls, model in (
        (LSTMModel, tiny("lstm")),
        (TCN, tiny("tcn")),
        (SSM, tiny("ssm")),
        (AudioTransformer, AudioTransformer(8, 2, 1, 16, max_len=32)),
    ):
        assert cls.head_prefixes == ("head.",)
        head = [n for n, _ in model.named_parameters() if n.startswith(cls.head_prefixes)]
        assert sorted(head) == ["head.bias", "head.weight"], cls.__name__


def test_build_model_context():
    for arch in CONTEXT_ARCHS:
        assert arch in MODELS
        assert build_model(ModelConfig(arch=arch, context_dim=4)).context_dim == 4
        assert build_model(ModelConfig(arch=arch)).context_dim == 0
    for arch in ("transformer", "arx"):
        with pytest.raises(ValueError, match=rf"model.arch {arch} takes no context \(model.context_dim must be 0\)"):
            build_model(ModelConfig(arch=arch, context_dim=2))
