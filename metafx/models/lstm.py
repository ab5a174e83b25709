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
"""
from __future__ import annotations

from torch import Tensor, nn

from metafx.config import LSTMConfig


class LSTMModel(nn.Module):
    """LSTM(1 -> hidden) + Linear(hidden -> 1), optional input-to-output skip.

    Parameter count: ``4 * hidden * (1 + hidden) + 8 * hidden`` (LSTM weights and its
    two bias vectors) ``+ hidden + 1`` (head): 265,473 for hidden 256, 17,217 for 64.

    Args:
        hidden: hidden (and cell) state size.
        skip: add the input to the output (Wright et al.).

    Shape:
        forward: (B, 1, T) -> (B, 1, T); ``output_len(T) == T``.
    """

    def __init__(self, hidden: int = 32, skip: bool = True):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"LSTMModel: hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.skip = skip
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    @classmethod
    def from_config(cls, cfg: LSTMConfig) -> "LSTMModel":
        """Build from the ``model.lstm`` section."""
        return cls(hidden=cfg.hidden, skip=cfg.skip)

    def output_len(self, T: int) -> int:
        """The LSTM outputs one sample per input sample."""
        return T

    def forward(self, x: Tensor) -> Tensor:
        """Process a batch of mono slices, each from a zero initial state.

        Args:
            x: dry input, (B, 1, T).

        Returns:
            Predicted wet signal, (B, 1, T).

        Raises:
            ValueError: if ``x`` is not (B, 1, T).
        """
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"LSTMModel expects (B, 1, T), got {tuple(x.shape)}")
        h, _ = self.lstm(x.transpose(1, 2))  # (B, T, 1) -> (B, T, hidden)
        y = self.head(h).transpose(1, 2)  # (B, T, 1) -> (B, 1, T)
        if self.skip:
            y = y + x
        return y

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


def lstm_param_count(hidden: int) -> int:
    """Closed-form parameter count of :class:`LSTMModel` (used by tests and reports)."""
    return 4 * hidden * (1 + hidden) + 8 * hidden + hidden + 1


__all__ = ["LSTMModel", "lstm_param_count"]
