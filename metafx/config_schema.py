"""Every setting of a study: frozen dataclasses whose fields carry each default and bound, written once.

The sections of a study file (``data``, ``model``, ``maml``, ``eval``, ``search``) as
dataclasses. A field declares its default and its check together
(:mod:`metafx.config_fields`: ``number(32, lo=1, hi=4096, integer=True)``), so a
dataclass built in code and a study that leaves the key out get the same value;
:mod:`metafx.config` loads and validates study files into these classes (import them
from there). ``checked_by("x")`` fields are parsed by ``check_x`` of the validator in
:mod:`metafx.config`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from metafx.config_fields import checked_by, flag, number, one_of, subsection, text
from metafx.config_io import flatten

# ARCHS and FILM_ARCHS are read off ModelConfig's model sections (below ModelConfig).
# maml: adapt every weight (paper); anil: adapt only the output head; cavia: adapt only a FiLM context
# vector; encoder: infer the context from the support pairs (amortized), optionally refined by inner
# steps; joint: no inner loop in training (ablation); ridge: closed-form head (metafx.engines.ridge),
# only with model.arch arx.
METHODS = ("maml", "anil", "cavia", "encoder", "joint", "ridge")
CONTEXT_METHODS = ("cavia", "encoder")  # need model.context_dim >= 1 and a model with FiLM
# Adapt only by inner gradient steps, so they need maml.inner_steps >= 1 (with 0 nothing is adapted: that is
# method joint). encoder with 0 steps is pure amortized inference; ridge and joint take no inner steps.
STEP_METHODS = ("maml", "anil", "cavia")
OUTER_SCHEDULES = ("constant", "cosine")
# Feature maps of the ARX head: "none" = [1, x]; "learned" = the small MLP / envelope / gate channels;
# a network's name = its hidden sequence (the model.<arch> section), projected to model.arx.n_trunk channels.
TRUNK_FEATURES = ("lstm", "tcn", "transformer")
ARX_FEATURES = ("none", "learned") + TRUNK_FEATURES
BACKENDS = ("func", "higher")
LOSS_TERMS = ("l1", "esr", "esr_pe", "stft", "mrstft")
# Metrics of every evaluation (validation, test, baselines; functions in metafx.metrics.METRICS).
EVAL_METRICS = ("l1", "stft", "mrstft", "esr", "esr_pe")
# What a trial reports on its validation episodes every maml.eval_every meta-steps (a search.metric may be any).
VAL_METRICS = tuple(f"val/query_{m}_{when}" for m in EVAL_METRICS for when in ("pre", "post"))
DISTRIBUTIONS = ("loguniform", "uniform", "int", "categorical")
SOURCE_KINDS = ("synth", "folder")
ON_UNSTABLE = ("drop", "fail")
SCHEDULERS = ("asha", "fifo")
MODES = ("min", "max")
GRID_SCALES = ("lin", "log")


# --------------------------------------------------------------------------- shared facts


def default_cache_dir() -> Path:
    """Where rendered datasets live unless ``data.cache_dir`` says otherwise.

    Outside the checkout on purpose: a ``ray job submit`` working directory is deleted after
    the job, and every node would render again into a fresh one.

    Returns:
        ``$METAFX_CACHE``, else ``~/.cache/metafx/datasets`` (user-expanded), read at each call.
    """
    return Path(os.environ.get("METAFX_CACHE", "~/.cache/metafx/datasets")).expanduser()


def is_cutoff_param(name: str) -> bool:
    """Whether an effect slider is a cutoff frequency in Hz (checked below Nyquist, used by the HF error).

    Args:
        name: the Faust slider label, e.g. ``"cutoff"``, ``"fc"``.

    Returns:
        True when the lower-cased name contains ``cutoff`` or is ``freq``, ``fc`` or ``frequency``.
    """
    n = str(name).lower()
    return "cutoff" in n or n in ("freq", "fc", "frequency")


def tcn_receptive_field(kernel: int, blocks: int, dilation_growth: int) -> int:
    """Receptive field in samples of the TCN's stack of valid dilated convolutions.

    Lives here rather than in :mod:`metafx.models.tcn` (which re-exports it) because the
    validator checks it against ``maml.slice_len`` and config must not import torch.

    Args:
        kernel: Conv1d kernel size.
        blocks: number of blocks.
        dilation_growth: block ``i`` has dilation ``dilation_growth ** i``.

    Returns:
        ``1 + (kernel - 1) * sum_i dilation_growth ** i``.
    """
    return 1 + (kernel - 1) * sum(dilation_growth**i for i in range(blocks))


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
    max_tasks: int | None = number(None, lo=1, integer=True, nullable=True)  # seeded random subset; None = all

    def grid(self) -> list[dict[str, float]]:
        """The family's tasks: the Cartesian product of the parameter values.

        Returns:
            One ``{slider: value}`` per task, the last slider varying fastest.
        """
        out: list[dict[str, float]] = [{}]
        for p in self.params:
            out = [{**d, p.name: v} for d in out for v in p.values]
        return out


@dataclass(frozen=True)
class SourceConfig:
    """Source (dry) audio: a synthesized corpus or a folder of user audio."""

    kind: str = one_of("synth", SOURCE_KINDS)
    path: Path | None = checked_by("source_path", default=None)  # folder of WAV/FLAC when kind == "folder"
    seconds: float = number(20.0, lo=0, lo_open=True)  # total length of the corpus (synth) or cap (folder)
    seed: int = number(0, integer=True)
    loudness_db: float = number(-18.0, lo=-80, hi=0)  # RMS target, dBFS


@dataclass(frozen=True)
class DataConfig:
    """The task set: sample rate, source audio, effect families, splits and where renders are cached."""

    sample_rate: int = number(48000, lo=8000, hi=384000, integer=True)
    source: SourceConfig = subsection(SourceConfig)
    families: tuple[FamilyConfig, ...] = checked_by("families", default=())  # at least one in a study
    left_out_families: tuple[str, ...] = checked_by("left_out_families", default=())  # split by family: never meta-trained on
    on_unstable: str = one_of("drop", ON_UNSTABLE)  # "drop" (warn) | "fail"
    val_fraction: float = number(0.15, lo=0, hi=0.9)
    test_fraction: float = number(0.15, lo=0, hi=0.9)
    split_seed: int = number(0, integer=True)
    cache_dir: Path = checked_by("cache_dir", default_factory=default_cache_dir)
    render_workers: int = number(0, lo=0, integer=True)  # 0 = one thread per core


@dataclass(frozen=True)
class LSTMConfig:
    """Sizes of the LSTM (metafx/models/lstm.py)."""

    hidden: int = number(32, lo=1, hi=4096, integer=True)
    skip: bool = flag(True)  # Wright et al.: add the input to the output


@dataclass(frozen=True)
class TCNConfig:
    """Sizes of the TCN (metafx/models/tcn.py)."""

    channels: int = number(16, lo=1, hi=1024, integer=True)
    blocks: int = number(4, lo=1, hi=32, integer=True)
    kernel: int = number(9, lo=1, hi=1025, integer=True)
    dilation_growth: int = number(4, lo=1, hi=64, integer=True)


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the audio transformer (metafx/models/transformer.py)."""

    d_model: int = number(128, lo=1, hi=4096, integer=True)  # divisible by heads
    heads: int = number(4, lo=1, hi=64, integer=True)
    layers: int = number(2, lo=1, hi=48, integer=True)
    ff: int = number(256, lo=1, integer=True)
    levels: int = number(256, lo=2, hi=65536, integer=True)  # 8-bit tokens
    max_len: int = number(32768, lo=1, integer=True)


