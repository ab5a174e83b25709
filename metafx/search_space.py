"""The search space of a study: Optuna's define-by-run space over ``search.params``, its checks, and a trial's config.

The only module of metafx importing optuna (lazily: a trial imports this module for
:func:`trial_config` without paying for optuna): the space Ray Tune's OptunaSearch samples
(:class:`DefineByRun`, :func:`sampler`), the study the search summary's plots are drawn from
(:func:`study_from_rows`, :func:`summary_axes`; :mod:`metafx.plots` saves them) and Optuna's
logging (:func:`quiet_optuna`). Nothing here computes: OptunaSearch calls :class:`DefineByRun`
for every trial it samples.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from metafx.config import (ARCHS, STEP_METHODS, VAL_METRICS, Config, ConfigError, SearchConfig, SearchParam, config_from_dict,
                           get_dotted)
from metafx.records import finite_value

log = logging.getLogger(__name__)

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


def study_from_rows(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "min",
    search_params: Iterable[Any] | None = None,
) -> Any:
    """Rebuild an Optuna study from finished trial rows (for the summary plots).

    Useful when the live study is not at hand (e.g. after ``Tuner.restore`` or
    from an MLflow read-back): each row with a finite ``metric`` becomes a
    COMPLETE trial. Distributions come from ``search_params`` (the
    :class:`metafx.config.SearchParam` list of the study) when given, else are
    inferred from the values seen (float range, int range or categorical).

    Args:
        rows: mappings holding the metric and the parameter values under their
            dotted keys (``maml.inner_lr``), either at top level or in a
            ``params`` sub-mapping.
        metric: the objective's key in the rows, e.g. ``val/query_l1_post``.
        mode: ``min`` or ``max``.
        search_params: the study's :class:`metafx.config.SearchParam` list, or None.

    Returns:
        An in-memory ``optuna.Study``.

    Raises:
        ValueError: ``mode`` is not min/max or no row has a finite metric.
    """
    import optuna  # the search's own study lives in Ray Tune's OptunaSearch; this one is for the plots
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scored = [(r, finite_value(r.get(metric))) for r in rows]
    scored = [(r, v) for r, v in scored if v is not None]
    if not scored:
        raise ValueError(f"no trial row has a finite value of metric {metric!r}; cannot build a study")

    def values_of(r: Mapping[str, Any]) -> dict[str, Any]:
        sub = r.get("params")
        return dict(sub) if isinstance(sub, Mapping) else dict(r)

    dists: dict[str, Any] = {}
    if search_params is not None:
        dists = {sp.key: distribution(sp) for sp in search_params}
    else:
        keys = {k for r, _ in scored for k in values_of(r) if k != metric}
        for k in sorted(keys):
            vals = [values_of(r)[k] for r, _ in scored if k in values_of(r)]
            if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in vals):
                dists[k] = IntDistribution(int(min(vals)), int(max(vals)))
            elif all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in vals):
                lo, hi = float(min(vals)), float(max(vals))
                dists[k] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)
            elif all(isinstance(x, (str, bool, int, float)) or x is None for x in vals):
                dists[k] = CategoricalDistribution(sorted(set(vals), key=repr))
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for r, v in scored:
        vals = values_of(r)
        params, used = {}, {}
        for k, d in dists.items():
            if k not in vals:
                continue  # conditional parameter absent in this trial
            x = vals[k]
            if isinstance(d, CategoricalDistribution) and x not in d.choices:
                log.warning("row value %s=%r is not among the search choices %s; left out of the study", k, x, d.choices)
                continue
            if isinstance(d, (FloatDistribution, IntDistribution)):
                if isinstance(x, bool) or not isinstance(x, (int, float, np.number)) or not d.low <= x <= d.high:
                    log.warning("row value %s=%r is outside the search range [%s, %s]; left out", k, x, d.low, d.high)
                    continue
                x = int(x) if isinstance(d, IntDistribution) else float(x)
            params[k], used[k] = x, d
        study.add_trial(optuna.trial.create_trial(params=params, distributions=used, value=v))
    return study


def summary_axes(study: Any) -> list[tuple[str, Any]]:
    """Optuna's optimization-history and parameter-importance plots of a study, as matplotlib axes.

    Drawn with ``optuna.visualization.matplotlib``; :func:`metafx.plots.optuna_plots` sizes and
    saves them (this module draws, that one writes files). Parameter importances need at least two
    completed trials and a parameter that varies; when Optuna cannot compute them the plot is
    left out with a logged warning rather than failing the search summary.

    Args:
        study: an ``optuna.Study`` (live, or from :func:`study_from_rows`).

    Returns:
        ``[("optuna_history", ax), ("optuna_importances", ax)]``, the second left out when
        importances cannot be computed; empty when no trial completed.
    """
    import optuna
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        log.warning("the study has no completed trial; no Optuna plots written")
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        out = [("optuna_history", ovm.plot_optimization_history(study))]
        keys = {k for t in done for k in t.params}
        if len(done) < 2 or not any(len({repr(t.params.get(k)) for t in done}) > 1 for k in keys):
            log.warning("parameter importances need >= 2 completed trials with a varying parameter; skipped")
            return out
        try:
            out.append(("optuna_importances", ovm.plot_param_importances(study)))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.warning("Optuna could not compute parameter importances (%s: %s); plot skipped", type(e).__name__, e)
    return out


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own logger at WARNING inside the block (its per-trial INFO lines off), restored after."""
    import optuna

    saved = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(saved)
