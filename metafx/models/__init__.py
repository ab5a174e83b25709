"""Model registry: every audio-effect model behind one interface, keyed by ``model.arch``.

Contract (tested over the whole registry in tests/test_models.py):

* ``forward(x)`` maps a dry batch ``(B, 1, T)`` to a wet prediction ``(B, 1, T')``;
* ``output_len(T)`` gives ``T'`` (``T`` for the LSTM, the SSM and the transformer,
  shorter for the TCN's valid convolutions);
* every model is causal: output sample ``t`` depends on input samples up to ``t`` (the
  TCN's batch-statistics BatchNorm aside, which normalizes with the statistics of
  the whole batch of slices), and a shorter output is aligned with the *end* of the
  input, so a target is cropped with :func:`metafx.metrics.crop_like`;
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

Adding a model: its module here (a class with ``from_config(section[, context_dim])``,
``output_len`` and ``head_prefixes``), one line in :data:`MODELS`, and in
:mod:`metafx.config` a dataclass of its sizes (defaults and bounds in the field
metadata) plus one ``subsection(..., model=True[, film=True])`` field of
:class:`~metafx.config.ModelConfig`, which makes its name a ``model.arch``
(:data:`metafx.config.ARCHS`). tests/test_models.py checks that :data:`MODELS` and
``ARCHS`` agree and runs the contract over every entry.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from metafx.config import FILM_ARCHS, TRUNK_FEATURES, ModelConfig
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
CONTEXT_ARCHS: tuple[str, ...] = FILM_ARCHS  # models whose forward takes a FiLM context (marked in ModelConfig)
# Networks whose hidden sequence can feed the ARX head (model.arx.features; metafx.models.arx.FeatureNetwork).
FEATURE_NETWORKS: tuple[str, ...] = TRUNK_FEATURES


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
    if cfg.arch == "arx" and section.features in FEATURE_NETWORKS and not context_dim:
        trunk = build_model(replace(cfg, arch=section.features))  # sized by model.<features>
        return MetaARX.from_config(section, trunk=trunk)
    if context_dim:
        raise ValueError(
            f"model.arch {cfg.arch} takes no context (model.context_dim must be 0): use {' | '.join(CONTEXT_ARCHS)} "
            f"(got model.context_dim = {context_dim})"
        )
    return MODELS[cfg.arch].from_config(section)


def count_params(model: nn.Module) -> int:
    """Number of trainable scalar parameters (what the paper's Table 1 reports).

    Args:
        model: any module.

    Returns:
        The sum of ``numel()`` over the parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "CONTEXT_ARCHS",
    "FEATURE_NETWORKS",
    "MODELS",
    "SSM",
    "AudioTransformer",
    "LSTMModel",
    "MetaARX",
    "TCN",
    "build_model",
    "count_params",
]
