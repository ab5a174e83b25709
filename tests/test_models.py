"""Model registry contract, paper parameter counts, and per-model behaviour."""
from __future__ import annotations

import pytest
import torch

from metafx import config
from metafx.config import ARCHS, FILM_ARCHS, ARXConfig, LSTMConfig, ModelConfig, SSMConfig, TCNConfig, TransformerConfig
from metafx.metrics import crop_like
from metafx.models import CONTEXT_ARCHS, FEATURE_NETWORKS, MODELS, build_model, count_params
from metafx.models.arx import FeatureNetwork, MetaARX
from metafx.models.lstm import lstm_param_count
from metafx.models.tcn import tcn_receptive_field
from metafx.models.transformer import mu_law_decode, mu_law_encode


# One torch thread: set for the whole suite in conftest.py.

# Tiny sizes of every registered model (keep in sync with MODELS: checked below).
TINY = {
    "lstm": ModelConfig(arch="lstm", lstm=LSTMConfig(hidden=8, skip=True)),
    "tcn": ModelConfig(arch="tcn", tcn=TCNConfig(channels=4, blocks=3, kernel=3, dilation_growth=2)),
    "transformer": ModelConfig(
        arch="transformer", transformer=TransformerConfig(d_model=8, heads=2, layers=2, ff=16, levels=256, max_len=512)
    ),
    "arx": ModelConfig(arch="arx", arx=ARXConfig(nb=3, na=2, features="learned", hidden=4, n_point=2, n_env=2, n_gate=2,
                                                 n_start=1, ridge_feat=1e-3, n_filter=1)),
    "ssm": ModelConfig(arch="ssm", ssm=SSMConfig(channels=4, state=3, layers=2)),
}


def test_tiny_configs_cover_the_registry():
    assert set(TINY) == set(MODELS)