@dataclass(frozen=True)
class ARXConfig:
    """Meta-learned features + a per-task linear ARX head fitted in closed form (metafx/models/arx.py).

    Defaults: the prototype's best Moog setting (classical ARX(13, 12) regressors [1, x] with a
    meta-learned per-coefficient ridge and prior mean; learned features did not help on Moog).
    """

    nb: int = number(13, lo=1, hi=4096, integer=True)  # MA taps per feature channel (b_0 .. b_{nb-1})
    na: int = number(12, lo=0, hi=256, integer=True)  # AR order (a_1 .. a_na); 0 = FIR head on the features
    # "none": channels [1, x] | "learned": plus the channels below | lstm | tcn | transformer: plus n_trunk
    # channels of that network's hidden sequence (sized by its model.<arch> section)
    features: str = one_of("none", ARX_FEATURES)
    n_trunk: int = number(8, lo=1, hi=256, integer=True)  # channels projected from the network's hidden sequence
    hidden: int = number(32, lo=1, hi=4096, integer=True)  # width of the pointwise and gate MLPs (learned)
    n_point: int = number(12, lo=0, hi=256, integer=True)  # pointwise nonlinear channels MLP(x)
    # learned one-pole low-passes of x fed to the pointwise MLP beside x: MLP(x, lp_1(x), ..), a filter before
    # the nonlinearity (pre-emphasis into a clipper); 0 = MLP(x) alone (need n_point >= 1)
    n_filter: int = number(0, lo=0, hi=32, integer=True)
    n_env: int = number(6, lo=0, hi=64, integer=True)  # log one-pole envelope channels of |x| (learned taus)
    n_gate: int = number(8, lo=0, hi=256, integer=True)  # x * sigmoid(MLP(envelopes)) (need n_env >= 1)
    n_start: int = number(0, lo=0, hi=16, integer=True)  # "time since slice start" inputs of the gate MLP
    ridge: float = number(1e-8, lo=0, lo_open=True, hi=1e6)  # initial relative ridge of the b of [1, x]
    ridge_a: float = number(1e-8, lo=0, lo_open=True, hi=1e6)  # initial relative ridge of the AR coefficients
    # initial relative ridge of the learned channels' b; None = ridge
    ridge_feat: float | None = number(None, lo=0, lo_open=True, hi=1e6, nullable=True)
    per_coef_ridge: bool = flag(True)  # one meta-learned ridge per coefficient (else one for b, one for a)
    ridge_lr_scale: float = number(16.0, lo=0, hi=1e4)  # log-ridge learning rate = scale * maml.outer_lr
    rmax: float = number(0.999, lo=0, lo_open=True, hi=0.99999)  # pole radius clamp of the fitted A(z)
    # IIR simulated by FFT over fft_pad * T samples (wrap-around < rmax^((pad-1)T))
    fft_pad: int = number(4, lo=2, hi=64, integer=True)
    cosine_lr: bool = flag(True)  # cosine annealing of the outer learning rate over maml.meta_steps
    # adaptation picks the ridge multiplier per task by leave-one-slice-out CV on the support
    # (metafx.models.arx.CV_RIDGE_SCALES); meta-training's fits are unchanged
    cv_ridge: bool = flag(False)
    # with cv_ridge: classical ARX (the head on [1, x] alone, initial ridge, identity prior) is a candidate of that
    # cross-validation too, kept where it predicts the left-out support slices strictly better
    cv_classical: bool = flag(False)


