"""One trial end to end on a real rendered task set: metrics, checkpoints, resume, failures."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metafx.config import REPO_ROOT, load_config
from metafx.data.tasks import load_taskset
from metafx.engines import NonFiniteLossError
from metafx.train import meta_train
from resume_check import assert_resume_matches_uninterrupted

TRAIN_NAMES = {"support_l1_pre", "support_l1_post", "query_l1_post", "val/query_l1_post", "step"}
TEST_NAMES = {
    "test/query_l1_pre", "test/query_l1_post", "test/query_stft_pre", "test/query_stft_post",
    "test/query_mrstft_post", "test/query_esr_post", "test/query_hf_post", "test/identity_l1", "test/identity_stft",
    "test/lsfir/query_l1_post", "test/lsfir/query_stft_post", "test/joint/query_l1_post",
    "test/single_task/query_l1_post",
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_config("lstm.yaml", "smoke", {"data.cache_dir": str(cache), "model.lstm.hidden": 8})


@pytest.fixture(scope="module")
def taskset(cfg):
    return load_taskset(cfg.data, progress=False)


def test_meta_train_reports_paper_metrics(cfg, taskset):
    reports = []

    def report(m, ck):  # the checkpoint folder must be complete when it is handed over
        reports.append((m, ck, ck is not None and (Path(ck) / "checkpoint.pt").is_file()))

    res = meta_train(cfg, taskset, report)
    steps = [m["step"] for m, _, _ in reports[:-1]]
    assert steps == list(range(cfg.maml.eval_every, cfg.maml.meta_steps + 1, cfg.maml.eval_every))
    for m, _, _ in reports[:-1]:
        assert TRAIN_NAMES <= set(m), set(m)
        assert all(math.isfinite(v) for v in m.values())
    final, ck, complete = reports[-1]
    assert TEST_NAMES <= set(final), TEST_NAMES - set(final)
    assert ck is not None and complete
    assert res.metrics["test/identity_l1"] == res.metrics["test/identity/query_l1_post"]
    # The least-squares FIR fit is exact-ish on a linear filter: it must beat identity.
    assert res.metrics["test/lsfir/query_l1_post"] < res.metrics["test/identity_l1"]
    assert len(res.examples) >= 1 and res.examples[0]["target"].ndim == 1


def test_checkpoint_loads_weights_only(cfg, taskset, tmp_path):
    meta_train(cfg, taskset, None, workdir=tmp_path, evaluate=False)
    st = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert st["step"] == cfg.maml.meta_steps
    assert st["config"]["model"]["arch"] == "lstm"
    best = torch.load(tmp_path / "checkpoint" / "best.pt", weights_only=True)
    assert set(best["model"]) == set(st["model"])


def test_resume_matches_uninterrupted(cfg, taskset, tmp_path):
    assert_resume_matches_uninterrupted(cfg, taskset, tmp_path)


def test_nonfinite_loss_names_step_and_task(cfg, taskset):
    from metafx.config import config_from_dict

    bad = config_from_dict(cfg.to_dict(), cfg.source_file, overrides={"maml.inner_lr": 1e38, "maml.inner_steps": 2})
    with pytest.raises(NonFiniteLossError) as e:
        meta_train(bad, taskset, None, evaluate=False)
    msg = str(e.value)
    assert "step 1" in msg or "meta-step 1" in msg
    assert "task" in msg


def test_joint_method_trains(cfg, taskset):
    from metafx.config import config_from_dict

    joint = config_from_dict(cfg.to_dict(), cfg.source_file, overrides={"maml.method": "joint"})
    res = meta_train(joint, taskset, None, baselines=False)
    assert math.isfinite(res.metrics["test/query_l1_post"])


def test_launch_train_writes_results_without_ray_or_mlflow(cfg, tmp_path):
    out = tmp_path / "r.json"
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(REPO_ROOT / 'launch' / 'train.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"rc = m.main(['--space', 'lstm.yaml', '--budget', 'smoke', '--set', 'data.cache_dir={cfg.data.cache_dir}',"
        f" '--set', 'model.lstm.hidden=8', '--no-baselines', '--results', {str(out)!r}])\n"
        "assert rc == 0\n"
        "bad = [x for x in ('ray', 'mlflow', 'optuna') if x in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=300)
    data = json.loads(out.read_text())
    assert "test/query_l1_post" in data["metrics"] and data["config"]["budget"] == "smoke"


def test_launch_train_bad_config_exit_code(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--space", "lstm.yaml",
                        "--budget", "smoke", "--set", "maml.inner_steps=-1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "maml.inner_steps" in r.stderr and ">= 0" in r.stderr
