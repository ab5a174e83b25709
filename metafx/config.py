"""Loading a study: YAML -> validated, frozen dataclasses; the one import for everything config.

A study file (``search_spaces/*.yaml``) is a complete single-trial configuration
(``data``, ``model``, ``maml``, ``eval`` sections) plus an optional ``search``
section and a ``budgets`` section of dotted overrides (``smoke``, ``local``,
``paper``). :func:`load_config` resolves the file and validates the study as written
(so a bad value is reported even where the chosen budget replaces it), then applies the
budget and any ``--set key=value`` overrides to the raw mapping and validates every key
again. :attr:`Config.budget_changes` keeps what the budget replaced (:func:`budget_report`).

Four modules, one concept each; import every name from here:

* :mod:`metafx.config_schema`: the dataclasses; each setting's default and bounds,
  written once in its field;
* :mod:`metafx.config_fields`: how a field declares its check, and the validator
  that walks :func:`dataclasses.fields`;
* :mod:`metafx.config_io`: finding, reading and writing study files, dotted keys;
* this module: :func:`load_config`, and by hand only what one field cannot say
  (the families and their grids, losses, search parameters, paths, and the
  rules that tie settings together).

Every problem raises :class:`ConfigError` naming the file, the dotted key, the
bad value and what is allowed (nanoGPT's "Unknown config key", docs/design.md
style rule 3). The resolved mapping (:attr:`Config.raw`) is what checkpoints,
MLflow and the best-config writer store, so a stored config reloads to the
same :class:`Config`.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Mapping

from metafx.config_fields import FieldValidator, field_default, field_named
from metafx.config_io import (
    REPO_ROOT, SPACES_DIR, ConfigError, dump_config, flatten, get_dotted, inline_yaml, lookup_dotted, parse_override,
    read_yaml, resolve_space, set_dotted,
)
from metafx.config_schema import (
    ARCHS, ARX_FEATURES, BACKENDS, CONTEXT_METHODS, DISTRIBUTIONS, FILM_ARCHS, GRID_SCALES, LOSS_TERMS, METHODS,
    OUTER_SCHEDULES, STEP_METHODS, TRUNK_FEATURES, VAL_METRICS, EVAL_METRICS, ARXConfig, BudgetChange, Config, DataConfig, EvalConfig, FamilyConfig, LossConfig,
    LSTMConfig, MAMLConfig, ModelConfig, ParamGrid, SearchConfig, SearchParam, SourceConfig, SSMConfig, TCNConfig,
    TransformerConfig, default_cache_dir, is_cutoff_param, tcn_receptive_field,
)

EFFECTS_DIR = Path(__file__).resolve().parent / "data" / "effects"
BUDGETS = ("smoke", "local", "paper")
DEFAULT_BUDGET = "local"
SEARCHABLE_SECTIONS = ("data", "model", "maml", "eval")

__all__ = [
    "ARCHS", "ARX_FEATURES", "EVAL_METRICS", "TRUNK_FEATURES", "VAL_METRICS", "BACKENDS", "BUDGETS", "CONTEXT_METHODS", "DEFAULT_BUDGET", "DISTRIBUTIONS",
    "EFFECTS_DIR", "FILM_ARCHS", "LOSS_TERMS", "METHODS", "OUTER_SCHEDULES", "REPO_ROOT", "SPACES_DIR",
    "STEP_METHODS", "ARXConfig", "BudgetChange", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "FamilyConfig", "LSTMConfig", "LossConfig", "MAMLConfig", "ModelConfig", "ParamGrid", "SSMConfig",
    "SearchConfig", "SearchParam", "SourceConfig", "TCNConfig", "TransformerConfig",
    "budget_changes", "budget_report", "check_audio_length", "config_from_dict", "default_cache_dir",
    "dump_config", "flatten", "get_dotted", "is_cutoff_param", "load_config", "parse_override", "read_yaml",
    "resolve_space", "set_dotted", "tcn_receptive_field",
]


# The top-level keys of a study file and the section class of each validated section.
SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "maml": MAMLConfig, "eval": EvalConfig,
                             "search": SearchConfig}
TOP_KEYS = ("name", "data", "model", "maml", "eval", "search", "budget", "budgets")
# The keys of one search.params entry, and of a slider's range under data.families[i].params.
SEARCH_PARAM_KEYS = ("dist", "low", "high", "step", "choices", "when")
GRID_KEYS = ("low", "high", "num", "scale")


# --------------------------------------------------------------------------- loading


def load_config(
    space: str | os.PathLike[str],
    budget: str | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> Config:
    """Load and validate a study file.

    Args:
        space: study name in search_spaces/ or a path to a YAML file.
        budget: ``smoke``, ``local`` or ``paper``; None = the file's ``budget`` key,
            else ``local``. The file's ``budgets.<budget>`` overrides are applied.
        overrides: dotted ``{key: value}`` or ``["key=value", ...]`` applied last.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: naming the file, the key, the value and what is allowed.
    """
    path = resolve_space(space)
    raw = read_yaml(path)
    return config_from_dict(raw, path, budget=budget, overrides=overrides)


def config_from_dict(
    raw: Mapping[str, Any],
    path: Path,
    budget: str | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> Config:
    """Validate a study mapping as if read from ``path`` (relative paths resolve against its folder).

    Args:
        raw: the study mapping (not modified), e.g. :func:`read_yaml` of a file or a stored
            :meth:`Config.to_dict`.
        path: the file named in error messages.
        budget: as in :func:`load_config`.
        overrides: as in :func:`load_config`.

    Returns:
        The validated :class:`Config`; its ``raw`` is the resolved mapping with ``budget`` set,
        its ``budget_changes`` the keys the budget overrides (:func:`budget_changes`).

    Raises:
        ConfigError: naming the file, the key, the value and what is allowed. The study as
            written is validated first, so a bad value is reported even where the chosen
            budget replaces it. An error in a value given as ``--set key=value`` (``overrides``
            as a list) names that ``--set``, not the file.
    """
    raw = copy.deepcopy(dict(raw))
    budgets = raw.pop("budgets", None) or {}
    file_budget = raw.pop("budget", None)
    budget = budget or file_budget or DEFAULT_BUDGET
    if budget not in BUDGETS:
        raise ConfigError(f"{path}: budget {budget!r} is not one of {', '.join(BUDGETS)}")
    if not isinstance(budgets, dict):
        raise ConfigError(f"{path}: key 'budgets' must map budget names to overrides")
    for b in budgets:
        if b not in BUDGETS:
            raise ConfigError(f"{path}: budgets.{b}: unknown budget; allowed: {', '.join(BUDGETS)}")
    by_budget = budgets.get(budget) or {}
    if not isinstance(by_budget, dict):
        raise ConfigError(f"{path}: budgets.{budget} must map dotted keys to values")
    study = copy.deepcopy(raw)  # the study as written
    for k, v in by_budget.items():
        set_dotted(raw, k, v, where=f"{path}: budgets.{budget}")
    cli: dict[str, str] = {}  # key -> the --set that gave its value
    if overrides:
        if isinstance(overrides, Mapping):
            items = [(k, v, f"{path}: override {k}") for k, v in overrides.items()]
        else:
            items = [(*parse_override(o), f"--set {o}") for o in overrides]
        for k, v, where in items:
            set_dotted(raw, k, v, where=where)
            if where.startswith("--set"):
                cli[k] = where
    if by_budget:  # a value the budget replaces is still checked: the study as written must be valid
        try:
            _Validator(path).config(copy.deepcopy(study), budget)
        except ConfigError as e:
            over = _owner(e.key, {k: f"budgets.{budget}" for k in by_budget})
            if over is None:
                raise
            raise ConfigError(f"{e} (in the study as written: budget {budget} replaces this value, but the study "
                              "itself must be valid)", key=e.key, allowed=e.allowed) from None
    try:
        cfg = _Validator(path).config(raw, budget)
    except ConfigError as e:
        where = _owner(e.key, cli)
        if where is not None:  # the bad value came from the command line, not the file
            raise ConfigError(f"{where}: {_without_path(str(e), path)}", key=e.key, allowed=e.allowed) from None
        if _owner(e.key, {k: "" for k in by_budget}) is not None:
            raise ConfigError(f"{e} (the value of budgets.{budget})", key=e.key, allowed=e.allowed) from None
        raise
    resolved = copy.deepcopy(raw)
    resolved["budget"] = budget
    object.__setattr__(cfg, "raw", resolved)
    object.__setattr__(cfg, "budget_changes", _changes(study, by_budget, resolved))
    return cfg


def _owner(key: str | None, origins: Mapping[str, str]) -> str | None:
    """The origin of the override that set ``key`` or a section above it, or None."""
    if key is None:
        return None
    for k, where in origins.items():
        if key == k or key.startswith((k + ".", k + "[")):
            return where
    return None


def _without_path(msg: str, path: Path) -> str:
    """``msg`` without its leading ``<path>: ``."""
    head = f"{path}: "
    return msg[len(head):] if msg.startswith(head) else msg


def _schema_default(key: str) -> tuple[bool, Any]:
    """The default of a dotted key of the sections, walking the dataclass fields: ``(found, default)``."""
    parts = key.split(".")
    cls: Any = SECTIONS.get(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if cls is None:
            return False, None
        try:
            f = field_named(cls, part)
        except KeyError:
            return False, None
        if i == len(parts) - 1:
            v = field_default(f)
            return True, dict(v.terms) if isinstance(v, LossConfig) else v
        cls = f.metadata.get("cls")
    return False, None


def _changes(study: Mapping[str, Any], by_budget: Mapping[str, Any], resolved: Mapping[str, Any]) -> tuple[BudgetChange, ...]:
    """The keys of ``by_budget`` whose value in ``resolved`` differs from the study as written."""
    out = []
    for k in by_budget:
        found, old = lookup_dotted(study, k)
        default = not found
        if default:
            found, old = _schema_default(k)
        _, new = lookup_dotted(resolved, k)
        if not found or old != new:
            out.append(BudgetChange(k, old, new, default))
    return tuple(out)


def budget_changes(cfg_or_space: Config | str | os.PathLike[str], budget: str | None = None) -> tuple[BudgetChange, ...]:
    """The keys a budget overrides: ``(key, value in the study, value used, default)`` for each that differs.

    Args:
        cfg_or_space: a loaded :class:`Config` (its budget), or a study name or path.
        budget: with a study name or path: the budget (None = the file's, else ``local``).

    Returns:
        One :class:`BudgetChange` per key of ``budgets.<budget>`` whose value differs from the
        study as written (``default`` True where the study leaves the key out), in file order.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    if isinstance(cfg_or_space, Config):
        return cfg_or_space.budget_changes
    return load_config(cfg_or_space, budget).budget_changes


def budget_report(cfg: Config) -> str:
    """What the budget replaced, for the start of every run.

    Args:
        cfg: a loaded study.

    Returns:
        ``budget smoke replaces 3 key(s) of <file>:`` and one line
        ``  key: <value in the study> in the study -> <value used> used`` per key, or one line
        saying the study is used as written.
    """
    ch = cfg.budget_changes
    if not ch:
        return f"budget {cfg.budget}: {cfg.source_file} is used as written (the budget replaces none of its values)"
    lines = [f"budget {cfg.budget} replaces {len(ch)} key(s) of {cfg.source_file}:"]
    for c in ch:
        old = f"{inline_yaml(c.study)}{' (default)' if c.default else ''}"
        used = inline_yaml(c.used) + (" (not searched)" if c.used is None and c.key.startswith("search.params.") else "")
        lines.append(f"  {c.key}: {old} in the study -> {used} used")
    return "\n".join(lines)


def check_audio_length(cfg: Config, num_samples: int) -> None:
    """Check that the rendered source is long enough for one episode (a folder may hold less than asked).

    The load-time check compares the slices with ``data.source.seconds``; a folder source can
    hold less audio than that, which is known only once it is read.

    Args:
        cfg: the study.
        num_samples: samples of the rendered source (:attr:`metafx.data.tasks.TaskSet.num_samples`).

    Raises:
        ConfigError: naming the study file, the slices, the audio there is and the fix.
    """
    m, sr = cfg.maml, cfg.data.sample_rate
    need = (m.k_support + m.k_query) * m.slice_len
    if num_samples >= need:
        return
    src = cfg.data.source
    where = f"the source folder {src.path} holds only" if src.kind == "folder" else "the source audio is only"
    raise ConfigError(
        f"{cfg.source_file}: maml.k_support + maml.k_query = {m.k_support + m.k_query} slices of maml.slice_len = "
        f"{m.slice_len} samples need {need} samples ({need / sr:.3f} s) of audio, but {where} {num_samples} "
        f"({num_samples / sr:.3f} s; data.source.seconds = {src.seconds:g}): add audio"
        f"{' to the folder' if src.kind == 'folder' else ''} or lower maml.slice_len / k_support / k_query",
        key="maml.slice_len")


# --------------------------------------------------------------------------- validation


class _Validator(FieldValidator):
    """The study's hand-written checks: ``checked_by`` fields, cross-field rules, families, search parameters."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.built: dict[str, Any] = {}  # the sections validated so far (search is last: its checks read them)

    # ---- hand-written checks of single settings (named by checked_by)

    def check_source_path(self, v: Any, full: str, f: Field, done: Mapping[str, Any]) -> Path | None:
        if done["kind"] != "folder":
            return None
        if not v:
            raise self.err(full, v, "kind: folder needs a path to a folder of WAV/FLAC files")
        p = self._path(v)
        if not p.is_dir():
            raise self.err(full, str(p), "no such folder; give a folder of WAV/FLAC files")
        return p

    def check_cache_dir(self, v: Any, full: str, f: Field, done: Mapping[str, Any]) -> Path:
        return self._path(v) if v else field_default(f)

    def check_families(self, v: Any, full: str, f: Field, done: Mapping[str, Any]) -> tuple[FamilyConfig, ...]:
        if not isinstance(v, list) or not v:
            raise self.err(full, v, "expected a non-empty list of effect families")
        fams = tuple(self.family(x, i, done["sample_rate"]) for i, x in enumerate(v))
        names = [x.name for x in fams]
        if len(set(names)) != len(names):
            raise self.err(full, names, "family names must be unique")
        return fams

    def check_left_out_families(self, v: Any, full: str, f: Field, done: Mapping[str, Any]) -> tuple[str, ...]:
        if v is None or v == []:
            return ()
        names = [x.name for x in done["families"]]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.err(full, v, f"expected a list of family names of data.families ({', '.join(names)})")
        unknown = [x for x in v if x not in names]
        if unknown:
            raise self.err(full, unknown, f"not in data.families; allowed: {', '.join(names)}")
        if set(v) == set(names):
            raise self.err(full, v, "every family is left out: leave at least one family in meta-training")
        return tuple(v)

    def check_loss(self, v: Any, full: str, f: Field, done: Mapping[str, Any]) -> LossConfig:
        if v is None:
            return field_default(f)
        d = v
        if isinstance(d, str):  # "l1", or a weighted sum "5*l1+stft" (what a categorical search can choose)
            terms: dict[str, float] = {}
            for part in d.replace(" ", "").split("+"):
                w, _, name = part.rpartition("*")
                try:
                    terms[name] = float(w) if w else 1.0
                except ValueError:
                    raise self.err(full, v, "expected a term name or a weighted sum like '5*l1+stft'") from None
            d = terms
        d = self.section(d, full, LOSS_TERMS)
        if not d:
            raise self.err(full, d, f"give at least one term with a weight, from {', '.join(LOSS_TERMS)}")
        return LossConfig(tuple((k, self.num(d[k], f"{full}.{k}", lo=0, lo_open=True)) for k in d))

    def check_search_params(self, v: Any, full: str, f: Field, done: Mapping[str, Any]) -> tuple[SearchParam, ...]:
        v = v or {}
        if not isinstance(v, dict):
            raise self.err(full, v, "expected a mapping dotted.key -> {dist: ..., ...}")
        # A parameter set to null (e.g. by a budget) is not searched.
        return tuple(self.search_param(pk, spec) for pk, spec in v.items() if spec is not None)

    def check_search_first(self, v: Any, full: str, f: Field, done: Mapping[str, Any]
                           ) -> tuple[tuple[tuple[str, Any], ...], ...]:
        if v is None or v == []:
            return ()
        params = {p.key: p for p in done["params"]}
        if not isinstance(v, list) or not all(isinstance(x, dict) and x for x in v):
            raise self.err(full, v, "expected a list of mappings {searched.key: value}, e.g. [{maml.method: ridge}]")
        out = []
        for i, point in enumerate(v):
            for k, val in point.items():
                p = params.get(k)
                if p is None:
                    raise self.err(f"{full}[{i}].{k}", val, f"not a key of search.params; searched: {', '.join(params)}")
                ok = val in p.choices if p.dist == "categorical" else (
                    isinstance(val, (int, float)) and not isinstance(val, bool) and p.low <= val <= p.high)
                if not ok:
                    allowed = p.choices if p.dist == "categorical" else f"[{p.low}, {p.high}]"
                    raise self.err(f"{full}[{i}].{k}", val, f"outside search.params.{k}: allowed {allowed}")
            out.append(tuple(point.items()))
        return tuple(out)

    # ---- cross-field rules

    def rules(self, obj: Any, key: str) -> None:
        """The rules that tie several settings of one section together."""
        if isinstance(obj, MAMLConfig) and obj.method in STEP_METHODS and obj.inner_steps < 1:
            raise self.err(key + ".inner_steps", obj.inner_steps,
                           f"{key}.method = {obj.method!r} adapts only by inner gradient steps, so with 0 steps nothing "
                           f"is adapted (its adapted metrics would equal those before adaptation): set "
                           f"{key}.inner_steps >= 1, or {key}.method: joint to train without adaptation")
        if isinstance(obj, DataConfig) and obj.val_fraction + obj.test_fraction >= 1:
            raise self.err(key + ".val_fraction", obj.val_fraction,
                           f"val_fraction + test_fraction ({obj.val_fraction + obj.test_fraction}) must be < 1")
        if isinstance(obj, TransformerConfig) and obj.d_model % obj.heads:
            raise self.err(key + ".d_model", obj.d_model, f"must be divisible by {key}.heads = {obj.heads}")
        if isinstance(obj, SSMConfig) and obj.r_min > obj.r_max:
            raise self.err(key + ".r_min", obj.r_min, f"must be <= {key}.r_max = {obj.r_max}")
        if isinstance(obj, ARXConfig):
            k = key + "."
            if obj.features == "learned":
                if obj.n_point + obj.n_gate + obj.n_env == 0:
                    raise self.err(k + "features", obj.features, "learned features need n_point, n_gate or n_env "
                                   ">= 1 (or use features: none)")
                if obj.n_gate and not obj.n_env:
                    raise self.err(k + "n_gate", obj.n_gate, f"gates are driven by the envelopes: set {k}n_env "
                                   ">= 1 or n_gate: 0")
                if obj.n_filter and not obj.n_point:
                    raise self.err(k + "n_filter", obj.n_filter, f"the filters feed the pointwise MLP: set {k}n_point "
                                   ">= 1 or n_filter: 0")
                if obj.n_start and not obj.n_gate:
                    raise self.err(k + "n_start", obj.n_start, f"n_start feeds the gate MLP: set {k}n_gate >= 1 "
                                   "or n_start: 0")
            if obj.ridge_feat is not None and not obj.per_coef_ridge:
                raise self.err(k + "ridge_feat", obj.ridge_feat, "a separate ridge for the learned channels needs "
                               f"{k}per_coef_ridge: true (or ridge_feat: null)")
            if obj.cv_classical and not obj.cv_ridge:
                raise self.err(k + "cv_classical", obj.cv_classical, "classical ARX is a candidate of the per-task "
                               f"cross-validation: set {k}cv_ridge: true (or cv_classical: false)")

    # ---- the whole study

    def config(self, raw: dict[str, Any], budget: str) -> Config:
        """Validate every section, then the rules across sections."""
        self.section(raw, "", TOP_KEYS)
        name = raw.get("name", self.path.stem)
        if not isinstance(name, str) or not name:
            raise self.err("name", name, "expected a non-empty string")
        self.built = {}
        for key, cls in SECTIONS.items():
            self.built[key] = self.build(cls, raw.get(key), key)
        s = self.built
        data, model, maml = s["data"], s["model"], s["maml"]
        if data.source.seconds * data.sample_rate < (maml.k_support + maml.k_query) * maml.slice_len:
            raise ConfigError(
                f"{self.path}: maml.k_support + maml.k_query = {maml.k_support + maml.k_query} slices of "
                f"maml.slice_len = {maml.slice_len} samples need "
                f"{(maml.k_support + maml.k_query) * maml.slice_len / data.sample_rate:.2f} s of audio, but "
                f"data.source.seconds = {data.source.seconds}: raise data.source.seconds or lower the slices"
            )
        t = model.tcn
        rf = tcn_receptive_field(t.kernel, t.blocks, t.dilation_growth)
        if model.arch == "tcn" and rf >= maml.slice_len:
            raise ConfigError(
                f"{self.path}: the TCN's receptive field ({rf} samples from "
                f"model.tcn.kernel = {t.kernel}, blocks = {t.blocks}, dilation_growth = "
                f"{t.dilation_growth}) must be shorter than maml.slice_len = {maml.slice_len}: "
                "lower the kernel, blocks or dilation growth, or use longer slices")
        if maml.method in CONTEXT_METHODS and (model.context_dim < 1 or model.arch not in FILM_ARCHS):
            raise ConfigError(
                f"{self.path}: maml.method = {maml.method!r} adapts a FiLM context and needs model.context_dim >= 1 "
                f"and model.arch in {' | '.join(FILM_ARCHS)}; got model.context_dim = {model.context_dim}, "
                f"model.arch = {model.arch!r}: set model.context_dim (e.g. 16) and a FiLM model, or use maml.method maml | anil")
        if model.context_dim and model.arch not in FILM_ARCHS:
            raise self.err("model.context_dim", model.context_dim,
                           f"model.arch {model.arch!r} takes no context: set model.context_dim: 0 or use "
                           f"{' | '.join(FILM_ARCHS)}")
        if maml.backend == "higher" and (maml.method not in ("maml", "joint") or maml.stabilized()):
            raise ConfigError(
                f"{self.path}: maml.backend = 'higher' runs plain MAML only (the paper's setting); maml.method = "
                f"{maml.method!r} and the MAML++ stabilizers (learn_inner_lr, multi_step_loss, outer_schedule) run "
                "on the func backend: set maml.backend: func")
        if maml.method == "ridge" and model.arch != "arx":
            raise ConfigError(
                f"{self.path}: maml.method = 'ridge' (closed-form head fit) needs model.arch = 'arx', got "
                f"model.arch = {model.arch!r}: set model.arch: arx, or use maml.method maml | joint")
        if model.arch == "arx" and maml.method != "ridge":
            others = " | ".join(a for a in ARCHS if a != "arx")
            raise ConfigError(
                f"{self.path}: model.arch = 'arx' is adapted in closed form and needs maml.method = 'ridge', got "
                f"maml.method = {maml.method!r}: set maml.method: ridge, or use model.arch {others}")
        if model.arch == "arx" and max(model.arx.nb - 1, model.arx.na) >= maml.slice_len:
            raise ConfigError(
                f"{self.path}: model.arx.nb = {model.arx.nb} / na = {model.arx.na} leave no equation in a slice of "
                f"maml.slice_len = {maml.slice_len} samples: lower the orders or use longer slices")
        uses_transformer = model.arch == "transformer" or (model.arch == "arx" and model.arx.features == "transformer")
        if uses_transformer and maml.slice_len > model.transformer.max_len:
            raise self.err("maml.slice_len", maml.slice_len, f"must be <= model.transformer.max_len = {model.transformer.max_len}")
        return Config(name, self.path, budget, **s)

    # ---- effect families

    def _path(self, p: Any) -> Path:
        """A user path: absolute, else relative to the study file's folder if it exists there, else to the repo."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.path.parent / p).resolve() if (self.path.parent / p).exists() else (REPO_ROOT / p).resolve()

    def family(self, f: Any, i: int, sr: int) -> FamilyConfig:
        """One ``data.families[i]`` entry: its .dsp file found, its sliders' grids parsed, cutoffs below Nyquist."""
        key = f"data.families[{i}]"
        f = self.section(f, key, tuple(x.name for x in fields(FamilyConfig)))
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise self.err(f"{key}.name", name, "expected a non-empty string")
        dsp = f.get("dsp", f"{name}.dsp")
        if not isinstance(dsp, str):
            raise self.err(f"{key}.dsp", dsp, "expected a .dsp file name or path")
        cands = [Path(os.path.expanduser(dsp))]
        if not cands[0].is_absolute():
            cands = [self.path.parent / dsp, EFFECTS_DIR / dsp, REPO_ROOT / dsp]
        found = next((c.resolve() for c in cands if c.is_file()), None)
        if found is None:
            shipped = ", ".join(sorted(x.name for x in EFFECTS_DIR.glob("*.dsp")))
            raise self.err(f"{key}.dsp", dsp, f"no such .dsp file (looked in {', '.join(map(str, cands))}); shipped effects: {shipped}")
        params_raw = f.get("params")
        if not isinstance(params_raw, dict) or not params_raw:
            raise self.err(f"{key}.params", params_raw, "expected a mapping slider -> grid, e.g. cutoff: {low: 200, high: 8000, num: 8, scale: log}")
        params = []
        for pname, spec in params_raw.items():
            pkey = f"{key}.params.{pname}"
            values = self.slider_values(spec, pkey)
            if is_cutoff_param(str(pname)):
                top = max(values)
                if top >= sr / 2:
                    raise self.err(pkey, top, f"a cutoff must be below Nyquist ({sr / 2:g} Hz at data.sample_rate = {sr})")
                if min(values) <= 0:
                    raise self.err(pkey, min(values), "a cutoff must be > 0 Hz")
            params.append(ParamGrid(str(pname), values))
        mt = self.value(field_named(FamilyConfig, "max_tasks"), f, f"{key}.max_tasks", {})
        return FamilyConfig(name=name, dsp=found, params=tuple(params), max_tasks=mt)

    def slider_values(self, spec: Any, key: str) -> tuple[float, ...]:
        """The grid values of one slider: a number, a list, or a range ``{low, high, num, scale: lin | log}``."""
        if isinstance(spec, list):
            if not spec:
                raise self.err(key, spec, "an empty grid has no tasks; give at least one value")
            for x in spec:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                    raise self.err(key, spec, "grid values must be finite numbers")
            return tuple(float(x) for x in spec)
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return (float(spec),)
        spec = self.section(spec, key, ("low", "high", "num", "scale"))
        lo = self.num(spec["low"], f"{key}.low") if "low" in spec else None
        hi = self.num(spec["high"], f"{key}.high") if "high" in spec else None
        if lo is None or hi is None:
            raise self.err(key, spec, "a range needs low and high (and num, scale: lin|log), or give a list")
        num = self.num(spec["num"], f"{key}.num", lo=1, integer=True) if "num" in spec else None
        if num is None:
            raise self.err(f"{key}.num", None, "a range needs num >= 1 grid points")
        if hi < lo:
            raise self.err(f"{key}.high", hi, f"must be >= low ({lo})")
        scale = self.choice(spec.get("scale", "lin"), f"{key}.scale", GRID_SCALES)
        if num == 1:
            return (float(lo),)
        if scale == "log":
            if lo <= 0:
                raise self.err(f"{key}.low", lo, "a log-scale grid needs low > 0")
            return tuple(float(lo * (hi / lo) ** (i / (num - 1))) for i in range(num))
        return tuple(float(lo + (hi - lo) * i / (num - 1)) for i in range(num))

    # ---- search parameters

    def search_param(self, key: str, spec: Any) -> SearchParam:
        """One ``search.params.<key>`` entry; the key must name a real setting of a searchable section.

        Its range (``low`` and ``high``) or every choice must be values the key itself accepts
        (the field's declared check), so a bad range fails here, before any trial starts.
        """
        full = f"search.params.{key}"
        spec = self.section(spec, full, SEARCH_PARAM_KEYS)
        sec = key.split(".")
        if sec[0] not in SEARCHABLE_SECTIONS or len(sec) < 2:
            raise self.err(full, key, "a searched key must be a dotted key under data, model, maml or eval")
        # The key must name a real setting: walk the dataclass fields (and the validated sections beside them).
        cls: Any = SECTIONS[sec[0]]
        parent: Any = None
        obj: Any = self.built.get(sec[0])
        f: Field | None = None
        term = None  # maml.inner_loss.<term>: the weight of one loss term
        for i, part in enumerate(sec[1:], start=1):
            names = tuple(x.name for x in fields(cls)) if cls is not None else ()
            if part not in names:
                allowed = ", ".join(names) if names else "(no sub-keys)"
                raise ConfigError(
                    f"{self.path}: search.params key {key!r} is not a setting of the model or trainer: "
                    f"{part!r} is unknown; allowed there: {allowed}", key=full, allowed=f"allowed there: {allowed}"
                )
            f = field_named(cls, part)
            parent, obj = obj, getattr(obj, part, None)
            if f.metadata.get("check") == "loss":
                if i + 1 < len(sec):
                    term = ".".join(sec[i + 1:])
                    if term not in LOSS_TERMS:
                        raise self.err(full, key, f"{'.'.join(sec[:i + 1])}.<term> takes a loss term: "
                                                  f"{', '.join(LOSS_TERMS)}")
                break
            cls = f.metadata.get("cls")
        dist = spec.get("dist")
        if dist not in DISTRIBUTIONS:
            raise self.err(full + ".dist", dist, f"unknown distribution; allowed: {', '.join(DISTRIBUTIONS)}")
        when_raw = spec.get("when") or {}
        if not isinstance(when_raw, dict):
            raise self.err(full + ".when", when_raw, "expected a mapping dotted.key -> value or list of values")
        when = tuple((wk, tuple(wv) if isinstance(wv, list) else (wv,)) for wk, wv in when_raw.items())
        if dist == "categorical":
            ch = spec.get("choices")
            if not isinstance(ch, list) or not ch:
                raise self.err(full + ".choices", ch, "a categorical parameter needs a non-empty list of choices")
            self.search_values(key, f, parent, term, dist, [("choice", c) for c in ch])
            return SearchParam(key, dist, choices=tuple(ch), when=when)
        lo = self.num(spec["low"], full + ".low") if "low" in spec else None
        hi = self.num(spec["high"], full + ".high") if "high" in spec else None
        if lo is None or hi is None:
            raise self.err(full, spec, f"dist {dist} needs low and high")
        if lo > hi:
            raise self.err(full + ".low", lo, f"low must be <= high ({hi})")
        if dist == "loguniform" and lo <= 0:
            raise self.err(full + ".low", lo, "loguniform needs low > 0")
        step = None
        if dist == "int":
            if not float(lo).is_integer() or not float(hi).is_integer():
                raise self.err(full, spec, "dist int needs integer low and high")
            step = self.num(spec.get("step", 1), full + ".step", lo=1, integer=True)
            lo, hi = int(lo), int(hi)
        self.search_values(key, f, parent, term, dist, [("low", spec["low"]), ("high", spec["high"])])
        return SearchParam(key, dist, low=lo, high=hi, step=step, log=dist == "loguniform", when=when)

    def search_values(self, key: str, f: Field, parent: Any, term: str | None, dist: str,
                      values: list[tuple[str, Any]]) -> None:
        """Check a searched parameter's bounds or choices as values of its key.

        Args:
            key: the searched dotted key.
            f: its field (for a loss term: the loss field).
            parent: the validated section holding ``f`` (hand-written checks read its other settings).
            term: for ``maml.<loss>.<term>``: the term whose weight is searched; else None.
            dist: the distribution.
            values: ``(what, value)``: ``("low", lo), ("high", hi)`` or ``("choice", c)`` for each choice.

        Raises:
            ConfigError: a value the key does not accept, or a numeric distribution for a key that
                is not a number (or real numbers for an integer key); names the file, the
                parameter, the value and what the key accepts.
        """
        full = f"search.params.{key}"
        m = f.metadata
        kind = m.get("kind")
        accepts = "weights > 0" if term else _accepts(f)
        if term is None and dist != "categorical" and kind != "num":
            raise ConfigError(f"{self.path}: {full}: dist {dist} samples numbers, but {key} takes "
                              f"{accepts or 'no number'}: use "
                              "dist: categorical with a list of choices", key=full, allowed="dist: categorical")
        if term is None and dist in ("uniform", "loguniform") and m.get("integer"):
            raise ConfigError(f"{self.path}: {full}: dist {dist} samples real numbers, but {key} takes {accepts}: "
                              "use dist: int (or categorical)", key=full, allowed="dist: int or categorical")
        done = {x.name: getattr(parent, x.name) for x in fields(parent)} if parent is not None else {}
        for what, v in values:
            try:
                if term is not None:
                    self.num(v, key, lo=0, lo_open=True)
                else:
                    self.value(f, {f.name: v}, key, done)
            except ConfigError as e:
                allowed = accepts or e.allowed
                raise ConfigError(f"{self.path}: {full}: {what} {v!r} is not a value {key} accepts ({allowed})",
                                  key=full, allowed=allowed) from None


def _accepts(f: Field) -> str | None:
    """What a field accepts, in words, from its declared check (None for a hand-written check)."""
    m = f.metadata
    kind = m.get("kind")
    if kind == "num":
        what = "integers" if m["integer"] else "numbers"
        lo, hi = m["lo"], m["hi"]
        if lo is not None and hi is not None:
            what += f" in {'(' if m['lo_open'] else '['}{lo:g}, {hi:g}]"
        elif lo is not None:
            what += f" {'>' if m['lo_open'] else '>='} {lo:g}"
        elif hi is not None:
            what += f" <= {hi:g}"
        return what + (", or null" if m["nullable"] else "")
    if kind == "bool":
        return "true or false"
    if kind == "choice":
        ch = m["choices"]() if callable(m["choices"]) else m["choices"]
        return "one of " + ", ".join(map(str, ch))
    if kind == "text":
        return m["expect"].removeprefix("expected ")
    if kind == "section":
        return f"a mapping of {', '.join(x.name for x in fields(m['cls']))}"
    if m.get("check") == "loss":
        return f"a loss term ({', '.join(LOSS_TERMS)}), a weighted sum such as '5*l1+stft', or a mapping term -> weight"
    return None
