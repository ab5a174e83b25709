"""One capture, end to end: load, align, adapt, export, predict, score, write, log (:func:`run_capture`).

Everything is written into a temporary folder beside ``--out`` and renamed at the end; the
MLflow run (:func:`metafx.tracking.log_capture`) is created only after every check passed and
ends FAILED if logging fails, so neither holds half a capture.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metafx import capture_signal as cs
from metafx.capture.adapt import adapt_and_export, baseline_predictions, classical_arx_fit, score
from metafx.capture.cascade_units import CASCADE_TRIES
from metafx.capture.errors import CaptureError
from metafx.capture.meta_model import MetaModel, load_meta_model
from metafx.capture.recording import CLIP_LEVEL, Recording, find_latency, fit_length, read_recording
from metafx.data.sources import resample
from metafx.export import ExportError, real_time_factor, save, script
from metafx.plots import capture_plots, write_capture_audio
from metafx.wiener import WIENER_UNITS

log = logging.getLogger(__name__)

RESULTS_FORMAT = "metafx.capture"
RESULTS_VERSION = 1
MAX_LATENCY_SECONDS = 1.0  # bounded latency search (and the largest length difference accepted)
MIN_HELDOUT_SECONDS = 0.5  # a capture must leave at least this much audio to score
SILENT_RMS = 1e-5  # a wet quieter than -100 dBFS RMS carries nothing to fit
CLIP_WARN_FRACTION = 1e-4  # warn when more of the wet is clipped
AUDIO_SECONDS = 5.0  # seconds of held-out audio logged to MLflow (dry, wet, prediction)
CAPTURE_THREADS = min(2, os.cpu_count() or 1)  # torch threads during a capture (see run_capture)
RTF_BLOCK = 256
NATIVE_CHECK_SECONDS = 2.0  # seconds of the dry file on which model.so is checked against model.ts at capture
NATIVE_TOLERANCE = 1e-5  # largest difference accepted there (float rounding: about 1e-7 measured)

@dataclass
class CaptureResult:
    """What :func:`run_capture` produced: the results mapping and where things went."""

    results: dict[str, Any]
    out: Path
    run_id: str | None = None
    warnings: list[str] = field(default_factory=list)


def write_capture_signal(path: Path) -> float:
    """Write the shipped capture signal as a float WAV (48 kHz mono); returns the probe length in seconds."""
    return cs.write_wav(path)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CaptureError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")


def run_capture(
    wet: Path,
    out: Path,
    *,
    dry: Path | None = None,
    support_seconds: float | None = None,
    model: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    mlflow: bool = True,
    run_name: str | None = None,
    apply: Path | None = None,
    apply_out: Path | None = None,
    max_latency_seconds: float = MAX_LATENCY_SECONDS,
    overwrite: bool = False,
    ridge_fit: str = "continuous",
    wiener_units: int = WIENER_UNITS,
    tries: int = CASCADE_TRIES,
    heldout_from_seconds: float | None = None,
    measure_rtf: bool = True,
    command: str | None = None,
    meta_model: MetaModel | None = None,
    threads: int = CAPTURE_THREADS,
    native: bool = True,
) -> CaptureResult:
    """Adapt a meta-model to a dry/wet recording; write results, prediction, plots and the exported model.

    Args:
        wet: the device's output.
        out: the output folder (must not exist or be empty, unless ``overwrite``).
        dry: the device's input; None = the shipped capture signal (regenerated).
        support_seconds: seconds from the start that adapt the model; None = the probe's length.
        model: see :func:`load_meta_model` (None = the shipped meta-model).
        tracking_uri, experiment, mlflow, run_name: the MLflow run (``mlflow=False``: none).
        apply, apply_out: another file processed with the adapted model.
        max_latency_seconds: bound of the latency search and of the length difference.
        overwrite: replace a non-empty ``out``.
        ridge_fit: ``"continuous"`` or ``"slices"`` (ARX meta-models; :func:`adapt_arx`).
        wiener_units: curve units of the Wiener bank (with its gain units) offered to a continuous ARX fit
            (:mod:`metafx.wiener`; 0: no bank).
        tries: searches for the bank's cascade units, each on other rows of the support, the head with the smallest
            cross-validated ESR on the support kept (:data:`metafx.capture.cascade_units.CASCADE_TRIES`; they run
            only where a cascade is searched: devices of two nonlinear stages with a filter between, an amp).
        heldout_from_seconds: score from here instead of from the end of the support (a fixed
            held-out part for comparisons across support lengths; >= ``support_seconds``).
        measure_rtf: time the exported model (blocks of 256, one thread).
        command: the command line, recorded in results.json.
        meta_model: an already loaded meta-model (``model`` is then only a label).
        native: also write the native export (``model.c``, and ``model.so`` where a C compiler is found;
            :mod:`metafx.native_export`): ARX models without a network trunk. The compiler runs beside the
            baselines; its library is checked against ``model.ts`` on the first :data:`NATIVE_CHECK_SECONDS` of
            the dry file and then computes ``prediction.wav`` and the scores (the same model, several times faster).
        threads: torch intra-op threads during the capture (restored after). Two by default (one on a one-core
            machine): the adaptation's normal equations and cross-validation are large products that a second
            thread nearly halves (a 10 s support: 13.5 s -> 9.0 s for the whole capture); the exported model's
            real-time factor is measured on one thread regardless. On a machine busy with other work, 1.

    Returns:
        :class:`CaptureResult`.

    Raises:
        CaptureError: bad input (files, lengths, support, checkpoint); nothing is written.
        metafx.tracking.TrackingError: the MLflow run could not be written (it ends FAILED;
            ``out`` is not written).
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _run_capture(wet, out, dry=dry, support_seconds=support_seconds, model=model, tracking_uri=tracking_uri,
                            experiment=experiment, mlflow=mlflow, run_name=run_name, apply=apply, apply_out=apply_out,
                            max_latency_seconds=max_latency_seconds, overwrite=overwrite, ridge_fit=ridge_fit,
                            wiener_units=wiener_units, tries=tries,
                            heldout_from_seconds=heldout_from_seconds, measure_rtf=measure_rtf, command=command,
                            meta_model=meta_model, native=native)
    finally:
        torch.set_num_threads(old_threads)


