"""A real browser on the real MLflow UI: the search is reviewable there (issue 5).

Builds a store with :class:`metafx.tracking.Tracker` (a parent run, two nested
trial runs with WAV/PNG artifacts), starts ``mlflow server`` on 127.0.0.1 on a
free port, and drives Debian's headless Chromium with Playwright: the
experiment's runs table lists the search and, expanded, both trials; a trial's
artifacts page shows a plot and an audio file. Screenshots go to
``test-outputs/mlflow_ui_*.png`` (git-ignored). Without the Playwright package
it falls back to ``chromium --dump-dom`` / ``--screenshot`` for the text check.

Needs ``/usr/bin/chromium`` (``.ci/browser-deps.sh`` installs it); skipped
with the reason otherwise. Marked slow: ``pytest -m slow tests/test_ui_browser.py``.

MLflow 3's UI opens experiments on its GenAI pages; ``?workflowType=machine_learning``
selects the model-training view with the runs table.
"""
from __future__ import annotations

import os
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
from metafx.records import TAG_MODEL, SearchSummary
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
TRIALS = ("trial_ui_000", "trial_ui_001")
VIEW = "workflowType=machine_learning"


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
    """A store with one finished search: parent + two trial runs with audio and plots."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium; run .ci/browser-deps.sh "
                    "(apt-get update && apt-get install -y chromium)")
    d = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cfg = load_config("lstm.yaml", "smoke")
    tr = Tracker(uri, "lstm-ui")
    parent = tr.start_search(cfg, SEARCH, {"dataset_hash": "ui-test"}, resume=False)
    runs = {}
    for i, tid in enumerate(TRIALS):
        runs[tid] = tr.trial_run(tid, {"maml.inner_lr": 0.01 * (i + 1)}, {TAG_MODEL: "lstm"})
        for s in range(5):
            tr.log_metrics(tid, {"val/query_l1_post": 0.2 / (s + 1) + 0.01 * i, "support_l1_pre": 0.3 / (s + 1)}, s)
        ck = d / f"ckpt_{tid}"
        write_trial_artifacts(ck, make_examples(n=1, length=4000), make_history(5), SR)
        tr.log_artifacts(tid, ck)
        tr.end_trial(tid, "FINISHED")
    table = [{"trial_id": t, "val/query_l1_post": 0.04} for t in TRIALS]
    tr.end_search("FINISHED", SearchSummary(name=SEARCH, experiment_path=str(d), best_config_path=None,
                                            best_checkpoint=None, best_metrics={}, table=table, parent_run_id=parent))
    return {"uri": uri, "dir": d, "experiment_id": tr.experiment_id, "parent": parent, "runs": runs}


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


def test_ui_lists_runs_and_shows_trial_artifacts(recorded, server):
    OUT.mkdir(exist_ok=True)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _check_with_chromium_cli(recorded, server)
        return
    eid = recorded["experiment_id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(45_000)
            page.goto(f"{server}/#/experiments/{eid}/runs?{VIEW}", wait_until="load")
            page.get_by_text(SEARCH, exact=True).first.wait_for()
            _close_assistant(page)
            # Trials are nested under the search run: expand it.
            row = page.locator("[role=row]", has_text=SEARCH).first
            row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            for tid in TRIALS:
                page.get_by_text(tid, exact=True).first.wait_for()
            text = page.inner_text("body")
            page.screenshot(path=str(OUT / "mlflow_ui_experiment.png"))
            assert SEARCH in text and all(t in text for t in TRIALS), text[:2000]

            # One trial's artifacts: the training curves plot renders as an image ...
            rid = recorded["runs"][TRIALS[0]]
            page.goto(f"{server}/#/experiments/{eid}/runs/{rid}/artifacts?{VIEW}", wait_until="load")
            page.get_by_text("plots", exact=True).first.wait_for()
            _close_assistant(page)
            page.get_by_text("plots", exact=True).first.click()
            page.get_by_text("training_curves.png", exact=True).first.click()
            page.wait_for_function(
                "() => [...document.images].some(i => i.complete && i.naturalWidth > 500)", timeout=30_000
            )
            page.screenshot(path=str(OUT / "mlflow_ui_artifacts_plot.png"))
            # ... and a WAV gets the UI's audio player.
            page.get_by_text("audio", exact=True).first.click()
            page.get_by_text("moog_vcf-000", exact=True).first.click()
            page.get_by_text("target.wav", exact=True).first.click()
            page.locator("audio").first.wait_for(state="attached")
            page.wait_for_timeout(1500)  # let the waveform draw for the screenshot
            page.screenshot(path=str(OUT / "mlflow_ui_artifacts_audio.png"))
            body = page.inner_text("body")
            assert "audio/moog_vcf-000/target.wav" in body and TRIALS[0] in body
        finally:
            browser.close()
    for name in ("experiment", "artifacts_plot", "artifacts_audio"):
        assert (OUT / f"mlflow_ui_{name}.png").stat().st_size > 10_000


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
        **{f"run_{t}": (f"{server}/#/experiments/{eid}/runs/{rid}?{VIEW}", t) for t, rid in recorded["runs"].items()},
    }
    base = [str(CHROMIUM), *CHROMIUM_ARGS, "--virtual-time-budget=20000", "--window-size=1600,1000"]
    for name, (url, needle) in pages.items():
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert needle in dom, f"{needle!r} not in the rendered page {url}"
        shot = OUT / f"mlflow_ui_{name}.png"
        subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
        assert shot.stat().st_size > 10_000
