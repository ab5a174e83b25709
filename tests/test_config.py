"""Study files: every shipped YAML loads at every budget; bad search sections fail early and clearly."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metafx.config import BUDGETS, SPACES_DIR, ConfigError, config_from_dict, dump_config, load_config, read_yaml

SPACES = sorted(p.name for p in SPACES_DIR.glob("*.yaml"))


def test_shipped_studies_exist():
    assert {"lstm.yaml", "tcn.yaml", "transformer.yaml", "all.yaml"} <= set(SPACES)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_study_loads(space, budget):
    cfg = load_config(space, budget)
    assert cfg.budget == budget
    assert len(cfg.data.families) >= 1
    n_tasks = sum(len(f.grid()) for f in cfg.data.families)
    if budget in ("local", "paper"):
        assert n_tasks >= 100, "local and paper budgets need at least 100 tasks"
    if budget == "paper":
        assert cfg.data.source.seconds >= 600 and cfg.maml.slice_len == 24000
    assert cfg.search.params, "every shipped study has a search section"


@pytest.mark.parametrize("space", SPACES)
def test_every_key_is_commented(space):
    """Every line that sets a key in the data/model/maml/eval/search sections carries a comment."""
    text = (SPACES_DIR / space).read_text().splitlines()
    section = None
    for line in text:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":")[0]
            continue
        indent = len(line) - len(line.lstrip())
        in_params = line.lstrip().startswith(("model.", "maml.", "data.", "eval.", "search."))
        if section in ("data", "model", "maml", "eval", "search") and not in_params and indent <= 6:
            assert "#" in line, f"{space}: uncommented key: {line.strip()}"


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config("lstm.yaml", "smoke", ["maml.inner_lr=0.05"])
    out = tmp_path / "best.yaml"
    dump_config(cfg.to_dict(), out)
    again = load_config(out)
    assert again.maml.inner_lr == 0.05
    assert again.budget == "smoke"
    assert again.data == cfg.data and again.model == cfg.model and again.maml == cfg.maml


def test_override_parses_yaml_values():
    cfg = load_config("lstm.yaml", "smoke", ["maml.first_order=true", "model.lstm.hidden=8", "maml.outer_loss={l1: 1, mrstft: 0.1}"])
    assert cfg.maml.first_order is True and cfg.model.lstm.hidden == 8
    assert dict(cfg.maml.outer_loss.terms) == {"l1": 1.0, "mrstft": 0.1}


def _bad(tmp_path: Path, edit) -> str:
    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["budgets"] = {}  # no budget override may hide the edit
    edit(raw)
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(p, "local")
    msg = str(e.value)
    assert str(p) in msg, "the error names the file"
    return msg


@pytest.mark.parametrize("edit, expect", [
    (lambda r: r["search"]["params"].update({"maml.inner_lr": {"dist": "gaussian", "low": 0.1, "high": 1}}),
     ["search.params.maml.inner_lr.dist", "gaussian", "loguniform"]),
    (lambda r: r["search"]["params"].update({"maml.inner_lr": {"dist": "loguniform", "low": 0.5, "high": 0.1}}),
     ["search.params.maml.inner_lr.low", "0.5", "<= high"]),
    (lambda r: r["search"]["params"].update({"model.lstm.dropout": {"dist": "uniform", "low": 0, "high": 0.5}}),
     ["model.lstm.dropout", "'dropout' is unknown", "hidden, skip"]),
    (lambda r: r["search"].update({"num_samples": 0}), ["search.num_samples", "must be >= 1"]),
    (lambda r: r["search"].update({"nmu_samples": 3}), ["unknown key 'search.nmu_samples'", "num_samples"]),
    (lambda r: r["search"]["params"].update({"maml.inner_lr": {"dist": "loguniform", "low": 0, "high": 1}}),
     ["loguniform needs low > 0"]),
])
def test_bad_search_section(tmp_path, edit, expect):
    msg = _bad(tmp_path, edit)
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_parameter_the_model_does_not_have(tmp_path):
    """lstm.yaml's architecture is fixed to lstm: searching a TCN setting is refused before Ray starts."""
    from metafx.search_space import check_space

    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["search"]["params"]["model.tcn.kernel"] = {"dist": "categorical", "choices": [3, 5]}
    cfg = config_from_dict(raw, tmp_path / "x.yaml", budget="smoke")
    with pytest.raises(ConfigError, match=r"model.tcn.kernel.*never has this parameter"):
        check_space(cfg)