def _run_capture(wet: Path, out: Path, *, dry: Path | None, support_seconds: float | None, model: str | None,
                 tracking_uri: str | None, experiment: str | None, mlflow: bool, run_name: str | None,
                 apply: Path | None, apply_out: Path | None, max_latency_seconds: float, overwrite: bool,
                 ridge_fit: str, wiener_units: int, tries: int, heldout_from_seconds: float | None, measure_rtf: bool,
                 command: str | None, meta_model: MetaModel | None, native: bool) -> CaptureResult:
    t_all = time.perf_counter()
    sec: dict[str, float] = {}
    warnings: list[str] = []

    def warn(msg: str) -> None:
        log.warning("%s", msg)
        warnings.append(msg)

    cpu: dict[str, float] = {}
    c_last = [time.process_time()]

    def stage(name: str, t0: float) -> float:
        sec[name] = time.perf_counter() - t0
        c = time.process_time()
        cpu[name] = c - c_last[0]
        c_last[0] = c
        return time.perf_counter()

    out = Path(out).expanduser()
    _check_out(out, overwrite)
    if (apply is None) != (apply_out is None):
        raise CaptureError("--apply and --apply-out go together: give both (the file to process and where to write it)")
    if apply is not None and not Path(apply).is_file():
        raise CaptureError(f"--apply file {apply} does not exist: check the path")
    if support_seconds is not None and not support_seconds > 0:
        raise CaptureError(f"--support-seconds must be > 0, got {support_seconds}")
    if wiener_units < 0:
        raise CaptureError(f"--wiener-units must be >= 0 (0 offers no Wiener bank), got {wiener_units}")
    if tries < 1:
        raise CaptureError(f"--tries must be >= 1 (searches for the cascade units; 1 is the default), got {tries}")

    t = time.perf_counter()
    mm = meta_model if meta_model is not None else load_meta_model(model, tracking_uri)
    sr = int(mm.cfg.data.sample_rate)
    bank_fit = mm.cfg.model.arch == "arx" and ridge_fit == "continuous"  # where the Wiener bank is offered
    t = stage("load_model", t)

    wet_rec = read_recording(Path(wet), "--wet", sr)
    if dry is None:
        if sr != cs.SAMPLE_RATE:
            raise CaptureError(f"the meta-model runs at {sr} Hz but the shipped capture signal is defined at "
                               f"{cs.SAMPLE_RATE} Hz: pass the dry file with --dry")
        x = cs.capture_signal()
        dry_rec = Recording(None, cs.SAMPLE_RATE, 1, x.size, x, float(np.max(np.abs(x))), 0.0)
    else:
        dry_rec = read_recording(Path(dry), "--dry", sr)
    probe = cs.probe() if sr == cs.SAMPLE_RATE else None
    is_signal = dry is None or (probe is not None and dry_rec.samples.size >= probe.size and
                                float(np.max(np.abs(dry_rec.samples[:probe.size] - probe))) < 1e-3)  # 16-bit PCM too
    dname = "the capture signal" if dry is None else str(dry)
    w_rms = float(np.sqrt(np.mean(np.square(wet_rec.samples, dtype=np.float64))))
    if w_rms < SILENT_RMS:
        raise CaptureError(f"--wet file {wet} is silent ({20 * math.log10(w_rms + 1e-30):.0f} dBFS RMS): check the "
                           f"device's output and the recording level, and record again")
    d_rms = float(np.sqrt(np.mean(np.square(dry_rec.samples, dtype=np.float64))))
    if d_rms < SILENT_RMS:
        raise CaptureError(f"--dry file {dry} is silent: pass the signal that was played into the device")
    if wet_rec.clipped_fraction > CLIP_WARN_FRACTION:
        if wet_rec.peak >= CLIP_LEVEL:  # at full scale: the recorder (or the interface) clipped
            warn(f"--wet file {wet}: {100 * wet_rec.clipped_fraction:.3f} % of the samples are clipped (peak "
                 f"{wet_rec.peak:.4f}): lower the recording level and record again; the model learns the clipping")
        else:  # a flat top below full scale: a clipped take scaled down, or a device that clips (its own sound)
            warn(f"--wet file {wet}: {100 * wet_rec.clipped_fraction:.3f} % of the samples are clipped (a flat top at "
                 f"{wet_rec.peak:.4f}, below full scale): if the take was clipped and then scaled, lower the recording "
                 f"level and record again; if the device itself clips (a fuzz, a hard clipper), that is its sound")
    t = stage("load_audio", t)

    max_lag = int(round(max_latency_seconds * sr))
    dx, wy = dry_rec.samples, wet_rec.samples
    if abs(wy.size - dx.size) > max_lag:
        raise CaptureError(f"--wet {wet} ({wy.size / sr:.2f} s) and {dname} ({dx.size / sr:.2f} s) differ in length by "
                           f"{abs(wy.size - dx.size) / sr:.2f} s, more than a plausible latency ({max_latency_seconds:g} s): "
                           f"they are not one take; trim them to the same take (or raise --max-latency-ms)")
    lat = find_latency(dx, wy, sr, max_lag, cs.click_positions(sr) if is_signal else None)
    n = min(dx.size, wy.size - lat.samples)
    dry_a = dx[:n]
    wet_a = wy[lat.samples: lat.samples + n]
    t = stage("align", t)

    S = support_seconds if support_seconds is not None else cs.probe_seconds()
    n_sup = int(round(S * sr))
    L = mm.cfg.maml.slice_len
    if n_sup < L:
        raise CaptureError(f"--support-seconds {S:g} holds {n_sup} samples, fewer than one slice of the meta-model "
                           f"({L} samples = {L / sr:.3f} s): raise --support-seconds")
    if n_sup >= n:
        raise CaptureError(f"--support-seconds {S:g} is longer than the aligned recording ({n / sr:.2f} s of {wet}): "
                           f"lower --support-seconds (the default is the capture signal's probe, "
                           f"{cs.probe_seconds():.2f} s)")
    h0 = n_sup if heldout_from_seconds is None else int(round(heldout_from_seconds * sr))
    if h0 < n_sup:
        raise CaptureError(f"the held-out part may not start ({h0 / sr:g} s) inside the support ({S:g} s)")
    if n - h0 < int(MIN_HELDOUT_SECONDS * sr):
        raise CaptureError(f"--support-seconds {S:g} leaves {max(0, n - h0) / sr:.2f} s of the {n / sr:.2f} s recording "
                           f"to score (at least {MIN_HELDOUT_SECONDS:g} s needed): lower --support-seconds or record "
                           f"the whole capture signal")

    # ---- every check passed: compute into a temporary folder beside --out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the published folder's mode
    apply_tmp: Path | None = None
    building = None  # the native build while the compiler runs
    try:
        t = time.perf_counter()
        # classical ARX, fitted once: the continuous ARX fit's candidate and the ``arx`` baseline
        classical = classical_arx_fit(dry_a, wet_a, n_sup, sr, lat.samples)
        try:
            module = adapt_and_export(mm, dry_a, wet_a, n_sup, sr, lat.samples, ridge_fit=ridge_fit,
                                      wiener_units=wiener_units, classical=classical, cascade_tries=tries)
        except ExportError as e:
            raise CaptureError(f"{mm.checkpoint}: {e}") from e
        t = stage("adapt", t)
        scripted = script(module)
        save(scripted, tmp / "model.ts")
        native_info, building = _start_native(module, tmp, native)
        t = stage("export", t)
        # the baselines, fitted and scored while the compiler runs
        base = baseline_predictions(mm.cfg, dry_a, wet_a, n_sup, sr, arx=classical)
        target = wet_a[h0:]
        baselines = {k: score(v[h0:n], target) for k, v in base.items()}
        t = stage("baselines", t)
        native_model = None
        if building is not None:
            native_info, native_model = _finish_native(building, dx, scripted, sr, warn)
        t = stage("native", t)
        # the whole dry file from a zero state: by model.so where it was built (the same model, checked against
        # model.ts above; 5-8x faster), else by model.ts
        if native_model is not None:
            pred_full = native_model.process(dx)
        else:
            with torch.no_grad():
                pred_full = scripted.process(torch.from_numpy(dx)).numpy()
        pred = pred_full[:n]
        t = stage("predict", t)
        held = score(pred[h0:], target)
        support = {"esr": float(np.sum((wet_a[:n_sup] - pred[:n_sup]) ** 2) / (np.sum(wet_a[:n_sup] ** 2) + 1e-12))}
        t = stage("score", t)
        capture_seconds = sum(sec.values())
        capture_cpu = sum(cpu.values())
        rtf = real_time_factor(scripted, block=RTF_BLOCK, seconds=2.0) if measure_rtf else None
        if measure_rtf and native_model is not None:
            native_info["rtf_block256_one_thread"] = native_model.real_time_factors(RTF_BLOCK, seconds=2.0)[0]
        t = stage("rtf", t)

        # prediction.wav: aligned with the wet FILE (delayed by the latency), at its rate and length
        import soundfile as sf

        p_wet = resample(np.concatenate([np.zeros(lat.samples), pred_full]), sr, wet_rec.rate_in)  # float64 filter
        sf.write(tmp / "prediction.wav", fit_length(p_wet, wet_rec.frames_in), wet_rec.rate_in, subtype="FLOAT")
        title = f"capture of {Path(wet).name} with {mm.cfg.name} ({mm.cfg.model.arch}, {mm.cfg.maml.method}), " \
                f"{S:g} s support: held-out ESR {held['esr']:.4g} (classical ARX {baselines['arx']['esr']:.4g})"
        capture_plots(tmp / "plots", sr, dry_a[h0:], target, pred[h0:], base["arx"][h0:n], title)
        a0, a1 = h0, min(n, h0 + int(AUDIO_SECONDS * sr))
        write_capture_audio(tmp / "audio", sr, {"dry": dry_a[a0:a1], "wet": wet_a[a0:a1], "prediction": pred[a0:a1]})
        if apply is not None:
            apply_tmp = _apply(scripted, Path(apply), Path(apply_out), sr)
        t = stage("write", t)

        if all(v["esr"] > 0.9 for v in (held, *baselines.values()) if v is not baselines["identity"]):
            warn(f"neither the adapted model nor the baselines explain the wet (held-out ESR {held['esr']:.3g}): is "
                 f"{wet} a recording of {dname}?")
        results: dict[str, Any] = {
            "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
            "command": command,
            "rate": sr,
            "dry": {"path": None if dry is None else str(dry), "capture_signal": bool(is_signal),
                    "capture_signal_version": cs.CAPTURE_VERSION if is_signal else None,
                    "rate_in": dry_rec.rate_in, "channels": dry_rec.channels, "seconds": dx.size / sr,
                    "fingerprint": cs.fingerprint(dx)},
            "wet": {"path": str(wet), "rate_in": wet_rec.rate_in, "channels": wet_rec.channels,
                    "seconds": wy.size / sr, "peak": wet_rec.peak, "clipped_fraction": wet_rec.clipped_fraction},
            "latency": {"samples": lat.samples, "ms": lat.ms(sr), "method": lat.method, "peak_lag": lat.peak_lag,
                        "max_search_ms": 1000 * max_latency_seconds},
            "support_seconds": n_sup / sr,
            "heldout_seconds": (n - h0) / sr,
            "heldout_from_seconds": h0 / sr,
            "model": {"source": mm.source, "checkpoint": str(mm.checkpoint), "study": mm.cfg.name,
                      "arch": mm.cfg.model.arch, "method": mm.cfg.maml.method, "step": mm.step,
                      "slice_len": L, "ridge_fit": ridge_fit if mm.cfg.model.arch == "arx" else None,
                      "ridge_scale": getattr(module, "ridge_scale", None),
                      "classical_arx": bool(getattr(module, "classical_arx", False)) if bank_fit else None,
                      "wiener_offered": bool(getattr(module, "bank_offered", False)) if bank_fit else None,
                      "wiener_units": int(getattr(module, "n_curve", 0)) if bank_fit else None,
                      "wiener_gain_units": int(getattr(module, "n_gain", 0)) if bank_fit else None,
                      "wiener_tuned_units": int(getattr(module, "n_aa", 0)) if bank_fit else None,
                      "wiener_prefilter": (module.prefilter.as_dict() if getattr(module, "prefilter", None) is not None
                                           else None) if bank_fit else None,
                      "wiener_cascade_units": int(getattr(module, "n_cas", 0)) if bank_fit else None,
                      "wiener_cascade": (module.cascade.as_dict() if getattr(module, "cascade", None) is not None
                                         else None) if bank_fit else None,
                      "cv_esr": (float(module.cv_esr) if math.isfinite(getattr(module, "cv_esr", math.nan)) else None)
                      if bank_fit else None,
                      "tries": tries,
                      "wiener_cascade_tries": list(getattr(module, "cascade_tries", [])) if bank_fit else None,
                      "wiener_dynamics_units": int(getattr(module, "n_dyn", 0)) if bank_fit else None,
                      "wiener_dynamics": (module.dynamics.as_dict() if getattr(module, "dynamics", None) is not None
                                          else None) if bank_fit else None},
            "heldout": held,
            "support": support,
            "baselines": baselines,
            "export": {"file": "model.ts", "kind": str(scripted.kind), "streaming": bool(scripted.streaming),
                       "bytes": (tmp / "model.ts").stat().st_size, "rtf_block256_one_thread": rtf,
                       "native": native_info},
            "seconds": {**{k: round(v, 4) for k, v in sec.items()}, "capture": round(capture_seconds, 4)},
            "cpu_seconds": {**{k: round(v, 4) for k, v in cpu.items()}, "capture": round(capture_cpu, 4)},
            "apply": None if apply is None else {"in": str(apply), "out": str(apply_out)},
            "warnings": warnings,
        }
        run_id = None
        if mlflow:
            t = time.perf_counter()
            run_id = _log_mlflow(results, tmp, tracking_uri, experiment, run_name or f"{Path(wet).stem}", mm)
            sec["mlflow"] = time.perf_counter() - t
        else:
            _write_results(tmp / "results.json", results)
        # ---- publish
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
        if apply_tmp is not None:
            os.replace(apply_tmp, Path(apply_out))
            apply_tmp = None
    except BaseException:
        if building is not None:
            building.wait()  # the compiler writes into tmp: let it finish before tmp goes
        shutil.rmtree(tmp, ignore_errors=True)
        if apply_tmp is not None:
            apply_tmp.unlink(missing_ok=True)
        raise
    results["seconds"]["total"] = round(time.perf_counter() - t_all, 4)
    return CaptureResult(results, out, run_id, warnings)


