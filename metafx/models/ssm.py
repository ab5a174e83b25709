"""Diagonal linear state-space model (LRU / S4D style), computed by FFT convolution.

What. A stack of ``layers`` blocks of ``channels`` (C) channels. In every block, each
channel ``c`` is a linear time-invariant filter with ``state`` (N) complex diagonal
modes: the recurrence

    s_n[t] = lambda_n s_n[t-1] + B_n h[t],      y[t] = Re(sum_n Cc_n s_n[t]) + D h[t]

(one per channel, zero initial state), whose impulse response is

    k[t] = Re(sum_n Cc_n B_n lambda_n^t)  (+ D at t = 0),   lambda_n = exp(-nu_n + i theta_n),

with ``nu = exp(log_nu) > 0`` (pole radius ``r = exp(-nu) < 1``: stable for any value of
the parameter) and ``theta`` the pole angle in radians per sample. The recurrence is never
stepped: the kernel ``k`` of length T is built in closed form and convolved with the
input by FFT, so the whole slice is processed in parallel (Gu et al. 2022, S4D; Orvieto
et al. 2023, LRU). Between the linear filters: pointwise GELU, a 1x1 channel mixing,
optional FiLM by a task context, and a residual connection::

    in:    Conv1d 1x1, 1 -> C                                   (B, 1, T) -> (B, C, T)
    block: u = h + FiLM(mix(GELU(k * h + D h)))                  (B, C, T) -> (B, C, T)
    head:  Conv1d 1x1, C -> 1  (+ the dry input with ``skip``)  (B, C, T) -> (B, 1, T)

Why. A linear filter's impulse response is exactly a sum of decaying complex
exponentials, one per pole (partial fractions), so one channel of one block can
represent any stable linear filter of order <= 2N (real filters: conjugate pole
pairs, the real part does the pairing). The paper's Moog ladder and diode ladder
families are such filters with nonlinearities around them; the GELU and the channel
mixing between blocks supply (static) nonlinearities. The poles are parameters, so the
inner loop can move a resonance directly, and the receptive field is the whole slice
at no extra cost (unlike the TCN's).

Parametrization and init (per channel and mode; all real parameters of shape (C, N)):

* ``log_nu``: ``-log r = exp(log_nu)`` drawn log-uniformly in ``[-log r_max, -log r_min]``
  (time constants spread evenly over the decades between the two radii);
* ``theta``: uniform in ``[0, pi]`` (the real part makes negative angles redundant);
* ``b_re, b_im``: input coefficient ``B``, N(0, 1/2) per part (``E|B|^2 = 1``); it is
  multiplied in ``forward`` by ``sqrt(1 - r^2)`` (the LRU's normalization, recomputed
  from the current pole so an adapted pole near the unit circle does not blow up the
  gain): a mode fed white noise then has the variance of its input;
* ``c_re, c_im``: output coefficient ``Cc``, N(0, 1/N) per part, so the sum of N modes
  (halved by the real part) has about unit variance for white noise;
* ``d`` (C,): direct term, N(0, 1).

``lambda^t`` is evaluated as ``exp(t log lambda) = exp(-nu t) (cos(theta t) + i sin(theta t))``
with the real and imaginary parts written out (the same numbers as complex arithmetic, in
real tensors), so float64 and second-order autograd work as for any real model.

Causality: the kernel is causal and the FFT length is at least ``2T - 1`` (rounded up
to a power of two), so the circular convolution equals the linear one on the first T
samples: no wrap-around. Output sample t depends on input samples 0..t only (up to
floating-point rounding of the FFT, about 1e-16 relative in float64). Every slice
starts from a zero state. No buffers; ``forward`` is a pure function of the parameters.

Cost per block, batch B and T samples: kernel O(C N T) (independent of B; a batched
matrix product of two O(C N sqrt(T)) tables of powers, see :meth:`SSMBlock.kernel`),
convolution O(B C T log T) by FFT, mixing O(B C^2 T). Parameters: ``2C`` (in) ``+ layers * (6 C N + C
+ C^2 + C)`` ``+ C + 1`` (head) [``+ layers * (context_dim + 1) 2C`` FiLM].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metafx.config import SSMConfig
from metafx.models.film import apply_film, context_batch, make_film


def _fft_len(T: int) -> int:
    """Smallest power of two >= 2T - 1: linear convolution of two length-T signals, no wrap-around."""
    return 1 << max(0, (2 * T - 2).bit_length())


class SSMBlock(nn.Module):
    """One block: per-channel diagonal complex SSM (FFT convolution) -> GELU -> 1x1 mix [-> FiLM] + residual.

    Args:
        channels: C, width in and out.
        state: N, complex modes per channel.
        r_min, r_max: initial pole radii (0 < r_min <= r_max < 1).
        context_dim: FiLM context size (0 = no FiLM module).

    Shape:
        (B, C, T) [, ctx (1 or B, context_dim)] -> (B, C, T).
    """

    def __init__(self, channels: int, state: int, r_min: float, r_max: float, context_dim: int = 0):
        super().__init__()
        C, N = channels, state
        # -log r log-uniform in [-log r_max, -log r_min].
        lo, hi = math.log(-math.log(r_max)), math.log(-math.log(r_min))
        self.log_nu = nn.Parameter(torch.empty(C, N).uniform_(lo, hi))
        self.theta = nn.Parameter(torch.empty(C, N).uniform_(0.0, math.pi))
        self.b_re = nn.Parameter(torch.randn(C, N) * math.sqrt(0.5))
        self.b_im = nn.Parameter(torch.randn(C, N) * math.sqrt(0.5))
        self.c_re = nn.Parameter(torch.randn(C, N) / math.sqrt(N))
        self.c_im = nn.Parameter(torch.randn(C, N) / math.sqrt(N))
        self.d = nn.Parameter(torch.randn(C))
        self.mix = nn.Conv1d(C, C, kernel_size=1)
        if context_dim:  # no module without a context
            self.film = make_film(context_dim, C)

    def kernel(self, T: int) -> Tensor:
        """Impulse responses without the direct term, ``k[c, t] = Re(sum_n Cc B sqrt(1 - r^2) lambda^t)``.

        With ``t = j M + i`` (``M = ceil(sqrt(T))``, ``0 <= i < M``, ``0 <= j < J = ceil(T / M)``),
        ``lambda^t = lambda^(jM) lambda^i``, so the kernel is a batched matrix product of two
        small tables over the N modes, ``k[c, j, i] = Re(sum_n P[c, j, n] A[c, n, i])`` with
        ``P = lambda^(jM)`` (C, J, N) and ``A = w lambda^i`` (C, N, M): the exponentials cost
        O(C N sqrt(T)) and the O(C N T) part is a BLAS product instead of elementwise work on a
        (C, N, T) tensor. Every power is ``exp(t log lambda)`` evaluated directly (no
        repeated multiplication, no accumulated rounding).

        Args:
            T: length in samples (>= 1).

        Returns:
            (C, T), in the parameters' dtype.
        """
        nu = self.log_nu.exp()  # (C, N), -log r
        norm = torch.sqrt(-torch.expm1(-2.0 * nu))  # sqrt(1 - r^2), in (0, 1)
        b_re, b_im = self.b_re * norm, self.b_im * norm
        w_re = self.c_re * b_re - self.c_im * b_im  # w = Cc * B, (C, N)
        w_im = self.c_re * b_im + self.c_im * b_re
        M = math.isqrt(T - 1) + 1  # ceil(sqrt(T)) or a little more; M * J >= T
        J = -(-T // M)
        i = torch.arange(M, dtype=nu.dtype, device=nu.device)
        jM = torch.arange(J, dtype=nu.dtype, device=nu.device) * M

        def power(e: Tensor) -> tuple[Tensor, Tensor]:  # lambda^e = exp(-nu e) (cos + i sin)(theta e), (C, N, len(e))
            mag, arg = torch.exp(-nu.unsqueeze(-1) * e), self.theta.unsqueeze(-1) * e
            return mag * torch.cos(arg), mag * torch.sin(arg)

        l_re, l_im = power(i)  # lambda^i, (C, N, M)
        a_re = w_re.unsqueeze(-1) * l_re - w_im.unsqueeze(-1) * l_im  # A = w lambda^i
        a_im = w_re.unsqueeze(-1) * l_im + w_im.unsqueeze(-1) * l_re
        p_re, p_im = power(jM)  # lambda^(jM), (C, N, J)
        # Re(P A) = P_re A_re - P_im A_im: one bmm over the 2N stacked parts.
        P = torch.cat([p_re, -p_im], dim=1).transpose(1, 2)  # (C, J, 2N)
        A = torch.cat([a_re, a_im], dim=1)  # (C, 2N, M)
        return torch.bmm(P, A).reshape(P.shape[0], J * M)[:, :T]  # (C, J, M) -> (C, T)

    def forward(self, h: Tensor, ctx: Tensor | None = None) -> Tensor:
        """One block: causal FFT convolution with the modes' kernel, GELU, 1x1 mixing [, FiLM], residual.

        Args:
            h: hidden signal, (B, C, T).
            ctx: None, or the checked context (1 or B, context_dim) of :func:`context_batch`.

        Returns:
            (B, C, T).
        """
        T = h.shape[-1]
        n = _fft_len(T)
        k = self.kernel(T)  # (C, T)
        y = torch.fft.irfft(torch.fft.rfft(h, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :T]  # causal conv, (B, C, T)
        y = y + self.d.unsqueeze(-1) * h  # direct term D (k[0] += D)
        z = self.mix(F.gelu(y))  # (B, C, T)
        if ctx is not None:
            z = apply_film(z, self.film, ctx)
        return h + z


class SSM(nn.Module):
    """Diagonal complex state-space model: 1x1 in, ``layers`` :class:`SSMBlock`, 1x1 head, optional skip.

    See the module docstring for the math, the init and the cost.

    Args:
        channels: C, width of every block.
        state: N, complex modes per channel and block.
        layers: number of blocks.
        r_min, r_max: initial pole radii, ``0 < r_min <= r_max < 1``.
        skip: add the dry input to the output (as the LSTM).
        context_dim: size of the task context (0 = none); FiLM after every block's mixing.

    Shape:
        forward: (B, 1, T) [, ctx (context_dim,) | (1, context_dim) | (B, context_dim)]
        -> (B, 1, T); ``output_len(T) == T``.
    """

    head_prefixes: tuple[str, ...] = ("head.",)

    def __init__(
        self,
        channels: int = 16,
        state: int = 16,
        layers: int = 2,
        r_min: float = 0.9,
        r_max: float = 0.9999,
        skip: bool = True,
        context_dim: int = 0,
    ):
        super().__init__()
        if min(channels, state, layers) < 1:
            raise ValueError(f"SSM: channels, state and layers must be >= 1, got {channels}, {state}, {layers}")
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"SSM: pole radii need 0 < r_min <= r_max < 1, got r_min = {r_min}, r_max = {r_max}")
        if context_dim < 0:
            raise ValueError(f"SSM: context_dim must be >= 0, got {context_dim}")
        self.channels, self.state, self.skip, self.context_dim = channels, state, skip, context_dim
        self.inp = nn.Conv1d(1, channels, kernel_size=1)
        self.blocks = nn.ModuleList(SSMBlock(channels, state, r_min, r_max, context_dim) for _ in range(layers))
        self.head = nn.Conv1d(channels, 1, kernel_size=1)

    @classmethod
    def from_config(cls, cfg: SSMConfig, context_dim: int = 0) -> "SSM":
        """Build from the ``model.ssm`` section (and ``model.context_dim``)."""
        return cls(
            channels=cfg.channels,
            state=cfg.state,
            layers=cfg.layers,
            r_min=cfg.r_min,
            r_max=cfg.r_max,
            skip=cfg.skip,
            context_dim=context_dim,
        )

    def output_len(self, T: int) -> int:
        """One output sample per input sample."""
        return T

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Filter a batch of mono slices, each from a zero initial state.

        Args:
            x: dry input, (B, 1, T).
            ctx: task context, (context_dim,), (1, context_dim) or (B, context_dim);
                None = zeros. Must be None when ``context_dim == 0``.

        Returns:
            Predicted wet signal, (B, 1, T).

        Raises:
            ValueError: if ``x`` is not (B, 1, T), or ``ctx`` does not fit ``context_dim``.
        """
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"SSM expects (B, 1, T), got {tuple(x.shape)}")
        c = context_batch(ctx, self.context_dim, x, "SSM")  # None or (B', context_dim)
        h = self.inp(x)  # (B, C, T)
        for block in self.blocks:
            h = block(h, c)  # (B, C, T)
        y = self.head(h)  # (B, 1, T)
        if self.skip:
            y = y + x
        return y

    def extra_repr(self) -> str:
        ctx = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"state={self.state}, skip={self.skip}{ctx}"


def ssm_param_count(channels: int, state: int, layers: int, context_dim: int = 0) -> int:
    """Closed-form parameter count of :class:`SSM`.

    Args:
        channels: C, width of every block.
        state: N, complex modes per channel and block.
        layers: number of blocks.
        context_dim: task-context size (0 = no FiLM).

    Returns:
        The number of trainable scalars ``count_params(SSM(...))`` gives.
    """
    C, N = channels, state
    film = (context_dim + 1) * 2 * C if context_dim else 0
    return 2 * C + layers * (6 * C * N + C + C * C + C + film) + C + 1


__all__ = ["SSM", "SSMBlock", "ssm_param_count"]
