"""The search space of a study: Optuna's define-by-run space over ``search.params``, its checks, and a trial's config.

The only module of metafx importing optuna for the search (lazily: a trial imports this
module for :func:`trial_config` without paying for optuna); :mod:`metafx.plots` imports it
too, only to draw the summary plots, and takes its distributions from :func:`distribution`.
Nothing here computes: OptunaSearch calls :class:`DefineByRun` for every trial it samples.
"""
from __future__ import annotations

from typing import Any, Mapping

from metafx.config import (ARCHS, STEP_METHODS, VAL_METRICS, Config, ConfigError, SearchConfig, SearchParam, config_from_dict,
                           get_dotted)

#: The training metrics a trial reports; with :data:`~metafx.config.VAL_METRICS`, what ``search.metric`` may be.
REPORTED_METRICS = ("query_l1_post", "query_l1_pre", "support_l1_post", "support_l1_pre")


def distribution(p: SearchParam) -> Any:
    """The Optuna distribution of one searched parameter.

    Args:
        p: the parameter as the study file declares it.

    Returns:
        ``CategoricalDistribution`` of its choices for ``categorical``, ``IntDistribution``
        (``step`` default 1) for ``int``, else ``FloatDistribution`` (log scale for
        ``loguniform``).
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.dist == "categorical":
        return CategoricalDistribution(list(p.choices))
    if p.dist == "int":
        return IntDistribution(int(p.low), int(p.high), step=int(p.step or 1))
    return FloatDistribution(float(p.low), float(p.high), log=bool(p.log))


def _active(p: SearchParam, values: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """A conditional parameter exists only when every ``when`` key takes an allowed value."""
    for key, allowed in p.when:
        v = values[key] if key in values else get_dotted(base, key)
        if v not in allowed:
            return False
    return True


class DefineByRun:
    """Optuna define-by-run space from the study's ``search.params`` (no computation inside).

    Parameters are suggested in file order; one with ``when: {model.arch: lstm}`` is
    suggested only in trials whose (sampled or fixed) ``model.arch`` is ``lstm``.

    Args:
        params: the study's ``search.params``.
        base: the study's resolved config mapping (the fixed values ``when`` may name).
    """

    def __init__(self, params: tuple[SearchParam, ...], base: Mapping[str, Any]):
        self.params = params
        self.base = dict(base)

    def __call__(self, trial) -> None:
        """Suggest every active parameter on ``trial`` (an ``optuna.Trial``)."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        values: dict[str, Any] = {}
        for p in self.params:
            if not _active(p, values, self.base):
                continue
            d = distribution(p)
            if isinstance(d, CategoricalDistribution):
                values[p.key] = trial.suggest_categorical(p.key, list(d.choices))
            elif isinstance(d, IntDistribution):
                values[p.key] = trial.suggest_int(p.key, d.low, d.high, step=d.step, log=d.log)
            else:
                values[p.key] = trial.suggest_float(p.key, d.low, d.high, step=d.step, log=d.log)
        return None


def sampler(s: SearchConfig) -> Any:
    """The Optuna sampler of a search: TPE, seeded, a third of the trials (at least 2) random first.

    Args:
        s: the study's search section.

    Returns:
        An ``optuna.samplers.TPESampler``.
    """
    import optuna

    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, s.num_samples // 3))


def check_space(cfg: Config) -> None:
    """Search-section checks that need the whole config, before Ray starts.

    A model parameter (``model.<arch>.<key>``) must belong to an architecture the trial
    can have (:data:`metafx.config.ARCHS`, restricted by ``model.arch`` and ``when``);
    every ``when`` key must be searched or set; a method that adapts only by inner steps
    (:data:`metafx.config.STEP_METHODS`) must never meet ``maml.inner_steps`` 0; the metric must
    be one the trials report. (Each parameter's range against its key's own bounds is checked
    when the study loads.)

    Args:
        cfg: the study config.

    Raises:
        ConfigError: the first problem found, naming the file and the key.
    """
    s = cfg.search
    if not s.params:
        raise ConfigError(f"{cfg.source_file}: search.params is empty: give at least one parameter to search")
    searched = {p.key for p in s.params}
    arch_param = next((p for p in s.params if p.key == "model.arch"), None)
    arch_choices = set(arch_param.choices) if arch_param else {cfg.model.arch}
    if arch_param is not None and arch_param.when:  # conditional: the file's default arch applies otherwise
        arch_choices.add(cfg.model.arch)
    for p in s.params:
        parts = p.key.split(".")
        if parts[0] == "model" and len(parts) > 2 and parts[1] in ARCHS:
            conds = dict(p.when).get("model.arch")
            possible = set(conds) & arch_choices if conds else arch_choices
            if parts[1] not in possible:
                raise ConfigError(
                    f"{cfg.source_file}: search.params.{p.key}: the model never has this parameter here "
                    f"(model.arch is {sorted(arch_choices)}{' with when ' + str(sorted(conds)) if conds else ''}); "
                    f"remove it, or add `when: {{model.arch: {parts[1]}}}` with {parts[1]} among model.arch choices")
        for key, _ in p.when:
            if key not in searched and get_dotted(cfg.to_dict(), key) is None:
                raise ConfigError(f"{cfg.source_file}: search.params.{p.key}.when: {key!r} is neither searched nor set")
    _check_inner_steps(cfg)
    if s.metric not in REPORTED_METRICS + VAL_METRICS:
        raise ConfigError(f"{cfg.source_file}: search.metric = {s.metric!r} is not reported by a trial: use one of "
                          f"{', '.join(VAL_METRICS + REPORTED_METRICS)}")


def _check_inner_steps(cfg: Config) -> None:
    """Refuse a space where a trial could pair maml / anil / cavia with ``maml.inner_steps`` 0 (the loader refuses it)."""
    params = {p.key: p for p in cfg.search.params}
    mp = params.get("maml.method")
    methods = set(mp.choices) if mp else {cfg.maml.method}
    if mp is not None and mp.when:  # conditional: the file's method applies otherwise
        methods.add(cfg.maml.method)
    sp = params.get("maml.inner_steps")
    if sp is None:
        lowest, what = cfg.maml.inner_steps, f"maml.inner_steps = {cfg.maml.inner_steps} (not searched)"
    else:
        lowest = min(sp.choices) if sp.dist == "categorical" else sp.low
        what = f"search.params.maml.inner_steps reaches {lowest}"
        conds = dict(sp.when).get("maml.method")
        if conds:
            methods &= set(conds)
    bad = sorted(methods & set(STEP_METHODS))
    if lowest is not None and lowest < 1 and bad:
        raise ConfigError(
            f"{cfg.source_file}: {what}, but a trial can have maml.method {' | '.join(bad)}, which adapts only by "
            f"inner steps and needs maml.inner_steps >= 1: raise the range's low to 1 (or add "
            f"`when: {{maml.method: [...]}}` without {', '.join(bad)}); method joint trains without adaptation")


def trial_config(cfg: Config, sampled: Mapping[str, Any]) -> Config:
    """The full configuration of one trial: the study's resolved config plus its sampled values.

    Args:
        cfg: the study config (budget applied).
        sampled: the trial's sampled values under their dotted keys (Tune's ``trial.config``);
            keys without a dot are not config keys and are ignored.

    Returns:
        The trial's validated config.

    Raises:
        ConfigError: a sampled value the config refuses.
    """
    over = {k: v for k, v in sampled.items() if "." in k}
    return config_from_dict(cfg.to_dict(), cfg.source_file, overrides=over)
