"""One-layer LSTM audio-effect model (paper section 4.2.2; Wright et al. 2019/2020).

The paper's models: one ``nn.LSTM`` layer followed by a linear layer to one output,
hidden 256 ("LSTM", about 265k parameters) or 64 ("LSTM-small", about 17k).
Wright et al. add a skip connection from the input to the output, so the network
only learns the difference between the processed and the dry signal; the paper
does not say whether it used one, so it is a configuration option
(``model.lstm.skip``).

Every slice starts from a zero hidden state: the model sees the slice and nothing
before it, while the target was rendered from a continuous signal. The first few
milliseconds of each slice therefore carry a start-up transient that no model of
this kind can reproduce exactly (the TCN crops them away instead).

Task context (``context_dim > 0``, optional). A context vector ``ctx`` of
``context_dim`` numbers (e.g. the task vector CAVIA adapts in its inner loop,
Zintgraf et al. 2019) conditions the model twice: it is concatenated to the input at
every time step (the LSTM's input size becomes ``1 + context_dim``, CAVIA's
conditioning) and it FiLM-modulates the LSTM output features before the head
(Perez et al. 2018, :func:`apply_film`). With ``context_dim == 0`` (the default)
the model is exactly the paper's, with the same parameters and outputs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from metafx.config import LSTMConfig
from metafx.models.film import apply_film, context_batch, make_film

# --------------------------------------------------------------------------- model


class LSTMModel(nn.Module):
    """LSTM(1 [+ context] -> hidden) [+ FiLM] + Linear(hidden -> 1), optional input-to-output skip.

    Parameter count: ``4 * hidden * (1 + hidden) + 8 * hidden`` (LSTM weights and its
    two bias vectors) ``+ hidden + 1`` (head): 265,473 for hidden 256, 17,217 for 64.
    A context adds ``4 * hidden * context_dim`` (LSTM input weights) and
    ``(context_dim + 1) * 2 * hidden`` (FiLM), see :func:`lstm_param_count`.

    Args:
        hidden: hidden (and cell) state size.
        skip: add the input to the output (Wright et al.).
        context_dim: size of the task context (0 = none: the paper's model).

    Shape:
        forward: (B, 1, T) [, ctx (context_dim,) | (1, context_dim) | (B, context_dim)]
        -> (B, 1, T); ``output_len(T) == T``.
    """

    head_prefixes: tuple[str, ...] = ("head.",)

    def __init__(self, hidden: int = 32, skip: bool = True, context_dim: int = 0):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"LSTMModel: hidden must be >= 1, got {hidden}")
        if context_dim < 0:
            raise ValueError(f"LSTMModel: context_dim must be >= 0, got {context_dim}")
        self.hidden = hidden
        self.skip = skip
        self.context_dim = context_dim
        self.lstm = nn.LSTM(input_size=1 + context_dim, hidden_size=hidden, num_layers=1, batch_first=True)
        if context_dim:  # no FiLM module at all without a context: same parameter names as the paper's model
            self.film = make_film(context_dim, hidden)
        self.head = nn.Linear(hidden, 1)

    @classmethod
    def from_config(cls, cfg: LSTMConfig, context_dim: int = 0) -> "LSTMModel":
        """Build from the ``model.lstm`` section (and ``model.context_dim``)."""
        return cls(hidden=cfg.hidden, skip=cfg.skip, context_dim=context_dim)

    def output_len(self, T: int) -> int:
        """The LSTM outputs one sample per input sample."""
        return T

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Process a batch of mono slices, each from a zero initial state.

        Args:
            x: dry input, (B, 1, T).
            ctx: task context, (context_dim,), (1, context_dim) or (B, context_dim);
                None = zeros. Must be None when ``context_dim == 0``.

        Returns:
            Predicted wet signal, (B, 1, T).

        Raises:
            ValueError: if ``x`` is not (B, 1, T), or ``ctx`` does not fit ``context_dim``.
        """
        y = self.head(self._hidden(x, ctx)).transpose(1, 2)  # (B, T, 1) -> (B, 1, T)
        if self.skip:
            y = y + x
        return y

    def _hidden(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        """The (FiLM-modulated) LSTM output sequence, (B, T, hidden); checks ``x`` and ``ctx``."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"LSTMModel expects (B, 1, T), got {tuple(x.shape)}")
        c = context_batch(ctx, self.context_dim, x, "LSTMModel")  # None or (B', context_dim)
        inp = x.transpose(1, 2)  # (B, T, 1)
        if c is not None:
            B, T = x.shape[0], x.shape[-1]
            inp = torch.cat([inp, c.unsqueeze(1).expand(B, T, self.context_dim)], dim=-1)  # (B, T, 1 + context_dim)
        h, _ = self.lstm(inp)  # (B, T, hidden)
        if c is not None:
            h = apply_film(h, self.film, c, channels_last=True)
        return h

    def features(self, x: Tensor) -> Tensor:
        """The hidden sequence the head reads: the feature map of a closed-form head (``model.arx.features: lstm``).

        Args:
            x: dry input, (B, 1, T).

        Returns:
            (B, hidden, T), causal, from a zero state.
        """
        return self._hidden(x, None).transpose(1, 2)

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`features`."""
        return self.hidden

    def extra_repr(self) -> str:
        return f"skip={self.skip}" + (f", context_dim={self.context_dim}" if self.context_dim else "")


def lstm_param_count(hidden: int, context_dim: int = 0) -> int:
    """Closed-form parameter count of :class:`LSTMModel` (used by tests and reports).

    Args:
        hidden: LSTM width.
        context_dim: task-context size (0 = no FiLM, no context inputs).

    Returns:
        The number of trainable scalars ``count_params(LSTMModel(hidden, context_dim=...))`` gives.
    """
    film = (context_dim + 1) * 2 * hidden if context_dim else 0
    return 4 * hidden * (1 + context_dim + hidden) + 8 * hidden + hidden + 1 + film


__all__ = ["LSTMModel", "apply_film", "context_batch", "lstm_param_count", "make_film"]
