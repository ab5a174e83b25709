"""Temporal convolutional network, TCN-100-N of Steinmetz & Reiss (paper section 4.2.1).

Structure of micro-tcn ("Efficient neural networks for real-time modeling of analog
dynamic range compression", Steinmetz & Reiss 2022; github.com/csteinmetz1/micro-tcn),
without the parameter conditioning (the task is inferred by MAML, not given):

    block i (i = 0 .. blocks-1), dilation d_i = dilation_growth ** i:
        h = PReLU(BatchNorm1d(Conv1d(x, kernel, dilation d_i, valid padding, no bias)))
        out = h + crop_end(Conv1d_1x1(x))      # residual, grouped like micro-tcn
    head: Conv1d 1x1 (channels -> 1)

Every convolution is *valid* (no padding), so the output is shorter than the input
by the receptive field minus one: ``T' = T - (rf - 1)`` with
``rf = 1 + (kernel - 1) * sum_i growth ** i``. Output sample ``t`` depends on input
samples ``t .. t + rf - 1`` only, i.e. the output is aligned with the *end* of the
input (causal); the target is cropped to its last ``T'`` samples
(:func:`metafx.metrics.crop_like`), as the paper does.

Sizes. The paper's "TCN 16k" is micro-tcn's TCN-100 (4 blocks, kernel 5, growth 10,
32 channels): 16,065 parameters and a 4,445-sample receptive field (about 100 ms at
44.1 kHz, hence the name). Its slices are 0.5 s long; at shorter slices the receptive
field has to shrink (fewer blocks or a smaller growth), or no output is left.

Differences from micro-tcn, on purpose:

* BatchNorm uses **batch statistics always** (``track_running_stats=False``). In the
  MAML inner loop, in the outer loop and at evaluation, every forward pass
  normalizes each channel with the mean and variance over the batch and time of the
  slices it is given (the support slices during adaptation, the query slices for the
  query loss): transductive batch norm, as in the original MAML code (Finn et al.
  2017). There are no running-statistics buffers, so ``torch.func.functional_call``
  and ``higher`` are pure functions of the parameters and nothing is mutated by the
  inner loop; train and eval mode behave the same. The price: an output sample
  depends, through the normalization statistics, on the whole batch of slices and
  not only on its own past (at evaluation, on the query slices). The affine scale
  and shift of each BatchNorm are ordinary parameters: meta-learned in the outer loop and adapted
  in the inner loop like every other weight.
* No ``tanh`` on the output: the targets are a linear filter's output and the other
  models' heads are linear too.

Task context (``context_dim > 0``, optional): a context vector FiLM-modulates every
block after its activation, ``h * (1 + gamma) + beta`` with ``(gamma, beta)`` from a
per-block ``Linear(context_dim -> 2 * channels)`` (``blocks.i.film``; see
:func:`metafx.models.lstm.apply_film`), before the residual add. With
``context_dim == 0`` (the default) there is no FiLM module and the model is exactly
micro-tcn's.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metafx.config import TCNConfig, tcn_receptive_field  # one formula, shared with the validator
from metafx.models.film import apply_film, context_batch, make_film


class TCNBlock(nn.Module):
    """Conv1d (valid, dilated) -> BatchNorm1d (batch statistics) -> PReLU [-> FiLM], + cropped 1x1 residual.

    Shape:
        (B, in_ch, T) [, ctx (1 or B, context_dim)] -> (B, out_ch, T - dilation * (kernel - 1)).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int, context_dim: int = 0):
        super().__init__()
        self.shrink = dilation * (kernel - 1)
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size=kernel, dilation=dilation, padding=0, bias=False)
        # Batch statistics always; see the module docstring.
        self.bn = nn.BatchNorm1d(out_ch, track_running_stats=False)
        self.act = nn.PReLU(out_ch)
        # micro-tcn's residual: a 1x1 convolution grouped per input channel (C weights).
        groups = in_ch if out_ch % in_ch == 0 else 1
        self.res = nn.Conv1d(in_ch, out_ch, kernel_size=1, groups=groups, bias=False)
        if context_dim:  # no module without a context: same parameter names as micro-tcn
            self.film = make_film(context_dim, out_ch)

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        """One block with its cropped residual.

        Args:
            x: (B, in_ch, T).
            ctx: None, or the checked context (1 or B, context_dim) of :func:`context_batch`.

        Returns:
            (B, out_ch, T - dilation * (kernel - 1)), aligned with the end of ``x``.
        """
        h = self.act(self.bn(self.conv(x)))  # (B, out_ch, T - shrink)
        if ctx is not None:
            h = apply_film(h, self.film, ctx)
        r = self.res(x)[..., self.shrink :]  # (B, out_ch, T) -> last T - shrink samples (causal crop)
        return h + r


