"""Capture benchmark: every shipped family, a held-out setting, the capture signal rendered through it.

    python launch/bench.py capture [-- --families a,b --support 0.5,1,3,probe,10 --scratch-steps 40 --no-scratch
                                       --model PATH --ridge-fit continuous|slices|both]
    python launch/bench.py capture -- --report-only     # capture.md again from capture.json

For each shipped effect family (metafx/data/effects/*.dsp), one *held-out* setting (a test-split
task of the shipped meta-model's own task set, metafx/shipped/capture_arx.yaml: a setting no
meta-training step saw), the shipped capture signal (:mod:`metafx.capture_signal`) is rendered
through it with DAWDreamer (:func:`render_through`: a folder source holding the capture signal,
rendered by :func:`metafx.data.tasks.load_taskset`) and captured with the shipped meta-model
(:func:`metafx.capture.run_capture`, no MLflow) for each support length (0.5, 1, 3 s, the probe's
4.66 s, which is what a capture uses by default, and 10 s). The
held-out part is the same for every support length: the last 9.66 s of the signal (from 10 s),
so the rows compare. Beside the meta-model, on the same support and held-out audio:

* ``lsfir``: least-squares FIR (256 taps); ``arx``: classical ARX(13, 12), no meta-learning;
  ``identity``;
* ``scratch``: the meta-model's architecture (MetaARX with learned features) trained from a
  fresh initialization on the support alone (no meta-learning): the ridge engine's meta-steps on
  episodes cut from the support (half the slices fit the head, the other half score it), then
  the same continuous head fit; ``--scratch-steps`` steps (40), at the 3 s support only (its cost).

The head fit of the capture (continuous features, ridge strength chosen on the support) is compared
with the engine's per-slice fit (``--ridge-fit both``, the default) at the 3 s support.

The continuous fit is offered the Wiener bank (:mod:`metafx.wiener`, kept where the support's
cross-validation prefers it); at the 3 s support the same capture also runs without it
(``wiener_units=0``), so the table shows what the bank changes. The scratch model's capture is
offered the bank too (the same capture procedure; only the meta-learning differs).

Also: the capture's wall time (load, align, adapt, export, score; in this process, models and
imports already loaded, 2 cores, the capture's default torch threads), and the exported model's real-time factor on one thread at
48 kHz, blocks of 256, measured in a fresh interpreter that loads the saved file (as a host
would; :func:`metafx.export.real_time_factors`), in its CPU time (the machine is shared: wall
time would count other processes) and in wall time.

Takes: a capture whose cascade units were kept (the non-convex search of
:mod:`metafx.capture.cascade_units`) is repeated at the 3 s support on ``--takes`` - 1 more takes of the
same wet, each with independent noise of RMS :data:`TAKE_NOISE` (-140 dBFS, far below any recording's
noise floor) added: how much the result depends on the search's path rather than on the device. Each take is
captured again with ``--tries`` searches (``launch/capture.py --tries``: the head the support's cross-validation
prefers is kept): whether more searches steady the result.

Writes ``benchmarks/capture.md`` and ``benchmarks/capture.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from metafx.bench.machine import cpu_model, probe_sentence, speed_probe
from metafx.bench.report_files import write_report

log = logging.getLogger(__name__)

SUPPORT_SECONDS = ("0.5", "1", "3", "probe", "10")  # "probe": the capture signal's probe, a capture's default
HELDOUT_FROM = 10.0  # seconds: the fixed held-out part of every row
TARGET_ESR = 0.01
TARGET_SUPPORT = 3.0
TARGET_CAPTURE_SECONDS = 10.0
TARGET_RTF = 50.0
PRECISION_FLOOR = 1e-8  # two ESRs below this are both exact to float rounding
TAKE_NOISE = 1e-7  # RMS of the noise that makes another take of the same wet (-140 dBFS)


def render_through(family: dict[str, Any], params: dict[str, float], cache_dir: Path, x: np.ndarray | None = None,
                   sample_rate: int = 48000) -> tuple[np.ndarray, np.ndarray]:
    """Render a signal (default: the capture signal) through one setting of an effect family with DAWDreamer.

    The signal is written as a WAV into a folder source (normalized to its own RMS, i.e. left as
    it is) and rendered by :func:`metafx.data.tasks.load_taskset` (cached by content hash in
    ``cache_dir``).

    Args:
        family: a ``data.families`` entry (``name``, ``dsp``; its ``params`` are replaced).
        params: slider -> value of the one setting.
        cache_dir: dataset cache (and where the source folder is written).
        x: the dry signal (float32 mono at ``sample_rate``); None = the capture signal.

    Returns:
        ``(dry, wet)``: the rendered dataset's input and target, float32.
    """
    import soundfile as sf

    from metafx import capture_signal as cs
    from metafx.config import REPO_ROOT, config_from_dict
    from metafx.data.tasks import load_taskset

    x = cs.capture_signal(sample_rate) if x is None else np.asarray(x, dtype=np.float32)
    src = Path(cache_dir) / f"source-{cs.fingerprint(x)}"
    src.mkdir(parents=True, exist_ok=True)
    if not (src / "signal.wav").is_file():
        sf.write(src / "signal.tmp.wav", x, sample_rate, subtype="FLOAT")
        os.replace(src / "signal.tmp.wav", src / "signal.wav")
    rms_db = 20 * np.log10(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))))
    raw = {"name": f"render-{family['name']}",
           "data": {"sample_rate": sample_rate,
                    "source": {"kind": "folder", "path": str(src), "seconds": x.size / sample_rate,
                               "loudness_db": float(rms_db)},
                    "families": [{"name": family["name"], "dsp": family.get("dsp", f"{family['name']}.dsp"),
                                  "params": {k: [float(v)] for k, v in params.items()}}],
                    "on_unstable": "fail", "val_fraction": 0.0, "test_fraction": 0.0,
                    "cache_dir": str(cache_dir), "render_workers": 1}}
    cfg = config_from_dict(raw, REPO_ROOT / "metafx" / "shipped" / "render.yaml")
    ts = load_taskset(cfg.data, progress=False)
    return np.array(ts.input, dtype=np.float32), np.array(ts.targets[0], dtype=np.float32)


def heldout_settings(study: Path, families: list[str] | None = None, per_family: int | None = 1
                     ) -> list[dict[str, Any]]:
    """Test-split settings of each family of a study's task set (rendered if not cached).

    Args:
        study: the study file.
        families: only these (None: every family).
        per_family: settings per family (at most its test tasks; None: all of them); the first is always the
            middle test task, the one this benchmark captures, then the others in task order.

    Returns:
        ``{"family": name, "dsp": file, "params": {...}, "task_id": ...}`` per setting, in study order.
    """
    from metafx.config import load_config
    from metafx.data.tasks import load_taskset

    cfg = load_config(study)
    ts = load_taskset(cfg.data, progress=False)
    out = []
    for fam in cfg.data.families:
        if families and fam.name not in families:
            continue
        test = [t for t in ts.tasks if t["family"] == fam.name and t["split"] == "test"]
        if not test:
            continue
        mid = len(test) // 2
        for t in ([test[mid]] + test[:mid] + test[mid + 1:])[:per_family]:
            out.append({"family": fam.name, "dsp": Path(fam.dsp).name, "params": dict(t["params"]), "task_id": t["id"]})
    return out


def train_scratch(mm: Any, dry: np.ndarray, wet: np.ndarray, n_support: int, steps: int, seed: int = 0) -> Any:
    """The meta-model's architecture from a fresh initialization, trained on the support alone (no meta-learning).

    Episodes are cut from the support: its slices of ``maml.slice_len`` are shuffled each step,
    half of them fit the ridge head, the other half are the query whose loss (the study's outer
    loss) trains the features through the solve (the ridge engine's meta-step on one task).

    Returns:
        A :class:`metafx.capture.MetaModel` holding the trained model.
    """
    import torch

    from metafx.capture import MetaModel, support_slices
    from metafx.engines import make_outer_optimizer

    cfg = mm.cfg
    torch.manual_seed(seed)
    model = mm.engine.build_learner(cfg)
    opt = make_outer_optimizer(model, cfg.maml)
    L = cfg.maml.slice_len
    sx, sy = support_slices(dry, wet, n_support, L, max_k=10**9)
    K = sx.shape[0]
    if K < 2:
        raise ValueError(f"scratch training needs at least 2 support slices of {L} samples")
    rng = np.random.default_rng(seed)

    class _Ep:
        def __init__(self, i: np.ndarray, j: np.ndarray):
            self.support_x, self.support_y, self.query_x, self.query_y = sx[i], sy[i], sx[j], sy[j]

    mc = cfg.maml.__class__(**{**cfg.maml.__dict__, "meta_steps": steps})
    for s in range(1, steps + 1):
        p = rng.permutation(K)
        h = max(1, K // 2)
        mm.engine.meta_step(model, [_Ep(p[:h], p[h:] if K - h > 0 else p[:h])], mc, opt, s, with_stats=False)
    model.eval()
    return MetaModel(cfg, model, mm.engine, "scratch", mm.checkpoint, steps)


def _repo_relative(path: Path, root: Path) -> str:
    """``path`` relative to the repository (the report names the shipped file, not this checkout's folder)."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the benchmark (see the module docstring)."""
    import torch

    from metafx.capture import SHIPPED_DIR, load_meta_model, run_capture
    from metafx.capture.run import CAPTURE_THREADS
    from metafx.config import REPO_ROOT
    from metafx.wiener import WIENER_UNITS

    ap = argparse.ArgumentParser(prog="bench capture")
    ap.add_argument("--families", default=None, help="comma-separated subset (default: every family of the study)")
    ap.add_argument("--support", default=",".join(SUPPORT_SECONDS), help="seconds, comma-separated; 'probe' is the "
                    "capture signal's probe (a capture's default support)")
    ap.add_argument("--model", default=None, help="meta-model (default: the shipped one)")
    ap.add_argument("--study", default=str(SHIPPED_DIR / "capture_arx.yaml"),
                    help="study whose test split gives the held-out settings")
    ap.add_argument("--scratch-steps", type=int, default=40)
    ap.add_argument("--no-scratch", action="store_true")
    ap.add_argument("--ridge-fit", default="both", choices=["continuous", "slices", "both"])
    ap.add_argument("--cache", default=None, help="render cache (default: a temporary folder)")
    ap.add_argument("--takes", type=int, default=5, help="takes of each capture that kept cascade units, at 3 s "
                    "(the first is the wet as rendered; the others add -140 dBFS noise)")
    ap.add_argument("--tries", type=int, default=3, help="each take captured again with this many cascade searches "
                    "(launch/capture.py --tries; 1: not again)")
    ap.add_argument("--report-only", action="store_true", help="re-write capture.md from the capture.json in --out "
                    "(the figures and the command that made them unchanged)")
    rest = [a for a in rest if a != "--"]
    opts = ap.parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    if opts.report_only:
        rep = json.loads((out_dir / "capture.json").read_text(encoding="utf-8"))
        write_report(out_dir, "capture", rep, _markdown(rep, rep["rows"][0]["fit"]))  # rows start with fits[0]
        print(f"wrote {out_dir / 'capture.md'} from {out_dir / 'capture.json'}")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    from metafx.capture_signal import probe_seconds

    supports = [round(probe_seconds(), 2) if s.strip() == "probe" else float(s) for s in opts.support.split(",")]
    fams = opts.families.split(",") if opts.families else None
    command = "python launch/bench.py capture" + (" -- " + shlex.join(rest) if rest else "")

    probe = speed_probe()  # before the captures: what this machine's 2 cores gave the timings below
    mm = load_meta_model(opts.model)
    settings = heldout_settings(Path(opts.study), fams)
    cache = Path(opts.cache) if opts.cache else Path(tempfile.mkdtemp(prefix="metafx-bench-capture-"))
    fits = ["continuous", "slices"] if opts.ridge_fit == "both" and mm.cfg.model.arch == "arx" else \
        [opts.ridge_fit if opts.ridge_fit != "both" else "continuous"]
    rows: list[dict[str, Any]] = []
    rtf = rtf_bank = rtf_cascade = None
    work = Path(tempfile.mkdtemp(prefix="metafx-bench-capture-out-"))
    import soundfile as sf

    for st in settings:
        t0 = time.perf_counter()
        dry, wet = render_through({"name": st["family"], "dsp": st["dsp"]}, st["params"], cache)
        render_s = time.perf_counter() - t0
        wet_path = work / f"{st['family']}.wav"
        sf.write(wet_path, wet, 48000, subtype="FLOAT")
        for fit in fits:
            for S in supports:
                if fit != fits[0] and S != TARGET_SUPPORT:  # the head-fit comparison at 3 s only (its cost)
                    continue
                res = run_capture(wet_path, work / f"{st['family']}-{fit}-{S:g}", support_seconds=S, mlflow=False,
                                  meta_model=mm, ridge_fit=fit, heldout_from_seconds=max(HELDOUT_FROM, S),
                                  measure_rtf=False, overwrite=True).results
                row = {"family": st["family"], "params": st["params"], "task_id": st["task_id"], "fit": fit,
                       "support_seconds": S, "latency_samples": res["latency"]["samples"],
                       "heldout_seconds": res["heldout_seconds"], "model": res["heldout"],
                       **{k: v for k, v in res["baselines"].items()}, "capture_seconds": res["seconds"]["capture"],
                       "capture_cpu_seconds": res["cpu_seconds"]["capture"], "stage_seconds": res["seconds"],
                       "stage_cpu_seconds": res["cpu_seconds"], "ridge_scale": res["model"]["ridge_scale"],
                       "wiener_units": res["model"]["wiener_units"],
                       "tuned_units": res["model"].get("wiener_tuned_units"),
                       "cascade_units": res["model"].get("wiener_cascade_units"),
                       "dynamics_units": res["model"].get("wiener_dynamics_units"),
                       "classical_arx": res["model"].get("classical_arx"), "render_seconds": render_s}
                if fit == "continuous" and S == TARGET_SUPPORT and mm.cfg.model.arch == "arx" and WIENER_UNITS:
                    nres = run_capture(wet_path, work / f"{st['family']}-nobank", support_seconds=S, mlflow=False,
                                       meta_model=mm, heldout_from_seconds=max(HELDOUT_FROM, S), measure_rtf=False,
                                       overwrite=True, wiener_units=0).results
                    row["no_bank"] = nres["heldout"]
                    row["no_bank_capture_seconds"] = nres["seconds"]["capture"]
                    if rtf_bank is None and res["model"]["wiener_units"]:
                        rtf_bank = _fresh_rtf(work / f"{st['family']}-{fit}-{S:g}" / "model.ts")
                        rtf_bank["family"] = st["family"]
                    if rtf_cascade is None and res["model"].get("wiener_cascade_units"):
                        rtf_cascade = _fresh_rtf(work / f"{st['family']}-{fit}-{S:g}" / "model.ts")
                        rtf_cascade["family"] = st["family"]
                if fit == "continuous" and S == TARGET_SUPPORT and res["model"].get("wiener_cascade_units") \
                        and opts.takes > 1:
                    row["takes"] = [res["heldout"]["esr"]]
                    if opts.tries > 1:
                        row["tries"], row["takes_tried"], row["takes_tried_seconds"] = opts.tries, [], []
                    for k in range(opts.takes):
                        take = wet_path
                        if k:
                            noise = np.random.default_rng(k).standard_normal(wet.size) * TAKE_NOISE
                            take = work / "take.wav"
                            sf.write(take, (wet + noise).astype(np.float32), 48000, subtype="FLOAT")
                            row["takes"].append(run_capture(take, work / f"{st['family']}-take", mlflow=False,
                                                            support_seconds=S, meta_model=mm,
                                                            heldout_from_seconds=max(HELDOUT_FROM, S),
                                                            measure_rtf=False, overwrite=True).results["heldout"]["esr"])
                        if opts.tries > 1:
                            tres = run_capture(take, work / f"{st['family']}-tries", mlflow=False, support_seconds=S,
                                               meta_model=mm, heldout_from_seconds=max(HELDOUT_FROM, S),
                                               measure_rtf=False, overwrite=True, tries=opts.tries).results
                            row["takes_tried"].append(tres["heldout"]["esr"])
                            row["takes_tried_seconds"].append(tres["seconds"]["capture"])
                if fit == fits[0] and S == TARGET_SUPPORT and not opts.no_scratch and mm.cfg.model.arch == "arx":
                    t1 = time.perf_counter()
                    smm = train_scratch(mm, dry, wet, int(S * 48000), opts.scratch_steps)
                    sres = run_capture(wet_path, work / f"{st['family']}-scratch", support_seconds=S, mlflow=False,
                                       meta_model=smm, heldout_from_seconds=max(HELDOUT_FROM, S), measure_rtf=False,
                                       overwrite=True).results
                    row["scratch"] = sres["heldout"]
                    row["scratch_seconds"] = time.perf_counter() - t1
                rows.append(row)
                print(f"{st['family']:13s} {fit:10s} S={S:4g}  ESR model {row['model']['esr']:.4g}  arx "
                      f"{row['arx']['esr']:.4g}  lsfir {row['lsfir']['esr']:.4g}"
                      + (f"  scratch {row['scratch']['esr']:.4g}" if "scratch" in row else "")
                      + f"  capture {row['capture_seconds']:.2f} s  latency {row['latency_samples']}", flush=True)
        if rtf is None:
            rtf = _fresh_rtf(work / f"{st['family']}-{fits[0]}-{supports[0]:g}" / "model.ts")
    load = os.getloadavg()
    report = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "capture_threads": CAPTURE_THREADS, "load_average": load, "speed_probe": probe,
                          "python": platform.python_version(), "torch": torch.__version__},
              "model": {"source": mm.source, "checkpoint": _repo_relative(mm.checkpoint, REPO_ROOT), "study": mm.cfg.name,
                        "arch": mm.cfg.model.arch, "method": mm.cfg.maml.method},
              "heldout_from_seconds": HELDOUT_FROM, "rtf_block256": rtf, "rtf_block256_bank": rtf_bank,
              "rtf_block256_cascade": rtf_cascade,
              "wiener_units_offered": WIENER_UNITS, "rows": rows}
    write_report(out_dir, "capture", report, _markdown(report, fits[0]))
    print(f"wrote {out_dir / 'capture.md'} and {out_dir / 'capture.json'}")
    return 0