def test_registry_is_keyed_by_the_config_architectures():
    """One list of architectures: config.ARCHS (read off ModelConfig) names exactly the registered models."""
    assert set(MODELS) == set(ARCHS)
    assert set(CONTEXT_ARCHS) == set(FILM_ARCHS) <= set(ARCHS)
    for arch in ARCHS:  # every architecture has its own sizes section in ModelConfig
        assert hasattr(ModelConfig(), arch), arch


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_model_contract(arch):
    torch.manual_seed(0)
    model = build_model(TINY[arch])
    if arch == "arx":
        # forward() is the prior-mean head, the identity at start: give every channel a nonzero prior so
        # that every feature parameter is used. The log-ridges act only in fit() (their meta-gradient is
        # checked against finite differences in tests/test_ridge.py).
        with torch.no_grad():
            model.prior.normal_(0, 0.05)
    fit_only = set(getattr(model, "fit_only_parameters", lambda: ())())
    B, T = 3, 200
    x = 0.3 * torch.randn(B, 1, T)
    y = model(x)
    assert y.shape == (B, 1, model.output_len(T))
    assert 0 < model.output_len(T) <= T
    assert torch.isfinite(y).all()
    target = 0.3 * torch.randn(B, 1, T)
    (y - crop_like(target, y)).abs().mean().backward()
    for name, p in model.named_parameters():
        if name in fit_only:
            assert p.grad is None, f"{arch}: {name} is declared fit-only but forward uses it"
            continue
        assert p.grad is not None, f"{arch}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{arch}: zero gradient for {name}"
    assert count_params(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_is_pure_and_mode_independent(arch):
    """No buffer changes in forward and train/eval give the same output (MAML needs a pure forward)."""
    torch.manual_seed(0)
    model = build_model(TINY[arch])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = 0.3 * torch.randn(2, 1, 128)
    y_train = model.train()(x)
    y_eval = model.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("arch", ["lstm", "transformer", "arx"])
def test_causal(arch):
    """A change at sample t0 leaves every earlier output sample unchanged."""
    torch.manual_seed(0)
    model = build_model(TINY[arch]).double()
    x = 0.3 * torch.randn(1, 1, 100, dtype=torch.float64)
    x2 = x.clone()
    x2[..., 60] += 0.5
    y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[..., :60], y2[..., :60], rtol=0, atol=1e-12)
    assert (y[..., 60:] - y2[..., 60:]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", FEATURE_NETWORKS)
def test_feature_network_contract(arch):
    """FeatureNetwork over every member: (B, 1, T) -> (B, C, T), causal from a zero state, every body parameter trained."""
    torch.manual_seed(0)
    net = build_model(TINY[arch]).double()
    assert isinstance(net, FeatureNetwork)
    x = 0.3 * torch.randn(2, 1, 120, dtype=torch.float64)
    f = net.features(x)
    assert f.shape == (2, net.feature_channels, 120)
    x2 = x.clone()
    x2[..., 70] += 0.5
    f2 = net.features(x2)
    if arch != "tcn":  # causal; the TCN's BatchNorm normalizes with whole-slice statistics (models/__init__.py)
        torch.testing.assert_close(f[..., :70], f2[..., :70], rtol=0, atol=1e-12)
    assert (f[..., 70:] - f2[..., 70:]).abs().max() > 1e-6
    f.square().mean().backward()
    head = tuple(getattr(net, "head_prefixes", ()))
    for name, p in net.named_parameters():
        if not name.startswith(head):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{arch}: no gradient reaches {name}"


@pytest.mark.parametrize("arch", FEATURE_NETWORKS)
def test_arx_head_on_a_network_trains_the_network(arch):
    """model.arx.features: <network>: the closed-form head's meta-gradient reaches the network's weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="arx", arx=ARXConfig(nb=3, na=2, features=arch, n_trunk=3),
                      **{arch: getattr(TINY[arch], arch)})
    model = build_model(cfg)
    assert isinstance(model, MetaARX) and model.channels == 2 + 3
    sx, qx = 0.3 * torch.randn(2, 3, 1, 200), 0.3 * torch.randn(2, 3, 1, 200)
    sy, qy = torch.tanh(2 * sx), torch.tanh(2 * qx)
    head = model.fit_features(model.feats(sx), sy[:, :, 0])
    pred = model.predict_features(model.feats(qx), head)
    (pred - qy[:, :, 0]).abs().mean().backward()
    trunk = [(n, p) for n, p in model.named_parameters() if n.startswith("phi.trunk.") and not n.startswith(
        tuple("phi.trunk." + h for h in getattr(model.phi.trunk, "head_prefixes", ())))]
    assert trunk and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trunk)
    with pytest.raises(ValueError, match="trunk"):
        MetaARX(features=arch)  # a network's name needs the network


def test_paper_parameter_counts():
    """Table 1 of the paper: LSTM 265k, LSTM-small 17k, TCN 16k, Transformer 1219k / 617k."""
    n = lambda cfg: count_params(build_model(cfg))  # noqa: E731
    assert n(ModelConfig(arch="lstm", lstm=LSTMConfig(hidden=256))) == lstm_param_count(256) == 265_473
    assert n(ModelConfig(arch="lstm", lstm=LSTMConfig(hidden=64))) == lstm_param_count(64) == 17_217
    # micro-tcn TCN-100: 4 blocks, kernel 5, growth 10, 32 channels.
    assert n(ModelConfig(arch="tcn", tcn=TCNConfig(channels=32, blocks=4, kernel=5, dilation_growth=10))) == 16_065
    # PyTorch's default feed-forward width 2048 reproduces the paper's counts.
    big = TransformerConfig(d_model=128, heads=4, layers=2, ff=2048)
    small = TransformerConfig(d_model=68, heads=2, layers=2, ff=2048)
    assert n(ModelConfig(arch="transformer", transformer=big)) == 1_218_945
    assert n(ModelConfig(arch="transformer", transformer=small)) == 616_845


def test_tcn_receptive_field_and_alignment():
    cfg = TINY["tcn"].tcn
    model = build_model(TINY["tcn"])
    rf = tcn_receptive_field(cfg.kernel, cfg.blocks, cfg.dilation_growth)
    assert rf == 1 + 2 * (1 + 2 + 4) == model.receptive_field
    assert model.output_len(100) == 100 - rf + 1
    assert tcn_receptive_field(5, 4, 10) == 4445  # TCN-100
    assert tcn_receptive_field is config.tcn_receptive_field  # one formula: the model's and the validator's
    with pytest.raises(ValueError, match="receptive field"):
        model(torch.zeros(1, 1, rf - 1))
    assert not list(model.buffers()), "BatchNorm must not keep running statistics"


def test_mu_law_round_trip():
    x = torch.linspace(-1, 1, 10001, dtype=torch.float64)
    tok = mu_law_encode(x, 256)
    assert tok.dtype == torch.int64 and tok.min() == 0 and tok.max() == 255
    xr = mu_law_decode(tok, 256, torch.float64)
    # Mu-law error is relative: small near 0, at most ~3% of full scale at the top.
    assert (xr - x).abs().max() < 0.035
    quiet = x.abs() < 0.01
    assert (xr - x)[quiet].abs().max() < 3e-4
    assert mu_law_encode(torch.tensor([2.0, -2.0]), 256).tolist() == [255, 0]  # clipped


def test_transformer_limits_and_skip():
    cfg = TINY["transformer"].transformer
    model = build_model(TINY["transformer"])
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 1, cfg.max_len + 1))
    from metafx.models.transformer import AudioTransformer

    torch.manual_seed(0)
    a = AudioTransformer(8, 2, 1, 16, max_len=64, skip=False)
    torch.manual_seed(0)
    b = AudioTransformer(8, 2, 1, 16, max_len=64, skip=True)
    x = 0.3 * torch.randn(1, 1, 64)
    torch.testing.assert_close(b(x) - a(x), mu_law_decode(mu_law_encode(x, 256), 256))


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="registered models"):
        build_model(ModelConfig(arch="wavenet"))