def _write_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")


def _start_native(module: Any, tmp: Path, enabled: bool) -> tuple[dict[str, Any] | None, Any]:
    """Write ``model.c`` and start compiling it (:func:`metafx.native_export.start_native`: the compiler is its
    own process, so it runs beside the baselines); returns (the results' ``export.native`` entry for a model
    with no native export, else None; the build, else None)."""
    if not enabled:
        return None, None
    from metafx.native_export import NativeExportError, start_native

    try:
        return None, start_native(module, tmp)
    except NativeExportError as e:  # not an ARX model, or one with a network trunk: model.ts only
        return {"c": None, "header": None, "library": None, "error": str(e)}, None


def _finish_native(build: Any, dx: np.ndarray, scripted: Any, sr: int, warn: Any) -> tuple[dict[str, Any], Any]:
    """Wait for the compiler, load ``model.so`` and check it against ``model.ts`` on the first
    :data:`NATIVE_CHECK_SECONDS` of the dry file (to :data:`NATIVE_TOLERANCE`).

    Returns:
        (the results' ``export.native`` entry, the loaded :class:`metafx.native_export.NativeModel` or None:
        no library, ``error`` says why and a warning names the fix). A library that computes something else
        than model.ts (a bug of the runtime) is left out with a warning: the capture stands on model.ts.
    """
    k = min(dx.size, int(NATIVE_CHECK_SECONDS * sr))
    with torch.no_grad():
        ref = scripted.process(torch.from_numpy(dx[:k])).numpy()
    nm = build.finish(check=(dx[:k], ref), tolerance=NATIVE_TOLERANCE, reference="model.ts")
    info = dict(build.info)
    info["max_abs_diff_vs_model_ts"] = info.pop("max_abs_diff")
    info["rtf_block256_one_thread"] = None
    if nm is None:  # the compiler's errors say "model.ts still works"; a failed check says it here
        checked = info["max_abs_diff_vs_model_ts"] is not None
        warn(f"native export: {info['error']}" + ("; model.ts is the exported model" if checked else ""))
    return info, nm