def test_empty_search_is_refused(tmp_path):
    from metafx.search_space import check_space

    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["search"]["params"] = {}
    raw["search"]["first"] = []  # it names searched keys: with none searched, it is refused first (test_search_first_...)
    cfg = config_from_dict(raw, tmp_path / "x.yaml", budget="smoke")
    with pytest.raises(ConfigError, match="search.params is empty"):
        check_space(cfg)


@pytest.mark.parametrize("metric", ["val/query_esr", "val/esr_post", "query_stft_post"])
def test_a_search_metric_no_trial_reports_is_refused(tmp_path, metric):
    """A typo in search.metric would leave every trial unranked: refused before Ray starts, naming the valid ones."""
    from metafx.search_space import check_space

    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["search"]["metric"] = metric
    cfg = config_from_dict(raw, tmp_path / "x.yaml", budget="smoke")
    with pytest.raises(ConfigError, match=r"search.metric .* is not reported.*val/query_esr_post"):
        check_space(cfg)


@pytest.mark.parametrize("first,needle", [([{"maml.nope": 1}], r"search.first\[0\].maml.nope.*not a key of search.params"),
                                          ([{"maml.method": "sgd"}], r"search.first\[0\].maml.method.*outside"),
                                          ([{"maml.outer_lr": 5.0}], r"search.first\[0\].maml.outer_lr.*outside"),
                                          ({"maml.method": "ridge"}, r"search.first.*expected a list of mappings")])
def test_search_first_names_searched_values(tmp_path, first, needle):
    """search.first enqueues trials before sampling: each key must be searched and each value inside its range."""
    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    raw["search"]["first"] = first
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw, tmp_path / "x.yaml", budget="smoke")


def test_tcn_receptive_field_checked():
    with pytest.raises(ConfigError, match="receptive field"):
        load_config("tcn.yaml", "smoke", ["model.tcn.dilation_growth=10", "model.tcn.blocks=4"])


def test_unknown_study_lists_known():
    with pytest.raises(ConfigError, match="lstm.yaml"):
        load_config("nope.yaml")


# --------------------------------------------------------------------------- one default, one check per setting


def _minimal(tmp_path: Path):
    """A study that gives only what has no default (one family), so every other setting is its default."""
    raw = {"data": {"families": [{"name": "moog_vcf", "params": {"cutoff": [1000.0]}}]}}
    return config_from_dict(raw, tmp_path / "minimal.yaml", budget="smoke")


def test_a_left_out_key_gets_the_dataclass_default(tmp_path):
    from metafx.config import EvalConfig, MAMLConfig, ModelConfig, SearchConfig, SourceConfig

    cfg = _minimal(tmp_path)
    assert cfg.model == ModelConfig() and cfg.maml == MAMLConfig() and cfg.eval == EvalConfig()
    assert cfg.search == SearchConfig() and cfg.data.source == SourceConfig()
    # Same types too (an int default stays an int, a float default a float).
    assert type(cfg.maml.inner_lr) is float and type(cfg.maml.meta_steps) is int


