"""Study configuration: YAML -> validated, frozen dataclasses.

A study file (``search_spaces/*.yaml``) is a complete single-trial configuration
(``data``, ``model``, ``maml``, ``eval`` sections) plus an optional ``search``
section and a ``budgets`` section of dotted overrides (``smoke``, ``local``,
``paper``). :func:`load_config` resolves the file, applies the budget and any
``--set key=value`` overrides to the raw mapping, then validates every key.

Every problem raises :class:`ConfigError` naming the file, the dotted key, the
bad value and what is allowed (nanoGPT's "Unknown config key", DESIGN.md
style rule 3). The resolved mapping (:attr:`Config.raw`) is what checkpoints,
MLflow and the best-config writer store, so a stored config reloads to the
same :class:`Config`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACES_DIR = REPO_ROOT / "search_spaces"
EFFECTS_DIR = Path(__file__).resolve().parent / "data" / "effects"
BUDGETS = ("smoke", "local", "paper")
DEFAULT_BUDGET = "local"

ARCHS = ("lstm", "tcn", "transformer", "arx", "ssm")
# maml: adapt every weight (paper); anil: adapt only the output head; cavia: adapt only a FiLM context
# vector; encoder: infer the context from the support pairs (amortized), optionally refined by inner
# steps; joint: no inner loop in training (ablation); ridge: closed-form head (metafx.closed_form),
# only with model.arch arx.
METHODS = ("maml", "anil", "cavia", "encoder", "joint", "ridge")
CONTEXT_METHODS = ("cavia", "encoder")  # need model.context_dim >= 1 and a model with FiLM
FILM_ARCHS = ("lstm", "tcn", "ssm")
OUTER_SCHEDULES = ("constant", "cosine")
ARX_FEATURES = ("none", "learned")
BACKENDS = ("func", "higher")
LOSS_TERMS = ("l1", "esr", "stft", "mrstft")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "categorical")


class ConfigError(ValueError):
    """A study file or override is invalid. The message names file, key, value and the fix."""


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ParamGrid:
    """One slider of a Faust effect and the values the task grid takes for it."""

    name: str  # Faust slider label, e.g. "cutoff"
    values: tuple[float, ...]


@dataclass(frozen=True)
class FamilyConfig:
    """One effect family: a Faust .dsp file with named sliders and a parameter grid."""

    name: str
    dsp: Path  # absolute path to the .dsp file
    params: tuple[ParamGrid, ...]
    max_tasks: int | None = None  # random subset of the full grid (seeded), None = all

    def grid(self) -> list[dict[str, float]]:
        """Cartesian product of the parameter values, as a list of {slider: value}."""
        out: list[dict[str, float]] = [{}]
        for p in self.params:
            out = [{**d, p.name: v} for d in out for v in p.values]
        return out


@dataclass(frozen=True)
class SourceConfig:
    """Source (dry) audio: a synthesized corpus or a folder of user audio."""

    kind: str = "synth"  # "synth" | "folder"
    path: Path | None = None  # folder of WAV/FLAC when kind == "folder"
    seconds: float = 20.0  # total length of the corpus (synth) or cap (folder)
    seed: int = 0
    loudness_db: float = -18.0  # RMS target, dBFS


@dataclass(frozen=True)
class DataConfig:
    sample_rate: int = 48000
    source: SourceConfig = field(default_factory=SourceConfig)
    families: tuple[FamilyConfig, ...] = ()
    on_unstable: str = "drop"  # "drop" (warn) | "fail"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    cache_dir: Path = Path("~/.cache/metafx/datasets").expanduser()
    render_workers: int = 0  # 0 = one thread per core


@dataclass(frozen=True)
class LSTMConfig:
    hidden: int = 32
    skip: bool = True  # Wright et al.: add the input to the output


@dataclass(frozen=True)
class TCNConfig:
    channels: int = 16
    blocks: int = 4
    kernel: int = 9
    dilation_growth: int = 4


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    ff: int = 256
    levels: int = 256  # 8-bit tokens
    max_len: int = 32768


@dataclass(frozen=True)
class ARXConfig:
    """Meta-learned features + a per-task linear ARX head fitted in closed form (metafx/models/arx.py).

    Defaults: the prototype's best Moog setting (classical ARX(13, 12) regressors [1, x] with a
    meta-learned per-coefficient ridge and prior mean; learned features did not help on Moog).
    """

    nb: int = 13  # MA taps per feature channel (b_0 .. b_{nb-1})
    na: int = 12  # AR order (a_1 .. a_na); 0 = FIR head on the features
    features: str = "none"  # "none": channels [1, x] | "learned": plus the meta-learned channels below
    hidden: int = 32  # width of the pointwise and gate MLPs (features: learned)
    n_point: int = 12  # pointwise nonlinear channels MLP(x)
    n_env: int = 6  # log one-pole envelope channels of |x| (learned time constants)
    n_gate: int = 8  # x * sigmoid(MLP(envelopes)) channels (need n_env >= 1)
    n_start: int = 0  # "time since slice start" inputs of the gate MLP (zero initial state is known)
    ridge: float = 1e-8  # initial relative ridge of the b coefficients of [1, x]
    ridge_a: float = 1e-8  # initial relative ridge of the AR coefficients
    ridge_feat: float | None = None  # initial relative ridge of the learned channels' b; None = ridge
    per_coef_ridge: bool = True  # one meta-learned ridge per coefficient (else one for b, one for a)
    ridge_lr_scale: float = 16.0  # log-ridge learning rate = ridge_lr_scale * maml.outer_lr
    rmax: float = 0.999  # pole radius clamp of the fitted A(z)
    fft_pad: int = 4  # IIR simulated by FFT over fft_pad * T samples (wrap-around < rmax^((pad-1)T))
    cosine_lr: bool = True  # cosine annealing of the outer learning rate over maml.meta_steps


@dataclass(frozen=True)
class SSMConfig:
    """Diagonal complex linear recurrence computed by FFT convolution (metafx/models/ssm.py)."""

    channels: int = 16  # H: width of every layer
    state: int = 16  # N: complex diagonal modes per channel
    layers: int = 2
    r_min: float = 0.9  # initial pole radii drawn in [r_min, r_max] (per sample)
    r_max: float = 0.9999
    skip: bool = True  # add the dry input to the output


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "lstm"
    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    tcn: TCNConfig = field(default_factory=TCNConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    arx: ARXConfig = field(default_factory=ARXConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    context_dim: int = 0  # FiLM context size (methods cavia, encoder); 0 = no context
    encoder_hidden: int = 64  # width of the amortized task encoder's MLP (method encoder)
    encoder_bands: int = 32  # log-spaced bands of the encoder's transfer-function features


@dataclass(frozen=True)
class LossConfig:
    """A weighted sum of loss terms, e.g. {"l1": 1.0, "mrstft": 0.1}."""

    terms: tuple[tuple[str, float], ...] = (("l1", 1.0),)


@dataclass(frozen=True)
class MAMLConfig:
    method: str = "maml"  # see METHODS
    backend: str = "func"  # "func" (torch.func) | "higher"
    first_order: bool = False
    inner_steps: int = 1
    inner_lr: float = 0.1
    outer_lr: float = 1e-3
    meta_batch: int = 4
    meta_steps: int = 200
    k_support: int = 4
    k_query: int = 4
    slice_len: int = 2048  # samples per slice
    inner_loss: LossConfig = field(default_factory=LossConfig)
    outer_loss: LossConfig = field(default_factory=LossConfig)
    grad_clip: float = 0.0  # 0 = off
    eval_every: int = 20
    val_episodes: int = 8
    checkpoint_every: int = 50
    seed: int = 0
    # MAML++ stabilizers (Antoniou et al. 2019), usable with maml, anil, cavia and encoder:
    learn_inner_lr: bool = False  # learned per-step, per-tensor inner learning rates (LSLR), init inner_lr
    multi_step_loss: bool = False  # query loss after every inner step, weights annealed to the last step
    msl_steps: int = 100  # meta-steps over which the multi-step weights anneal to the last step
    outer_schedule: str = "constant"  # "constant" | "cosine" annealing of outer_lr over meta_steps

    def stabilized(self) -> bool:
        """True when a MAML++ stabilizer (other than grad_clip) is on."""
        return self.learn_inner_lr or self.multi_step_loss or self.outer_schedule != "constant"


@dataclass(frozen=True)
class EvalConfig:
    test_episodes: int = 16
    test_seed: int = 1234
    lsfir_taps: int = 256
    lsfir_ridge: float = 1e-6
    joint_steps: int = 200  # joint-training baseline steps (0 = skip)
    single_task_steps: int = 200  # single-task baseline steps (0 = skip)
    single_task_tasks: int = 2  # how many test tasks get a single-task model
    hf_margin: float = 1.0  # spectral error counted above margin * cutoff


@dataclass(frozen=True)
class SearchParam:
    key: str  # dotted config key, e.g. "maml.inner_lr"
    dist: str  # loguniform | uniform | int | categorical
    low: float | None = None
    high: float | None = None
    step: int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key, allowed values): exists only then


@dataclass(frozen=True)
class SearchConfig:
    params: tuple[SearchParam, ...] = ()
    num_samples: int = 8
    max_concurrent: int = 2
    scheduler: str = "asha"  # "asha" | "fifo"
    grace_period: int = 20  # meta-steps
    reduction_factor: int = 2
    metric: str = "val/query_l1_post"
    mode: str = "min"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fraction; used only where GPUs exist
    seed: int = 0
    max_failures: int = 2


@dataclass(frozen=True)
class Config:
    name: str
    source_file: Path
    budget: str
    data: DataConfig
    model: ModelConfig
    maml: MAMLConfig
    eval: EvalConfig
    search: SearchConfig
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved mapping: budget and overrides applied, no ``budgets`` section."""
        return copy.deepcopy(dict(self.raw))

    def flat(self) -> dict[str, Any]:
        """Flattened dotted keys of :meth:`to_dict` (for MLflow params)."""
        return flatten(self.to_dict())

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- helpers