def _fresh_rtf(model_file: Path) -> dict[str, Any]:
    """The real-time factor of a saved export, and of its native library beside it, each measured in a fresh
    interpreter (blocks of 256, one thread, 10 s; :func:`metafx.bench.export_rtf.fresh_rtf`).

    Fresh: this process has run captures and training, and a host loads the file into its own process.

    Returns:
        ``{"rtf_wall", "rtf_cpu", "kind", "bank_units", "native_rtf_wall", "native_rtf_cpu"}`` (the native ones None
        without model.so).
    """
    from metafx.bench.export_rtf import fresh_rtf

    r = fresh_rtf(Path(model_file).parent, 10.0)
    nat = r["native"] or {}
    return {"rtf_wall": r["ts"]["wall"], "rtf_cpu": r["ts"]["cpu"], "kind": r["ts"]["kind"],
            "bank_units": r["ts"]["bank_units"], "native_rtf_wall": nat.get("wall"), "native_rtf_cpu": nat.get("cpu")}


def _native(r: dict[str, Any]) -> str:
    """`` (native model.so: N x in CPU time)`` where the report has the native figure (reports before it have not)."""
    return f" (native model.so: {_fmt(r['native_rtf_cpu'], 3)}x in CPU time)" if r.get("native_rtf_cpu") else ""