def test_cache_dir_honours_METAFX_CACHE_in_code_and_in_yaml(tmp_path, monkeypatch):
    from metafx.config import DataConfig

    monkeypatch.setenv("METAFX_CACHE", str(tmp_path / "cache"))
    assert DataConfig().cache_dir == tmp_path / "cache"
    assert _minimal(tmp_path).data.cache_dir == tmp_path / "cache"
    assert load_config("lstm.yaml", "smoke").data.cache_dir == tmp_path / "cache"  # cache_dir: null
    monkeypatch.delenv("METAFX_CACHE")
    assert DataConfig().cache_dir == Path("~/.cache/metafx/datasets").expanduser()


def test_every_setting_declares_its_check():
    """A field without a declared check would be accepted unchecked: every section field carries one."""
    from dataclasses import fields

    from metafx.config import SECTIONS

    seen = set()

    def walk(cls, key):
        for f in fields(cls):
            assert f.metadata.get("kind") in ("num", "bool", "choice", "text", "section", "custom"), f"{key}.{f.name}"
            if f.metadata["kind"] == "section":
                walk(f.metadata["cls"], f"{key}.{f.name}")
            seen.add(f"{key}.{f.name}")

    for key, cls in SECTIONS.items():
        walk(cls, key)
    assert {"model.lstm.hidden", "data.source.seconds", "maml.inner_loss", "search.metric"} <= seen


def test_null_is_not_a_default(tmp_path):
    """An explicit null is a bad value for a setting that is not nullable (as before the field walk)."""
    with pytest.raises(ConfigError, match=r"key 'model.arch' = None is invalid: allowed: lstm, tcn"):
        load_config("lstm.yaml", "smoke", {"model.arch": None})
    with pytest.raises(ConfigError, match=r"key 'maml.inner_lr' = None is invalid: expected a number"):
        load_config("lstm.yaml", "smoke", {"maml.inner_lr": None})


@pytest.mark.parametrize("name, cutoff", [
    ("cutoff", True), ("Cutoff_Hz", True), ("lp_cutoff", True), ("freq", True), ("FC", True), ("frequency", True),
    ("resonance", False), ("gain", False), ("freq_shift", False), ("fcx", False),
])
def test_is_cutoff_param(name, cutoff):
    from metafx.config import is_cutoff_param

    assert is_cutoff_param(name) is cutoff


def test_architectures_come_from_the_model_sections():
    from metafx.config import ARCHS, FILM_ARCHS

    assert ARCHS == ("lstm", "tcn", "transformer", "arx", "ssm")
    assert FILM_ARCHS == ("lstm", "tcn", "ssm")


# --------------------------------------------------------------------------- the study as written, and what a budget replaces


def _study(tmp_path: Path, edit) -> Path:
    """lstm.yaml with its budgets, edited, written to tmp_path."""
    raw = read_yaml(SPACES_DIR / "lstm.yaml")
    edit(raw)
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


@pytest.mark.parametrize("key, value, expect", [
    ("data.families[0].params.cutoff", {"low": 200, "high": 30000, "num": 4, "scale": "log"}, "below Nyquist"),
    ("maml.slice_len", "long", "expected an integer"),
    ("maml.meta_steps", 0, "must be >= 1"),
])
def test_a_bad_value_the_budget_replaces_is_still_refused(tmp_path, key, value, expect):
    """The smoke budget overrides each of these keys; the study as written is validated all the same."""
    from metafx.config import set_dotted

    p = _study(tmp_path, lambda r: set_dotted(r, key, value))
    with pytest.raises(ConfigError) as e:
        load_config(p, "smoke")
    msg = str(e.value)
    assert str(p) in msg and f"'{key}" in msg and expect in msg, msg
    assert "budget smoke replaces this value" in msg, msg