def tcn_receptive_field(t: TCNConfig) -> int:
    """Samples of input one TCN output sample depends on: 1 + (k - 1) * sum_i growth**i."""
    return 1 + (t.kernel - 1) * sum(t.dilation_growth ** i for i in range(t.blocks))



def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_INDEX = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<i>\d+)\]$")


def set_dotted(d: dict[str, Any], key: str, value: Any, *, where: str = "override") -> None:
    """Set ``a.b.c`` (or ``data.families[0].max_tasks``) in a nested dict.

    Missing sections are created. Under ``search.params`` the rest of the key is one
    (dotted) parameter name, so ``search.params.maml.inner_lr`` sets that parameter.
    """
    parts = key.split(".")
    cur: Any = d
    trail: list[str] = []
    i = 0
    while i < len(parts) - 1:
        p = parts[i]
        if trail == ["search", "params"]:
            break
        m = _INDEX.match(p)
        name = m.group("name") if m else p
        nxt = cur.get(name)
        if m:
            idx = int(m.group("i"))
            if not isinstance(nxt, list) or idx >= len(nxt):
                raise ConfigError(f"{where}: cannot set {key!r}: {name!r} has no item [{idx}]")
            nxt = nxt[idx]
        elif nxt is None:
            nxt = cur[name] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: cannot set {key!r}: {p!r} is a {type(nxt).__name__}, not a section")
        cur = nxt
        trail.append(name)
        i += 1
    cur[".".join(parts[i:])] = value


