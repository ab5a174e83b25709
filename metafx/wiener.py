"""The Wiener bank: fixed random nonlinear channels of pre-filtered input, offered to a capture's ARX head.

A ridge ARX head adapts only the linear weights of its channels. The meta-learned pointwise
channels of :class:`metafx.models.arx.Features` are functions of x alone, so an effect with a
filter *before* its nonlinearity (the tube clipper's pre-emphasis, the fuzz's and the amp's input
stages), different for every device, is out of the head's reach: a model of the same architecture
trained from scratch on the support does no better (benchmarks/capture.md), and meta-learned input
low-passes (``model.arx.n_filter``) help those effects but hurt the memoryless and ladder families
(benchmarks/capture_filters.md).

The bank offers such curves as a random-feature basis instead: ``R`` units
``tanh(g_r d_r . [x, lp_1(x), .., lp_F(x)] + c_r)`` with ``F`` fixed one-pole low-passes
``lp[n] = (1 - a) x[n] + a lp[n - 1]`` (corners log-spaced over :data:`LOWPASS_HZ`), unit
directions ``d_r`` drawn at random (x's component kept positive, so every unit sees the input
itself), gains ``g_r`` log-spaced over 1..100 with alternating sign (drives up to 40 dB at
-18 dBFS), offsets ``c_r`` uniform in [-1, 1]. A pre-filter ``x + c hp(x)`` followed by a curve is
then near a linear combination of units, and the head's FIR taps on every unit supply the filter
after the curve (Wiener-Hammerstein). The bank is the same for every capture (seeded): it is not
meta-learned, and the capture keeps it only where a cross-validation on the support says it helps
(:func:`metafx.capture.adapt.ridge_fit_continuous`), so families the meta-features already fit are
left as they were.

This module only defines the bank; :class:`metafx.export.ARXStream` computes its channels (the
exported model carries the bank's numbers, not this code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

WIENER_UNITS = 48  # units of the bank a capture offers its head (0: none); measured in benchmarks/capture.md
WIENER_LOWPASSES = 3  # fixed input low-passes the units look along
LOWPASS_HZ = (100.0, 6000.0)  # corner range of those low-passes, log-spaced
GAIN_RANGE = (1.0, 100.0)  # unit input gains, log-spaced, alternating sign
WIENER_RIDGE = 1e-2  # relative ridge of the bank's head coefficients (to the mean Gram diagonal), prior mean 0
WIENER_SEED = 0  # the bank is the same for every capture
# The bank is offered only where the support holds at least this many equations per coefficient of the head
# with it (48 units x 8 taps + the model's 229: 613 coefficients -> 39k equations, 0.8 s at 48 kHz). Chosen on
# the shipped study's validation settings (benchmarks/capture_bank_rule.md): at 0.5 s of support (39 per
# coefficient) the cross-validation keeps the bank where it hurts as often as where it helps; from 1 s (78) on
# it helps.
WIENER_MIN_EQUATIONS = 64


@dataclass(frozen=True)
class WienerBank:
    """A bank of ``R`` units over x and ``F`` one-pole low-passes of x.

    Attributes:
        poles: one-pole coefficients ``a`` of the low-passes, (F,), float64, in (0, 1).
        weights: each unit's input weights over ``[x, lp_1, .., lp_F]`` (gain times direction), (R, 1 + F), float64.
        biases: each unit's offset, (R,), float64.
    """

    poles: Tensor
    weights: Tensor
    biases: Tensor

    @property
    def n_units(self) -> int:
        """R: channels the bank adds."""
        return int(self.weights.shape[0])

    @property
    def n_lowpass(self) -> int:
        """F: input low-passes."""
        return int(self.poles.numel())


def make_bank(n_units: int = WIENER_UNITS, n_lowpass: int = WIENER_LOWPASSES, sample_rate: int = 48000,
              seed: int = WIENER_SEED) -> WienerBank:
    """The seeded bank (see the module docstring).

    Args:
        n_units: R >= 1.
        n_lowpass: F >= 0 (0: curves of x alone).
        sample_rate: Hz, for the low-pass corners.
        seed: the random directions and offsets.

    Returns:
        The :class:`WienerBank`.

    Raises:
        ValueError: ``n_units < 1`` or ``n_lowpass < 0``.
    """
    if n_units < 1 or n_lowpass < 0:
        raise ValueError(f"a Wiener bank needs n_units >= 1 and n_lowpass >= 0 (got {n_units}, {n_lowpass})")
    rng = np.random.default_rng(seed)
    fc = np.logspace(math.log10(LOWPASS_HZ[0]), math.log10(LOWPASS_HZ[1]), n_lowpass)
    poles = np.exp(-2 * math.pi * fc / sample_rate)
    d = rng.standard_normal((n_units, 1 + n_lowpass))
    d[:, 0] = np.abs(d[:, 0]) + 0.5
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    g = np.logspace(math.log10(GAIN_RANGE[0]), math.log10(GAIN_RANGE[1]), n_units) \
        * np.where(np.arange(n_units) % 2 == 0, 1.0, -1.0)
    c = rng.uniform(-1.0, 1.0, n_units)
    return WienerBank(torch.from_numpy(poles), torch.from_numpy(g[:, None] * d), torch.from_numpy(c))


def bank_channels(bank: WienerBank, x: np.ndarray) -> np.ndarray:
    """The bank's channels of a whole signal from a zero state, float64, (R, T): a reference (scipy) computation.

    The exported model computes the same channels block by block (:class:`metafx.export.ARXStream`);
    tests compare the two.
    """
    from scipy.signal import lfilter

    x = np.asarray(x, dtype=np.float64)
    rows = [x] + [lfilter([1.0 - a], [1.0, -a], x) for a in bank.poles.tolist()]
    return np.tanh(bank.weights.numpy() @ np.stack(rows) + bank.biases.numpy()[:, None])


__all__ = ["GAIN_RANGE", "LOWPASS_HZ", "WIENER_LOWPASSES", "WIENER_MIN_EQUATIONS", "WIENER_RIDGE", "WIENER_SEED",
           "WIENER_UNITS", "WienerBank", "bank_channels", "make_bank"]