def test_budget_changes_name_what_the_budget_replaces(tmp_path):
    """A user edits the grid of a copied study; --budget smoke uses its own grid and says so."""
    from metafx.config import budget_changes, budget_report

    grid = {"low": 100, "high": 2000, "num": 5, "scale": "log"}
    p = _study(tmp_path, lambda r: r["data"]["families"][0]["params"].update(cutoff=grid))
    cfg = load_config(p, "smoke")
    ch = {c.key: c for c in cfg.budget_changes}
    assert ch["data.families[0].params.cutoff"].study == grid
    assert ch["data.families[0].params.cutoff"].used == {"low": 300, "high": 4000, "num": 4, "scale": "log"}
    assert ch["maml.meta_steps"][:3] == ("maml.meta_steps", 200, 6)
    assert budget_changes(p, "smoke") == cfg.budget_changes
    report = budget_report(cfg)
    assert report.splitlines()[0] == f"budget smoke replaces {len(ch)} key(s) of {p}:"
    assert ("  data.families[0].params.cutoff: {low: 100, high: 2000, num: 5, scale: log} in the study -> "
            "{low: 300, high: 4000, num: 4, scale: log} used") in report.splitlines()
    # A key the study leaves out is shown with its default; a --set on a replaced key shows the value used.
    p2 = _study(tmp_path, lambda r: r["eval"].pop("joint_steps"))
    c2 = {c.key: c for c in load_config(p2, "smoke", ["maml.meta_steps=9"]).budget_changes}
    assert c2["eval.joint_steps"] == ("eval.joint_steps", 200, 4, True)
    assert c2["maml.meta_steps"].used == 9
    assert "used as written" in budget_report(load_config("all.yaml", "local"))


def test_set_errors_name_the_command_line_not_the_file():
    for over, expect in [(["maml.inner_steps=-1"], "--set maml.inner_steps=-1: key 'maml.inner_steps' = -1 is invalid"),
                         (["data.sample_rte=44100"], "--set data.sample_rte=44100: unknown key 'data.sample_rte'"),
                         (["data.families[2].max_tasks=3"], "--set data.families[2].max_tasks=3: cannot set")]:
        with pytest.raises(ConfigError) as e:
            load_config("lstm.yaml", "smoke", over)
        msg = str(e.value)
        assert msg.startswith(expect) and "lstm.yaml" not in msg, msg


# --------------------------------------------------------------------------- inner steps


@pytest.mark.parametrize("method", ["maml", "anil", "cavia"])
def test_a_gradient_method_without_inner_steps_is_refused(method):
    over = {"maml.method": method, "maml.inner_steps": 0, "model.context_dim": 4}
    with pytest.raises(ConfigError) as e:
        load_config("lstm.yaml", "smoke", over)
    msg = str(e.value)
    assert "maml.inner_steps" in msg and method in msg and "method: joint" in msg and ">= 1" in msg, msg


@pytest.mark.parametrize("over", [
    {"maml.method": "encoder", "maml.inner_steps": 0, "model.context_dim": 4},  # pure amortized inference
    {"maml.method": "joint", "maml.inner_steps": 0},  # no inner loop in training
])
def test_methods_that_need_no_inner_steps_accept_zero(over):
    assert load_config("lstm.yaml", "smoke", over).maml.inner_steps == 0
    assert load_config("arx.yaml", "smoke").maml.inner_steps == 0  # ridge: the head is solved, not stepped


def test_a_search_that_can_pair_maml_with_zero_steps_is_refused(tmp_path):
    from metafx.search_space import check_space

    raw = read_yaml(SPACES_DIR / "all.yaml")
    raw["search"]["params"]["maml.inner_steps"]["low"] = 0
    cfg = config_from_dict(raw, tmp_path / "x.yaml", budget="smoke")
    with pytest.raises(ConfigError, match=r"inner_steps reaches 0, but a trial can have maml.method anil \| cavia \| maml"):
        check_space(cfg)
    raw["search"]["params"]["maml.inner_steps"]["when"] = {"maml.method": ["encoder"]}
    check_space(config_from_dict(raw, tmp_path / "x.yaml", budget="smoke"))  # encoder alone may take 0 steps


# --------------------------------------------------------------------------- search ranges against the key's own bounds


