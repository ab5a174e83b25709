"""Capture your own effect: adapt a meta-model to a recording of it, in seconds.

    python launch/capture.py signal --out capture.wav          # 1. the signal to play through the device
    python launch/capture.py --wet recorded.wav --out DIR       # 2. adapt, score, export (DIR/model.ts)

    python launch/capture.py --dry in.wav --wet out.wav --out DIR [--support-seconds S] [--model M]
        [--apply song.wav --apply-out song_fx.wav] [--tracking-uri URI | --no-mlflow] [--experiment capture]
        [--wiener-units N] [--tries N]
    python launch/capture.py apply --model DIR/model.ts IN OUT  # process a file with an exported model (or model.so)

--model: a checkpoint (best.pt / checkpoint.pt or its folder), a search folder (ray_results/<name>:
its best trial), or models:/<name>/<version> from the MLflow Model Registry; default: the meta-model
shipped in metafx/shipped/. Files of any rate and channel count (mixed to mono and resampled to
the model's rate). DIR receives results.json, prediction.wav, plots/, audio/ and model.ts (runs
with torch alone: see metafx/export.py). Each capture is an MLflow run in the experiment
"capture" of the project store (or --tracking-uri). The logic is metafx/capture/.

--wiener-units: an ARX meta-model's head is also offered a bank of N fixed random curves of the input
and its low-passes (metafx/wiener.py: a filter before a clipper, which the meta-learned features cannot
express) and 54 gain units that follow the input's peak level (a limiter's or compressor's gain); the
capture keeps the bank only where a cross-validation on the support seconds prefers it (results.json:
model.wiener_offered, model.wiener_units, model.wiener_gain_units). With the bank come 9 tuned units, anti-aliased
curves of a pre-filter fitted to the support (metafx/capture/tuned_units.py; results.json:
model.wiener_tuned_units, model.wiener_prefilter), and where they leave much unexplained 9 cascade units, a second
curve after a filtered first one (metafx/capture/cascade_units.py; model.wiener_cascade_units, model.wiener_cascade),
kept with the bank or left out. 0 offers no bank.

--tries N: the cascade units' search is not convex (an amp's held-out ESR varied 2.5x between takes that
differ only by noise at -140 dBFS); N searches, each on other runs of the support, and the head with the
smallest cross-validated ESR on the support is kept (results.json: model.wiener_cascade_tries). It guards
against a search that loses the cascade; between cascades that all work it does not reliably pick the better
(README, benchmarks/capture_tries/). Each further try costs about 3-4 s on 2 cores, only where a cascade is
searched (an amp, a driven filter). Default 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metafx import cli  # noqa: E402

CAPTURE_HELP = cli.EXIT_STATUS_HELP.replace(
    "the source audio (an unreadable file, too little audio for the slices)",
    "the source audio (an unreadable file, too little audio for the slices); for a capture: a missing, "
    "silent or NaN file, dry and wet of different takes, a support too long or too short, a checkpoint "
    "of another format or version")


def _signal(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="capture.py signal", description="write the shipped capture signal")
    ap.add_argument("--out", type=Path, required=True, help="WAV file to write (48 kHz, mono, float)")
    args = ap.parse_args(argv)
    from metafx.capture_signal import CAPTURE_VERSION, PROGRAMME_SECONDS, write_wav

    probe = write_wav(args.out)
    print(f"wrote {args.out}: capture signal v{CAPTURE_VERSION}, 48000 Hz mono; probe {probe:.2f} s (the default "
          f"support), then {PROGRAMME_SECONDS:g} s of held-out programme material")
    print(f"probe_seconds {probe:.2f}")
    return 0


def _apply(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="capture.py apply", description="process a file with an exported model")
    ap.add_argument("--model", type=Path, required=True,
                    help="a capture's model.ts or model.so (the native export), or its folder (model.ts)")
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    args = ap.parse_args(argv)
    from metafx.capture import CaptureError, apply_exported

    try:
        r = apply_exported(args.model, args.input, args.output)
    except CaptureError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return cli.EXIT_BAD_INPUT
    print(f"wrote {r['out']} ({r['rate']} Hz model)")
    return 0


def _capture(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=CAPTURE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wet", type=Path, required=True, help="the device's output (recorded)")
    ap.add_argument("--dry", type=Path, default=None, help="the device's input (default: the shipped capture signal)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    ap.add_argument("--support-seconds", type=float, default=None,
                    help="seconds from the start that adapt the model (default: the capture signal's probe)")
    ap.add_argument("--model", default=None, help="checkpoint, search folder or models:/name/version (default: shipped)")
    ap.add_argument("--apply", type=Path, default=None, help="also process this file with the adapted model")
    ap.add_argument("--apply-out", type=Path, default=None, help="where --apply writes (float WAV)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlruns/)")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: capture)")
    ap.add_argument("--run-name", default=None, help="MLflow run name (default: the wet file's name)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not record the capture in MLflow")
    ap.add_argument("--max-latency-ms", type=float, default=1000.0, help="longest latency searched (default 1000)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads during the capture (default: 2, or 1 on a one-core machine; 1 on a busy one)")
    ap.add_argument("--wiener-units", type=int, default=None,
                    help="curve units of the Wiener bank (with its gain units) offered to an ARX head, kept where the "
                         "support's cross-validation prefers them (default: metafx.wiener.WIENER_UNITS; 0: no bank)")
    ap.add_argument("--tries", type=int, default=None,
                    help="searches for the cascade units, the best by the support's cross-validation kept (default: "
                         "metafx.capture.cascade_units.CASCADE_TRIES; more guard against a lost cascade)")
    ap.add_argument("--no-native", action="store_true",
                    help="skip the native export (model.c, model.so: an ARX model as C, 5-8x faster than model.ts)")
    args = ap.parse_args(argv)
    from metafx.capture import CaptureError, run_capture
    from metafx.capture.cascade_units import CASCADE_TRIES
    from metafx.capture.run import CAPTURE_THREADS
    from metafx.wiener import WIENER_UNITS

    try:
        res = run_capture(args.wet, args.out, dry=args.dry, support_seconds=args.support_seconds, model=args.model,
                          tracking_uri=args.tracking_uri, experiment=args.experiment, mlflow=not args.no_mlflow,
                          run_name=args.run_name, apply=args.apply, apply_out=args.apply_out,
                          max_latency_seconds=args.max_latency_ms / 1000.0, overwrite=args.overwrite,
                          threads=CAPTURE_THREADS if args.threads is None else args.threads,
                          wiener_units=WIENER_UNITS if args.wiener_units is None else args.wiener_units,
                          tries=CASCADE_TRIES if args.tries is None else args.tries, native=not args.no_native,
                          command="python launch/capture.py " + shlex.join(argv))
    except CaptureError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return cli.EXIT_BAD_INPUT
    r = res.results
    h, b = r["heldout"], r["baselines"]
    print(f"capture of {args.wet} with {r['model']['study']} ({r['model']['arch']}, {r['model']['method']}): "
          f"latency {r['latency']['samples']} samples ({r['latency']['ms']:.2f} ms), support {r['support_seconds']:.2f} s, "
          f"held out {r['heldout_seconds']:.2f} s")
    print(f"  {'':14s} {'ESR':>10s} {'MAE':>10s} {'STFT':>8s} {'MR-STFT':>8s}")
    for name, m in (("adapted model", h), ("LS-FIR", b["lsfir"]), ("classical ARX", b["arx"]), ("identity", b["identity"])):
        print(f"  {name:14s} {m['esr']:10.4g} {m['mae']:10.4g} {m['stft']:8.3f} {m['mrstft']:8.3f}")
    rtf = r["export"]["rtf_block256_one_thread"]
    print(f"  capture {r['seconds']['capture']:.2f} s (load, align, adapt, export, predict, baselines, score); exported "
          f"{r['export']['kind']} model {r['export']['bytes'] / 1e6:.1f} MB" + (f", {rtf:.1f}x real time (one thread, "
          f"blocks of 256)" if rtf else ""))
    nat = r["export"].get("native") or {}
    if nat.get("library"):
        nrtf = nat.get("rtf_block256_one_thread")
        print(f"  native export model.so (model.c compiled by {nat['compiler']})"
              + (f": {nrtf:.1f}x real time (one thread, blocks of 256)" if nrtf else ""))
    elif nat.get("error"):
        print(f"  no native model.so: {nat['error']}")
    files = "model.ts" + (", model.c" if nat.get("c") else "") + (", model.so" if nat.get("library") else "")
    print(f"wrote {res.out} (results.json, prediction.wav, {files}, plots/, audio/)"
          + (f"; MLflow run {res.run_id}" if res.run_id else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bar over the results
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "signal":
        return cli.run(lambda: _signal(argv[1:]))
    if argv and argv[0] == "apply":
        return cli.run(lambda: _apply(argv[1:]), interrupted="nothing was written")
    return cli.run(lambda: _capture(argv), interrupted="nothing was written (--out and MLflow are written at the end)")


if __name__ == "__main__":
    raise SystemExit(main())
