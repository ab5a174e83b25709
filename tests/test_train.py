"""One trial end to end on a real rendered task set: metrics, checkpoints, resume, failures."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metafx.config import REPO_ROOT, VAL_METRICS, load_config
from metafx.data.tasks import load_taskset
from metafx.engines import NonFiniteLossError
from metafx.train import meta_train
from resume_check import assert_resume_matches_uninterrupted

TRAIN_NAMES = {"support_l1_pre", "support_l1_post", "query_l1_post", "step", *VAL_METRICS}
TEST_NAMES = {
    "test/query_l1_pre", "test/query_l1_post", "test/query_stft_pre", "test/query_stft_post",
    "test/query_mrstft_post", "test/query_esr_post", "test/query_hf_post", "test/identity_l1", "test/identity_stft",
    "test/lsfir/query_l1_post", "test/lsfir/query_stft_post", "test/joint/query_l1_post",
    "test/single_task/query_l1_post", "test/arx/query_esr_post", "test/arx/query_stft_post",
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
    assert res.metrics["test/arx/query_esr_post"] < res.metrics["test/identity/query_esr_post"]  # so does classical ARX
    assert len(res.examples) >= 1 and res.examples[0]["target"].ndim == 1


def test_checkpoint_loads_weights_only(cfg, taskset, tmp_path):
    meta_train(cfg, taskset, None, workdir=tmp_path, evaluate=False)
    st = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert st["step"] == cfg.maml.meta_steps
    assert st["config"]["model"]["arch"] == "lstm"
    best = torch.load(tmp_path / "checkpoint" / "best.pt", weights_only=True)
    assert set(best["model"]) == set(st["model"])


def test_a_run_shorter_than_checkpoint_every_leaves_its_checkpoints(cfg, taskset, tmp_path):
    """meta_steps below checkpoint_every (a capped benchmark run): the finished run still writes its last
    state and best.pt (found missing by bench universal --steps 40 on a study with checkpoint_every 50)."""
    import dataclasses

    short = dataclasses.replace(cfg, maml=dataclasses.replace(cfg.maml, meta_steps=cfg.maml.eval_every,
                                                              checkpoint_every=10 * cfg.maml.eval_every))
    meta_train(short, taskset, None, workdir=tmp_path, evaluate=False)
    st = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert st["step"] == short.maml.meta_steps
    best = torch.load(tmp_path / "checkpoint" / "best.pt", weights_only=True)
    assert best["step"] == short.maml.eval_every and math.isfinite(best["val"])


def test_every_new_best_is_checkpointed_so_an_early_stopped_trial_keeps_it(cfg, taskset, tmp_path):
    """ASHA may stop a trial at any report before checkpoint_every: each report that improves the best
    validation value hands over a checkpoint whose best.pt is that report's model (a search's stopped
    trials used to leave none when its grace period was below checkpoint_every)."""
    import dataclasses

    from metafx.train import selection_metric

    long_every = dataclasses.replace(cfg, maml=dataclasses.replace(
        cfg.maml, meta_steps=3 * cfg.maml.eval_every, checkpoint_every=100 * cfg.maml.eval_every))
    select = selection_metric(long_every)
    seen = []

    def report(m, ck):
        if "done" in m:
            return
        best_file = None if ck is None else torch.load(Path(ck) / "best.pt", weights_only=True)
        seen.append((m["step"], m[select], best_file))

    meta_train(long_every, taskset, report, workdir=tmp_path, evaluate=False)
    assert len(seen) == 3
    best_val = math.inf
    for step, val, best_file in seen:
        improved = val < best_val
        best_val = min(best_val, val)
        assert (best_file is not None) == improved, (step, val, best_val)
        if best_file is not None:
            assert best_file["step"] == step and best_file["val"] == pytest.approx(val)
    assert seen[0][2] is not None  # the first report always improves on nothing


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
    # The timeout guards against a hang only: ~280 s measured on a loaded 2-core machine.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=900)
    data = json.loads(out.read_text())
    assert "test/query_l1_post" in data["metrics"] and data["config"]["budget"] == "smoke"


def test_launch_train_bad_config_exit_code(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--space", "lstm.yaml",
                        "--budget", "smoke", "--set", "maml.inner_steps=-1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "maml.inner_steps" in r.stderr and ">= 0" in r.stderr


# --------------------------------------------------------------------------- launch/train.py: errors while loading data, Ctrl-C


def _write_folder(folder: Path, kind: str) -> None:
    import numpy as np
    import soundfile as sf

    folder.mkdir()
    if kind == "corrupt":
        sf.write(folder / "a.wav", 0.3 * np.sin(np.arange(48000) / 7.0), 48000)
        (folder / "b.wav").write_bytes(b"RIFF\x00\x00garbage, not a wave file" * 10)
    else:  # 800 samples: shorter than 4 slices of 512
        sf.write(folder / "short.wav", 0.3 * np.sin(np.arange(800) / 7.0), 48000)


@pytest.mark.parametrize("case, sets, status, expect", [
    ("unstable", ["data.on_unstable=fail", "data.families[0].params.cutoff=[1000, 10000, 10500]",
                  "data.families[0].params.resonance=[0.0, 0.9]"],
     1, ["error: unstable render: 2 of 6 setting(s)", "'cutoff': 10000.0", "'cutoff': 10500.0"]),
    ("slider", ["data.families[0].params={{cutof: [300, 600, 900], resonance: [0.1]}}"],
     2, ["error: {study}: key 'data.families[0].params.cutof'", "its sliders are: cutoff, resonance"]),
    ("corrupt", ["data.source={{kind: folder, path: {folder}, seconds: 2}}"],
     2, ["error: cannot read audio file {folder}/b.wav: Error opening", "Format not recognised. Only WAV"]),
    ("short", ["data.source={{kind: folder, path: {folder}, seconds: 2}}"],
     2, ["error: {study}: maml.k_support + maml.k_query = 4 slices of maml.slice_len = 512 samples need 2048 samples",
         "the source folder {folder} holds only 800 (0.017 s"]),
])
def test_launch_train_reports_data_errors_in_one_line(tmp_path, case, sets, status, expect):
    """Errors raised while the task set is rendered or loaded: one line and a documented status, no traceback."""
    folder = tmp_path / "audio"
    if case in ("corrupt", "short"):
        _write_folder(folder, case)
    study = REPO_ROOT / "search_spaces" / "lstm.yaml"
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--space", "lstm.yaml", "--budget", "smoke",
           "--no-baselines", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for s in sets:
        cmd += ["--set", s.format(folder=folder)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == status, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    for part in expect:
        assert part.format(study=study, folder=folder) in errors[0], (part, errors[0])
    assert "budget smoke replaces" in r.stdout and "maml.meta_steps: 200 in the study -> 6 used" in r.stdout


def test_launch_train_interrupted_says_how_to_resume(cfg, tmp_path):
    """Ctrl-C while training: exit 130, one line with the command that continues from the last checkpoint."""
    import signal
    import time

    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--space", "lstm.yaml", "--budget", "smoke",
           "--set", f"data.cache_dir={cfg.data.cache_dir}", "--set", "model.lstm.hidden=8",
           "--set", "maml.meta_steps=100000", "--workdir", str(work)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        for line in p.stdout:  # the first report comes after the first checkpoint (checkpoint_every = eval_every)
            if line.startswith("step") or time.monotonic() > deadline:
                break
        assert (work / "checkpoint" / "checkpoint.pt").is_file()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: continue with  python launch/train.py --space lstm.yaml") and \
        last.endswith(f"--resume {work / 'checkpoint'}"), last


def test_best_model_is_chosen_by_the_search_metric(cfg, taskset, tmp_path):
    """search.metric val/query_esr_post: best.pt is the report with the lowest validation ESR, and says so."""
    import dataclasses

    esr = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, metric="val/query_esr_post"))
    res = meta_train(esr, taskset, None, workdir=tmp_path, evaluate=False)
    vals = [(r["val/query_esr_post"], r["step"]) for r in res.history]
    best = torch.load(tmp_path / "checkpoint" / "best.pt", weights_only=True)
    assert best["metric"] == "val/query_esr_post"
    assert (best["val"], best["step"]) == min(vals)