def _log_mlflow(results: dict[str, Any], tmp: Path, tracking_uri: str | None, experiment: str | None, run_name: str,
                mm: MetaModel) -> str:
    from metafx.tracking import CAPTURE_EXPERIMENT, log_capture

    exp = experiment or CAPTURE_EXPERIMENT

    def before(run_id: str, uri: str) -> None:
        results["mlflow"] = {"tracking_uri": uri, "experiment": exp, "run_id": run_id}
        _write_results(tmp / "results.json", results)

    params = {"wet": results["wet"]["path"], "dry": results["dry"]["path"] or f"capture signal v{cs.CAPTURE_VERSION}",
              "model_source": mm.source, "model_checkpoint": str(mm.checkpoint), "study": mm.cfg.name,
              "arch": mm.cfg.model.arch, "method": mm.cfg.maml.method, "support_seconds": results["support_seconds"],
              "rate": results["rate"], "wet_rate_in": results["wet"]["rate_in"],
              "latency_method": results["latency"]["method"], "dry_fingerprint": results["dry"]["fingerprint"],
              "ridge_fit": results["model"]["ridge_fit"], "wiener_offered": results["model"]["wiener_offered"],
              "wiener_units": results["model"]["wiener_units"],
              "wiener_gain_units": results["model"]["wiener_gain_units"],
              "wiener_tuned_units": results["model"]["wiener_tuned_units"],
              "wiener_cascade_units": results["model"]["wiener_cascade_units"], "tries": results["model"]["tries"],
              "wiener_dynamics_units": results["model"]["wiener_dynamics_units"]}
    metrics = {"heldout": results["heldout"], "baselines": results["baselines"], "support": results["support"],
               "latency_samples": results["latency"]["samples"], "latency_ms": results["latency"]["ms"],
               "seconds": results["seconds"], "rtf_block256": results["export"]["rtf_block256_one_thread"],
               "rtf_block256_native": (results["export"]["native"] or {}).get("rtf_block256_one_thread"),
               "clipped_fraction": results["wet"]["clipped_fraction"]}
    tags = {"metafx.role": "capture", "metafx.model": mm.cfg.model.arch, "metafx.study": mm.cfg.name}
    run_id, _ = log_capture(tracking_uri, exp, run_name, params=params, metrics=metrics, tags=tags, artifact_dir=tmp,
                            before_upload=before)
    return run_id


