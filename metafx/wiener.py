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

With ``dynamics`` (the default) the bank also holds *gain units* for level-dependent effects
(limiters, compressors), whose gain follows the input's level with memory, which no curve of the
input's current value and no linear filter can follow: ``x[n] min(1, l / e[n])`` for levels ``l``
log-spaced over :data:`GAIN_LEVELS_DB` and envelopes ``e`` that are instant-attack peak followers
``p[n] = max(|x[n]|, r p[n - 1])`` (release times :data:`RELEASE_S`) smoothed by a one-pole
(attack times :data:`ATTACK_S`): the gain law of a peak limiter, ``ceiling / envelope`` capped at
1, and sums of them any falling gain curve. The peak follower is a max-plus recursion, so a block
computes it exactly from the carried state: ``log p[n] = max(log p[-1] + (n + 1) log r,
n log r + cummax_k(log|x[k]| - k log r))``. Gain units enter the head at lag 0 only (one
coefficient each: a level detector's gain has no filter after it). Measured on the shipped study's
validation settings (benchmarks/capture_bank_rule.md) and its test settings (benchmarks/capture.md).

A capture adds *tuned units* to the bank (:meth:`WienerBank.with_tuned_units`, fitted by
:mod:`metafx.capture.tuned_units`): anti-aliased curves (:func:`adaa_tanh`) along one direction of x
and one more low-pass, both fitted to the support; they are channels of the bank like the others
(after the curve units, before the gain units), kept or left out with it.

A capture whose tuned units leave much of the support unexplained may also add *cascade units*
(:meth:`WienerBank.with_cascade_units`, fitted by :mod:`metafx.capture.cascade_units`): a second curve
after a filter of a first one, for effects built as two nonlinear stages with a filter between (an
amp's preamp, tone stack and power stage): ``v = ADAA tanh(w1 . [x, lp..] + c1) - tanh(c1)``, ``w =
beta . [v, lp_1(v), .., lp_J(v)]`` over fixed one-poles of ``v``, units ``ADAA tanh(s_k w + c_k)``
(after the tuned units, before the gain units).

A capture whose tuned units fall short may also add *dynamics units* (:meth:`WienerBank.with_dynamics_units`,
fitted by :mod:`metafx.capture.dynamics_units`): gain units ``x min(1, l / e)`` like the grid's, over one
envelope with fitted times in a peak limiter's order (:func:`dynamics_envelope`: a peak hold, an
attack one-pole, a release follower), after the grid's gain units and at lag 0 as they are.

This module only defines the bank; :class:`metafx.export.ARXStream` computes its channels (the
exported model carries the bank's numbers, not this code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

WIENER_UNITS = 48  # units of the bank a capture offers its head (0: none); measured in benchmarks/capture.md
WIENER_LOWPASSES = 3  # fixed input low-passes the units look along
LOWPASS_HZ = (100.0, 6000.0)  # corner range of those low-passes, log-spaced
GAIN_RANGE = (1.0, 100.0)  # unit input gains, log-spaced, alternating sign
WIENER_RIDGE = 1e-2  # relative ridge of the bank's head coefficients (to the mean Gram diagonal), prior mean 0
WIENER_SEED = 0  # the bank is the same for every capture
WIENER_DYNAMICS = True  # the bank also holds gain units (peak-envelope gains, for limiters and compressors)
RELEASE_S = (0.005, 0.05, 0.5)  # release times of the gain units' peak followers, seconds
ATTACK_S = (0.0002, 0.002, 0.02)  # attack times (one-pole smoothing of each peak follower), seconds
GAIN_LEVELS_DB = (-50.0, 0.0, 6)  # the gain units' levels l: from, to (dBFS), count (log-spaced)
ADAA_EPS = 1e-4  # steps of an anti-aliased unit's input below this use the midpoint tanh (see adaa_tanh)
GAIN_FLOOR = 1e-9  # envelopes are floored here before the division (silence: gain 1)
# The bank is offered only where the support holds at least this many equations per coefficient of the head
# with it (48 curve units x 8 taps + 54 gain units x 1 tap + the model's 229: 667 coefficients -> 43k equations,
# 0.9 s at 48 kHz). Chosen on the shipped study's validation settings (benchmarks/capture_bank_rule.md): at 0.5 s
# of support (36 per coefficient) the cross-validation keeps the bank where it hurts about as often as where it
# helps; from 1 s (72) on it helps.
WIENER_MIN_EQUATIONS = 64


@dataclass(frozen=True)
class WienerBank:
    """A bank of ``R`` units over x and ``F`` one-pole low-passes of x.

    Attributes:
        poles: one-pole coefficients ``a`` of the low-passes, (F,), float64, in (0, 1).
        weights: each curve unit's input weights over ``[x, lp_1, .., lp_F]`` (gain times direction), (R, 1 + F),
            float64.
        biases: each curve unit's offset, (R,), float64.
        release: the gain units' peak-follower coefficients ``r`` (Nr,), float64, in (0, 1); empty: no gain units.
        attack: the one-pole coefficients smoothing each follower (Na,), float64, in [0, 1).
        levels: the gain units' levels ``l`` (linear), (Nl,), float64, > 0.
        aa_weights, aa_biases: the anti-aliased (tuned) units' weights over ``[x, lp_1, .., lp_F]`` (K, 1 + F) and
            offsets (K,); empty in the seeded bank.
        cas_weights, cas_bias: the cascade's first curve ``ADAA tanh(cas_weights . [x, lp..] + cas_bias)``, (1 + F,)
            and a number; ``cas_poles``: the one-poles of its output ``v`` (J,); ``cas_beta``: the weights of ``[v,
            lp_1(v), .., lp_J(v)]`` (J + 1,); ``cas_gains``, ``cas_biases``: the cascade units ``ADAA tanh(s w + c)``
            (K2,); all empty (no cascade) in the seeded bank.
        dyn_hold, dyn_attack, dyn_release, dyn_levels: the dynamics units ``x min(1, l / e)`` over one fitted
            envelope ``e = follow_release(smooth_attack(max of |x| over the last dyn_hold + 1 samples))``
            (:func:`dynamics_envelope`): the hold in samples, the attack one-pole's and the release follower's
            coefficients (in [0, 1)) and the units' levels (K3,); no levels (no units) in the seeded bank.
    """

    poles: Tensor
    weights: Tensor
    biases: Tensor
    release: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    attack: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    levels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    aa_weights: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    aa_biases: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cas_weights: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cas_bias: float = 0.0
    cas_poles: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cas_beta: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cas_gains: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cas_biases: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    dyn_hold: int = 0
    dyn_attack: float = 0.0
    dyn_release: float = 0.0
    dyn_levels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    @property
    def n_curves(self) -> int:
        """R: curve units ``tanh(w . [x, lp..] + c)``."""
        return int(self.weights.shape[0])

    @property
    def n_aa(self) -> int:
        """K: anti-aliased curve units ``ADAA tanh(w . [x, lp..] + c)`` (:func:`adaa_tanh`), fitted to a capture
        (:mod:`metafx.capture.tuned_units`); 0 in the seeded bank."""
        return int(self.aa_weights.shape[0])

    @property
    def n_cascade(self) -> int:
        """K2: cascade units ``ADAA tanh(s w + c)`` over a filtered first curve (:mod:`metafx.capture.cascade_units`);
        0 in the seeded bank."""
        return int(self.cas_gains.numel())

    @property
    def n_framed(self) -> int:
        """Units with the head's ``nb`` taps: the curve units, the anti-aliased units and the cascade units."""
        return self.n_curves + self.n_aa + self.n_cascade

    @property
    def n_envelopes(self) -> int:
        """Nr x Na: smoothed peak envelopes, release-major."""
        return int(self.release.numel() * self.attack.numel())

    @property
    def n_grid_gains(self) -> int:
        """Nr x Na x Nl: the seeded grid's gain units ``x min(1, l / e)``, envelope-major; 0 without dynamics."""
        return self.n_envelopes * int(self.levels.numel())

    @property
    def n_dynamics(self) -> int:
        """K3: dynamics units ``x min(1, l / e)`` over a fitted envelope (:mod:`metafx.capture.dynamics_units`);
        0 in the seeded bank."""
        return int(self.dyn_levels.numel())

    @property
    def n_gains(self) -> int:
        """Every channel at lag 0 only: the grid's gain units, then the dynamics units."""
        return self.n_grid_gains + self.n_dynamics

    @property
    def n_units(self) -> int:
        """Channels the bank adds: the curve units, the anti-aliased units, the cascade units, then the gain units."""
        return self.n_framed + self.n_gains

    def head_coefficients(self, nb: int) -> int:
        """Coefficients the bank adds to a head of ``nb`` taps (:func:`head_coefficients`)."""
        return head_coefficients(self.n_framed, self.n_gains, nb)

    def with_tuned_units(self, pole: float, weights: np.ndarray, biases: np.ndarray) -> "WienerBank":
        """This bank plus anti-aliased units over a new low-pass (a capture's fitted units).

        Args:
            pole: the new one-pole low-pass coefficient, in [0, 1), appended to ``poles``.
            weights: the new units' weights over ``[x, lp_1, .., lp_F, lp_new]`` (K, F + 2).
            biases: their offsets (K,).

        Returns:
            A new :class:`WienerBank` (the curve units get a zero weight on the new low-pass).
        """
        F = self.n_lowpass
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if tuple(w.shape) != (w.shape[0], F + 2) or not 0.0 <= pole < 1.0:
            raise ValueError(f"tuned units need weights (K, {F + 2}) and a pole in [0, 1), got {tuple(w.shape)}, {pole}")
        old = self.aa_weights if self.n_aa else torch.zeros(0, F + 1, dtype=torch.float64)
        grown = self._with_lowpass(pole)
        return replace(grown, aa_weights=torch.cat([_pad_column(old), w]),
                       aa_biases=torch.cat([self.aa_biases, torch.as_tensor(np.asarray(biases, dtype=np.float64))]))

    def _with_lowpass(self, pole: float) -> "WienerBank":
        """This bank with one more input low-pass: every unit's weights get a zero column for it."""
        return replace(self, poles=torch.cat([self.poles, torch.tensor([float(pole)], dtype=torch.float64)]),
                       weights=_pad_column(self.weights), aa_weights=_pad_column(self.aa_weights) if self.n_aa
                       else self.aa_weights,
                       cas_weights=_pad_column(self.cas_weights[None])[0] if self.n_cascade else self.cas_weights)

    def with_cascade_units(self, pole: float, weights: np.ndarray, bias: float, v_poles: np.ndarray,
                           beta: np.ndarray, gains: np.ndarray, biases: np.ndarray) -> "WienerBank":
        """This bank plus cascade units over a new input low-pass (a capture's fitted cascade; replaces any other).

        Args:
            pole: the new input low-pass coefficient, in [0, 1), appended to ``poles``.
            weights: the first curve's weights over ``[x, lp_1, .., lp_F, lp_new]`` (F + 2,).
            bias: its offset c1.
            v_poles: the one-poles of the first curve's output (J,), in [0, 1).
            beta: the weights of ``[v, lp_1(v), .., lp_J(v)]`` (J + 1,).
            gains, biases: the units' ``s`` and ``c`` (K2,).

        Returns:
            A new :class:`WienerBank`.

        Raises:
            ValueError: sizes that do not match, a pole outside [0, 1), or non-finite numbers.
        """
        F = self.n_lowpass
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        vp = np.asarray(v_poles, dtype=np.float64).reshape(-1)
        be = np.asarray(beta, dtype=np.float64).reshape(-1)
        g = np.asarray(gains, dtype=np.float64).reshape(-1)
        c = np.asarray(biases, dtype=np.float64).reshape(-1)
        ok = (w.size == F + 2 and be.size == vp.size + 1 and g.size == c.size and g.size > 0 and 0.0 <= pole < 1.0
              and bool(np.all((vp >= 0) & (vp < 1))) and all(np.all(np.isfinite(a)) for a in (w, vp, be, g, c))
              and math.isfinite(bias))
        if not ok:
            raise ValueError(f"cascade units need weights ({F + 2},), beta (J + 1,) for J v-poles in [0, 1), gains and "
                             f"biases of one size and an input pole in [0, 1); got {w.size}, {be.size}, {vp.size}, "
                             f"{g.size}, {c.size}, {pole}")
        t = lambda a: torch.from_numpy(a.copy())  # noqa: E731
        return replace(self._with_lowpass(pole), cas_weights=t(w), cas_bias=float(bias), cas_poles=t(vp),
                       cas_beta=t(be), cas_gains=t(g), cas_biases=t(c))

    def with_dynamics_units(self, hold: int, attack: float, release: float, levels: np.ndarray) -> "WienerBank":
        """This bank plus dynamics units over one envelope (a capture's fitted units; replaces any other).

        Args:
            hold: the peak hold in samples, >= 0 (the envelope's input is the max of |x| over the last
                ``hold + 1`` samples).
            attack: the one-pole coefficient smoothing the held peak, in [0, 1).
            release: the follower's coefficient (instant rise, one-pole fall), in [0, 1).
            levels: the units' levels ``l`` (K3,), > 0.

        Returns:
            A new :class:`WienerBank`.

        Raises:
            ValueError: a negative hold, a coefficient outside [0, 1), no levels or a level <= 0 or not finite.
        """
        lv = np.asarray(levels, dtype=np.float64).reshape(-1)
        if not (int(hold) == hold and hold >= 0 and 0.0 <= attack < 1.0 and 0.0 <= release < 1.0 and lv.size > 0
                and bool(np.all(np.isfinite(lv) & (lv > 0)))):
            raise ValueError(f"dynamics units need a hold >= 0 samples, attack and release coefficients in [0, 1) and "
                             f"levels > 0; got {hold}, {attack}, {release}, {lv.tolist()}")
        return replace(self, dyn_hold=int(hold), dyn_attack=float(attack), dyn_release=float(release),
                       dyn_levels=torch.from_numpy(lv.copy()))

    @property
    def n_lowpass(self) -> int:
        """F: input low-passes."""
        return int(self.poles.numel())


def _pad_column(m: Tensor) -> Tensor:
    """``m`` (N, C) with a zero column appended, (N, C + 1)."""
    return torch.cat([m, torch.zeros(m.shape[0], 1, dtype=m.dtype)], 1)


def head_coefficients(n_curves: int, n_gains: int, nb: int) -> int:
    """Coefficients a bank of ``n_curves`` curve units and ``n_gains`` gain units adds to a head of ``nb`` taps.

    ``nb`` per curve unit (framed like the model's channels), one per gain unit (lag 0 only).
    """
    return n_curves * nb + n_gains


def lowpass_pole(fc: np.ndarray | float, sample_rate: int) -> np.ndarray | float:
    """The coefficient ``a`` of the one-pole low-pass ``lp[n] = (1 - a) x[n] + a lp[n - 1]`` of corner ``fc`` Hz."""
    return np.exp(-2 * math.pi * np.asarray(fc, dtype=np.float64) / sample_rate)


def time_constant_pole(tau: np.ndarray | float, sample_rate: int) -> np.ndarray | float:
    """The one-pole coefficient ``exp(-1 / (tau sr))`` of time constant ``tau`` s (Faust's ``ba.tau2pole``): the gain
    units' attack and release, the dynamics units' times."""
    return np.exp(-1.0 / (np.asarray(tau, dtype=np.float64) * sample_rate))


def make_bank(n_units: int = WIENER_UNITS, n_lowpass: int = WIENER_LOWPASSES, sample_rate: int = 48000,
              seed: int = WIENER_SEED, dynamics: bool = WIENER_DYNAMICS) -> WienerBank:
    """The seeded bank (see the module docstring).

    Args:
        n_units: R >= 1 curve units.
        n_lowpass: F >= 0 (0: curves of x alone).
        sample_rate: Hz, for the low-pass corners and the gain units' time constants.
        seed: the random directions and offsets.
        dynamics: add the gain units (``len(RELEASE_S) x len(ATTACK_S) x GAIN_LEVELS_DB[2]`` of them).

    Returns:
        The :class:`WienerBank`.

    Raises:
        ValueError: ``n_units < 1`` or ``n_lowpass < 0``.
    """
    if n_units < 1 or n_lowpass < 0:
        raise ValueError(f"a Wiener bank needs n_units >= 1 and n_lowpass >= 0 (got {n_units}, {n_lowpass})")
    rng = np.random.default_rng(seed)
    fc = np.logspace(math.log10(LOWPASS_HZ[0]), math.log10(LOWPASS_HZ[1]), n_lowpass)
    poles = lowpass_pole(fc, sample_rate)
    d = rng.standard_normal((n_units, 1 + n_lowpass))
    d[:, 0] = np.abs(d[:, 0]) + 0.5
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    g = np.logspace(math.log10(GAIN_RANGE[0]), math.log10(GAIN_RANGE[1]), n_units) \
        * np.where(np.arange(n_units) % 2 == 0, 1.0, -1.0)
    c = rng.uniform(-1.0, 1.0, n_units)
    if not dynamics:
        return WienerBank(torch.from_numpy(poles), torch.from_numpy(g[:, None] * d), torch.from_numpy(c))
    release = time_constant_pole(RELEASE_S, sample_rate)
    attack = time_constant_pole(ATTACK_S, sample_rate)
    levels = 10.0 ** (np.linspace(GAIN_LEVELS_DB[0], GAIN_LEVELS_DB[1], int(GAIN_LEVELS_DB[2])) / 20.0)
    return WienerBank(torch.from_numpy(poles), torch.from_numpy(g[:, None] * d), torch.from_numpy(c),
                      torch.from_numpy(release), torch.from_numpy(attack), torch.from_numpy(levels))


def adaa_tanh(z: np.ndarray, z_before: np.ndarray) -> np.ndarray:
    """First-order antiderivative anti-aliased tanh along the last axis: the mean of tanh over each step.

    ``y[n] = (F(z[n]) - F(z[n-1])) / (z[n] - z[n-1])`` with ``F = log cosh`` (Parker, Zavalishin and Le
    Bivic 2016; Faust's ``aa.tanh1``), ``tanh((z[n] + z[n-1]) / 2)`` where the step is below
    :data:`ADAA_EPS` (the quotient loses its digits there; the midpoint's error is ``dz^2 / 24``).
    A curve driven hard by a pre-emphasized input aliases at 48 kHz; a device (analog, or a plugin
    with anti-aliasing) does not, and no linear combination of aliased curves cancels that: units of
    this form are what let a capture reach the tube clipper's and the fuzz's output
    (metafx/capture/tuned_units.py). :class:`metafx.export.ARXStream` computes the same in torch.

    Args:
        z: the unit inputs, (..., T), float64.
        z_before: each row's input before the first sample, (..., 1).

    Returns:
        (..., T), float64.
    """
    zp = np.concatenate([z_before, z[..., :-1]], -1)
    dz = z - zp
    small = np.abs(dz) < ADAA_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (_logcosh(z) - _logcosh(zp)) / np.where(small, 1.0, dz)
    return np.where(small, np.tanh(0.5 * (z + zp)), q)


def _logcosh(z: np.ndarray) -> np.ndarray:
    """``log cosh z`` without overflow, less its constant ``log 2`` (it cancels in :func:`adaa_tanh`)."""
    a = np.abs(z)
    return a + np.log1p(np.exp(-2.0 * a))


def tuned_channels(bank: WienerBank, x: np.ndarray) -> np.ndarray:
    """The bank's anti-aliased (tuned) units over a whole signal from a zero state, float64, (n_aa, T).

    What a capture adds to the channels it has already computed without them (the low-passes the
    units do not look along are skipped); :func:`bank_channels` and :class:`metafx.export.ARXStream`
    compute the same (tests compare them to 1e-10).
    """
    x = np.asarray(x, dtype=np.float64)
    z = _input_mix(bank, bank.aa_weights.numpy(), bank.aa_biases.numpy()[:, None], x)
    return adaa_tanh(z, bank.aa_biases.numpy()[:, None])  # zero state: x[-1] = lp[-1] = 0


def _input_mix(bank: WienerBank, W: np.ndarray, c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W [x, lp_1(x), .., lp_F(x)] + c`` over the bank's low-passes from zero, (K, T); the low-passes no row looks
    along are skipped. ``W``: (K, 1 + F); ``c``: (K, 1)."""
    from scipy.signal import lfilter

    z = W[:, :1] * x[None] + c
    for k, a in enumerate(bank.poles.tolist()):
        if np.any(W[:, 1 + k] != 0):
            z = z + W[:, 1 + k: 2 + k] * lfilter([1.0 - a], [1.0, -a], x)[None]
    return z


def cascade_channels(bank: WienerBank, x: np.ndarray) -> np.ndarray:
    """The bank's cascade units over a whole signal from a zero state, float64, (n_cascade, T): a reference.

    ``v = ADAA tanh(u) - tanh(c1)`` with ``u = cas_weights . [x, lp..] + c1`` (``u = c1`` before the first
    sample), ``w = beta . [v, lp_1(v), ..]`` (one-poles of ``v`` from zero), units ``ADAA tanh(s w + c)`` (their
    input before the first sample: ``c``). :class:`metafx.export.ARXStream` computes the same block by block.
    """
    from scipy.signal import lfilter

    x = np.asarray(x, dtype=np.float64)
    c1 = float(bank.cas_bias)
    u = _input_mix(bank, bank.cas_weights.numpy()[None], np.array([[c1]]), x)[0]
    v = adaa_tanh(u[None], np.array([[c1]]))[0] - math.tanh(c1)
    beta = bank.cas_beta.numpy()
    w = beta[0] * v
    for j, a in enumerate(bank.cas_poles.tolist()):
        w = w + beta[1 + j] * lfilter([1.0 - a], [1.0, -a], v)
    c = bank.cas_biases.numpy()[:, None]
    return adaa_tanh(bank.cas_gains.numpy()[:, None] * w[None] + c, c)


def dynamics_envelope(x: np.ndarray, hold: int, attack: float, release: float) -> np.ndarray:
    """The dynamics units' envelope of a whole signal from a zero state, float64, (T,).

    ``h[n] = max(|x[n - hold]|, .., |x[n]|)`` (a peak hold), ``u = (1 - a) h[n] + a u[n - 1]`` (the attack
    one-pole), ``e[n] = max(u[n], (1 - r) u[n] + r e[n - 1])`` (a follower that rises at once and falls by a
    one-pole toward its input: Faust's ``an.peak_envelope``): the detector of a peak limiter
    (``co.limiter_lad_mono``: peak hold, attack smoothing, release follower, gain ``min(1, ceiling / e)``),
    with a sliding window for its hold (Faust's ``ba.peakholder`` holds one peak until a higher one or a time-out).

    The follower's recursion is not linear, but it is the largest of the one-pole's continuations from every
    restart: with ``S`` the one-pole of ``u`` from zero, ``e[n] = S[n] + max(0, max_{k <= n} r^(n-k) (u[k] - S[k]))``,
    a running maximum in the log domain (numpy here, block by block in :class:`metafx.export.ARXStream`; tests
    compare both to the sample loop).
    """
    from scipy.ndimage import maximum_filter1d
    from scipy.signal import lfilter

    a = np.abs(np.asarray(x, dtype=np.float64))
    H = int(hold)
    h = maximum_filter1d(a, H + 1, origin=H // 2, mode="constant") if H > 0 else a  # window [n - H, n]
    u = lfilter([1.0 - attack], [1.0, -attack], h)
    S = lfilter([1.0 - release], [1.0, -release], u)
    d = u - S
    n = np.arange(a.size)
    lr = math.log(max(release, 1e-300))
    with np.errstate(divide="ignore"):
        ld = np.where(d > 0, np.log(np.where(d > 0, d, 1.0)), -np.inf)
    return S + np.exp(np.maximum.accumulate(ld - n * lr) + n * lr)


def dynamics_channels(bank: WienerBank, x: np.ndarray) -> np.ndarray:
    """The bank's dynamics units ``x min(1, l / e)`` over a whole signal from a zero state, float64, (n_dynamics, T)
    (:func:`dynamics_envelope`)."""
    x = np.asarray(x, dtype=np.float64)
    e = dynamics_envelope(x, bank.dyn_hold, bank.dyn_attack, bank.dyn_release)
    return x[None] * np.minimum(1.0, bank.dyn_levels.numpy()[:, None] / np.maximum(e, GAIN_FLOOR)[None])


def bank_channels(bank: WienerBank, x: np.ndarray) -> np.ndarray:
    """The bank's channels of a whole signal from a zero state, float64, (n_units, T): a reference computation.

    Written as the recursions themselves (scipy's ``lfilter`` for the one-poles, a sample loop for the
    peak followers); the exported model computes the same channels block by block
    (:class:`metafx.export.ARXStream`) and tests compare the two.
    """
    from scipy.signal import lfilter

    x = np.asarray(x, dtype=np.float64)
    rows = np.stack([x] + [lfilter([1.0 - a], [1.0, -a], x) for a in bank.poles.tolist()])
    out = [np.tanh(bank.weights.numpy() @ rows + bank.biases.numpy()[:, None])]
    if bank.n_aa:
        out.append(tuned_channels(bank, x))
    if bank.n_cascade:
        out.append(cascade_channels(bank, x))
    if bank.n_grid_gains:
        r = bank.release.numpy()
        peak = np.zeros((r.size, x.size))
        p = np.zeros(r.size)
        for n, v in enumerate(np.abs(x)):
            p = np.maximum(v, r * p)
            peak[:, n] = p
        env = [lfilter([1.0 - a], [1.0, -a], peak[i]) for i in range(r.size) for a in bank.attack.tolist()]
        for e in env:
            out.append(x[None] * np.minimum(1.0, bank.levels.numpy()[:, None] / np.maximum(e, GAIN_FLOOR)[None]))
    if bank.n_dynamics:
        out.append(dynamics_channels(bank, x))
    return np.concatenate(out, 0)


__all__ = ["ADAA_EPS", "ATTACK_S", "GAIN_FLOOR", "GAIN_LEVELS_DB", "GAIN_RANGE", "LOWPASS_HZ", "RELEASE_S", "WIENER_DYNAMICS",
           "WIENER_LOWPASSES", "WIENER_MIN_EQUATIONS", "WIENER_RIDGE", "WIENER_SEED", "WIENER_UNITS", "WienerBank",
           "adaa_tanh", "bank_channels", "cascade_channels", "dynamics_channels", "dynamics_envelope", "head_coefficients", "lowpass_pole", "make_bank", "time_constant_pole",
           "tuned_channels"]