@dataclass(frozen=True)
class SSMConfig:
    """Diagonal complex linear recurrence computed by FFT convolution (metafx/models/ssm.py)."""

    channels: int = number(16, lo=1, hi=4096, integer=True)  # H: width of every layer
    state: int = number(16, lo=1, hi=4096, integer=True)  # N: complex diagonal modes per channel
    layers: int = number(2, lo=1, hi=64, integer=True)
    r_min: float = number(0.9, lo=0, lo_open=True, hi=0.999999)  # initial pole radii in [r_min, r_max]
    r_max: float = number(0.9999, lo=0, lo_open=True, hi=0.999999)
    skip: bool = flag(True)  # add the dry input to the output


@dataclass(frozen=True)
class ModelConfig:
    """The model: which architecture, one section of sizes per architecture, the task context.

    Each ``subsection(..., model=True)`` field is one architecture: its name is a value of
    ``arch`` (:data:`ARCHS`), ``film=True`` marks the models that take a FiLM context
    (:data:`FILM_ARCHS`). ``metafx.models.MODELS`` has one entry per architecture.
    """

    arch: str = one_of("lstm", lambda: ARCHS)  # ARCHS is read off the fields below
    lstm: LSTMConfig = subsection(LSTMConfig, model=True, film=True)
    tcn: TCNConfig = subsection(TCNConfig, model=True, film=True)
    transformer: TransformerConfig = subsection(TransformerConfig, model=True)
    arx: ARXConfig = subsection(ARXConfig, model=True)  # closed-form head; maml.method ridge
    ssm: SSMConfig = subsection(SSMConfig, model=True, film=True)
    context_dim: int = number(0, lo=0, hi=4096, integer=True)  # FiLM context size (cavia, encoder); 0 = none
    encoder_hidden: int = number(64, lo=1, hi=4096, integer=True)  # width of the task encoder's MLP (encoder)
    encoder_bands: int = number(32, lo=2, hi=1024, integer=True)  # log-spaced bands of the encoder's features