class TCN(nn.Module):
    """TCN-100-N: ``blocks`` TCN blocks of ``channels`` channels and a 1x1 output conv.

    Args:
        channels: channels of every block.
        blocks: number of blocks.
        kernel: kernel size of the dilated convolutions.
        dilation_growth: dilation of block ``i`` is ``dilation_growth ** i``.
        context_dim: size of the task context (0 = none: micro-tcn's model).

    Shape:
        forward: (B, 1, T) [, ctx (context_dim,) | (1, context_dim) | (B, context_dim)]
        -> (B, 1, T - rf + 1) with ``rf = self.receptive_field``.
    """

    head_prefixes: tuple[str, ...] = ("head.",)

    def __init__(
        self, channels: int = 16, blocks: int = 4, kernel: int = 13, dilation_growth: int = 10, context_dim: int = 0
    ):
        super().__init__()
        if min(channels, blocks, kernel, dilation_growth) < 1:
            raise ValueError(
                f"TCN: channels, blocks, kernel and dilation_growth must be >= 1, got "
                f"{channels}, {blocks}, {kernel}, {dilation_growth}"
            )
        if context_dim < 0:
            raise ValueError(f"TCN: context_dim must be >= 0, got {context_dim}")
        self.context_dim = context_dim
        self.receptive_field = tcn_receptive_field(kernel, blocks, dilation_growth)
        self.blocks = nn.ModuleList(
            TCNBlock(1 if i == 0 else channels, channels, kernel, dilation_growth**i, context_dim)
            for i in range(blocks)
        )
        self.head = nn.Conv1d(channels, 1, kernel_size=1)

    @classmethod
    def from_config(cls, cfg: TCNConfig, context_dim: int = 0) -> "TCN":
        """Build from the ``model.tcn`` section (and ``model.context_dim``)."""
        return cls(
            channels=cfg.channels,
            blocks=cfg.blocks,
            kernel=cfg.kernel,
            dilation_growth=cfg.dilation_growth,
            context_dim=context_dim,
        )

    def output_len(self, T: int) -> int:
        """Output length for an input of ``T`` samples (may be <= 0: too short an input)."""
        return T - self.receptive_field + 1

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Predict the last ``T - rf + 1`` samples of the wet signal.

        Args:
            x: dry input, (B, 1, T).
            ctx: task context, (context_dim,), (1, context_dim) or (B, context_dim);
                None = zeros. Must be None when ``context_dim == 0``.

        Returns:
            (B, 1, T - rf + 1), aligned with the end of the input.

        Raises:
            ValueError: if ``x`` is not (B, 1, T), ``T`` is shorter than the receptive field, or
                ``ctx`` does not fit ``context_dim``.
        """
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"TCN expects (B, 1, T), got {tuple(x.shape)}")
        T = x.shape[-1]
        if T < self.receptive_field:
            raise ValueError(
                f"TCN: input of {T} samples is shorter than the receptive field of {self.receptive_field} "
                f"samples; lengthen maml.slice_len or shrink model.tcn (blocks, kernel, dilation_growth)"
            )
        return self.head(self._trunk(x, ctx))  # (B, 1, T - rf + 1)

    def _trunk(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        """The last block's output, (B, channels, T - rf + 1)."""
        c = context_batch(ctx, self.context_dim, x, "TCN")  # None or (B', context_dim)
        for block in self.blocks:
            x = block(x, c)  # (B, C, T_i) -> (B, C, T_i - d_i (k - 1))
        return x

    def features(self, x: Tensor) -> Tensor:
        """The last block's channels at every input sample: the feature map of a closed-form head.

        The input is left-padded with ``rf - 1`` zeros (silence before the slice), so the
        features are causal, from a zero state, and as long as the input (``model.arx.features: tcn``).

        Args:
            x: dry input, (B, 1, T).

        Returns:
            (B, channels, T).

        Raises:
            ValueError: if ``x`` is not (B, 1, T).
        """
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"TCN expects (B, 1, T), got {tuple(x.shape)}")
        return self._trunk(F.pad(x, (self.receptive_field - 1, 0)), None)

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`features`."""
        return self.head.in_channels

    def extra_repr(self) -> str:
        return f"receptive_field={self.receptive_field}" + (
            f", context_dim={self.context_dim}" if self.context_dim else ""
        )


__all__ = ["TCN", "TCNBlock", "tcn_receptive_field"]
