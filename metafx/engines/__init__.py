"""The adaptation engines, one per family of methods, and the registry keyed by ``maml.method``.

A new method is one module implementing :class:`metafx.engines.base.AdaptationEngine` plus one
line in :data:`ENGINES`; ``tests/test_engines.py`` runs the contract over every entry.
"""
from __future__ import annotations

from metafx.config import METHODS, Config, MAMLConfig
from metafx.engines import gradient, joint, maml, ridge
from metafx.engines.base import AdaptationEngine, NonFiniteLossError, adapt_and_predict, make_outer_optimizer

ENGINES: dict[str, AdaptationEngine] = {
    "maml": maml.ENGINE,  # plain MAML; with a MAML++ stabilizer the gradient engine runs it
    "anil": gradient.ENGINE,
    "cavia": gradient.ENGINE,
    "encoder": gradient.ENGINE,
    "ridge": ridge.ENGINE,
    "joint": joint.ENGINE,
}
assert set(ENGINES) == set(METHODS), "every maml.method needs an engine"


def engine_for(cfg: Config | MAMLConfig) -> AdaptationEngine:
    """The engine of a config's ``maml.method``.

    Plain MAML as in the paper (``maml`` without MAML++ stabilizers, both backends) is
    :mod:`metafx.engines.maml`; ``maml`` with a stabilizer (``learn_inner_lr``, ``multi_step_loss``,
    ``outer_schedule: cosine``) needs the learned pieces of :class:`metafx.engines.gradient.MetaLearner`
    and runs on :mod:`metafx.engines.gradient`.

    Raises:
        KeyError: an unknown method (the config refuses those at load).
    """
    mc = cfg.maml if isinstance(cfg, Config) else cfg
    if mc.method == "maml" and mc.stabilized():
        return gradient.ENGINE
    return ENGINES[mc.method]


__all__ = ["ENGINES", "AdaptationEngine", "NonFiniteLossError", "adapt_and_predict", "engine_for",
           "make_outer_optimizer"]
