"""Causal transformer encoder over mu-law tokens (paper section 4.2.3; Verma & Chafe 2021).

The paper: "Inputs were quantized from 16-bit samples into 8-bit samples, which were
then mapped into tokens in the set {0, ..., 255} and passed into an embedding layer.
Positional encoding is then added to the embeddings. After this, two transformer
encoder blocks follow, which are then met by a linear layer outputting a vector of
the same length as the audio waveform input." Large: embedding 128, 4 heads; small:
68, 2 heads; 2 encoder blocks each; dropout 0.5.

This module, step by step (shapes for a batch of B slices of T samples):

1. Quantization, (B, 1, T) float in [-1, 1] -> (B, T) int64 tokens in [0, levels-1].
   The samples are conceptually 16-bit PCM; they are companded with mu-law
   (ITU-T G.711 style, ``mu = levels - 1``), ``F(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu)``,
   and ``F`` in [-1, 1] is mapped linearly and rounded to ``levels`` integer tokens
   (8 bit = 256 by default). Mu-law spends the 8 bits where audio at -18 dBFS lives
   (a linear 8-bit grid would leave such signals with a few dozen levels). Values
   outside [-1, 1] are clipped. Rounding is not differentiable with respect to the
   input, which is fine: the input is data, not a parameter.
2. ``nn.Embedding(levels, d_model)``: (B, T) -> (B, T, d_model), plus a fixed
   sinusoidal positional encoding (Vaswani et al. 2017), a non-persistent buffer of
   ``max_len`` positions.
3. ``layers`` post-norm ``nn.TransformerEncoderLayer`` blocks (``d_model``, ``heads``,
   feed-forward ``ff``, ReLU, batch_first) under a **causal** attention mask: sample t
   attends to samples 0..t only. The LSTM and TCN are causal too, so all three models
   are real-time filters of the past input; a bidirectional encoder would see the
   future of the slice, which no real-time effect can.
4. Output, (B, T, d_model) -> (B, 1, T): ``nn.Linear(d_model, 1)`` regresses the
   wet sample value at every position directly (no softmax over output tokens, no
   de-quantization of the output): the prediction is a continuous waveform that the
   L1/STFT losses compare with the target. With ``skip=True`` the de-quantized
   input (``F^-1`` of the token) is added, so the network learns the difference
   from the (quantized) dry signal like the LSTM's skip; the paper has no skip and it
   is off by default.

Dropout is 0 instead of the paper's 0.5: MAML's inner and outer passes, the two
backends and the finite-difference checks must see the same function.

Parameter counts: with the paper's sizes (128 / 4 heads / 2 blocks) and PyTorch's
default feed-forward width 2048 this is 1,218,945 parameters, the paper's "1219k";
the small one (68 / 2 heads, ff 2048) is 616,845, the paper's "617k". So the paper
used ``dim_feedforward=2048``; ``model.transformer.ff: 256`` (our default) gives
297,857 for the large model and 125,837 for the small one.

Second-order MAML through attention on CPU needs the math SDPA kernel; the MAML
engine switches to it (:func:`metafx.engines.base.second_order_safe`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metafx.config import TransformerConfig


def mu_law_encode(x: Tensor, levels: int = 256) -> Tensor:
    """Mu-law companding and quantization of samples in [-1, 1] to integer tokens.

    Args:
        x: samples, any shape; clipped to [-1, 1].
        levels: number of tokens (``mu = levels - 1``).

    Returns:
        int64 tokens in ``[0, levels - 1]``, same shape as ``x``.
    """
    mu = levels - 1
    x = x.clamp(-1.0, 1.0)
    f = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)  # [-1, 1]
    return torch.round((f + 1.0) / 2.0 * mu).to(torch.int64)


def mu_law_decode(tokens: Tensor, levels: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`mu_law_encode` (up to the quantization error).

    Args:
        tokens: int tokens in ``[0, levels - 1]``.
        levels: number of tokens.
        dtype: floating dtype of the result.

    Returns:
        Samples in [-1, 1], same shape as ``tokens``.
    """
    mu = levels - 1
    f = tokens.to(dtype) / mu * 2.0 - 1.0
    return torch.sign(f) * torch.expm1(f.abs() * math.log1p(mu)) / mu


