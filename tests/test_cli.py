"""The launch scripts' shared handling (metafx.cli): one-line errors, exit statuses, interrupts, the budget report."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from metafx import cli
from metafx.config import REPO_ROOT, SourceConfig, load_config


def test_a_configuration_error_is_one_line_and_status_2(capsys):
    status = cli.run(lambda: load_config("lstm.yaml", "smoke", ["maml.inner_lr=-1"]))
    err = capsys.readouterr().err
    assert status == cli.EXIT_BAD_INPUT == 2
    assert err == "error: --set maml.inner_lr=-1: key 'maml.inner_lr' = -1 is invalid: must be >= 0\n"


def test_unreadable_source_audio_is_status_2(tmp_path, capsys):
    from metafx.data.sources import load_sources

    (tmp_path / "x.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    status = cli.run(lambda: load_sources(SourceConfig(kind="folder", path=tmp_path, seconds=1.0), 48000))
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: cannot read audio file {tmp_path / 'x.wav'}") and err.count("\n") == 1


def test_a_failed_run_is_status_1(capsys):
    from metafx.data.tasks import TaskSet, TaskSetError

    status = cli.run(lambda: TaskSet(REPO_ROOT / "no-such-dataset"))
    assert status == cli.EXIT_FAILED == 1 and capsys.readouterr().err.startswith("error: ")
    assert cli.exit_status(TaskSetError("x")) == 1


def test_any_other_exception_keeps_its_traceback():
    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):
        cli.run(bug)


def test_ctrl_c_and_sigterm_are_status_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert cli.run(interrupted, interrupted="nothing kept") == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted: nothing kept\n"

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler or `ray job stop` sends it
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert cli.run(terminated, interrupted=lambda: "continue with ...") == 130
    assert capsys.readouterr().err == "interrupted: continue with ...\n"
    assert signal.getsignal(signal.SIGTERM) == before, "the handler is restored"


def test_load_study_prints_the_budget_report(capsys):
    cfg = cli.load_study("lstm.yaml", "local")
    out = capsys.readouterr().out
    assert cfg.budget == "local"
    assert out.splitlines()[0] == f"budget local replaces 4 key(s) of {cfg.source_file}:"
    assert "  maml.first_order: false in the study -> true used" in out.splitlines()


def test_naming_study_prefixes_the_study_file(tmp_path):
    from metafx.config import ConfigError
    from metafx.data.render import render_taskset

    cfg = load_config("lstm.yaml", "smoke", {"data.cache_dir": str(tmp_path),
                                             "data.families[0].params": {"cutof": [300, 600, 900], "resonance": [0.1]}})
    with pytest.raises(ConfigError) as e, cli.naming_study(cfg):
        render_taskset(cfg.data, progress=False)
    assert str(e.value).startswith(f"{cfg.source_file}: key 'data.families[0].params.cutof'")


def test_cli_imports_nothing_heavy():
    code = "import sys; import metafx.cli; print(sorted(m for m in ('torch', 'dawdreamer', 'ray', 'mlflow') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
