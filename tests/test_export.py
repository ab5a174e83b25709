"""Exported models (metafx/export.py): they compute what the adapted model computes, stream exactly, run without metafx.

* the ARX export equals MetaARX's own simulation of the fitted head on slices from a zero state
  (to the pointwise table's interpolation and float32), and its features are the model's;
* for the gradient methods, the weights baked by :func:`metafx.capture.adapted_network` give the
  engine's own adapted prediction, and the exported LSTM / TCN / SSM / windowed transformer
  reproduce it (the TCN on the support slices, whose statistics its BatchNorm is frozen at);
* every streaming export gives the whole-signal output block by block (32, 256, 2048, ragged, and tiny
  blocks; the ARX also 1-sample blocks and one block above MAX_BLOCK) with the state carried, to 1e-5;
* saved files load and reproduce their outputs in a fresh interpreter that never imports metafx.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from metafx.capture import MetaModel, adapted_network
from metafx.config import load_config
from metafx.engines import engine_for
from metafx.evaluate import predict_long
from metafx.export import MAX_BLOCK, ARXStream, ExportError, export_network, real_time_factor, save, script
from metafx.metrics import crop_like
from metafx.models.arx import ARXHead, MetaARX, stabilize
from metafx.models.lstm import LSTMModel
from metafx.models.tcn import TCN
from metafx.wiener import bank_channels, make_bank

BLOCKS = (32, 256, 2048, None, 0)  # None: ragged sizes 1..3000; 0: 100 blocks of 1..12 samples (shorter than the
# ARX's FIR history and AR order), then 512


def one_pole_task(K: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Support slices of a mildly nonlinear one-pole filter (a task every model can adapt to)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, 1, L, generator=g) * 0.2
    y = torch.zeros_like(x)
    for n in range(L):
        y[..., n] = 0.6 * torch.tanh(2 * x[..., n]) + (0.5 * y[..., n - 1] if n else 0.0)
    return x, y


def streamed(m, x: torch.Tensor, block: int | None) -> torch.Tensor:
    state, outs, i = m.initial_state(), [], 0
    rng = np.random.default_rng(0)
    n = 0
    while i < x.numel():
        if block == 0:
            b = int(rng.integers(1, 13)) if n < 100 else 512
        else:
            b = block or int(rng.integers(1, 3000))
        n += 1
        y, state = m(x[i:i + b], state)
        outs.append(y)
        i += b
    return torch.cat(outs)


def check_streaming(m, x: torch.Tensor) -> None:
    with torch.no_grad():
        full = m.process(x)
        assert full.shape == x.shape and bool(torch.isfinite(full).all())
        for block in BLOCKS:
            err = (streamed(m, x, block) - full).abs().max().item()
            assert err <= 1e-5, (block, err)


# --------------------------------------------------------------------------- ARX


BANKED = ("learned + Wiener bank", "filtered + Wiener bank", "classical + Wiener bank")


@pytest.fixture(scope="module", params=["learned", "filtered", "filtered, no envelopes", "lstm trunk", "tcn trunk",
                                        *BANKED])
def arx_export(request):
    torch.manual_seed(0)
    x, y = one_pole_task(4, 1024, 1)
    support = None
    if request.param == "learned":
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4, n_start=2)
    elif request.param == "filtered":  # the pointwise MLP sees x and its learned low-passes (one bank with the envelopes)
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4, n_filter=3)
        with torch.no_grad():  # corners apart from their initial values, so a mixed-up pole order shows
            m.phi.filt_logit.add_(torch.tensor([0.5, -0.3, 0.2]))
    elif request.param == "filtered, no envelopes":
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=0, n_gate=0, n_filter=2)
    elif request.param == "lstm trunk":  # the ARX head on an LSTM's hidden sequence: the LSTM's (h, c) stream too
        m = MetaARX(nb=6, na=8, features="lstm", trunk=LSTMModel(hidden=8), n_trunk=3)
    elif request.param == "tcn trunk":  # on a TCN's last block: BatchNorm frozen at the support audio's statistics
        m = MetaARX(nb=6, na=8, features="tcn", trunk=TCN(channels=4, blocks=2, kernel=3, dilation_growth=2), n_trunk=3)
        support = x.reshape(-1)
    elif request.param == "learned + Wiener bank":  # the bank's low-passes join the one-pole bank after the envelopes
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4)
    elif request.param == "filtered + Wiener bank":  # envelopes, input filters and the bank's low-passes in one bank
        m = MetaARX(nb=6, na=8, features="learned", hidden=8, n_point=4, n_env=3, n_gate=4, n_filter=2)
    else:  # [1, x] and the bank alone
        m = MetaARX(nb=6, na=8, features="none")
    head = m.fit(x, y)
    a = stabilize(head.a[None], m.rmax)[0][0]
    bank = None
    if request.param in BANKED:  # the bank's rows of the head: small random taps (the export computes any head)
        # with its gain units (peak followers, their smoothing in the one-pole bank), except for the classical model
        bank = make_bank(5, 2, dynamics=request.param != "classical + Wiener bank")
        extra = torch.randn(bank.n_units, m.nb, generator=torch.Generator().manual_seed(4)) * 0.05
        extra[bank.n_curves:, 1:] = 0  # the gain units have lag 0 only (ridge_fit_continuous(n_gain=...))
        head = ARXHead(torch.cat([head.b, extra]), head.a)
    return m, head, x, ARXStream(m, head.b, a, sample_rate=48000, latency_samples=7, support=support, bank=bank)


def test_arx_export_computes_the_fitted_head(arx_export):
    m, head, x, st = arx_export
    if st.n_bank:
        # The model's channels are the model's; the bank's are metafx.wiener's reference computation (float32 tanh);
        # the output is the head on all of them.
        M = m.phi.channels
        with torch.no_grad():
            feats = st.features(x[0, 0])
            ref_feats = m.feats(x[:1])[0].double()
            got = st.process(x[0, 0].double())
        assert (feats[:M] - ref_feats).abs().max().item() <= 1e-4
        ref_bank = bank_channels(make_bank(5, 2, dynamics=bool(st.n_gain)), x[0, 0].double().numpy())
        assert st.n_bank == 5 + (54 if st.n_gain else 0) and ref_bank.shape[0] == st.n_bank
        assert np.abs(feats[M:].numpy() - ref_bank).max() <= 1e-5
        want = lfilter([1.0], st.a.numpy(), sum(np.convolve(feats[c].numpy(), head.b[c].detach().double().numpy())[: x.shape[-1]]
                                               for c in range(feats.shape[0])))
        assert np.abs(got.numpy() - want).max() <= 1e-6 * np.abs(want).max()
        if st.n_gain:  # a gain unit with a tap after lag 0 is refused (the export computes lag 0 only)
            bad = head.b.detach().clone()
            bad[-1, 1] = 0.1
            with pytest.raises(ExportError, match="gain unit taps after lag 0"):
                st.set_head(bad, st.a)
        return
    if m.phi.n_trunk and not isinstance(m.phi.trunk, LSTMModel):
        # A TCN trunk's export freezes BatchNorm at the support audio's statistics, the model uses each batch's own:
        # with one slice as the support the two are the same, and so are the features.
        one = ARXStream(m, head.b, st.a, support=x[0, 0])
        with torch.no_grad():
            err = (one.features(x[0, 0]) - m.feats(x[:1])[0].double()).abs().max().item()
        assert err <= 1e-4, err
        return
    with torch.no_grad():
        ref = m.predict(x, head)[:, 0].double()
        got = torch.stack([st.process(x[k, 0].double()) for k in range(x.shape[0])])
        feats = st.features(x[0, 0])
        ref_feats = m.feats(x[:1])[0].double()
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert (feats - ref_feats).abs().max().item() <= 1e-4  # the pointwise table and float32 FFTs of the model
    assert torch.equal(feats[:2], ref_feats[:2])  # [1, x] exactly


def test_arx_export_streams_exactly_and_scripts(arx_export):
    *_, st = arx_export
    sm = script(st)
    x = torch.randn(MAX_BLOCK + 904, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.no_grad():
        full = sm.process(x)
        assert torch.equal(full, st.process(x))
        one, _ = sm(x, sm.initial_state())  # one call longer than MAX_BLOCK
        assert (one - full).abs().max().item() <= 1e-5
        assert (streamed(sm, x[:700], 1) - full[:700]).abs().max().item() <= 1e-5
    check_streaming(sm, x)
    assert (sm.sample_rate, sm.latency_samples, sm.kind, bool(sm.streaming)) == (48000, 7, "arx", True)


def test_arx_export_refuses_a_head_that_does_not_fit(arx_export):
    m, head, _, st = arx_export
    with pytest.raises(ExportError, match="does not fit"):
        st.set_head(head.b[:, :2], head.a)
    with pytest.raises(ExportError, match="non-finite"):
        st.set_head(head.b * float("nan"), head.a)


# --------------------------------------------------------------------------- gradient methods

CASES = {
    "lstm-maml": ("lstm.yaml", {"maml.method": "maml", "maml.first_order": True}),
    "lstm-anil": ("lstm.yaml", {"maml.method": "anil"}),
    "lstm-cavia": ("lstm.yaml", {"maml.method": "cavia", "model.context_dim": 3}),
    "lstm-encoder": ("lstm.yaml", {"maml.method": "encoder", "model.context_dim": 3, "model.encoder_hidden": 8,
                                   "model.encoder_bands": 4}),
    "tcn-cavia": ("tcn.yaml", {"maml.method": "cavia", "model.context_dim": 2, "model.tcn.channels": 4}),
    "ssm-encoder": ("lstm.yaml", {"model.arch": "ssm", "maml.method": "encoder", "model.context_dim": 2,
                                  "model.ssm.channels": 4, "model.ssm.state": 3, "model.encoder_hidden": 8,
                                  "model.encoder_bands": 4}),
    "transformer-maml": ("transformer.yaml", {"maml.method": "maml", "maml.first_order": True,
                                              "model.transformer.d_model": 8, "model.transformer.heads": 2,
                                              "model.transformer.ff": 16, "model.transformer.layers": 1}),
}
SMALL = {"maml.inner_steps": 2, "maml.inner_lr": 0.05, "maml.slice_len": 512, "model.lstm.hidden": 6}


def adapted_case(case: str):
    space, over = CASES[case]
    cfg = load_config(space, "smoke", {**SMALL, **over})
    eng = engine_for(cfg)
    torch.manual_seed(0)
    learner = eng.build_learner(cfg).eval()
    mm = MetaModel(cfg, learner, eng, case, cfg.source_file)
    sx, sy = one_pole_task(3, cfg.maml.slice_len, 2)
    net, ctx = adapted_network(mm, sx, sy)
    predictor = eng.adapt(learner, sx, sy, cfg.maml)
    return cfg, mm, sx, sy, net, ctx, predictor


@pytest.mark.parametrize("case", sorted(CASES))
def test_baked_weights_are_the_engines_adaptation_and_the_export_reproduces_it(case):
    cfg, mm, sx, sy, net, ctx, predictor = adapted_case(case)
    with torch.no_grad():
        ref = predictor(sx)  # (K, 1, T')
        baked = net(sx) if ctx is None else net(sx, ctx)
        assert (baked - ref).abs().max().item() <= 1e-6
        module = export_network(net, cfg.model.arch, ctx, sx, cfg.maml.slice_len, 48000, 0)
        sm = script(module)
        if cfg.model.arch == "transformer":
            x = sx[0, 0]
            ref_long = predict_long(predictor, x, cfg.maml.slice_len)
            assert (sm.process(x) - ref_long).abs().max().item() <= 1e-5
            assert not bool(sm.streaming)
            with pytest.raises(Exception, match="whole-file only"):
                sm(x, sm.initial_state())
            return
        for k in range(sx.shape[0]):
            got = sm.process(sx[k, 0])
            want = ref[k, 0]
            got = got[-want.shape[-1]:]  # the TCN's valid output is the end of the slice
            assert (got - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item()), (case, k)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(5)) * 0.3
    check_streaming(sm, x)


def test_exported_files_run_without_metafx(tmp_path, arx_export):
    """Saved exports of every kind, loaded in a fresh interpreter that never imports metafx."""
    x = torch.randn(6000, generator=torch.Generator().manual_seed(9)) * 0.3
    files = {"arx": save(arx_export[-1], tmp_path / "arx.ts")}
    for case in ("lstm-cavia", "tcn-cavia", "ssm-encoder", "transformer-maml"):
        cfg, mm, sx, sy, net, ctx, _ = adapted_case(case)
        files[case] = save(export_network(net, cfg.model.arch, ctx, sx, cfg.maml.slice_len, 48000, 0),
                           tmp_path / f"{case}.ts")
    expected = {}
    for k, f in files.items():
        m = torch.jit.load(str(f))
        with torch.no_grad():
            expected[k] = m.process(x)
    torch.save({"x": x, **{k: v for k, v in expected.items()}}, tmp_path / "io.pt")
    (tmp_path / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))
    code = textwrap.dedent(f"""
        import json, sys, torch
        files = json.load(open({str(tmp_path / 'files.json')!r}))
        io = torch.load({str(tmp_path / 'io.pt')!r})
        for k, f in files.items():
            m = torch.jit.load(f)
            y = m.process(io["x"])
            assert (y - io[k]).abs().max().item() <= 1e-5, k
            if m.streaming:
                st = m.initial_state()
                a, st = m(io["x"][:1000], st)
                b, st = m(io["x"][1000:], st)
                assert (torch.cat([a, b]) - io[k]).abs().max().item() <= 1e-5, k
        assert not any(n == "metafx" or n.startswith("metafx.") for n in sys.modules), "metafx was imported"
        print("OK", len(files))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK 5" in r.stdout


def test_real_time_factor_is_measured(arx_export):
    rtf = real_time_factor(script(arx_export[-1]), block=256, seconds=0.2)
    assert rtf > 0


def test_crop_helper_consistency():
    """The TCN comparison above relies on valid outputs being the END of a slice (metrics.crop_like)."""
    y = torch.arange(10.0).reshape(1, 1, 10)
    assert torch.equal(crop_like(y, torch.zeros(1, 1, 4)), y[..., 6:])


def test_a_transformer_trunk_has_no_streaming_export():
    from metafx.models.transformer import AudioTransformer

    m = MetaARX(nb=3, na=2, features="transformer", trunk=AudioTransformer(d_model=8, heads=2, layers=1, ff=8,
                                                                          max_len=64), n_trunk=2)
    with pytest.raises(ExportError, match="no streaming export.*AudioTransformer"):
        ARXStream(m)
    tcn = MetaARX(nb=3, na=2, features="tcn", trunk=TCN(channels=2, blocks=1, kernel=3), n_trunk=2)
    with pytest.raises(ExportError, match="needs the support audio"):
        ARXStream(tcn)