ARCHS: tuple[str, ...] = tuple(f.name for f in fields(ModelConfig) if f.metadata.get("model"))
FILM_ARCHS: tuple[str, ...] = tuple(f.name for f in fields(ModelConfig) if f.metadata.get("film"))


@dataclass(frozen=True)
class LossConfig:
    """A weighted sum of loss terms, e.g. {"l1": 1.0, "mrstft": 0.1}."""

    terms: tuple[tuple[str, float], ...] = (("l1", 1.0),)


@dataclass(frozen=True)
class MAMLConfig:
    """Meta-training: the adaptation method, inner and outer loops, episodes, losses, checkpoints."""

    method: str = one_of("maml", METHODS)
    backend: str = one_of("func", BACKENDS)  # "func" (torch.func) | "higher"
    first_order: bool = flag(False)
    inner_steps: int = number(1, lo=0, hi=1000, integer=True)
    inner_lr: float = number(0.1, lo=0)
    outer_lr: float = number(1e-3, lo=0, lo_open=True)
    meta_batch: int = number(4, lo=1, integer=True)
    meta_steps: int = number(200, lo=1, integer=True)
    k_support: int = number(4, lo=1, integer=True)
    k_query: int = number(4, lo=1, integer=True)
    slice_len: int = number(2048, lo=16, integer=True)  # samples per slice
    inner_loss: LossConfig = checked_by("loss", default_factory=LossConfig)
    outer_loss: LossConfig = checked_by("loss", default_factory=LossConfig)
    grad_clip: float = number(0.0, lo=0)  # 0 = off
    eval_every: int = number(20, lo=1, integer=True)
    val_episodes: int = number(8, lo=1, integer=True)
    checkpoint_every: int = number(50, lo=1, integer=True)
    seed: int = number(0, integer=True)
    # MAML++ stabilizers (Antoniou et al. 2019), usable with maml, anil, cavia and encoder:
    learn_inner_lr: bool = flag(False)  # learned per-step, per-tensor inner learning rates (LSLR), init inner_lr
    multi_step_loss: bool = flag(False)  # query loss after every inner step, weights annealed to the last step
    msl_steps: int = number(100, lo=1, integer=True)  # meta-steps over which the multi-step weights anneal
    outer_schedule: str = one_of("constant", OUTER_SCHEDULES)  # annealing of outer_lr over meta_steps

    def stabilized(self) -> bool:
        """Whether a MAML++ stabilizer is on.

        Returns:
            True when ``learn_inner_lr``, ``multi_step_loss`` or a non-constant ``outer_schedule``
            is set (``grad_clip`` does not count).
        """
        return self.learn_inner_lr or self.multi_step_loss or self.outer_schedule != "constant"


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation and its baselines."""

    test_episodes: int = number(16, lo=1, integer=True)
    test_seed: int = number(1234, integer=True)
    lsfir_taps: int = number(256, lo=1, integer=True)
    lsfir_ridge: float = number(1e-6, lo=0)
    joint_steps: int = number(200, lo=0, integer=True)  # joint-training baseline steps (0 = skip)
    single_task_steps: int = number(200, lo=0, integer=True)  # single-task baseline steps (0 = skip)
    single_task_tasks: int = number(2, lo=1, integer=True)  # how many test tasks get a single-task model
    single_task_lr: float = number(3e-3, lo=0, lo_open=True)  # Adam rate of the single-task baseline
    hf_margin: float = number(1.0, lo=0, lo_open=True)  # spectral error counted above margin * cutoff


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: its dotted key, distribution, range or choices, and when it exists."""

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
    """The hyperparameter search: searched settings, trial counts, scheduler and resources."""

    params: tuple[SearchParam, ...] = checked_by("search_params", default=())
    # Trials to run before any sampling, each {searched key: value}; its other searched keys are sampled.
    first: tuple[tuple[tuple[str, Any], ...], ...] = checked_by("search_first", default=())
    num_samples: int = number(8, lo=1, integer=True)
    max_concurrent: int = number(2, lo=1, integer=True)
    scheduler: str = one_of("asha", SCHEDULERS)
    grace_period: int = number(20, lo=1, integer=True)  # meta-steps
    reduction_factor: int = number(2, lo=2, integer=True)
    metric: str = text("val/query_l1_post", "expected a metric name such as val/query_l1_post")
    mode: str = one_of("min", MODES)
    cpus_per_trial: float = number(1.0, lo=0, lo_open=True)
    gpus_per_trial: float = number(0.0, lo=0)  # fraction; used only where GPUs exist
    seed: int = number(0, integer=True)
    max_failures: int = number(2, lo=0, integer=True)