def sinusoidal_encoding(max_len: int, d_model: int) -> Tensor:
    """Fixed sinusoidal positional encoding of Vaswani et al. (2017).

    Args:
        max_len: number of positions.
        d_model: embedding width.

    Returns:
        (max_len, d_model): ``pe[t, 2i] = sin(t / 10000^(2i/d))``, ``pe[t, 2i+1] = cos(...)``.
    """
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))  # (ceil(d/2),)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe.to(torch.float32)


class AudioTransformer(nn.Module):
    """Causal transformer encoder from mu-law tokens to waveform samples.

    Args:
        d_model: embedding width.
        heads: attention heads (``d_model % heads == 0``).
        layers: encoder blocks.
        ff: feed-forward width inside each block.
        levels: number of input tokens (256 = 8 bit).
        max_len: longest input the positional encoding covers.
        skip: add the de-quantized input to the output (off in the paper).

    Shape:
        forward: (B, 1, T) -> (B, 1, T), ``T <= max_len``.
    """

    head_prefixes: tuple[str, ...] = ("head.",)  # the output Linear (ANIL adapts only these)

    def __init__(
        self,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 2,
        ff: int = 256,
        levels: int = 256,
        max_len: int = 32768,
        skip: bool = False,
    ):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"AudioTransformer: d_model {d_model} must be divisible by heads {heads}")
        self.levels = levels
        self.max_len = max_len
        self.skip = skip
        self.embed = nn.Embedding(levels, d_model)
        # Constant, not a parameter; non-persistent so checkpoints do not carry it.
        self.register_buffer("pos", sinusoidal_encoding(max_len, d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff, dropout=0.0, activation="relu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    @classmethod
    def from_config(cls, cfg: TransformerConfig) -> "AudioTransformer":
        """Build from the ``model.transformer`` section."""
        return cls(d_model=cfg.d_model, heads=cfg.heads, layers=cfg.layers, ff=cfg.ff, levels=cfg.levels, max_len=cfg.max_len)

    def output_len(self, T: int) -> int:
        """One output sample per input sample."""
        return T

    def forward(self, x: Tensor) -> Tensor:
        """Predict the wet waveform from the quantized dry input.

        Args:
            x: dry input in [-1, 1], (B, 1, T).

        Returns:
            Predicted wet samples, (B, 1, T).

        Raises:
            ValueError: if ``x`` is not (B, 1, T) or ``T > max_len``.
        """
        tokens, h = self._encode(x)
        y = self.head(h).transpose(1, 2)  # (B, T, 1) -> (B, 1, T): the waveform itself
        if self.skip:
            y = y + mu_law_decode(tokens, self.levels, y.dtype).unsqueeze(1)
        return y

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Checks ``x``; returns its tokens (B, T) and the encoder's output (B, T, d_model)."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"AudioTransformer expects (B, 1, T), got {tuple(x.shape)}")
        T = x.shape[-1]
        if T > self.max_len:
            raise ValueError(f"AudioTransformer: input of {T} samples exceeds model.transformer.max_len = {self.max_len}")
        tokens = mu_law_encode(x[:, 0], self.levels)  # (B, T) int64
        h = self.embed(tokens) + self.pos[:T].to(self.embed.weight.dtype)  # (B, T, d_model)
        # Additive causal mask (T, T): -inf above the diagonal, in the activations' dtype.
        mask = torch.triu(torch.full((T, T), float("-inf"), dtype=h.dtype, device=h.device), diagonal=1)
        return tokens, self.encoder(h, mask=mask, is_causal=True)  # (B, T, d_model)

    def features(self, x: Tensor) -> Tensor:
        """The encoder's output sequence: the feature map of a closed-form head (``model.arx.features: transformer``).

        Args:
            x: dry input in [-1, 1], (B, 1, T), ``T <= max_len``.

        Returns:
            (B, d_model, T), causal (the same mask as :meth:`forward`).
        """
        return self._encode(x)[1].transpose(1, 2)

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`features`."""
        return self.embed.embedding_dim

    def extra_repr(self) -> str:
        return f"levels={self.levels}, max_len={self.max_len}, skip={self.skip}"


__all__ = ["AudioTransformer", "mu_law_decode", "mu_law_encode", "sinusoidal_encoding"]
