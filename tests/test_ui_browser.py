"""A real browser on the real MLflow UI: a person can review a search there (issues 5, 12).

Builds a store with :class:`metafx.tracking.Tracker` as a search does (a parent run, three
trial runs named ``trial N: lstm ...``, with metafx metrics, WAV/PNG artifacts, the search's
ranking and its saved view), starts ``mlflow server`` on 127.0.0.1 on a free port, and drives
Debian's headless Chromium with Playwright. What a person sees is asserted:

* the search's saved view (``Views`` menu; the link the search prints) lists the trials by
  readable name, ranked by the search metric (best first, not by start time), with metric
  columns (rank, best value, test metrics beside the baselines) and the searched parameters;
* its chart view shows the finished trials (none hidden) with the best-value chart;
* opening the experiment with no configuration, the view is offered under ``Views``;
* a trial's artifacts page shows a plot and plays a WAV.

Screenshots are saved in the test's temporary folder and copied to ``test-outputs/``
(git-ignored). Without the Playwright package it falls back to ``chromium --dump-dom`` /
``--screenshot`` for the text check.

Needs ``/usr/bin/chromium`` (``.ci/browser-deps.sh`` installs it); skipped with the reason
otherwise. Marked slow: ``pytest -m slow tests/test_ui_browser.py``.

MLflow 3's UI opens experiments on its GenAI pages; ``?workflowType=machine_learning``
selects the model-training view with the runs table.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from metafx.config import REPO_ROOT, load_config
from metafx.plots import write_trial_artifacts
from metafx.records import (
    FINISHED,
    STOPPED,
    TAG_MODEL,
    SearchSummary,
    best_definition,
    rank_rows,
    trial_run_name,
)
from metafx.tracking import Tracker
from tracking_fakes import SR, make_examples, make_history

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
OUT = REPO_ROOT / "test-outputs"
SEARCH = "ui-search-smoke"
METRIC = load_config("lstm.yaml", "smoke").search.metric  # what the tracker ranks and shows (val/query_mrstft_post)
VIEW = "workflowType=machine_learning"
# (trial id, number, sampled values, final validation curve value, outcome): trial 2 is the best
# finished trial; trial 3 has the lowest value of all but ASHA stopped it, so it ranks last.
TRIALS = (
    ("trial_ui_001", 1, {"model.lstm.hidden": 16, "maml.inner_lr": 0.01}, 0.05, FINISHED),
    ("trial_ui_002", 2, {"model.lstm.hidden": 32, "maml.inner_lr": 0.02}, 0.03, FINISHED),
    ("trial_ui_003", 3, {"model.lstm.hidden": 64, "maml.inner_lr": 0.03}, 0.02, STOPPED),
)
NAMES = {tid: trial_run_name(n, hp, "lstm") for tid, n, hp, _, _ in TRIALS}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer on {url} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A store with one finished search, written as metafx.search writes it."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium; run .ci/browser-deps.sh "
                    "(apt-get update && apt-get install -y chromium)")
    d = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cfg = load_config("lstm.yaml", "smoke")
    tr = Tracker(uri, "lstm-ui")
    parent = tr.start_search(cfg, SEARCH, {"dataset_hash": "ui-test"}, resume=False)
    runs, rows = {}, []
    for tid, number, hp, last, outcome in TRIALS:
        runs[tid] = tr.trial_run(tid, {**cfg.flat(), **hp}, {TAG_MODEL: "lstm"}, run_name=NAMES[tid])
        steps = 6 if outcome == FINISHED else 3
        for s in range(steps):
            tr.log_metrics(tid, {METRIC: last + 0.2 / (s + 1), "support_l1_pre": 0.3 / (s + 1)}, 2 * s)
        if outcome == FINISHED:
            tr.log_metrics(tid, {"test/query_l1_post": last + 0.01, "test/identity_l1": 0.09,
                                 "test/lsfir/query_l1_post": 0.013, "test/query_stft_post": 3.0 + last,
                                 "test/identity_stft": 6.2, "test/lsfir/query_stft_post": 1.6}, 10)
            ck = d / f"ckpt_{tid}"
            write_trial_artifacts(ck, make_examples(n=1, length=3 * SR), make_history(5), SR)
            tr.log_artifacts(tid, ck)
        tr.end_trial(tid, "FINISHED", stopped_early=outcome != FINISHED)
        rows.append({"trial": number, "name": NAMES[tid], "status": outcome, f"best {METRIC}": last + 0.2 / steps,
                     "stft": "fft=512,hop=128,win=512", **hp, "trial_id": tid})
    ranked = rank_rows(rows, METRIC)
    best = next(r for r in ranked if r["status"] == FINISHED)
    tr.end_search("FINISHED", SearchSummary(
        name=SEARCH, experiment_path=str(d), best_config_path=None, best_checkpoint=None,
        best_metrics={METRIC: best[f"best {METRIC}"]}, table=ranked, parent_run_id=parent, metric=METRIC,
        best_trial=best["name"], best_value=best[f"best {METRIC}"], definition=best_definition(METRIC)))
    return {"uri": uri, "dir": d, "experiment_id": tr.experiment_id, "parent": parent, "runs": runs,
            "view": tr.view_path(), "ranked": [r["name"] for r in ranked]}


@pytest.fixture(scope="module")
def server(recorded):
    """``mlflow server`` on loopback over the recorded store; killed by its pid afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = recorded["dir"] / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", recorded["uri"],
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log_fh:
        # Own process group, so the uvicorn worker goes down with it (killed by the leader's pid).
        proc = subprocess.Popen(cmd, cwd=recorded["dir"], env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(url, proc, log_path)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def _shot(page, tmp: Path, name: str) -> Path:
    """A screenshot in the test's folder, copied to test-outputs/ for a person to look at."""
    path = tmp / f"mlflow_ui_{name}.png"
    page.screenshot(path=str(path))
    OUT.mkdir(exist_ok=True)
    shutil.copy(path, OUT / path.name)
    assert path.stat().st_size > 10_000
    return path


def test_ui_shows_the_trials_ranked_with_metrics_and_their_artifacts(recorded, server, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _check_with_chromium_cli(recorded, server)
        return
    eid = recorded["experiment_id"]
    ranked = recorded["ranked"]
    assert ranked == [NAMES["trial_ui_002"], NAMES["trial_ui_001"], NAMES["trial_ui_003"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        def fresh_page():
            """A new browser profile: MLflow keeps the last view's filter and columns in local storage."""
            page = browser.new_context(viewport={"width": 1800, "height": 1000}).new_page()
            page.set_default_timeout(60_000)
            return page

        try:
            # With no configuration: the experiment's runs page offers the search's view under "Views".
            page = fresh_page()
            page.goto(f"{server}/#/experiments/{eid}/runs?{VIEW}", wait_until="load")
            page.get_by_text(SEARCH, exact=True).first.wait_for()
            _close_assistant(page)
            page.get_by_test_id("saved-views-trigger").click()
            page.get_by_text(f"{SEARCH}: trials ranked", exact=True).first.wait_for()
            _shot(page, tmp_path, "views_menu")
            page.get_by_text(f"{SEARCH}: trials ranked", exact=True).first.click()
            for name in recorded["ranked"]:
                page.get_by_text(name, exact=True).first.wait_for()

            # The search's ranked view (the link it prints, and its parent run's description).
            page = fresh_page()
            page.goto(f"{server}/{recorded['view']}", wait_until="load")
            for name in ranked:
                page.get_by_text(name, exact=True).first.wait_for()
            _close_assistant(page)
            page.wait_for_timeout(1000)
            _shot(page, tmp_path, "ranked_trials")
            text = page.inner_text("body")
            # Readable names, best first (start time would put trial 3 first), the search run left out.
            at = [text.index(n) for n in ranked]
            assert at == sorted(at), (at, text[:3000])
            assert f"{SEARCH}\n" not in text and "3 matching runs" in text, text[:3000]
            # Metric columns are shown: rank, the best value, the test metrics beside the baselines; and
            # the searched parameters.
            headers = page.locator("[role=columnheader]").all_inner_texts()
            joined = " | ".join(h.strip() for h in headers)
            for col in ("rank", f"best/{METRIC}", "test/query_l1_post", "test/identity_l1",
                        "maml.method", "model.lstm.hidden"):
                assert any(h.strip().startswith(col[:14]) for h in headers), (col, joined)
            # The numbers are in the table: the best trial's best value (0.03 + 0.2 / 6) and test MAE.
            assert "0.0633" in text and "0.04" in text, text[:3000]

            # Chart view of the same view: every trial is shown (none hidden), their curves comparable.
            page.goto(f"{server}/{recorded['view']}&compareRunsMode=CHART", wait_until="load")
            page.get_by_text(f"best/{METRIC}", exact=True).first.wait_for()
            page.wait_for_timeout(2000)
            _shot(page, tmp_path, "ranked_charts")
            text = page.inner_text("body")
            assert all(n in text for n in ranked), text[:3000]
            assert "Show more" not in text or "hidden" not in text.lower(), text[:3000]

            # One trial's artifacts: the training curves plot renders as an image ...
            rid = recorded["runs"]["trial_ui_002"]
            page.goto(f"{server}/#/experiments/{eid}/runs/{rid}/artifacts?{VIEW}", wait_until="load")
            page.get_by_text("plots", exact=True).first.wait_for()
            _close_assistant(page)
            page.get_by_text("plots", exact=True).first.click()
            page.get_by_text("moog_vcf-000_spectrum.png", exact=True).first.click()
            page.wait_for_function(
                "() => [...document.images].some(i => i.complete && i.naturalWidth > 500)", timeout=30_000
            )
            _shot(page, tmp_path, "artifacts_plot")
            # ... and a WAV of a few seconds gets the UI's audio player.
            page.get_by_text("audio", exact=True).first.click()
            page.get_by_text("moog_vcf-000", exact=True).first.click()
            page.get_by_text("target.wav", exact=True).first.click()
            page.locator("audio").first.wait_for(state="attached")
            page.wait_for_timeout(1500)  # let the waveform draw for the screenshot
            _shot(page, tmp_path, "artifacts_audio")
            body = page.inner_text("body")
            assert "audio/moog_vcf-000/target.wav" in body and NAMES["trial_ui_002"] in body
        finally:
            browser.close()


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an 'MLflow Assistant' side panel; close it so the screenshot shows the runs."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _check_with_chromium_cli(recorded, server) -> None:
    """Fallback without Playwright: Chromium's own --dump-dom (text) and --screenshot."""
    eid = recorded["experiment_id"]
    pages = {
        "experiment": (f"{server}/#/experiments/{eid}/runs?{VIEW}", SEARCH),
        **{f"run_{t}": (f"{server}/#/experiments/{eid}/runs/{rid}?{VIEW}", NAMES[t])
           for t, rid in recorded["runs"].items()},
    }
    base = [str(CHROMIUM), *CHROMIUM_ARGS, "--virtual-time-budget=20000", "--window-size=1600,1000"]
    for name, (url, needle) in pages.items():
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert needle in dom, f"{needle!r} not in the rendered page {url}"
        shot = OUT / f"mlflow_ui_{name}.png"
        subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
        assert shot.stat().st_size > 10_000
