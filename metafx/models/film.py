"""FiLM conditioning on a task context, shared by the LSTM, the TCN and the SSM.

A context vector of ``context_dim`` numbers (the task vector CAVIA adapts, or the one the
amortized encoder infers; metafx/engines/gradient.py) modulates hidden features as
``h * (1 + gamma) + beta`` with ``(gamma, beta)`` a linear function of the context
(Perez et al. 2018).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

def make_film(context_dim: int, channels: int) -> nn.Linear:
    """The FiLM generator of one layer: ``Linear(context_dim -> 2 * channels)`` giving (gamma, beta).

    The bias starts at zero, so a zero context leaves the features unchanged
    (``h * (1 + 0) + 0``). The weights keep PyTorch's default random init on purpose:
    CAVIA adapts a context that starts at zero, and the gradient of the loss with respect
    to the context goes through these weights; zero weights would keep it zero forever.

    Args:
        context_dim: size of the context vector (>= 1).
        channels: features ``C`` of the modulated layer.

    Returns:
        ``nn.Linear(context_dim, 2 * channels)`` with a zero bias.
    """
    film = nn.Linear(context_dim, 2 * channels)
    nn.init.zeros_(film.bias)
    return film


def context_batch(ctx: Tensor | None, context_dim: int, x: Tensor, model: str) -> Tensor | None:
    """Check a context argument and bring it to (B', context_dim), ``B'`` in {1, B}.

    Args:
        ctx: None, or a context of shape (context_dim,), (1, context_dim) or (B, context_dim)
            with ``B = x.shape[0]``; one context broadcasts over the batch.
        context_dim: the model's context size (0 = the model takes no context).
        x: the model's input (B, 1, T); gives B, the dtype and the device.
        model: class name for the error messages.

    Returns:
        None when ``context_dim == 0``; otherwise the context as (1 or B, context_dim)
        in ``x``'s dtype and device (zeros, (1, context_dim), when ``ctx`` is None).

    Raises:
        ValueError: a context given to a model built with ``context_dim == 0``, or a
            context of the wrong shape.
    """
    if context_dim == 0:
        if ctx is not None:
            raise ValueError(
                f"{model} was built with context_dim = 0 and takes no context, got ctx of shape "
                f"{tuple(ctx.shape)}; set model.context_dim > 0 to condition it"
            )
        return None
    if ctx is None:
        return torch.zeros(1, context_dim, dtype=x.dtype, device=x.device)
    B = x.shape[0]
    ok = (ctx.dim() == 1 and ctx.shape[0] == context_dim) or (
        ctx.dim() == 2 and ctx.shape[1] == context_dim and ctx.shape[0] in (1, B)
    )
    if not ok:
        raise ValueError(
            f"{model}: ctx must have shape ({context_dim},), (1, {context_dim}) or ({B}, {context_dim}) "
            f"(context_dim = {context_dim}, batch {B}), got {tuple(ctx.shape)}"
        )
    return ctx.reshape(-1, context_dim).to(dtype=x.dtype, device=x.device)


def apply_film(h: Tensor, film: nn.Linear, ctx: Tensor, channels_last: bool = False) -> Tensor:
    """FiLM: ``h * (1 + gamma) + beta`` with ``(gamma, beta) = film(ctx)``, broadcast over time.

    Args:
        h: features, (B, C, T) (or (B, T, C) with ``channels_last``).
        film: from :func:`make_film` (``context_dim -> 2 C``).
        ctx: (1 or B, context_dim), from :func:`context_batch`.
        channels_last: the features are (B, T, C).

    Returns:
        Modulated features, the shape of ``h``.
    """
    gamma, beta = film(ctx).chunk(2, dim=-1)  # (B', C) each
    if channels_last:
        gamma, beta = gamma.unsqueeze(1), beta.unsqueeze(1)  # (B', 1, C)
    else:
        gamma, beta = gamma.unsqueeze(-1), beta.unsqueeze(-1)  # (B', C, 1)
    return h * (1.0 + gamma) + beta


__all__ = ["apply_film", "context_batch", "make_film"]