def _apply(module: Any, src: Path, dst: Path, sr: int) -> Path:
    """Process ``src`` (any rate/channels; mixed to mono at the model's rate) with ``module``; float WAV at src's rate.

    Returns:
        The temporary file beside ``dst`` (renamed to ``dst`` by the caller).
    """
    import soundfile as sf

    rec = read_recording(src, "--apply", sr)
    if isinstance(module, torch.jit.ScriptModule):
        with torch.no_grad():
            y = module.process(torch.from_numpy(rec.samples)).numpy()
    else:  # a native library (metafx.native_export.NativeModel): float32 numpy in and out
        y = module.process(rec.samples)
    y = fit_length(resample(y.astype(np.float64), sr, rec.rate_in), rec.frames_in)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 1.0:
        log.warning("--apply-out %s peaks at %.3g (> 1): written as float, scale it before playback", dst, peak)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}.wav")
    sf.write(tmp, y, rec.rate_in, subtype="FLOAT")
    return tmp


def apply_exported(model_file: Path, src: Path, dst: Path) -> dict[str, Any]:
    """Process ``src`` with an exported model file (a capture's ``model.ts``, or its native ``model.so``) into ``dst``
    (float WAV).

    Raises:
        CaptureError: a missing or unreadable model or audio file.
    """
    model_file = Path(model_file)
    if model_file.is_dir():
        model_file = model_file / "model.ts"
    if not model_file.is_file():
        raise CaptureError(f"exported model {model_file} does not exist: pass a capture's model.ts or model.so, or its "
                           f"folder")
    if model_file.suffix in (".so", ".dylib", ".dll"):
        from metafx.native_export import NativeExportError, NativeModel

        try:
            m: Any = NativeModel(model_file)
        except NativeExportError as e:
            raise CaptureError(str(e)) from e
        sr = m.sample_rate
    else:
        try:
            m = torch.jit.load(str(model_file))
            sr = int(m.sample_rate)
        except Exception as e:
            raise CaptureError(f"{model_file} is not an exported metafx model ({type(e).__name__}): pass a capture's "
                               f"model.ts or model.so") from e
    if not Path(src).is_file():
        raise CaptureError(f"input file {src} does not exist: check the path")
    tmp = _apply(m, Path(src), Path(dst), sr)
    os.replace(tmp, dst)
    return {"model": str(model_file), "in": str(src), "out": str(dst), "rate": sr}