def _markdown(rep: dict[str, Any], fit: str) -> str:
    from metafx.capture_signal import probe_seconds

    rows = rep["rows"]
    lines = [
        "# Capture: " + ("the shipped meta-model" if rep["model"]["source"] == "shipped" else
                         f"the meta-model `{rep['model']['source']}`") + " on a held-out setting of every family",
        "",
        f"Command: `{rep['command']}` ({rep['date']}; {rep['machine']['cpus']} CPU cores"
        + (f" ({rep['machine']['cpu']})" if rep["machine"].get("cpu") else "") + ", load average "
        f"{', '.join(f'{x:.1f}' for x in rep['machine']['load_average'])} at the end)."
        + probe_sentence(rep["machine"].get("speed_probe")),
        "",
        f"Meta-model: `{rep['model']['checkpoint']}` ({rep['model']['study']}, {rep['model']['arch']}, "
        f"{rep['model']['method']}). The capture signal rendered through one test-split setting per family "
        f"(DAWDreamer); support = the first S seconds; every row is scored on the same held-out part "
        f"(from {rep['heldout_from_seconds']:g} s to the end, 9.66 s of held-out programme material). ESR is "
        "whole-signal (error energy / target energy over the held-out part).",
        "",
        f"## Held-out ESR against support seconds (head fit: {fit})",
        "",
    ]
    sups = sorted({r["support_seconds"] for r in rows})
    fams = list(dict.fromkeys(r["family"] for r in rows))
    head = "| family | setting | " + " | ".join(f"{s:g} s" for s in sups) + " | LS-FIR 3 s | classical ARX 3 s | " \
        "scratch 3 s | identity |"
    lines += [head, "|" + "---|" * (len(sups) + 6)]
    met = {"esr": 0, "below_arx": 0, "floor": 0, "n": 0}
    for f in fams:
        rs = {r["support_seconds"]: r for r in rows if r["family"] == f and r["fit"] == fit}
        r3 = rs.get(TARGET_SUPPORT) or next(iter(rs.values()))
        setting = ", ".join(f"{k}={v:.3g}" for k, v in r3["params"].items())
        cells = [_fmt(rs[s]["model"]["esr"]) if s in rs else "-" for s in sups]
        lines.append(f"| {f} | {setting} | " + " | ".join(cells) + f" | {_fmt(r3['lsfir']['esr'])} | "
                     f"{_fmt(r3['arx']['esr'])} | {_fmt(r3.get('scratch', {}).get('esr'))} | "
                     f"{_fmt(r3['identity']['esr'])} |")
        if TARGET_SUPPORT in rs:
            e, ea = rs[TARGET_SUPPORT]["model"]["esr"], rs[TARGET_SUPPORT]["arx"]["esr"]
            met["n"] += 1
            met["esr"] += e <= TARGET_ESR
            met["below_arx"] += e < ea
            met["floor"] += e >= ea and max(e, ea) < PRECISION_FLOOR
    lines += ["", "## MAE / STFT at 3 s of support", "",
              "| family | model MAE | model STFT | model MR-STFT | LS-FIR MAE / STFT | classical ARX MAE / STFT | "
              "scratch MAE / STFT | latency found (samples) |", "|---|---|---|---|---|---|---|---|"]
    for f in fams:
        r = next((r for r in rows if r["family"] == f and r["fit"] == fit and r["support_seconds"] == TARGET_SUPPORT), None)
        if r is None:
            continue
        sc = r.get("scratch")
        lines.append(f"| {f} | {_fmt(r['model']['mae'])} | {_fmt(r['model']['stft'])} | {_fmt(r['model']['mrstft'])} | "
                     f"{_fmt(r['lsfir']['mae'])} / {_fmt(r['lsfir']['stft'])} | {_fmt(r['arx']['mae'])} / "
                     f"{_fmt(r['arx']['stft'])} | {(_fmt(sc['mae']) + ' / ' + _fmt(sc['stft'])) if sc else '-'} | "
                     f"{r['latency_samples']} |")
    banked = [r for r in rows if r["fit"] == fit and "no_bank" in r]
    if banked:
        lines += ["", f"## The Wiener bank at {TARGET_SUPPORT:g} s of support (held-out ESR)", "",
                  f"The capture offers the head the Wiener bank (metafx/wiener.py: {rep.get('wiener_units_offered', '-')} "
                  "random curve units and the gain units, which follow the input's peak level) with the units fitted "
                  "to the support (tuned units, metafx/capture/tuned_units.py; cascade units where those leave much "
                  "unexplained, metafx/capture/cascade_units.py; dynamics units, a fitted limiter envelope, "
                  "metafx/capture/dynamics_units.py) and keeps it where the "
                  "support's cross-validation prefers it; the same capture without the offer (`--wiener-units 0`) "
                  "beside it. The capture also cross-validates classical ARX itself on the same support and keeps "
                  "it where it is better (\"classical ARX\": a linear device).", "",
                  "| family | bank kept | with the offer | without (`--wiener-units 0`) | classical ARX | "
                  "capture s with / without |", "|---|---|---|---|---|---|"]
        for r in banked:
            kept = ("no, classical ARX" if r.get("classical_arx") else "no") if not r.get("wiener_units") else \
                "yes" + (", tuned" if r.get("tuned_units") else "") + \
                (", cascade" if r.get("cascade_units") else "") + (", dynamics" if r.get("dynamics_units") else "")
            lines.append(f"| {r['family']} | {kept} | {_fmt(r['model']['esr'])} | "
                         f"{_fmt(r['no_bank']['esr'])} | {_fmt(r['arx']['esr'])} | {r['capture_seconds']:.2f} / "
                         f"{r['no_bank_capture_seconds']:.2f} |")
        nb3 = sum(r["no_bank"]["esr"] <= TARGET_ESR for r in banked)
        lines += ["", f"Without the bank, ESR <= {TARGET_ESR} on {nb3} of {len(banked)} families."]
    other = [r for r in rows if r["fit"] != fit]
    if other:
        lines += ["", "## Head fit: continuous features against per-slice features (held-out ESR)", "",
                  "| family | S | continuous | slices (as in meta-training) |", "|---|---|---|---|"]
        for r in other:
            c = next((x for x in rows if x["family"] == r["family"] and x["fit"] == fit
                      and x["support_seconds"] == r["support_seconds"]), None)
            if c is not None:
                lines.append(f"| {r['family']} | {r['support_seconds']:g} | {_fmt(c['model']['esr'])} | "
                             f"{_fmt(r['model']['esr'])} |")
    takes = [r for r in rows if r.get("takes")]
    if takes:
        lines += ["", f"## Takes: held-out ESR at {TARGET_SUPPORT:g} s on takes of the same wet", "",
                  "Where the capture kept cascade units (a non-convex search), it was repeated on takes of the same "
                  f"wet with independent noise of RMS {TAKE_NOISE:g} (-140 dBFS) added: the spread is the search's "
                  "(its starts, L-BFGS path and the cross-validation's choices), not the device's.", "",
                  "| family | takes | held-out ESR of each | median | max |", "|---|---|---|---|---|"]
        for r in takes:
            lines.append(f"| {r['family']} | {len(r['takes'])} | {', '.join(_fmt(v) for v in r['takes'])} | "
                         f"{_fmt(float(np.median(r['takes'])))} | {_fmt(max(r['takes']))} |")
        tried = [r for r in takes if r.get("takes_tried")]
        if tried:
            lines += ["", f"The same takes captured with `--tries {tried[0]['tries']}` (that many searches for the "
                      "cascade units, each on other runs of the support; the head with the smallest cross-validated "
                      "ESR on the support kept: nothing is chosen on the held-out part):", "",
                      "| family | takes | held-out ESR of each | median | max | capture s (max) |",
                      "|---|---|---|---|---|---|"]
            for r in tried:
                lines.append(f"| {r['family']} | {len(r['takes_tried'])} | "
                             f"{', '.join(_fmt(v) for v in r['takes_tried'])} | "
                             f"{_fmt(float(np.median(r['takes_tried'])))} | {_fmt(max(r['takes_tried']))} | "
                             f"{max(r['takes_tried_seconds']):.2f} |")
    caps = [r["capture_seconds"] for r in rows if r["fit"] == fit]
    caps3 = [r["capture_seconds"] for r in rows if r["fit"] == fit and r["support_seconds"] == TARGET_SUPPORT]
    probe = round(probe_seconds(), 2)
    caps_p = [r["capture_seconds"] for r in rows if r["fit"] == fit and r["support_seconds"] == probe]
    cpus = [r["capture_cpu_seconds"] for r in rows if r["fit"] == fit and "capture_cpu_seconds" in r]
    rtf = rep.get("rtf_block256") or {}
    rtf_b = rep.get("rtf_block256_bank")
    rtf_c = rep.get("rtf_block256_cascade")
    lines += ["", "## Targets", "",
              f"* ESR <= {TARGET_ESR} with {TARGET_SUPPORT:g} s of support: met on {met['esr']} of {met['n']} families; "
              f"below classical ARX on {met['below_arx']} of {met['n']}"
              + (f" ({met['floor']} more where both are below {PRECISION_FLOOR:g}, float64 rounding: a tie)"
                 if met["floor"] else "") + ".",
              f"* Capture (load, align, adapt, export, predict, baselines, score; in-process, "
              f"{rep.get('machine', {}).get('capture_threads', 1)} torch thread(s)): "
              f"median {np.median(caps):.2f} s wall, max {max(caps):.2f} s"
              + (f" (at {TARGET_SUPPORT:g} s of support: median {np.median(caps3):.2f} s, max {max(caps3):.2f} s)"
                 if caps3 else "")
              + (f" (at the default support, the probe's {probe:g} s: median {np.median(caps_p):.2f} s, max "
                 f"{max(caps_p):.2f} s)" if caps_p else "")
              + (f"; median {np.median(cpus):.2f} s CPU, max {max(cpus):.2f} s" if cpus else "")
              + f" (target <= {TARGET_CAPTURE_SECONDS:g} s; wall time on a shared machine counts other processes).",
              f"* Exported model ({rtf.get('kind', '-')}), one thread, 48 kHz, blocks of 256: "
              f"{_fmt(rtf.get('rtf_cpu'), 3)}x real time in CPU time, {_fmt(rtf.get('rtf_wall'), 3)}x in wall time "
              f"(target >= {TARGET_RTF:g}x)" + _native(rtf)
              + (f"; with the Wiener bank kept ({rtf_b['family']}, {rtf_b['bank_units']} channels): "
                 f"{_fmt(rtf_b['rtf_cpu'], 3)}x in CPU time, {_fmt(rtf_b['rtf_wall'], 3)}x in wall time" + _native(rtf_b)
                 if rtf_b else "")
              + (f"; with cascade units kept ({rtf_c['family']}, {rtf_c['bank_units']} bank channels): "
                 f"{_fmt(rtf_c['rtf_cpu'], 3)}x in CPU time, {_fmt(rtf_c['rtf_wall'], 3)}x in wall time" + _native(rtf_c)
                 if rtf_c else "")
              + ". Every family's model.ts and model.so: benchmarks/export_rtf.md.", ""]
    return "\n".join(lines)


__all__ = ["heldout_settings", "main", "render_through", "train_scratch"]
