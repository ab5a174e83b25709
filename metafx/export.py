"""Exported models: an adapted meta-model as a TorchScript file that runs without metafx.

A capture (:mod:`metafx.capture`) ends with the meta-model adapted to one device. This module
turns that adapted model into a self-contained ``torch.nn.Module`` that is scripted
(``torch.jit.script``) and saved (``torch.jit.save``): the file holds the code and the weights,
so a host loads it with ``torch`` alone (no metafx, no pickle of metafx classes).

The API of every exported model (TorchScript methods and attributes)::

    import torch
    m = torch.jit.load("model.ts")            # torch only
    y = m.process(x)                           # x: float32 Tensor[T] at m.sample_rate -> Tensor[T],
                                               # the whole signal from a zero state
    state = m.initial_state()                  # List[Tensor]: the zero state
    for block in blocks:                       # a real-time host: blocks of any size >= 1
        y_block, state = m(block, state)       # forward(block: Tensor[T], state) -> (Tensor[T], state)
    m.sample_rate                              # int, Hz: the rate the model was trained at
    m.latency_samples                          # int: the device latency found at capture (information
                                               # only: the model itself adds no delay)
    m.streaming                                # bool: False for a whole-file export (see below)
    m.kind                                     # str: "arx" | "lstm" | "tcn" | "ssm" | "windowed"
    m.format_version                           # int: EXPORT_VERSION

``forward`` with the state carried from block to block gives the same output as ``process`` on the
concatenated blocks (to float rounding: 1e-5 is tested for blocks of 32, 256, 2048 and ragged
sizes), and ``process`` is ``forward`` over blocks of :data:`PROCESS_BLOCK` samples. The state
is a list of tensors the host passes back unchanged; it is never modified in place.

Per model (how the state is carried and what is precomputed at export):

* ``arx`` (:class:`ARXStream`, the ridge ARX head on meta-learned features, metafx/models/arx.py):
  float64 inside, but for the pointwise table, the gate MLP and the Wiener bank's curves (float32;
  the head is fitted on these same channels). The features run continuously: the pointwise MLP is a memoryless function of x
  (tabulated), or with ``n_filter`` of x and its one-pole low-passes (computed directly); the
  one-pole envelopes ``e[n] = (1 - a) |x[n]| + a e[n-1]`` and those low-passes carry their last value;
  the gates are memoryless functions of the envelopes (and, with ``n_start``, of the time since
  the start, a sample counter in the state). A capture may add the Wiener bank's channels
  (:mod:`metafx.wiener`, ``tanh`` of fixed directions of x and its fixed one-pole low-passes,
  float32) after the model's; their low-passes join the one-pole bank, and the file carries the
  bank's numbers. A capture's tuned units (anti-aliased ``tanh``, :func:`metafx.wiener.adaa_tanh`, float64)
  carry their last input in the state; its cascade units (a second anti-aliased curve after one-poles of a
  first, :func:`metafx.wiener.cascade_channels`) carry the first curve's last input, its one-poles (their own
  two-level scan) and their last inputs. The bank's gain units (``x min(1, l / e)``) follow peak envelopes: instant-attack
  peak followers ``p[n] = max(|x[n]|, r p[n-1])``, computed per block exactly as a max-plus scan
  (a cumulative maximum in the log domain, :meth:`ARXStream._peaks`) from their carried last
  value, then one-pole smoothed in the one-pole bank; a capture's dynamics units follow one fitted envelope
  (:func:`metafx.wiener.dynamics_envelope`: a hold, an attack one-pole, a release follower computed exactly per
  block, :meth:`ARXStream._dynamics`) and carry its two states and the last hold samples of |x|. The head
  ``A(z) y = sum_m B_m(z) phi_m`` is fixed
  after adaptation: its FIR part carries the last ``nb - 1`` feature frames; its recursive part
  carries the last ``na`` outputs. With a network trunk (``model.arx.features``) its projected
  hidden sequence is a feature too, streamed by :class:`_LSTMTrunk` (float64, carries ``(h, c)``)
  or :class:`_TCNTrunk` (the TCN's BatchNorm frozen at the statistics of the support audio, as for
  ``tcn`` below; per-block input histories); the transformer trunk has no recurrent state to
  carry, so it has no streaming export (:class:`ExportError`). A linear recursion over a block is computed exactly as its
  zero-state response (a lower-triangular Toeplitz product with the first samples of its
  impulse response; for the envelopes a two-level scan over sub-chunks) plus the response to the
  carried state (precomputed zero-input responses: ``a^(n+1)`` for a one-pole, ``na`` columns
  for the IIR). No FFT division: that assumes a periodic signal and is wrong for short blocks.
  Blocks longer than :data:`MAX_BLOCK` are split.
* ``lstm`` (:class:`LSTMStream`): the adapted weights baked in; a FiLM context (CAVIA, the task
  encoder) is folded into the LSTM's input bias (the context is a constant input) and into the
  head (FiLM is an affine map of the hidden features). State ``(h, c)``.
* ``tcn`` (:class:`TCNStream`): each block carries the last ``dilation * (kernel - 1)`` samples of
  its input, so a block of ``T`` samples costs ``T`` outputs per layer. The TCN's BatchNorm uses
  batch statistics (metafx/models/tcn.py); a stream has no batch, so the export freezes each
  BatchNorm at the mean and variance it computed on the adapted support slices (the statistics
  the adapted model saw). The exported TCN therefore differs from metafx's predictor on query
  slices, which normalizes with the query slices' own statistics.
* ``ssm`` (:class:`SSMStream`): each layer's diagonal complex modes carry their complex state
  ``(C, N)``; the zero-state part is the FFT convolution with the first ``T`` samples of the
  modes' kernel, as in the model.
* ``windowed`` (:class:`WindowedExport`, the transformer): attention over a slice has no
  recurrent state to carry, so only ``process`` exists (overlapping windows of the training slice
  length, as :func:`metafx.evaluate.predict_long`); ``streaming`` is False and ``forward`` raises.

Real-time factor: :func:`real_time_factor` times ``forward`` on one thread over blocks of 256
samples at the model's rate.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, List, Tuple

import numpy as np
import torch
from scipy.signal import lfilter, lfiltic
from torch import Tensor, nn
from torch.nn import functional as F

from metafx.wiener import ADAA_EPS, GAIN_FLOOR, WienerBank

EXPORT_VERSION = 1
MAX_BLOCK = 4096  # longest block computed in one piece (tables cover this many samples)
PROCESS_BLOCK = 4096  # block size of ``process``
ENV_FLOOR = 1e-4  # metafx.models.arx.ENV_FLOOR (repeated: the exported code must not import metafx)
ENV_CHUNK = 32  # sub-chunk of the one-pole (envelope and input filter) two-level scan
IIR_CHUNK = 256  # Toeplitz size of the recursive part's zero-state response
TABLE_RANGE = 2.0  # the pointwise MLP is tabulated over [-2, 2] (+6 dBFS); inputs beyond are clamped for it
TABLE_SIZE = 1 << 16  # intervals of that table (step 6.1e-5)
INV_LN10 = 1.0 / math.log(10.0)  # log10(v) = log(v) / ln 10 (torch's log10 is 4x slower than its log on CPU)


class ExportError(RuntimeError):
    """A model cannot be exported (unsupported architecture or option); the message says what to use."""


def _fft_len(T: int) -> int:
    """Smallest power of two >= 2T - 1 (linear convolution of two length-T signals, no wrap-around)."""
    n = 1
    while n < 2 * T - 1:
        n *= 2
    return n


def _conv_causal(u: Tensor, h: Tensor) -> Tensor:
    """Zero-state causal convolution of each row of ``u`` (..., T) with ``h`` (..., >= T), exact by FFT.

    ``y[n] = sum_{k<=n} h[k] u[n-k]`` for ``n < T``: only the first T samples of ``h`` matter, so a
    linear convolution over ``2T - 1`` samples is exact (no periodic wrap-around).
    """
    T = u.shape[-1]
    n = _fft_len(T)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h[..., :T], n=n), n=n)[..., :T]


def _iir_tables(a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Impulse response ``h`` (n,) of ``1 / A(z)`` and zero-input responses ``O`` (n, na).

    ``O[:, i]`` is the output of ``y[n] = -sum_k a_k y[n-k]`` with zero input when the past outputs
    ``[y[-na], ..., y[-1]]`` (oldest first) are the unit vector ``e_i``.
    """
    na = a.size - 1
    imp = np.zeros(n)
    imp[0] = 1.0
    h = lfilter([1.0], a, imp)
    O = np.zeros((n, na))
    for i in range(na):
        past = np.zeros(na)
        past[i] = 1.0
        zi = lfiltic([1.0], a, y=past[::-1])  # lfiltic wants y[-1], y[-2], ...
        O[:, i] = lfilter([1.0], a, np.zeros(n), zi=zi)[0]
    return h, O


