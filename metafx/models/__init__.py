"""Model registry: every audio-effect model behind one interface.

Contract (tested over the whole registry in tests/test_models.py):

* ``forward(x)`` maps a dry batch ``(B, 1, T)`` to a wet prediction ``(B, 1, T')``;
* ``output_len(T)`` gives ``T'`` (``T`` for the LSTM, the SSM and the transformer,
  shorter for the TCN's valid convolutions);
* every model is causal: output sample ``t`` depends on input samples up to ``t`` (the
  TCN's batch-statistics BatchNorm aside, which normalizes with the statistics of
  the whole batch of slices), and a shorter output is aligned with the *end* of the
  input, so a target is cropped with :func:`crop_like`;
* sizes come from the study YAML (``model.<arch>`` section), so a search can vary them;
* no buffer changes in ``forward`` (MAML's ``functional_call`` must be pure);
* ``head_prefixes``: class attribute, the parameter-name prefixes of the output head
  (ANIL adapts only those), e.g. ``("head.",)``.

Task context (the models of :data:`CONTEXT_ARCHS`: lstm, tcn, ssm): built with
``context_dim > 0`` (``model.context_dim``), ``forward(x, ctx=None)`` takes a context of
shape ``(context_dim,)``, ``(1, context_dim)`` or ``(B, context_dim)`` (None = zeros) that
FiLM-modulates the hidden layers (the LSTM also gets it as an input at every step). With
``context_dim == 0`` they are the unconditioned models, same parameters and outputs, and
a ``ctx`` argument is a ValueError.
"""
from __future__ import annotations

from torch import Tensor, nn

from metafx.config import FILM_ARCHS, ModelConfig
from metafx.models.arx import MetaARX
from metafx.models.lstm import LSTMModel
from metafx.models.ssm import SSM
from metafx.models.tcn import TCN
from metafx.models.transformer import AudioTransformer

MODELS: dict[str, type[nn.Module]] = {
    "lstm": LSTMModel,
    "tcn": TCN,
    "transformer": AudioTransformer,
    "arx": MetaARX,  # closed-form ARX head on meta-learned features; trained with maml.method ridge
    "ssm": SSM,  # diagonal complex linear recurrence (LRU / S4D), FFT convolution
}
CONTEXT_ARCHS: tuple[str, ...] = FILM_ARCHS  # models whose forward takes a FiLM context (one list, in config)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named by ``cfg.arch`` with the sizes of its config section.

    Args:
        cfg: the ``model`` section of a study config; ``cfg.context_dim`` (0 if absent)
            is passed to the models of :data:`CONTEXT_ARCHS`.

    Returns:
        A freshly initialized ``nn.Module`` (float32, CPU; move it yourself).

    Raises:
        ValueError: unknown ``cfg.arch``, or ``context_dim > 0`` for a model that takes no context.
    """
    if cfg.arch not in MODELS:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; registered models: {', '.join(sorted(MODELS))}")
    context_dim = getattr(cfg, "context_dim", 0)
    section = getattr(cfg, cfg.arch)
    if cfg.arch in CONTEXT_ARCHS:
        return MODELS[cfg.arch].from_config(section, context_dim=context_dim)
    if context_dim:
        raise ValueError(
            f"model.arch {cfg.arch} takes no context (model.context_dim must be 0): use {' | '.join(CONTEXT_ARCHS)} "
            f"(got model.context_dim = {context_dim})"
        )
    return MODELS[cfg.arch].from_config(section)


def count_params(model: nn.Module) -> int:
    """Number of trainable scalar parameters (what the paper's Table 1 reports)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def crop_like(y: Tensor, pred: Tensor) -> Tensor:
    """Crop a target to a prediction's length, keeping its last samples.

    Causal models with valid convolutions (the TCN) predict the last ``T'`` samples
    of the slice, so the target keeps its last ``T'`` samples too (the paper crops the
    label "to the same size").

    Args:
        y: target, (B, 1, T).
        pred: prediction, (B, 1, T') with ``T' <= T``.

    Returns:
        ``y[..., T - T':]``, (B, 1, T'); ``y`` itself when the lengths match.

    Raises:
        ValueError: if the prediction is longer than the target.
    """
    T, Tp = y.shape[-1], pred.shape[-1]
    if Tp == T:
        return y
    if Tp > T:
        raise ValueError(f"crop_like: prediction has {Tp} samples, more than the target's {T}")
    return y[..., T - Tp :]


__all__ = [
    "CONTEXT_ARCHS",
    "MODELS",
    "SSM",
    "AudioTransformer",
    "LSTMModel",
    "MetaARX",
    "TCN",
    "build_model",
    "count_params",
    "crop_like",
]