def get_dotted(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    cur: Any = d
    for p in key.split("."):
        if not isinstance(cur, Mapping) or p not in cur:
            return default
        cur = cur[p]
    return cur


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so 1e-3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, for example --set maml.inner_lr=0.05")
    key, val = text.split("=", 1)
    return key.strip(), yaml.safe_load(val)


def resolve_space(space: str | os.PathLike[str]) -> Path:
    """A study name (``lstm``, ``lstm.yaml``) in search_spaces/, or a path to a YAML file."""
    p = Path(space)
    candidates = [p] if p.suffix in (".yaml", ".yml") else [p.with_suffix(".yaml"), p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    for c in candidates:
        if (SPACES_DIR / c.name).is_file() and len(c.parts) == 1:
            return (SPACES_DIR / c.name).resolve()
    known = ", ".join(sorted(x.name for x in SPACES_DIR.glob("*.yaml")))
    raise ConfigError(f"study {str(space)!r} not found as a path or in {SPACES_DIR}; known studies: {known}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with data/model/maml/eval sections")
    return data


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
    for k, v in (budgets.get(budget) or {}).items():
        set_dotted(raw, k, v, where=f"{path}: budgets.{budget}")
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
        for k, v in items:
            set_dotted(raw, k, v, where=f"{path}: override {k}")
    v = _Validator(path)
    cfg = v.config(raw, budget)
    resolved = copy.deepcopy(raw)
    resolved["budget"] = budget
    object.__setattr__(cfg, "raw", resolved)
    return cfg


def dump_config(raw: Mapping[str, Any], path: Path, header: str = "") -> None:
    """Write a resolved mapping as a study YAML that :func:`load_config` accepts."""
    text = yaml.safe_dump(_plain(dict(raw)), sort_keys=False, default_flow_style=None)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text((header + "\n" if header else "") + text, encoding="utf-8")
    os.replace(tmp, path)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    return x


# --------------------------------------------------------------------------- validation


class _Validator:
    def __init__(self, path: Path):
        self.path = path

    def err(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{key}' = {value!r} is invalid: {allowed}")

    def section(self, d: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if d is None:
            return {}
        if not isinstance(d, dict):
            raise self.err(key, d, "expected a mapping (a YAML section)")
        for k in d:
            if k not in allowed:
                raise ConfigError(
                    f"{self.path}: unknown key '{key + '.' if key else ''}{k}'; allowed keys here: {', '.join(allowed)}"
                )
        return d

    def num(self, d, key, default, *, lo=None, hi=None, lo_open=False, integer=False, full=None):
        full = full or key
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(full, v, "expected an integer" if integer else "expected a number")
        if integer and not float(v).is_integer():
            raise self.err(full, v, "expected an integer")
        if not math.isfinite(float(v)):
            raise self.err(full, v, "expected a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.err(full, v, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise self.err(full, v, f"must be <= {hi}")
        return int(v) if integer else float(v)

    def boolean(self, d, key, default, full):
        v = d.get(key, default)
        if not isinstance(v, bool):
            raise self.err(full, v, "expected true or false")
        return v

    def choice(self, d, key, default, choices, full):
        v = d.get(key, default)
        if v not in choices:
            raise self.err(full, v, f"allowed: {', '.join(map(str, choices))}")
        return v

    # ---- sections

    def config(self, raw: dict[str, Any], budget: str) -> Config:
        self.section(raw, "", ("name", "data", "model", "maml", "eval", "search", "budget", "budgets"))
        name = raw.get("name", self.path.stem)
        if not isinstance(name, str) or not name:
            raise self.err("name", name, "expected a non-empty string")
        data = self.data(raw.get("data"))
        model = self.model(raw.get("model"))
        maml = self.maml(raw.get("maml"))
        ev = self.eval(raw.get("eval"))
        search = self.search(raw.get("search"), raw)
        # Cross-section checks.
        if data.source.seconds * data.sample_rate < (maml.k_support + maml.k_query) * maml.slice_len:
            raise ConfigError(
                f"{self.path}: maml.k_support + maml.k_query = {maml.k_support + maml.k_query} slices of "
                f"maml.slice_len = {maml.slice_len} samples need "
                f"{(maml.k_support + maml.k_query) * maml.slice_len / data.sample_rate:.2f} s of audio, but "
                f"data.source.seconds = {data.source.seconds}: raise data.source.seconds or lower the slices"
            )
        if model.arch == "tcn" and tcn_receptive_field(model.tcn) >= maml.slice_len:
            raise ConfigError(
                f"{self.path}: the TCN's receptive field ({tcn_receptive_field(model.tcn)} samples from "
                f"model.tcn.kernel = {model.tcn.kernel}, blocks = {model.tcn.blocks}, dilation_growth = "
                f"{model.tcn.dilation_growth}) must be shorter than maml.slice_len = {maml.slice_len}: "
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
            raise ConfigError(
                f"{self.path}: model.arch = 'arx' is adapted in closed form and needs maml.method = 'ridge', got "
                f"maml.method = {maml.method!r}: set maml.method: ridge, or use model.arch lstm | tcn | transformer | ssm")
        if model.arch == "arx" and max(model.arx.nb - 1, model.arx.na) >= maml.slice_len:
            raise ConfigError(
                f"{self.path}: model.arx.nb = {model.arx.nb} / na = {model.arx.na} leave no equation in a slice of "
                f"maml.slice_len = {maml.slice_len} samples: lower the orders or use longer slices")
        if model.arch == "transformer" and maml.slice_len > model.transformer.max_len:
            raise self.err("maml.slice_len", maml.slice_len, f"must be <= model.transformer.max_len = {model.transformer.max_len}")
        return Config(name, self.path, budget, data, model, maml, ev, search)

    def data(self, d: Any) -> DataConfig:
        d = self.section(d, "data", ("sample_rate", "source", "families", "on_unstable", "val_fraction",
                                     "test_fraction", "split_seed", "cache_dir", "render_workers"))
        sr = self.num(d, "sample_rate", 48000, lo=8000, hi=384000, integer=True, full="data.sample_rate")
        s = self.section(d.get("source"), "data.source", ("kind", "path", "seconds", "seed", "loudness_db"))
        kind = self.choice(s, "kind", "synth", ("synth", "folder"), "data.source.kind")
        spath = s.get("path")
        if kind == "folder":
            if not spath:
                raise self.err("data.source.path", spath, "kind: folder needs a path to a folder of WAV/FLAC files")
            spath = self._path(spath)
            if not spath.is_dir():
                raise self.err("data.source.path", str(spath), "no such folder; give a folder of WAV/FLAC files")
        else:
            spath = None
        source = SourceConfig(
            kind=kind,
            path=spath,
            seconds=self.num(s, "seconds", 20.0, lo=0, lo_open=True, full="data.source.seconds"),
            seed=self.num(s, "seed", 0, integer=True, full="data.source.seed"),
            loudness_db=self.num(s, "loudness_db", -18.0, lo=-80, hi=0, full="data.source.loudness_db"),
        )
        fams_raw = d.get("families")
        if not isinstance(fams_raw, list) or not fams_raw:
            raise self.err("data.families", fams_raw, "expected a non-empty list of effect families")
        fams = tuple(self.family(f, i, sr) for i, f in enumerate(fams_raw))
        names = [f.name for f in fams]
        if len(set(names)) != len(names):
            raise self.err("data.families", names, "family names must be unique")
        vf = self.num(d, "val_fraction", 0.15, lo=0, hi=0.9, full="data.val_fraction")
        tf = self.num(d, "test_fraction", 0.15, lo=0, hi=0.9, full="data.test_fraction")
        if vf + tf >= 1:
            raise self.err("data.val_fraction", vf, f"val_fraction + test_fraction ({vf + tf}) must be < 1")
        cache = d.get("cache_dir")
        # Default outside the checkout: a `ray job submit` working directory is deleted after the job,
        # and every node would render again into a fresh one.
        cache = self._path(cache) if cache else Path(os.environ.get("METAFX_CACHE", "~/.cache/metafx/datasets")).expanduser()
        return DataConfig(
            sample_rate=sr,
            source=source,
            families=fams,
            on_unstable=self.choice(d, "on_unstable", "drop", ("drop", "fail"), "data.on_unstable"),
            val_fraction=vf,
            test_fraction=tf,
            split_seed=self.num(d, "split_seed", 0, integer=True, full="data.split_seed"),
            cache_dir=cache,
            render_workers=self.num(d, "render_workers", 0, lo=0, integer=True, full="data.render_workers"),
        )

    def _path(self, p: Any) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.path.parent / p).resolve() if (self.path.parent / p).exists() else (REPO_ROOT / p).resolve()

    def family(self, f: Any, i: int, sr: int) -> FamilyConfig:
        key = f"data.families[{i}]"
        f = self.section(f, key, ("name", "dsp", "params", "max_tasks"))
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
            values = self.grid(spec, pkey)
            if "cutoff" in str(pname).lower() or str(pname).lower() in ("freq", "fc", "frequency"):
                top = max(values)
                if top >= sr / 2:
                    raise self.err(pkey, top, f"a cutoff must be below Nyquist ({sr / 2:g} Hz at data.sample_rate = {sr})")
                if min(values) <= 0:
                    raise self.err(pkey, min(values), "a cutoff must be > 0 Hz")
            params.append(ParamGrid(str(pname), values))
        mt = f.get("max_tasks")
        if mt is not None:
            mt = self.num(f, "max_tasks", None, lo=1, integer=True, full=f"{key}.max_tasks")
        return FamilyConfig(name=name, dsp=found, params=tuple(params), max_tasks=mt)

    def grid(self, spec: Any, key: str) -> tuple[float, ...]:
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
        lo = self.num(spec, "low", None, full=f"{key}.low") if "low" in spec else None
        hi = self.num(spec, "high", None, full=f"{key}.high") if "high" in spec else None
        if lo is None or hi is None:
            raise self.err(key, spec, "a range needs low and high (and num, scale: lin|log), or give a list")
        num = self.num(spec, "num", None, lo=1, integer=True, full=f"{key}.num") if "num" in spec else None
        if num is None:
            raise self.err(f"{key}.num", None, "a range needs num >= 1 grid points")
        if hi < lo:
            raise self.err(f"{key}.high", hi, f"must be >= low ({lo})")
        scale = self.choice(spec, "scale", "lin", ("lin", "log"), f"{key}.scale")
        if num == 1:
            return (float(lo),)
        if scale == "log":
            if lo <= 0:
                raise self.err(f"{key}.low", lo, "a log-scale grid needs low > 0")
            return tuple(float(lo * (hi / lo) ** (i / (num - 1))) for i in range(num))
        return tuple(float(lo + (hi - lo) * i / (num - 1)) for i in range(num))

    def model(self, d: Any) -> ModelConfig:
        d = self.section(d, "model", ("arch", "lstm", "tcn", "transformer", "arx", "ssm", "context_dim",
                                      "encoder_hidden", "encoder_bands"))
        arch = self.choice(d, "arch", "lstm", ARCHS, "model.arch")
        l = self.section(d.get("lstm"), "model.lstm", ("hidden", "skip"))
        t = self.section(d.get("tcn"), "model.tcn", ("channels", "blocks", "kernel", "dilation_growth"))
        x = self.section(d.get("transformer"), "model.transformer", ("d_model", "heads", "layers", "ff", "levels", "max_len"))
        lstm = LSTMConfig(
            hidden=self.num(l, "hidden", 32, lo=1, hi=4096, integer=True, full="model.lstm.hidden"),
            skip=self.boolean(l, "skip", True, "model.lstm.skip"),
        )
        tcn = TCNConfig(
            channels=self.num(t, "channels", 16, lo=1, hi=1024, integer=True, full="model.tcn.channels"),
            blocks=self.num(t, "blocks", 4, lo=1, hi=32, integer=True, full="model.tcn.blocks"),
            kernel=self.num(t, "kernel", 9, lo=1, hi=1025, integer=True, full="model.tcn.kernel"),
            dilation_growth=self.num(t, "dilation_growth", 4, lo=1, hi=64, integer=True, full="model.tcn.dilation_growth"),
        )
        heads = self.num(x, "heads", 4, lo=1, hi=64, integer=True, full="model.transformer.heads")
        dm = self.num(x, "d_model", 128, lo=1, hi=4096, integer=True, full="model.transformer.d_model")
        if dm % heads:
            raise self.err("model.transformer.d_model", dm, f"must be divisible by model.transformer.heads = {heads}")
        tr = TransformerConfig(
            d_model=dm,
            heads=heads,
            layers=self.num(x, "layers", 2, lo=1, hi=48, integer=True, full="model.transformer.layers"),
            ff=self.num(x, "ff", 256, lo=1, integer=True, full="model.transformer.ff"),
            levels=self.num(x, "levels", 256, lo=2, hi=65536, integer=True, full="model.transformer.levels"),
            max_len=self.num(x, "max_len", 32768, lo=1, integer=True, full="model.transformer.max_len"),
        )
        m = self.section(d.get("ssm"), "model.ssm", tuple(SSMConfig.__dataclass_fields__))
        k = "model.ssm."
        r_min = self.num(m, "r_min", 0.9, lo=0, lo_open=True, hi=0.999999, full=k + "r_min")
        r_max = self.num(m, "r_max", 0.9999, lo=0, lo_open=True, hi=0.999999, full=k + "r_max")
        if r_min > r_max:
            raise self.err(k + "r_min", r_min, f"must be <= model.ssm.r_max = {r_max}")
        ssm = SSMConfig(
            channels=self.num(m, "channels", 16, lo=1, hi=4096, integer=True, full=k + "channels"),
            state=self.num(m, "state", 16, lo=1, hi=4096, integer=True, full=k + "state"),
            layers=self.num(m, "layers", 2, lo=1, hi=64, integer=True, full=k + "layers"),
            r_min=r_min,
            r_max=r_max,
            skip=self.boolean(m, "skip", True, k + "skip"),
        )
        return ModelConfig(
            arch=arch, lstm=lstm, tcn=tcn, transformer=tr, arx=self.arx(d.get("arx")), ssm=ssm,
            context_dim=self.num(d, "context_dim", 0, lo=0, hi=4096, integer=True, full="model.context_dim"),
            encoder_hidden=self.num(d, "encoder_hidden", 64, lo=1, hi=4096, integer=True, full="model.encoder_hidden"),
            encoder_bands=self.num(d, "encoder_bands", 32, lo=2, hi=1024, integer=True, full="model.encoder_bands"),
        )

    def arx(self, d: Any) -> ARXConfig:
        d = self.section(d, "model.arx", tuple(ARXConfig.__dataclass_fields__))
        k = "model.arx."
        features = self.choice(d, "features", "none", ARX_FEATURES, k + "features")
        n_env = self.num(d, "n_env", 6, lo=0, hi=64, integer=True, full=k + "n_env")
        n_gate = self.num(d, "n_gate", 8, lo=0, hi=256, integer=True, full=k + "n_gate")
        n_point = self.num(d, "n_point", 12, lo=0, hi=256, integer=True, full=k + "n_point")
        n_start = self.num(d, "n_start", 0, lo=0, hi=16, integer=True, full=k + "n_start")
        if features == "learned":
            if n_point + n_gate + n_env == 0:
                raise self.err(k + "features", features, "learned features need n_point, n_gate or n_env >= 1 "
                               "(or use features: none)")
            if n_gate and not n_env:
                raise self.err(k + "n_gate", n_gate, "gates are driven by the envelopes: set model.arx.n_env >= 1 "
                               "or n_gate: 0")
            if n_start and not n_gate:
                raise self.err(k + "n_start", n_start, "n_start feeds the gate MLP: set model.arx.n_gate >= 1 or n_start: 0")
        per_coef = self.boolean(d, "per_coef_ridge", True, k + "per_coef_ridge")
        rf = d.get("ridge_feat")
        if rf is not None:
            rf = self.num(d, "ridge_feat", None, lo=0, lo_open=True, hi=1e6, full=k + "ridge_feat")
            if not per_coef:
                raise self.err(k + "ridge_feat", rf, "a separate ridge for the learned channels needs "
                               "model.arx.per_coef_ridge: true (or ridge_feat: null)")
        return ARXConfig(
            nb=self.num(d, "nb", 13, lo=1, hi=4096, integer=True, full=k + "nb"),
            na=self.num(d, "na", 12, lo=0, hi=256, integer=True, full=k + "na"),
            features=features,
            hidden=self.num(d, "hidden", 32, lo=1, hi=4096, integer=True, full=k + "hidden"),
            n_point=n_point,
            n_env=n_env,
            n_gate=n_gate,
            n_start=n_start,
            ridge=self.num(d, "ridge", 1e-8, lo=0, lo_open=True, hi=1e6, full=k + "ridge"),
            ridge_a=self.num(d, "ridge_a", 1e-8, lo=0, lo_open=True, hi=1e6, full=k + "ridge_a"),
            ridge_feat=rf,
            per_coef_ridge=per_coef,
            ridge_lr_scale=self.num(d, "ridge_lr_scale", 16.0, lo=0, hi=1e4, full=k + "ridge_lr_scale"),
            rmax=self.num(d, "rmax", 0.999, lo=0, lo_open=True, hi=0.99999, full=k + "rmax"),
            fft_pad=self.num(d, "fft_pad", 4, lo=2, hi=64, integer=True, full=k + "fft_pad"),
            cosine_lr=self.boolean(d, "cosine_lr", True, k + "cosine_lr"),
        )

    def loss(self, d: Any, key: str) -> LossConfig:
        if d is None:
            return LossConfig()
        if isinstance(d, str):  # "l1", or a weighted sum "5*l1+stft" (what a categorical search can choose)
            terms: dict[str, float] = {}
            for part in d.replace(" ", "").split("+"):
                w, _, name = part.rpartition("*")
                try:
                    terms[name] = float(w) if w else 1.0
                except ValueError:
                    raise self.err(key, d, "expected a term name or a weighted sum like '5*l1+stft'") from None
            d = terms
        d = self.section(d, key, LOSS_TERMS)
        if not d:
            raise self.err(key, d, f"give at least one term with a weight, from {', '.join(LOSS_TERMS)}")
        terms = tuple((k, self.num(d, k, None, lo=0, lo_open=True, full=f"{key}.{k}")) for k in d)
        return LossConfig(terms)

    def maml(self, d: Any) -> MAMLConfig:
        d = self.section(d, "maml", tuple(MAMLConfig.__dataclass_fields__))
        k = "maml."
        return MAMLConfig(
            method=self.choice(d, "method", "maml", METHODS, k + "method"),
            backend=self.choice(d, "backend", "func", BACKENDS, k + "backend"),
            first_order=self.boolean(d, "first_order", False, k + "first_order"),
            inner_steps=self.num(d, "inner_steps", 1, lo=0, hi=1000, integer=True, full=k + "inner_steps"),
            inner_lr=self.num(d, "inner_lr", 0.1, lo=0, full=k + "inner_lr"),
            outer_lr=self.num(d, "outer_lr", 1e-3, lo=0, lo_open=True, full=k + "outer_lr"),
            meta_batch=self.num(d, "meta_batch", 4, lo=1, integer=True, full=k + "meta_batch"),
            meta_steps=self.num(d, "meta_steps", 200, lo=1, integer=True, full=k + "meta_steps"),
            k_support=self.num(d, "k_support", 4, lo=1, integer=True, full=k + "k_support"),
            k_query=self.num(d, "k_query", 4, lo=1, integer=True, full=k + "k_query"),
            slice_len=self.num(d, "slice_len", 2048, lo=16, integer=True, full=k + "slice_len"),
            inner_loss=self.loss(d.get("inner_loss"), k + "inner_loss"),
            outer_loss=self.loss(d.get("outer_loss"), k + "outer_loss"),
            grad_clip=self.num(d, "grad_clip", 0.0, lo=0, full=k + "grad_clip"),
            eval_every=self.num(d, "eval_every", 20, lo=1, integer=True, full=k + "eval_every"),
            val_episodes=self.num(d, "val_episodes", 8, lo=1, integer=True, full=k + "val_episodes"),
            checkpoint_every=self.num(d, "checkpoint_every", 50, lo=1, integer=True, full=k + "checkpoint_every"),
            seed=self.num(d, "seed", 0, integer=True, full=k + "seed"),
            learn_inner_lr=self.boolean(d, "learn_inner_lr", False, k + "learn_inner_lr"),
            multi_step_loss=self.boolean(d, "multi_step_loss", False, k + "multi_step_loss"),
            msl_steps=self.num(d, "msl_steps", 100, lo=1, integer=True, full=k + "msl_steps"),
            outer_schedule=self.choice(d, "outer_schedule", "constant", OUTER_SCHEDULES, k + "outer_schedule"),
        )

    def eval(self, d: Any) -> EvalConfig:
        d = self.section(d, "eval", tuple(EvalConfig.__dataclass_fields__))
        k = "eval."
        return EvalConfig(
            test_episodes=self.num(d, "test_episodes", 16, lo=1, integer=True, full=k + "test_episodes"),
            test_seed=self.num(d, "test_seed", 1234, integer=True, full=k + "test_seed"),
            lsfir_taps=self.num(d, "lsfir_taps", 256, lo=1, integer=True, full=k + "lsfir_taps"),
            lsfir_ridge=self.num(d, "lsfir_ridge", 1e-6, lo=0, full=k + "lsfir_ridge"),
            joint_steps=self.num(d, "joint_steps", 200, lo=0, integer=True, full=k + "joint_steps"),
            single_task_steps=self.num(d, "single_task_steps", 200, lo=0, integer=True, full=k + "single_task_steps"),
            single_task_tasks=self.num(d, "single_task_tasks", 2, lo=1, integer=True, full=k + "single_task_tasks"),
            hf_margin=self.num(d, "hf_margin", 1.0, lo=0, lo_open=True, full=k + "hf_margin"),
        )

    def search(self, d: Any, raw: Mapping[str, Any]) -> SearchConfig:
        fields = tuple(f for f in SearchConfig.__dataclass_fields__)
        d = self.section(d, "search", fields)
        k = "search."
        params_raw = d.get("params") or {}
        if not isinstance(params_raw, dict):
            raise self.err(k + "params", params_raw, "expected a mapping dotted.key -> {dist: ..., ...}")
        # A parameter set to null (e.g. by a budget) is not searched.
        params = tuple(self.search_param(pk, spec, raw) for pk, spec in params_raw.items() if spec is not None)
        sched = self.choice(d, "scheduler", "asha", ("asha", "fifo"), k + "scheduler")
        mode = self.choice(d, "mode", "min", ("min", "max"), k + "mode")
        metric = d.get("metric", "val/query_l1_post")
        if not isinstance(metric, str) or not metric:
            raise self.err(k + "metric", metric, "expected a metric name such as val/query_l1_post")
        return SearchConfig(
            params=params,
            num_samples=self.num(d, "num_samples", 8, lo=1, integer=True, full=k + "num_samples"),
            max_concurrent=self.num(d, "max_concurrent", 2, lo=1, integer=True, full=k + "max_concurrent"),
            scheduler=sched,
            grace_period=self.num(d, "grace_period", 20, lo=1, integer=True, full=k + "grace_period"),
            reduction_factor=self.num(d, "reduction_factor", 2, lo=2, integer=True, full=k + "reduction_factor"),
            metric=metric,
            mode=mode,
            cpus_per_trial=self.num(d, "cpus_per_trial", 1.0, lo=0, lo_open=True, full=k + "cpus_per_trial"),
            gpus_per_trial=self.num(d, "gpus_per_trial", 0.0, lo=0, full=k + "gpus_per_trial"),
            seed=self.num(d, "seed", 0, integer=True, full=k + "seed"),
            max_failures=self.num(d, "max_failures", 2, lo=0, integer=True, full=k + "max_failures"),
        )

    def search_param(self, key: str, spec: Any, raw: Mapping[str, Any]) -> SearchParam:
        full = f"search.params.{key}"
        spec = self.section(spec, full, ("dist", "low", "high", "step", "choices", "when"))
        if key.split(".")[0] not in ("data", "model", "maml", "eval"):
            raise self.err(full, key, "a searched key must be a dotted key under data, model, maml or eval")
        sec = key.split(".")
        # The key must name a real setting: validate by walking the dataclass fields.
        cls: Any = {"data": DataConfig, "model": ModelConfig, "maml": MAMLConfig, "eval": EvalConfig}[sec[0]]
        for part in sec[1:]:
            fields = getattr(cls, "__dataclass_fields__", None)
            if fields is None or part not in fields:
                allowed = ", ".join(fields) if fields else "(no sub-keys)"
                raise ConfigError(
                    f"{self.path}: search.params key {key!r} is not a setting of the model or trainer: "
                    f"{part!r} is unknown; allowed there: {allowed}"
                )
            t = fields[part].type
            cls = {"LSTMConfig": LSTMConfig, "TCNConfig": TCNConfig, "TransformerConfig": TransformerConfig,
                   "ARXConfig": ARXConfig, "SSMConfig": SSMConfig, "SourceConfig": SourceConfig, "LossConfig": LossConfig}.get(str(t).split(" ")[0], None)
            if cls is LossConfig:
                break
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
            return SearchParam(key, dist, choices=tuple(ch), when=when)
        lo = self.num(spec, "low", None, full=full + ".low") if "low" in spec else None
        hi = self.num(spec, "high", None, full=full + ".high") if "high" in spec else None
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
            step = self.num(spec, "step", 1, lo=1, integer=True, full=full + ".step")
            lo, hi = int(lo), int(hi)
        return SearchParam(key, dist, low=lo, high=hi, step=step, log=dist == "loguniform", when=when)