@pytest.mark.parametrize("key, spec, expect", [
    ("maml.inner_lr", {"dist": "uniform", "low": -0.1, "high": -0.01},
     "search.params.maml.inner_lr: low -0.1 is not a value maml.inner_lr accepts (numbers >= 0)"),
    ("model.lstm.hidden", {"dist": "int", "low": 16, "high": 8192},
     "search.params.model.lstm.hidden: high 8192 is not a value model.lstm.hidden accepts (integers in [1, 4096])"),
    ("maml.outer_lr", {"dist": "uniform", "low": 0, "high": 0.01},
     "search.params.maml.outer_lr: low 0 is not a value maml.outer_lr accepts (numbers > 0)"),
    ("model.arch", {"dist": "categorical", "choices": ["lstm", "gru"]},
     "search.params.model.arch: choice 'gru' is not a value model.arch accepts (one of lstm, tcn, transformer, arx, ssm)"),
    ("maml.first_order", {"dist": "categorical", "choices": [True, "no"]},
     "search.params.maml.first_order: choice 'no' is not a value maml.first_order accepts (true or false)"),
    ("maml.outer_loss", {"dist": "categorical", "choices": ["l1", "l2"]},
     "search.params.maml.outer_loss: choice 'l2' is not a value maml.outer_loss accepts"),
    ("maml.outer_loss.stft", {"dist": "uniform", "low": 0, "high": 1},
     "search.params.maml.outer_loss.stft: low 0 is not a value maml.outer_loss.stft accepts (weights > 0)"),
    ("model.lstm.hidden", {"dist": "uniform", "low": 16, "high": 64},
     "search.params.model.lstm.hidden: dist uniform samples real numbers, but model.lstm.hidden takes integers"),
    ("maml.method", {"dist": "int", "low": 0, "high": 3},
     "search.params.maml.method: dist int samples numbers, but maml.method takes one of maml"),
    ("data.families[0].max_tasks", {"dist": "int", "low": 1, "high": 3}, "is not a setting"),
])
def test_search_ranges_are_checked_against_the_keys_bounds(tmp_path, key, spec, expect):
    """Each bound and choice must be a value of its key: refused at load, before Ray or MLflow start."""
    msg = _bad(tmp_path, lambda r: r["search"]["params"].update({key: spec}))
    assert expect in msg, msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- ARX feature sizes


@pytest.mark.parametrize("over, needle", [
    ({"model.arx.n_filter": 2, "model.arx.n_point": 0}, "'model.arx.n_filter' = 2 is invalid: the filters feed the "
                                                          "pointwise MLP: set model.arx.n_point >= 1 or n_filter: 0"),
    ({"model.arx.n_gate": 2, "model.arx.n_env": 0}, "'model.arx.n_gate' = 2 is invalid: gates are driven by the "
                                                      "envelopes"),
])
def test_arx_feature_sizes_that_feed_nothing_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("arx.yaml", "smoke", {"model.arx.features": "learned", **over})


def test_arx_input_filters_are_accepted_with_pointwise_channels():
    cfg = load_config("arx.yaml", "smoke", {"model.arx.features": "learned", "model.arx.n_filter": 3})
    assert cfg.model.arx.n_filter == 3


@pytest.mark.parametrize("budget", ["local", "paper"])
def test_the_main_job_validates_on_every_validation_task(budget):
    # The search picks its winner on the validation episodes: with 8 of the 18 Moog validation tasks it handed on
    # the head that ranks last on all 18 (benchmarks/search_local.md). One episode per validation task at least.
    from metafx.data.plan import assign_splits, plan_tasks

    cfg = load_config(SPACES_DIR / "lstm.yaml", budget=budget)
    d = cfg.data
    labels = assign_splits([t.family for t in plan_tasks(d)], d.val_fraction, d.test_fraction, d.split_seed)
    n_val = labels.count("val")
    assert n_val == 18
    assert cfg.maml.val_episodes >= n_val