def _scan_tables(alpha: Tensor, C: int, max_block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tables of the two-level one-pole scan (:meth:`ARXStream._scan`) for the poles ``alpha`` (P,), float64.

    Returns:
        ``(TT (P, C, C): sub-chunk zero-state responses (transposed Toeplitz), pw (P, C): a^(t+1), L (P, nj, nj):
        end-state carries a^(C (j - i)), Apow (P, nj): a^(C (j + 1)))`` with ``nj = max_block // C``.
    """
    dt = torch.float64
    t = torch.arange(C, dtype=dt)
    lag = t[:, None] - t[None, :]  # (C, C): t - k
    Tm = torch.where(lag >= 0, (1 - alpha)[:, None, None] * alpha[:, None, None] ** lag.clamp_min(0), 0.0)
    nj = max_block // C
    j = torch.arange(nj, dtype=dt)
    dj = j[:, None] - j[None, :]
    return (Tm.transpose(1, 2).contiguous(), alpha[:, None] ** (t[None] + 1),
            torch.where(dj >= 0, alpha[:, None, None] ** (C * dj.clamp_min(0)), 0.0), alpha[:, None] ** (C * (j[None] + 1)))


# --------------------------------------------------------------------------- ARX


class ARXStream(nn.Module):
    """A :class:`metafx.models.arx.MetaARX` with a fixed head, streaming (see the module docstring).

    Computation per block of T samples (float64 unless noted):

    * pointwise channels ``MLP(x)``: a table of the MLP on :data:`TABLE_SIZE` + 1 points over
      ``[-TABLE_RANGE, TABLE_RANGE]`` (float32 values), linearly interpolated (input clamped to
      the range: +6 dBFS); the head is fitted on these tabled features (:meth:`features`), so the
      model that is fitted is the model that runs. With ``n_filter`` input low-passes the MLP has
      several inputs and is computed directly (float64), no table;
    * the gates ``x sigmoid(MLP(log envelopes))``: the MLP in float32 with its ``tanh`` folded into
      sigmoids (``tanh z = 2 sigmoid(2 z) - 1``, the factors in its weights; a float64 ``tanh`` was
      the costliest op of a block), the head fitted on these same channels;
    * one-poles, the envelopes ``e[n] = (1 - a) |x[n]| + a e[n-1]`` and the input low-passes
      ``l[n] = (1 - a) x[n] + a l[n-1]`` in one bank: a two-level exact scan, sub-chunks of
      :data:`ENV_CHUNK` samples by a (C, C) lower-triangular Toeplitz product, their end states by
      a second triangular product of powers ``a^(C (j - i))``, then the carried state's
      ``a^(t+1)`` response;
    * the Wiener bank (when given): ``tanh(W [x, lp_1, .., lp_B] + c)``, (R, T), in float32 as
      ``2 sigmoid(2 .) - 1`` (its
      low-passes in the one-pole bank); its gain units ``x min(1, l / e)`` (float64) over the
      smoothed peak envelopes (peak followers by :meth:`_peaks`, their smoothing in the one-pole
      bank); the head is fitted on these same channels; a capture's dynamics units ``x min(1, l / e)``
      over one fitted envelope (a running-maximum hold, an attack one-pole, a release follower:
      :meth:`_dynamics`), float64;
    * FIR part: one product of the (nb, M) taps with the feature frames (the last ``nb - 1``
      carried), summed along the diagonals; the gain units have one tap (lag 0), so they are not
      framed: their weighted sum is one product with the block's gains, times x;
    * recursive part ``1 / A(z)``: per chunk of :data:`IIR_CHUNK` samples (a block of 256 is one
      chunk: one product and one update), the (C, C) Toeplitz matrix of its impulse response
      (zero-state) plus the (C, na) zero-input responses to the carried last ``na`` outputs.

    Args:
        model: the meta-model (its feature network is copied, float64).
        b: the head's MA coefficients, (M, nb); ``b[0, 1:]`` (DC lags) must be 0.
        a: the head's AR polynomial ``[1, a_1, ..., a_na]`` (stable: pole-clamped already).
        sample_rate: Hz; latency_samples: the capture's latency (information only).
        support: the dry support audio (T,): the BatchNorm statistics of a TCN trunk (needed only then).
        bank: a :class:`metafx.wiener.WienerBank` whose ``bank.n_units`` channels (curve units, anti-aliased
            (tuned) units, cascade units, then gain units) follow the model's (``b`` then has that many more rows),
            or None.

    Shape:
        forward: block (T,), state -> (T,), state. process: (T,) -> (T,). features: (T,) -> (M, T).

    Raises:
        ExportError: ``b`` or ``a`` of the wrong size or not finite.
    """

    def __init__(self, model: nn.Module, b: Tensor | None = None, a: Tensor | None = None, sample_rate: int = 48000,
                 latency_samples: int = 0, support: Tensor | None = None, bank: WienerBank | None = None):
        super().__init__()
        dt = torch.float64
        phi = model.phi
        self.trunk = _trunk_stream(phi, support)
        self.kind = "arx"
        self.streaming = True
        self.format_version = EXPORT_VERSION
        self.sample_rate = int(sample_rate)
        self.latency_samples = int(latency_samples)
        self.channels = int(phi.channels)
        self.nb, self.na = int(model.nb), int(model.na)
        self.n_point, self.n_env, self.n_gate, self.n_start = int(phi.n_point), int(phi.n_env), int(phi.n_gate), int(phi.n_start)
        self.n_filter = int(phi.n_filter)
        self.n_trunk = int(phi.n_trunk)
        self.n_bank = 0 if bank is None else bank.n_units  # Wiener bank channels, after the model's (metafx/wiener.py)
        self.n_curve = 0 if bank is None else bank.n_curves  # of them: curve, anti-aliased, cascade and gain units
        self.n_aa = 0 if bank is None else bank.n_aa
        self.n_gain = 0 if bank is None else bank.n_gains
        self.n_bank_lp = 0 if bank is None else bank.n_lowpass
        self.n_dyn = 0 if bank is None else bank.n_dynamics  # of the gain units: over the fitted envelope (last)
        self.n_grid = self.n_gain - self.n_dyn  # of the gain units: the seeded grid's
        self.n_peak = 0 if bank is None or not self.n_grid else int(bank.release.numel())  # peak followers
        self.n_attack = 0 if bank is None or not self.n_grid else int(bank.attack.numel())
        self.n_att = self.n_peak * self.n_attack  # smoothed peak envelopes (one-pole rows), release-major
        # one-pole rows: envelopes, input filters, bank low-passes, smoothed peak envelopes
        self.n_pole = self.n_env + self.n_filter + self.n_bank_lp + self.n_att
        self.gain_floor = GAIN_FLOOR  # an attribute of the file: the exported code does not import metafx
        self.channels += self.n_bank
        self.max_block = MAX_BLOCK
        self.env_floor = ENV_FLOOR
        self.inv_ln10 = INV_LN10
        self.env_chunk = ENV_CHUNK
        self.iir_chunk = IIR_CHUNK
        self.table_lo = -TABLE_RANGE
        self.table_inv_step = TABLE_SIZE / (2 * TABLE_RANGE)
        self.table_size = TABLE_SIZE
        self.ridge_scale = 1.0  # multiplier of the meta-learned ridge the head was fitted with (information)
        empty = torch.zeros(0, dtype=dt)
        with torch.no_grad():
            self.P1, self.p1b = empty.reshape(0, 0), empty
            self.P2, self.p2b = empty.reshape(0, 0), empty
            self.table = torch.zeros(0, 0)
            if self.n_point:
                W2, b2 = phi.p2.weight.detach()[:, :, 0].to(dt), phi.p2.bias.detach().to(dt)
                if self.n_filter:  # several inputs: the MLP itself
                    self.P1, self.p1b = phi.p1.weight.detach()[:, :, 0].to(dt), phi.p1.bias.detach().to(dt)
                    self.P2, self.p2b = W2, b2
                else:  # tabulated
                    grid = torch.linspace(-TABLE_RANGE, TABLE_RANGE, TABLE_SIZE + 1, dtype=dt)
                    w1, b1 = phi.p1.weight.detach().reshape(-1).to(dt), phi.p1.bias.detach().to(dt)
                    # the MLP's weights too (unused here): a native export (metafx/native_export.py) rebuilds the
                    # table from them rather than carrying its 2^16 points per channel as C source
                    self.P1, self.p1b, self.P2, self.p2b = w1[:, None].contiguous(), b1, W2, b2
                    tab = torch.tanh(grid[:, None] * w1[None] + b1[None]) @ W2.T + b2[None]  # (S + 1, n_point)
                    # (n_point, S + 2), one extra column (i + 1 at the top); channel-major, so a gather gives the
                    # (n_point, T) channels contiguous
                    self.table = torch.cat([tab, tab[-1:]]).T.to(torch.float32).contiguous()
            C = ENV_CHUNK
            poles: List[Tensor] = []
            if self.n_env:
                poles.append(torch.sigmoid(phi.env_logit.detach().to(dt)))  # (E,)
            if self.n_filter:
                poles.append(torch.sigmoid(phi.filt_logit.detach().to(dt)))  # (F,)
            if bank is not None and self.n_bank_lp:
                poles.append(bank.poles.detach().to(dt))  # (B,)
            if bank is not None and self.n_att:
                poles.append(bank.attack.detach().to(dt).repeat(self.n_peak))  # (Nr Na,): release-major
            if poles:
                # (n_pole,): envelopes, input low-passes, the bank's low-passes and attacks
                self.env_TT, self.env_pw, self.env_L, self.env_Apow = _scan_tables(torch.cat(poles), C, MAX_BLOCK)
            else:
                self.env_TT, self.env_pw = empty.reshape(0, 0, 0), empty.reshape(0, 0)
                self.env_L, self.env_Apow = empty.reshape(0, 0, 0), empty.reshape(0, 0)
            if self.n_gate:  # float32, tanh folded into sigmoids (see _features)
                f32 = torch.float32
                W1, b1 = phi.g1.weight.detach()[:, :, 0].to(dt), phi.g1.bias.detach().to(dt)
                W2, b2 = phi.g2.weight.detach()[:, :, 0].to(dt), phi.g2.bias.detach().to(dt)
                # sigmoid(2 (W2 tanh(W1 g + b1) + b2)), tanh(z) = 2 sigmoid(2 z) - 1:
                # = sigmoid(G2 sigmoid(G1 g + g1b) + g2b), G1 = 2 W1, g1b = 2 b1, G2 = 4 W2, g2b = 2 (b2 - W2 1)
                self.G1 = (2 * W1).to(f32).contiguous()
                self.g1b = (2 * b1).to(f32)[:, None].contiguous()
                self.G2 = (4 * W2).to(f32).contiguous()
                self.g2b = (2 * (b2 - W2.sum(1))).to(f32)[:, None].contiguous()
            else:
                self.G1, self.g1b = torch.zeros(0, 0), torch.zeros(0, 1)
                self.G2, self.g2b = torch.zeros(0, 0), torch.zeros(0, 1)
            if self.n_start:
                from metafx.models.arx import SAMPLE_RATE, START_TAU_MS
                self.start_tau = torch.logspace(math.log10(START_TAU_MS[0]), math.log10(START_TAU_MS[1]), self.n_start,
                                                dtype=dt) * 1e-3 * SAMPLE_RATE
            else:
                self.start_tau = empty
            # The bank in float32 (tanh of R x T values is the costliest step of a block in float64); the head
            # is fitted on these same float32 channels (features), so the fitted model is the model that runs.
            # tanh(z) = 2 sigmoid(2 z) - 1: the directions and offsets doubled here (a float32 sigmoid costs a
            # sixth of a tanh on CPU)
            self.bank_W = torch.zeros(0, 0) if bank is None else (2 * bank.weights.detach()).to(torch.float32).contiguous()
            self.bank_c = torch.zeros(0, 1) if bank is None else \
                (2 * bank.biases.detach()).to(torch.float32)[:, None].contiguous()
            # the anti-aliased units, float64 (their difference quotient needs the digits)
            self.aa_W = bank.aa_weights.detach().to(dt).contiguous() if self.n_aa else torch.zeros(0, 0, dtype=dt)
            self.aa_c = bank.aa_biases.detach().to(dt)[:, None].contiguous() if self.n_aa else torch.zeros(0, 1, dtype=dt)
            self.adaa_eps = ADAA_EPS
            # the cascade units (float64): the first curve's weights over [x, the bank's low-passes] and offset, the
            # one-poles of its output v (their own scan tables), the weights of [v, lp(v)..], the units' s and c
            self.n_cas = 0 if bank is None else bank.n_cascade
            self.n_cas_lp = 0 if not self.n_cas else int(bank.cas_poles.numel())
            if self.n_cas:
                self.cas_W = bank.cas_weights.detach().to(dt)[None].contiguous()  # (1, 1 + B)
                self.cas_c = torch.full((1, 1), float(bank.cas_bias), dtype=dt)
                self.cas_shift = -math.tanh(float(bank.cas_bias))
                self.cas_beta = bank.cas_beta.detach().to(dt)[None].contiguous()  # (1, 1 + J): over [v, lp_1(v), ..]
                self.cas_g = bank.cas_gains.detach().to(dt)[:, None].contiguous()
                self.cas_b = bank.cas_biases.detach().to(dt)[:, None].contiguous()
                self.cas_TT, self.cas_pw, self.cas_L, self.cas_Apow = _scan_tables(bank.cas_poles.detach().to(dt), C,
                                                                                   MAX_BLOCK)
            else:
                self.cas_W, self.cas_c = torch.zeros(0, 0, dtype=dt), torch.zeros(0, 1, dtype=dt)
                self.cas_shift = 0.0
                self.cas_beta = torch.zeros(0, 0, dtype=dt)
                self.cas_g, self.cas_b = torch.zeros(0, 1, dtype=dt), torch.zeros(0, 1, dtype=dt)
                self.cas_TT, self.cas_pw = empty.reshape(0, 0, 0), empty.reshape(0, 0)
                self.cas_L, self.cas_Apow = empty.reshape(0, 0, 0), empty.reshape(0, 0)
            # the gain units: log of the peak followers' coefficients (Nr,), the levels (Nl,)
            self.peak_logr = torch.log(bank.release.detach().to(dt)) if bank is not None and self.n_grid else empty
            self.gain_levels = bank.levels.detach().to(dt) if bank is not None and self.n_grid else empty
            # the dynamics units: the hold (samples), the attack one-pole's and the release follower's scan tables,
            # the log of the follower's coefficient, the levels (K3,)
            self.dyn_hold = 0 if not self.n_dyn else int(bank.dyn_hold)
            self.dyn_logr = 0.0 if not self.n_dyn else math.log(max(float(bank.dyn_release), 1e-300))
            self.dyn_levels = bank.dyn_levels.detach().to(dt) if self.n_dyn else empty
            if self.n_dyn:
                self.dyn_TT, self.dyn_pw, self.dyn_L, self.dyn_Apow = _scan_tables(
                    torch.tensor([float(bank.dyn_attack), float(bank.dyn_release)], dtype=dt), C, MAX_BLOCK)
            else:
                self.dyn_TT, self.dyn_pw = empty.reshape(0, 0, 0), empty.reshape(0, 0)
                self.dyn_L, self.dyn_Apow = empty.reshape(0, 0, 0), empty.reshape(0, 0)
        self.n_framed = self.channels - self.n_gain  # channels with nb taps (the gain units have one: lag 0)
        self.fir_W = torch.zeros(self.nb, self.n_framed, dtype=dt)
        self.gain_w = torch.zeros(self.n_gain, dtype=dt)  # the gain units' lag-0 coefficients
        self.iir_T = torch.zeros(IIR_CHUNK, IIR_CHUNK, dtype=dt)
        self.iir_O = torch.zeros(IIR_CHUNK, self.na, dtype=dt)
        self.a = torch.zeros(self.na + 1, dtype=dt)
        self.a[0] = 1.0
        if b is not None and a is not None:
            self.set_head(b, a)

    @torch.jit.unused
    def set_head(self, b: Tensor, a: Tensor) -> None:
        """Install a fitted head: ``b`` (M, nb), ``a`` (na + 1,) with ``a[0] = 1`` (already stable).

        Raises:
            ExportError: wrong sizes, ``a[0] != 1``, non-finite coefficients, or a gain unit's row of ``b``
                with a tap after lag 0 (the fit gives them lag 0 only, and the export computes only that).
        """
        b = b.detach().to(torch.float64).cpu()
        a = a.detach().to(torch.float64).cpu().reshape(-1)
        if tuple(b.shape) != (self.channels, self.nb) or a.numel() != self.na + 1:
            raise ExportError(f"ARX head of shape b {tuple(b.shape)}, a {tuple(a.shape)} does not fit the model "
                              f"(b ({self.channels}, {self.nb}), a ({self.na + 1},))")
        if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())) or abs(float(a[0]) - 1.0) > 1e-12:
            raise ExportError("ARX head has non-finite coefficients or a[0] != 1")
        if self.n_gain and bool((b[self.n_framed:, 1:] != 0).any()):
            raise ExportError("ARX head gives a Wiener gain unit taps after lag 0; fit it with "
                              "metafx.capture.adapt.ridge_fit_continuous(n_gain=...)")
        # (nb, M): row k multiplies X[:, t + k], i.e. lag nb - 1 - k
        self.fir_W = b[: self.n_framed].flip(-1).T.contiguous()
        self.gain_w = b[self.n_framed:, 0].contiguous()
        self.a = a.clone()
        if self.na:
            h, O = _iir_tables(a.numpy(), IIR_CHUNK)
            t = np.arange(IIR_CHUNK)
            lag = t[:, None] - t[None, :]
            self.iir_T = torch.from_numpy(np.where(lag >= 0, h[np.clip(lag, 0, None)], 0.0))  # Toeplitz, (C, C)
            self.iir_O = torch.from_numpy(O)

    @torch.jit.unused
    def head(self) -> Tuple[Tensor, Tensor]:
        """The installed head, as :meth:`set_head` took it.

        Returns:
            ``(b (M, nb), a (na + 1,))``, float64; the gain units' rows of ``b`` have their lag-0 tap only.
        """
        b = torch.zeros(self.channels, self.nb, dtype=torch.float64)
        b[: self.n_framed] = self.fir_W.T.flip(-1)
        b[self.n_framed:, 0] = self.gain_w
        return b, self.a.clone()

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        """Zero state: ``[one-poles, peak followers, the anti-aliased units' last inputs, the cascade's (its first
        curve's last input, its one-poles, its units' last inputs), the dynamics units' (the attack one-pole, the
        follower, the last hold |x| samples) (n_pole + n_peak + n_aa [+ 1 + J + K2] [+ 2 + hold],),
        samples so far (1,), last nb-1 feature frames of the framed channels (M - n_gain, nb-1), last na outputs
        (na,)]`` followed by the trunk's state (none without a trunk). An anti-aliased curve's input before the
        first sample is its offset (x, its low-passes and the cascade's v are 0 there)."""
        dt = torch.float64
        return [torch.cat([torch.zeros(self.n_pole + self.n_peak, dtype=dt), self.aa_c.reshape(-1),
                           self.cas_c.reshape(-1), torch.zeros(self.n_cas_lp, dtype=dt), self.cas_b.reshape(-1),
                           torch.zeros(2 + self.dyn_hold if self.n_dyn else 0, dtype=dt)]),
                torch.zeros(1, dtype=dt),
                torch.zeros(self.n_framed, self.nb - 1, dtype=dt), torch.zeros(self.na, dtype=dt)] \
            + self.trunk.initial_state()

    def _pointwise(self, x: Tensor, lp: Tensor) -> Tensor:
        """The pointwise MLP of x (tabulated), or of x and its low-passes ``lp`` (F, T) (computed), (n_point, T)."""
        if self.n_filter:
            h = torch.tanh(torch.addmm(self.p1b[:, None], self.P1, torch.cat([x[None], lp], 0)))
            return torch.addmm(self.p2b[:, None], self.P2, h)
        pos = (x.clamp(self.table_lo, -self.table_lo) - self.table_lo) * self.table_inv_step  # >= 0
        il = pos.to(torch.long).clamp_(0, self.table_size - 1)  # floor (pos >= 0)
        f = (pos - il).to(torch.float32)
        v0 = self.table.index_select(1, il)  # (n_point, T)
        return torch.lerp(v0, self.table.index_select(1, il + 1), f[None]).to(torch.float64)

    def _scan(self, u: Tensor, s: Tensor, TT: Tensor, L: Tensor, Apow: Tensor, pw: Tensor) -> Tensor:
        """One-poles ``e[n] = (1 - a) u[n] + a e[n-1]`` over ``u`` (1 or P, T) from the carried state ``s`` (P,), by the
        exact two-level scan with the tables of :func:`_scan_tables` (P poles), (P, T)."""
        T = u.shape[1]
        P = s.shape[0]
        C = self.env_chunk
        nch = (T + C - 1) // C
        if nch * C != T:
            u = torch.cat([u, u.new_zeros(u.shape[0], nch * C - T)], 1)
        U = u.reshape(u.shape[0], nch, C)
        Z = torch.matmul(U, TT)  # (P, nch, C): zero-state response of each sub-chunk
        S = torch.bmm(L[:, :nch, :nch], Z[:, :, C - 1:]).squeeze(2) + Apow[:, :nch] * s[:, None]
        prev = torch.cat([s[:, None], S[:, : nch - 1]], 1)  # state before each sub-chunk, (P, nch)
        env = Z + pw[:, None, :] * prev[:, :, None]
        return env.reshape(P, nch * C)[:, :T]

    def _peaks(self, x: Tensor, s: Tensor) -> Tensor:
        """The peak followers ``p[n] = max(|x[n]|, r p[n-1])`` over a block from their carried values ``s`` (Nr,).

        Exact as a max-plus scan: ``p[n] = max(r^(n+1) s, max_{k<=n} r^(n-k) |x[k]|)``, in the log
        domain ``n log r + cummax_k(log|x[k]| - k log r)`` (no overflow); |x| and ``s`` are floored
        at ``gain_floor``, far below any gain unit's level. Shape: x (T,), s (Nr,) -> (Nr, T).
        """
        T = x.shape[0]
        n = torch.arange(T, dtype=x.dtype)[None]  # (1, T)
        lr = self.peak_logr[:, None]  # (Nr, 1)
        lx = torch.log(x.abs().clamp_min(self.gain_floor))[None]
        run = torch.cummax(lx - n * lr, 1)[0] + n * lr
        carried = torch.log(s.clamp_min(self.gain_floor))[:, None] + (n + 1) * lr
        return torch.exp(torch.maximum(run, carried))

    def _dynamics(self, x: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """The dynamics units' envelope over a block (metafx.wiener.dynamics_envelope) from its state ``s`` =
        ``[the attack one-pole, the follower, the last hold |x| samples]``; returns ((T,), the new state).

        The hold is a running maximum over ``hold + 1`` samples by doubling windows (two overlapping powers of
        two cover any window); the follower ``e[n] = max(u[n], (1 - r) u[n] + r e[n-1])`` is the one-pole ``S`` of
        ``u`` from the carried ``e`` plus the largest restart ``r^(n-k) (u[k] - S[k])``, a log-domain running
        maximum (exact, no overflow)."""
        T = x.shape[0]
        H = self.dyn_hold
        a = torch.cat([s[2:], x.abs()])  # (H + T,)
        m = a
        if H:
            w = 1
            while 2 * w <= H + 1:  # m[i] = max a[i .. i + 2w - 1]
                m = torch.maximum(m[w:], m[:-w])
                w *= 2
            m = torch.maximum(m[:T], m[H + 1 - w:H + 1 - w + T])  # window [n, n + H] of a: [n - H, n] of x
        u = self._scan(m[None], s[:1], self.dyn_TT[:1], self.dyn_L[:1], self.dyn_Apow[:1], self.dyn_pw[:1])
        S = self._scan(u, s[1:2], self.dyn_TT[1:], self.dyn_L[1:], self.dyn_Apow[1:], self.dyn_pw[1:])[0]
        d = u[0] - S
        n = torch.arange(T, dtype=x.dtype)
        ld = torch.where(d > 0, torch.log(torch.where(d > 0, d, torch.ones_like(d))),
                         torch.full_like(d, float("-inf")))
        e = S + torch.exp(torch.cummax(ld - n * self.dyn_logr, 0)[0] + n * self.dyn_logr)
        return e, torch.cat([u[0, T - 1:], e[T - 1:], a[a.shape[0] - H:]])

    def _adaa(self, z: Tensor, z_before: Tensor) -> Tuple[Tensor, Tensor]:
        """Anti-aliased tanh of each row of ``z`` (K, T) after ``z_before`` (K,) (metafx.wiener.adaa_tanh, float64):
        ``(log cosh z[n] - log cosh z[n-1]) / (z[n] - z[n-1])``, the midpoint's tanh for steps below
        ``adaa_eps``. Returns the (K, T) outputs and the last inputs (K,)."""
        zz = torch.cat([z_before[:, None], z], 1)  # (K, T + 1)
        a = zz.abs()
        lc = a + torch.log1p(torch.exp(-2.0 * a))  # log cosh less log 2
        zp = zz[:, :-1]
        dz = z - zp
        small = dz.abs() < self.adaa_eps
        q = (lc[:, 1:] - lc[:, :-1]) / torch.where(small, torch.ones_like(dz), dz)
        return torch.where(small, torch.tanh(0.5 * (z + zp)), q), z[:, -1].clone()

    def _features(self, x: Tensor, env_s: Tensor, t0: Tensor, trunk_s: List[Tensor]
                  ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
        """Feature frames of one block (T <= MAX_BLOCK), float64; returns (the framed channels (M - n_gain, T), the
        gain units' gains ``min(1, l / e)`` (n_gain, T) (the channels are these times x), new one-pole and peak
        state, trunk state)."""
        T = x.shape[0]
        xi = x[None]  # (1, T)
        chans = [torch.ones_like(xi), xi]
        E = self.n_env
        F = self.n_filter
        poles = env_s
        aa_s = env_s[self.n_pole + self.n_peak:self.n_pole + self.n_peak + self.n_aa]
        o_cas = self.n_pole + self.n_peak + self.n_aa
        n_cas_s = 1 + self.n_cas_lp + self.n_cas if self.n_cas else 0
        cas_s = env_s[o_cas:o_cas + n_cas_s]
        dyn_s = env_s[o_cas + n_cas_s:]
        if self.n_pole:
            peak_s = env_s[self.n_pole:self.n_pole + self.n_peak]
            nx = self.n_pole - E - self.n_att  # rows driven by x: the input filters and the bank's low-passes
            if nx + self.n_att:  # rows: |x| for the envelopes, x for the low-passes, the peak followers
                rows = [x.abs()[None].expand(E, T)]
                if nx:
                    rows.append(xi.expand(nx, T))
                if self.n_att:
                    peak = self._peaks(x, peak_s)  # (Nr, T)
                    peak_s = peak[:, T - 1].clone()
                    rows.append(peak.repeat_interleave(self.n_attack, 0))  # (Nr Na, T), release-major
                u = torch.cat(rows, 0)
            else:
                u = x.abs()[None]
            poles = self._scan(u, env_s[: self.n_pole], self.env_TT, self.env_L, self.env_Apow, self.env_pw)
            env_s = torch.cat([poles[:, T - 1], peak_s])  # the anti-aliased units' part is added below
        if self.n_point:
            chans.append(self._pointwise(x, poles[E:E + F]))
        if E:
            env = poles[:E]
            le = torch.log(env.clamp_min(0) + self.env_floor) * self.inv_ln10 + 2  # log10, by the faster natural log
            if self.n_gate:  # the gate MLP in float32, its tanh as sigmoids (folded into G1, g1b, G2, g2b)
                gin = le
                if self.n_start:
                    tt = t0 + torch.arange(T, dtype=x.dtype)
                    gin = torch.cat([le, torch.exp(-tt[None] / self.start_tau[:, None])], 0)
                h = torch.sigmoid(torch.addmm(self.g1b, self.G1, gin.to(torch.float32)))
                g = torch.sigmoid(torch.addmm(self.g2b, self.G2, h))
                chans.append(xi * g.to(torch.float64))  # (n_gate, T)
            chans.append(0.25 * le)
        if self.n_trunk:
            f, trunk_s = self.trunk(x, trunk_s)
            chans.append(f)  # (n_trunk, T)
        if self.n_curve:
            lps = poles[E + F:E + F + self.n_bank_lp]
            bin64 = torch.cat([xi, lps], 0) if self.n_bank_lp else xi  # (1 + B, T)
            curves = torch.sigmoid(torch.addmm(self.bank_c, self.bank_W, bin64.to(torch.float32))).mul_(2.0).sub_(1.0)
            chans.append(curves.to(torch.float64))  # (R, T): tanh as 2 sigmoid(2 z) - 1
            if self.n_aa:
                aa, aa_s = self._adaa(torch.addmm(self.aa_c, self.aa_W, bin64), aa_s)
                chans.append(aa)  # (K, T)
                env_s = torch.cat([env_s, aa_s])
            if self.n_cas:  # v = ADAA tanh(u) - tanh(c1); w = beta . [v, lp(v)..]; units ADAA tanh(s w + c)
                J = self.n_cas_lp
                v, u_last = self._adaa(torch.addmm(self.cas_c, self.cas_W, bin64), cas_s[:1])
                v = v + self.cas_shift  # (1, T)
                lpv = self._scan(v, cas_s[1:1 + J], self.cas_TT, self.cas_L, self.cas_Apow, self.cas_pw)  # (J, T)
                w = torch.mm(self.cas_beta, torch.cat([v, lpv], 0))  # (1, T)
                cas, z_last = self._adaa(torch.addmm(self.cas_b, self.cas_g, w), cas_s[1 + J:])
                chans.append(cas)  # (K2, T)
                env_s = torch.cat([env_s, u_last, lpv[:, T - 1], z_last])
        gains = x.new_zeros(0, T)
        if self.n_grid:
            env = poles[self.n_pole - self.n_att:].clamp_min(self.gain_floor)  # (Nr Na, T): smoothed peaks
            gains = (self.gain_levels[None, :, None] / env[:, None, :]).clamp_max(1.0).reshape(self.n_grid, T)
        if self.n_dyn:
            e, dyn_s = self._dynamics(x, dyn_s)
            gains = torch.cat([gains, (self.dyn_levels[:, None] / e.clamp_min(self.gain_floor)[None]).clamp_max(1.0)])
            env_s = torch.cat([env_s, dyn_s])
        return torch.cat(chans, 0), gains, env_s, trunk_s  # the grid's gains envelope-major, level-minor

    def _block(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        T = x.shape[0]
        nb = self.nb
        phi, gains, env_s, trunk_s = self._features(x, state[0], state[1], state[4:])
        # tap k applied to every frame, the carried nb - 1 frames and this block's apart (the frames are not copied
        # together), (nb, nb - 1 + T)
        Zf = torch.cat([torch.mm(self.fir_W, state[2]), torch.mm(self.fir_W, phi)], 1)
        u = Zf.as_strided([nb, T], [T + nb, 1]).sum(0)  # u[t] = sum_k Zf[k, t + k]
        if self.n_gain:  # the gain units at lag 0: x times their weighted gains
            u = u + x * torch.mv(gains.t(), self.gain_w)
        if T >= nb - 1:
            hist = phi[:, T - (nb - 1):]
        else:
            hist = torch.cat([state[2], phi], 1)[:, T:]
        past = state[3]
        if self.na:
            ys: List[Tensor] = []
            start = 0
            while start < T:  # a block of up to IIR_CHUNK samples is one chunk
                c = min(self.iir_chunk, T - start)
                # zero-state Toeplitz product plus the carried outputs' response
                yc = torch.addmv(torch.mv(self.iir_O[:c], past), self.iir_T[:c, :c], u[start:start + c])
                # the last na outputs, oldest first: a new tensor, not a view of the output the host owns
                past = torch.cat([past, yc])[c:]
                ys.append(yc)
                start += c
            y = torch.cat(ys) if len(ys) > 1 else ys[0]
        else:
            y = u
        return y, [env_s, state[1] + T, hist, past] + trunk_s

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """Process one block with the carried state.

        Args:
            x: float32 (or float64) mono block, (T,), T >= 1.
            state: from :meth:`initial_state` or the previous call.

        Returns:
            ``(y (T,) in x's dtype, new state)``.
        """
        xd = x.to(torch.float64)
        T = xd.shape[0]
        if T <= self.max_block:
            y, state = self._block(xd, state)
            return y.to(x.dtype), state
        outs: List[Tensor] = []
        start = 0
        while start < T:
            stop = min(T, start + self.max_block)
            y, state = self._block(xd[start:stop], state)
            outs.append(y)
            start = stop
        return torch.cat(outs).to(x.dtype), state

    @torch.jit.export
    def process(self, x: Tensor) -> Tensor:
        """The whole signal from a zero state (``forward`` over blocks of PROCESS_BLOCK samples)."""
        y, _ = self.forward(x, self.initial_state())
        return y

    @torch.jit.export
    def features(self, x: Tensor) -> Tensor:
        """The feature frames of a whole signal from a zero state (what the head is fitted on), (M, T), float64."""
        xd = x.to(torch.float64)
        state = self.initial_state()
        env_s, t, trunk_s = state[0], state[1], state[4:]
        outs: List[Tensor] = []
        start = 0
        while start < xd.shape[0]:
            stop = min(xd.shape[0], start + self.max_block)
            phi, gains, env_s, trunk_s = self._features(xd[start:stop], env_s, t, trunk_s)
            t = t + (stop - start)
            outs.append(torch.cat([phi, xd[start:stop][None] * gains], 0) if self.n_gain else phi)
            start = stop
        return torch.cat(outs, 1)


class _NoTrunk(nn.Module):
    """No network trunk: no features, no state."""

    def initial_state(self) -> List[Tensor]:
        out: List[Tensor] = []
        return out

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        return torch.zeros([0, x.shape[0]], dtype=x.dtype), state


class _LSTMTrunk(nn.Module):
    """The projected hidden sequence of an LSTM trunk, float64; state ``[h (1, 1, H), c (1, 1, H)]``."""

    def __init__(self, trunk: nn.Module, proj: nn.Module):
        super().__init__()
        self.lstm = copy.deepcopy(trunk.lstm).to(torch.float64)
        self.hidden = int(self.lstm.hidden_size)
        self.W = proj.weight.detach()[:, :, 0].to(torch.float64).clone()  # (n_trunk, H)
        self.b = proj.bias.detach().to(torch.float64).clone()

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        return [torch.zeros(1, 1, self.hidden, dtype=torch.float64), torch.zeros(1, 1, self.hidden, dtype=torch.float64)]

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """x (T,) float64 -> (n_trunk, T), new state."""
        seq, hc = self.lstm(x[None, :, None], (state[0], state[1]))  # (1, T, H)
        return torch.addmm(self.b[:, None], self.W, seq[0].t()), [hc[0], hc[1]]


class _TCNTrunk(nn.Module):
    """The projected last-block channels of a TCN trunk, BatchNorm frozen at given statistics; per-block histories."""

    def __init__(self, trunk: nn.Module, proj: nn.Module, bn_stats: List[Tuple[Tensor, Tensor]]):
        super().__init__()
        if len(bn_stats) != len(trunk.blocks):
            raise ExportError(f"TCN trunk export: {len(bn_stats)} BatchNorm statistics for {len(trunk.blocks)} blocks")
        self.stack = _StatefulChain([_FrozenTCNBlock(b, m, v, None) for b, (m, v) in zip(trunk.blocks, bn_stats)])
        self.proj = copy.deepcopy(proj).to(torch.float32)
        # The model pads its input with zeros (TCN.features), so before the first sample every block has seen
        # silence: its input history is the previous block's constant response to silence, not zeros.
        silence: List[Tensor] = []
        with torch.no_grad():
            h = torch.zeros(1, 1, 1)
            for blk in self.stack.blocks:
                hist = h.expand(1, blk.in_ch, blk.shrink).contiguous()
                silence.append(hist)
                h = blk(h, hist)[0]
        self.silence = silence

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        out: List[Tensor] = []
        for s in self.silence:
            out.append(s.clone())
        return out

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """x (T,) -> (n_trunk, T) float64, new state (computed in float32, like the network)."""
        h, new = self.stack(x.to(torch.float32).reshape(1, 1, -1), state)
        return self.proj(h)[0].to(torch.float64), new


def _trunk_stream(phi: nn.Module, support: Tensor | None) -> nn.Module:
    """The streaming trunk of a MetaARX feature map (:class:`_NoTrunk` without one).

    Raises:
        ExportError: a trunk that cannot stream (the transformer), or a TCN trunk without ``support``.
    """
    trunk = getattr(phi, "trunk", None)
    if trunk is None:
        return _NoTrunk()
    if isinstance(getattr(trunk, "lstm", None), nn.LSTM):
        return _LSTMTrunk(trunk, phi.proj)
    if hasattr(trunk, "blocks") and hasattr(trunk, "receptive_field"):  # the TCN
        if support is None:
            raise ExportError("an ARX head on a TCN trunk needs the support audio (its BatchNorm statistics)")
        x = support.detach().to("cpu", torch.float32).reshape(1, 1, -1)
        net = copy.deepcopy(trunk).eval().to("cpu", torch.float32)
        return _TCNTrunk(net, phi.proj, bn_statistics(net, x, run=lambda: net.features(x)))
    raise ExportError(f"no streaming export of an ARX head on a {type(trunk).__name__} trunk (attention has no state "
                      "to carry across blocks): use model.arx.features lstm, tcn, learned or none to capture")


# --------------------------------------------------------------------------- LSTM


class LSTMStream(nn.Module):
    """An adapted :class:`metafx.models.lstm.LSTMModel` with its context folded in; state ``(h, c)``.

    Args:
        net: the adapted LSTM model (weights copied).
        ctx: the adapted FiLM context (1, context_dim) or None.
        sample_rate, latency_samples: see :class:`ARXStream`.
    """

    def __init__(self, net: nn.Module, ctx: Tensor | None = None, sample_rate: int = 48000, latency_samples: int = 0):
        super().__init__()
        self.kind = "lstm"
        self.streaming = True
        self.format_version = EXPORT_VERSION
        self.sample_rate = int(sample_rate)
        self.latency_samples = int(latency_samples)
        H = int(net.hidden)
        self.hidden = H
        self.skip = bool(net.skip)
        self.lstm = nn.LSTM(1, H, num_layers=1, batch_first=True)
        with torch.no_grad():
            src = net.lstm
            w_ih = src.weight_ih_l0.detach().clone()
            b_ih = src.bias_ih_l0.detach().clone()
            w_head = net.head.weight.detach().clone()  # (1, H)
            b_head = net.head.bias.detach().clone()  # (1,)
            if net.context_dim:
                c = (torch.zeros(1, net.context_dim) if ctx is None else ctx.detach().reshape(1, -1)).to(w_ih.dtype)
                b_ih = b_ih + (w_ih[:, 1:] @ c[0])  # the context is a constant input at every step
                gamma, beta = net.film(c).chunk(2, dim=-1)  # (1, H) each
                b_head = b_head + (w_head * beta).sum(-1)
                w_head = w_head * (1 + gamma)
            self.lstm.weight_ih_l0.copy_(w_ih[:, :1])
            self.lstm.bias_ih_l0.copy_(b_ih)
            self.lstm.weight_hh_l0.copy_(src.weight_hh_l0.detach())
            self.lstm.bias_hh_l0.copy_(src.bias_hh_l0.detach())
        self.w_head = w_head.reshape(H)
        self.b_head = b_head.reshape(1)

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        """Zero state ``[h (1, 1, H), c (1, 1, H)]``."""
        return [torch.zeros(1, 1, self.hidden), torch.zeros(1, 1, self.hidden)]

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """One block (T,) with the carried ``(h, c)``; returns ``(y (T,), [h, c])``."""
        xf = x.to(torch.float32)
        out, hc = self.lstm(xf.reshape(1, -1, 1), (state[0], state[1]))
        y = torch.mv(out[0], self.w_head) + self.b_head
        if self.skip:
            y = y + xf
        return y.to(x.dtype), [hc[0], hc[1]]

    @torch.jit.export
    def process(self, x: Tensor) -> Tensor:
        """The whole signal from a zero state."""
        y, _ = self.forward(x, self.initial_state())
        return y


# --------------------------------------------------------------------------- TCN


class _FrozenTCNBlock(nn.Module):
    """A TCN block with BatchNorm frozen at given statistics and FiLM folded to a per-channel affine map."""

    def __init__(self, block: nn.Module, mean: Tensor, var: Tensor, ctx: Tensor | None):
        super().__init__()
        self.conv = copy.deepcopy(block.conv)
        self.act = copy.deepcopy(block.act)
        self.res = copy.deepcopy(block.res)
        self.shrink = int(block.shrink)
        self.in_ch = int(block.conv.in_channels)
        with torch.no_grad():
            bn = block.bn
            scale = bn.weight.detach() / torch.sqrt(var.detach() + bn.eps)
            self.bn_scale = scale.reshape(-1, 1)
            self.bn_shift = (bn.bias.detach() - mean.detach() * scale).reshape(-1, 1)
            C = scale.numel()
            fs, fb = torch.ones(C), torch.zeros(C)
            if hasattr(block, "film") and ctx is not None:
                g, bt = block.film(ctx.reshape(1, -1)).chunk(2, dim=-1)
                fs, fb = 1 + g[0], bt[0]
            self.film_scale = fs.detach().reshape(-1, 1)
            self.film_shift = fb.detach().reshape(-1, 1)

    def forward(self, x: Tensor, hist: Tensor) -> Tuple[Tensor, Tensor]:
        """x (1, C_in, T), hist (1, C_in, shrink) -> (1, C_out, T), new hist."""
        xx = torch.cat([hist, x], 2)
        h = self.act(self.conv(xx) * self.bn_scale + self.bn_shift)
        h = h * self.film_scale + self.film_shift
        return h + self.res(x), xx[:, :, xx.shape[2] - self.shrink:]


class _StatefulChain(nn.Module):
    """Streaming layers run in order over one block, layer i carrying ``state[i]`` (TCN blocks, SSM layers).

    Each layer maps ``(h, its state) -> (h, its new state)``.
    """

    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """The last layer's output and every layer's new state."""
        new: List[Tensor] = []
        i = 0
        for blk in self.blocks:
            h, s = blk(h, state[i])
            new.append(s)
            i += 1
        return h, new


class TCNStream(nn.Module):
    """An adapted :class:`metafx.models.tcn.TCN`, BatchNorm frozen at the support statistics; per-layer histories.

    Args:
        net: the adapted TCN.
        bn_stats: per block ``(mean, var)`` of its BatchNorm input on the adapted support slices.
        ctx: the adapted FiLM context or None.
    """

    def __init__(self, net: nn.Module, bn_stats: List[Tuple[Tensor, Tensor]], ctx: Tensor | None = None,
                 sample_rate: int = 48000, latency_samples: int = 0):
        super().__init__()
        self.kind = "tcn"
        self.streaming = True
        self.format_version = EXPORT_VERSION
        self.sample_rate = int(sample_rate)
        self.latency_samples = int(latency_samples)
        if len(bn_stats) != len(net.blocks):
            raise ExportError(f"TCN export: {len(bn_stats)} BatchNorm statistics for {len(net.blocks)} blocks")
        self.stack = _StatefulChain([_FrozenTCNBlock(b, m, v, ctx) for b, (m, v) in zip(net.blocks, bn_stats)])
        self.head = copy.deepcopy(net.head)
        self.shapes = [(int(b.in_ch), int(b.shrink)) for b in self.stack.blocks]

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        """Zero state: per block its last ``dilation * (kernel - 1)`` input samples, (1, C_in, shrink)."""
        out: List[Tensor] = []
        for cs in self.shapes:
            out.append(torch.zeros(1, cs[0], cs[1]))
        return out

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        h, new = self.stack(x.to(torch.float32).reshape(1, 1, -1), state)
        return self.head(h).reshape(-1).to(x.dtype), new

    @torch.jit.export
    def process(self, x: Tensor) -> Tensor:
        y, _ = self.forward(x, self.initial_state())
        return y


# --------------------------------------------------------------------------- SSM


class _SSMLayer(nn.Module):
    """One SSM block with complex modal state; FiLM folded to a per-channel affine map."""

    def __init__(self, block: nn.Module, ctx: Tensor | None):
        super().__init__()
        dt = torch.float64
        with torch.no_grad():
            nu = block.log_nu.detach().to(dt).exp()
            norm = torch.sqrt(-torch.expm1(-2.0 * nu))
            b = torch.complex(block.b_re.detach().to(dt) * norm, block.b_im.detach().to(dt) * norm)
            c = torch.complex(block.c_re.detach().to(dt), block.c_im.detach().to(dt))
            self.w = c * b  # (C, N): y = Re(sum_n w_n s_n), s_n[t] = lam_n s_n[t-1] + h[t]
            self.loglam = torch.complex(-nu, block.theta.detach().to(dt))  # log lambda, (C, N)
            k = torch.arange(MAX_BLOCK + 1, dtype=dt)
            lam_k = torch.exp(self.loglam[:, :, None] * k)  # (C, N, MAX + 1)
            self.kernel = (self.w[:, :, None] * lam_k[:, :, :MAX_BLOCK]).real.sum(1)  # (C, MAX)
            self.d = block.d.detach().to(dt).reshape(-1, 1)
            self.mix_w = block.mix.weight.detach()[:, :, 0].to(dt)
            self.mix_b = block.mix.bias.detach().to(dt).reshape(-1, 1)
            C = self.d.shape[0]
            fs, fb = torch.ones(C, dtype=dt), torch.zeros(C, dtype=dt)
            if hasattr(block, "film") and ctx is not None:
                g, bt = block.film(ctx.reshape(1, -1).to(block.film.weight.dtype)).chunk(2, dim=-1)
                fs, fb = (1 + g[0]).to(dt), bt[0].to(dt)
            self.film_scale = fs.reshape(-1, 1)
            self.film_shift = fb.reshape(-1, 1)
        self.cache_T = -1
        self.pow_fwd = torch.zeros(0, 0, 0, dtype=torch.complex128)  # lam^(t+1), t < T
        self.pow_rev = torch.zeros(0, 0, 0, dtype=torch.complex128)  # lam^(T-1-k), k < T

    def forward(self, h: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """h (C, T) float64, s (C, N) complex128 -> (C, T), new s."""
        T = h.shape[1]
        if T != self.cache_T:
            k = torch.arange(T, dtype=torch.float64)
            self.pow_fwd = torch.exp(self.loglam[:, :, None] * (k + 1))
            self.pow_rev = torch.exp(self.loglam[:, :, None] * (T - 1 - k))
            self.cache_T = T
        y = _conv_causal(h, self.kernel)  # zero-state, (C, T)
        y = y + torch.bmm((self.w * s)[:, None, :], self.pow_fwd)[:, 0].real  # response to the carried state
        s_new = self.pow_fwd[:, :, T - 1] * s + torch.bmm(self.pow_rev, h.to(torch.complex128)[:, :, None])[:, :, 0]
        y = y + self.d * h
        z = torch.addmm(self.mix_b, self.mix_w, F.gelu(y))
        z = z * self.film_scale + self.film_shift
        return h + z, s_new


class SSMStream(nn.Module):
    """An adapted :class:`metafx.models.ssm.SSM`, streaming with complex modal states (float64 inside)."""

    def __init__(self, net: nn.Module, ctx: Tensor | None = None, sample_rate: int = 48000, latency_samples: int = 0):
        super().__init__()
        self.kind = "ssm"
        self.streaming = True
        self.format_version = EXPORT_VERSION
        self.sample_rate = int(sample_rate)
        self.latency_samples = int(latency_samples)
        dt = torch.float64
        with torch.no_grad():
            self.in_w = net.inp.weight.detach()[:, 0, 0].to(dt).reshape(-1, 1)
            self.in_b = net.inp.bias.detach().to(dt).reshape(-1, 1)
            self.head_w = net.head.weight.detach()[0, :, 0].to(dt)
            self.head_b = net.head.bias.detach().to(dt)
        self.layers = _StatefulChain([_SSMLayer(b, ctx) for b in net.blocks])
        self.skip = bool(net.skip)
        self.C, self.N = int(net.channels), int(net.state)
        self.max_block = MAX_BLOCK

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        """Zero state: one complex (C, N) modal state per layer."""
        out: List[Tensor] = []
        for _ in range(len(self.layers.blocks)):
            out.append(torch.zeros(self.C, self.N, dtype=torch.complex128))
        return out

    def _block(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        h, new = self.layers(self.in_w * x[None] + self.in_b, state)  # (C, T)
        y = torch.mv(h.t(), self.head_w) + self.head_b
        if self.skip:
            y = y + x
        return y, new

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        xd = x.to(torch.float64)
        outs: List[Tensor] = []
        start = 0
        while start < xd.shape[0]:
            stop = min(xd.shape[0], start + self.max_block)
            y, state = self._block(xd[start:stop], state)
            outs.append(y)
            start = stop
        if len(outs) == 0:
            return x.clone(), state
        return torch.cat(outs).to(x.dtype), state

    @torch.jit.export
    def process(self, x: Tensor) -> Tensor:
        y, _ = self.forward(x, self.initial_state())
        return y


# --------------------------------------------------------------------------- whole-file


class WindowedExport(nn.Module):
    """A slice-trained model over a long signal by overlapping windows (``predict_long``); no streaming.

    Args:
        net: a traced or scriptable module mapping (B, 1, window) -> (B, 1, window') (the adapted
            model with its context bound).
        window: the training slice length; out_len: the model's output length for it.
    """

    def __init__(self, net: nn.Module, window: int, out_len: int, sample_rate: int = 48000, latency_samples: int = 0):
        super().__init__()
        self.kind = "windowed"
        self.streaming = False
        self.format_version = EXPORT_VERSION
        self.sample_rate = int(sample_rate)
        self.latency_samples = int(latency_samples)
        self.net = net
        self.window = int(window)
        self.hop = max(1, min(window // 2, out_len))

    @torch.jit.export
    def initial_state(self) -> List[Tensor]:
        return []

    def forward(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        raise RuntimeError("this exported model is whole-file only (attention has no state to carry): use process(x)")

    @torch.jit.export
    def process(self, x: Tensor) -> Tensor:
        T = x.shape[0]
        W, hop = self.window, self.hop
        n_win = (T + hop - 1) // hop
        xp = torch.cat([x.new_zeros(W - hop), x, x.new_zeros(n_win * hop - T)])
        frames = xp.unfold(0, W, hop)[:n_win]  # (n_win, W)
        outs: List[Tensor] = []
        for i in range(0, n_win, 16):
            f = frames[i:i + 16]
            k = f.shape[0]
            if k < 16:  # the network was traced with batches of 16 windows
                f = torch.cat([f, f.new_zeros(16 - k, W)])
            outs.append(self.net(f[:, None])[:k, 0, -hop:])
        return torch.cat(outs).reshape(-1)[:T]


class _BoundContext(nn.Module):
    def __init__(self, net: nn.Module, ctx: Tensor | None):
        super().__init__()
        self.net = net
        self.ctx = ctx

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) if self.ctx is None else self.net(x, self.ctx)


# --------------------------------------------------------------------------- building, saving, timing


def bn_statistics(net: nn.Module, support_x: Tensor, ctx: Tensor | None = None,
                  run: Callable[[], Any] | None = None) -> List[Tuple[Tensor, Tensor]]:
    """Mean and (biased) variance per channel at every BatchNorm input of ``net`` on the support slices.

    Args:
        net: the adapted TCN (its BatchNorms use batch statistics).
        support_x: (K, 1, L).
        ctx: the FiLM context or None.
        run: what to call instead of ``net(support_x[, ctx])`` (a TCN trunk: its ``features``).

    Returns:
        One ``(mean (C,), var (C,))`` per BatchNorm, in module order.
    """
    stats: List[Tuple[Tensor, Tensor]] = []

    def hook(_m: nn.Module, inp: tuple, _out: Tensor) -> None:
        z = inp[0].detach()
        stats.append((z.mean((0, 2)), z.var((0, 2), unbiased=False)))

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    try:
        with torch.no_grad():
            if run is not None:
                run()
            else:
                net(support_x) if ctx is None else net(support_x, ctx)
    finally:
        for h in hs:
            h.remove()
    return stats


def export_network(net: nn.Module, arch: str, ctx: Tensor | None, support_x: Tensor, window: int, sample_rate: int,
                   latency_samples: int) -> nn.Module:
    """The exportable module of an adapted network (gradient methods; the ARX has :class:`ARXStream`).

    Args:
        net: the adapted network (weights baked in; not modified).
        arch: ``model.arch`` (lstm, tcn, ssm, transformer).
        ctx: the adapted FiLM context (CAVIA, encoder) or None.
        support_x: the support slices (K, 1, L): the TCN's frozen BatchNorm statistics.
        window: the training slice length (whole-file export).
        sample_rate, latency_samples: recorded on the module.

    Returns:
        An eager module with the exported API; script it with :func:`script`.

    Raises:
        ExportError: an unknown architecture.
    """
    net = copy.deepcopy(net).eval().to("cpu", torch.float32)
    ctx = None if ctx is None else ctx.detach().to("cpu", torch.float32)
    if arch == "lstm":
        return LSTMStream(net, ctx, sample_rate, latency_samples)
    if arch == "tcn":
        return TCNStream(net, bn_statistics(net, support_x.to("cpu", torch.float32), ctx), ctx, sample_rate,
                         latency_samples)
    if arch == "ssm":
        return SSMStream(net, ctx, sample_rate, latency_samples)
    if arch == "transformer":
        bound = _BoundContext(net, ctx).eval()
        with torch.no_grad():
            out_len = int(bound(torch.zeros(1, 1, window)).shape[-1])
            with warnings.catch_warnings():  # the model's shape checks are constants for a fixed window
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(bound, torch.zeros(16, 1, window), check_trace=False)
        return WindowedExport(traced, window, out_len, sample_rate, latency_samples)
    raise ExportError(f"no export for model.arch {arch!r}; exportable: arx, lstm, tcn, ssm, transformer")


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of an export module (frozen for inference: ``eval`` and no gradients)."""
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return torch.jit.script(module)


def save(module: nn.Module, path: Path) -> Path:
    """Script (if needed) and save to ``path`` (``torch.jit.save``); returns the path."""
    sm = module if isinstance(module, torch.jit.ScriptModule) else script(module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(sm, str(path))
    return path


def real_time_factor(module: nn.Module, block: int = 256, seconds: float = 5.0, threads: int = 1,
                     seed: int = 0) -> float:
    """Seconds of audio processed per second of wall time by ``forward`` over blocks of ``block`` samples.

    The wall-time figure of :func:`real_time_factors`.

    Returns:
        The real-time factor (> 1: faster than real time).
    """
    return real_time_factors(module, block, seconds, threads, seed)[0]


def real_time_factors(module: nn.Module, block: int = 256, seconds: float = 5.0, threads: int = 1,
                      seed: int = 0) -> tuple[float, float]:
    """Seconds of audio processed per second of wall time, and per second of this process's CPU time.

    ``forward`` over blocks of ``block`` samples (``process`` on the whole signal for a module
    that does not stream); noise at -18 dBFS RMS, at the module's sample rate, on ``threads``
    intra-op threads (restored after); a warm-up of 20 blocks first (TorchScript optimizes on the
    first calls). The CPU-time figure does not count other processes of a shared machine.

    Returns:
        ``(wall-time factor, CPU-time factor)`` (> 1: faster than real time).
    """
    sr = int(module.sample_rate)
    g = torch.Generator().manual_seed(seed)
    n_blocks = max(1, int(seconds * sr) // block)
    x = torch.randn(n_blocks + 20, block, generator=g) * 10 ** (-18 / 20)
    audio = n_blocks * block / sr
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            if not bool(module.streaming):
                t, c = time.perf_counter(), time.process_time()
                module.process(x[20:].reshape(-1))
            else:
                state = module.initial_state()
                for i in range(20):
                    _, state = module(x[i], state)
                t, c = time.perf_counter(), time.process_time()
                for i in range(20, n_blocks + 20):
                    _, state = module(x[i], state)
            return audio / (time.perf_counter() - t), audio / (time.process_time() - c)
    finally:
        torch.set_num_threads(old)


__all__ = ["ARXStream", "EXPORT_VERSION", "ExportError", "LSTMStream", "MAX_BLOCK", "PROCESS_BLOCK", "SSMStream",
           "TCNStream", "WindowedExport", "bn_statistics", "export_network", "real_time_factor", "save", "script"]