class BudgetChange(NamedTuple):
    """One key a budget overrides: its value in the study as written and the value the run uses."""

    key: str  # dotted key, as written under budgets.<budget>
    study: Any  # the value in the study's main sections (the field's default when the study leaves it out)
    used: Any  # the value used: the budget's, or a --set override's when one sets the same key
    default: bool = False  # the study leaves the key out: ``study`` is the default


@dataclass(frozen=True)
class Config:
    """A validated study: its name, file, budget and sections, and the resolved mapping it came from.

    ``budget_changes`` lists the keys the budget overrides whose value differs from the study
    as written (:func:`metafx.config.budget_report` prints them at the start of every run).
    """

    name: str
    source_file: Path
    budget: str
    data: DataConfig
    model: ModelConfig
    maml: MAMLConfig
    eval: EvalConfig
    search: SearchConfig
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False, default_factory=dict)
    budget_changes: tuple[BudgetChange, ...] = field(repr=False, compare=False, hash=False, default=())

    def to_dict(self) -> dict[str, Any]:
        """The resolved mapping, what checkpoints and MLflow store.

        Returns:
            A deep copy: budget and overrides applied, ``budget`` set, no ``budgets`` section.
        """
        return copy.deepcopy(dict(self.raw))

    def flat(self) -> dict[str, Any]:
        """The resolved mapping with dotted keys, for MLflow params.

        Returns:
            :func:`flatten` of :meth:`to_dict`.
        """
        return flatten(self.to_dict())

    def hash(self) -> str:
        """A short fingerprint of the resolved study.

        Returns:
            16 hex digits of the SHA-256 of :meth:`to_dict` as sorted JSON: equal for equal
            resolved studies.
        """
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
