"""The exported model's speed: TorchScript (model.ts) against the native export (model.so), every family.

    python launch/bench.py export_rtf [-- --families a,b --support 3 --seconds 10 --compare-without=FLAG]

Issue 13's target: the exported model >= 50x real time on one CPU core at 48 kHz, blocks of 256. Each
family's held-out setting (the capture bench's: :func:`metafx.bench.capture.heldout_settings`, the test
split of the shipped study) is rendered through the capture signal by DAWDreamer and captured with the
shipped meta-model from ``--support`` seconds (the capture's defaults otherwise: the Wiener bank offered,
kept where the support's cross-validation prefers it). Then, each in a fresh interpreter (a host loads
the file into its own process; this one has run captures), ``model.ts`` on one torch thread and
``model.so`` through ctypes process ``--seconds`` of noise at -18 dBFS RMS in blocks of 256 with the
state carried (:func:`metafx.export.real_time_factors`,
:meth:`metafx.native_export.NativeModel.real_time_factors`); real-time factor = seconds of audio per
second of CPU time of that process (the machine may be shared; wall time is reported beside it). Also:
the bank's size, the compile time, the library's largest difference from model.ts on the capture's dry
file (results.json), the capture's wall time and held-out ESR. With ``--compare-without FLAG``, each library
against the same model.c compiled without FLAG (:func:`compare_without`).
Writes benchmarks/export_rtf.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from metafx.bench.machine import cpu_model, probe_sentence, speed_probe
from metafx.bench.report_files import write_report
from metafx.config import REPO_ROOT
from metafx.native_export import LIBRARY

log = logging.getLogger(__name__)
TARGET_RTF = 50.0  # issue 13
BLOCK = 256


# each timed in its own fresh interpreter (a host loads the file into its own process; the bench's has run captures)
_TS_CODE = ("import json, sys, torch; from metafx.export import real_time_factors; m = torch.jit.load(sys.argv[1]); "
            f"w, c = real_time_factors(m, block={BLOCK}, seconds=float(sys.argv[2])); "
            "print(json.dumps({'wall': w, 'cpu': c, 'kind': str(m.kind), "
            "'bank_units': int(m.n_bank) if hasattr(m, 'n_bank') else 0}))")
_SO_CODE = ("import json, sys; from metafx.native_export import NativeModel; m = NativeModel(sys.argv[1]); "
            f"w, c = m.real_time_factors(block={BLOCK}, seconds=float(sys.argv[2])); "
            "print(json.dumps({'wall': w, 'cpu': c}))")


def _fresh(code: str, path: Path, seconds: float) -> dict[str, Any]:
    """Run ``code`` (:data:`_TS_CODE` or :data:`_SO_CODE`) on ``path`` in a fresh interpreter; its JSON line."""
    out = subprocess.run([sys.executable, "-c", code, str(path), str(seconds)], check=True, capture_output=True,
                         text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_rtf(folder: Path, seconds: float) -> dict[str, Any]:
    """Real-time factors of a capture's ``model.ts`` and ``model.so``, each timed in its own fresh interpreter.

    Returns:
        ``{"ts": {"wall", "cpu", "kind", "bank_units"}, "native": {"wall", "cpu"} | None}`` (None: no model.so).
    """
    so = folder / LIBRARY
    return {"ts": _fresh(_TS_CODE, folder / "model.ts", seconds),
            "native": _fresh(_SO_CODE, so, seconds) if so.is_file() else None}


def compare_without(folder: Path, command: str, flag: str, seconds: float, rounds: int = 2) -> dict[str, Any] | None:
    """The capture's library against the same ``model.c`` compiled without one flag, timed alternately.

    Why: the machine's speed moves within minutes (benchmarks/export_rtf_rerun/), so a flag's effect is measured
    by the two libraries timed in turn, each ``rounds`` times in a fresh interpreter, the best of each kept.

    Args:
        folder: the capture's folder (``model.c``, ``model.so``). command: the capture's compile command
            (results.json ``export.native.command``). flag: the flag to leave out. seconds: audio timed per run.

    Returns:
        ``{"flag", "command", "rtf_with_cpu", "rtf_without_cpu", "speedup"}``, or None where the command has no
        such flag.
    """
    argv = shlex.split(command)
    if flag not in argv:
        return None
    other = folder / f"without{Path(LIBRARY).suffix}"
    argv = [str(folder / "model.c") if Path(a).name == "model.c" else a for a in argv if a != flag]  # the command
    argv[argv.index("-o") + 1] = str(other)  # names the capture's temporary folder, since renamed
    subprocess.run(argv, check=True, capture_output=True, text=True)
    with_, without = [], []
    for _ in range(rounds):
        with_.append(_fresh(_SO_CODE, folder / LIBRARY, seconds)["cpu"])
        without.append(_fresh(_SO_CODE, other, seconds)["cpu"])
    return {"flag": flag, "command": " ".join(argv), "rtf_with_cpu": max(with_), "rtf_without_cpu": max(without),
            "speedup": max(with_) / max(without)}


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the benchmark (see the module docstring)."""
    import soundfile as sf

    from metafx.bench.capture import heldout_settings, render_through
    from metafx.capture import SHIPPED_DIR, load_meta_model, run_capture

    ap = argparse.ArgumentParser(prog="bench.py export_rtf")
    ap.add_argument("--families", default=None, help="comma-separated subset (default: every family of the study)")
    ap.add_argument("--support", type=float, default=3.0, help="seconds of support (issue 13's 3 s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of audio each real-time factor times")
    ap.add_argument("--compare-without", default=None, metavar="FLAG",
                    help="also time each library compiled without this flag of its command, alternately with it "
                         "(as --compare-without=-fno-trapping-math)")
    rest = [a for a in rest if a != "--"]
    opts = ap.parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python launch/bench.py export_rtf" + (" -- " + shlex.join(rest) if rest else "")
    mm = load_meta_model(None)
    settings = heldout_settings(SHIPPED_DIR / "capture_arx.yaml", opts.families.split(",") if opts.families else None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="metafx-bench-export-") as tmp:
        work = Path(tmp)
        for st in settings:
            fam = st["family"]
            dry, wet = render_through({"name": fam, "dsp": st["dsp"]}, st["params"], work / "cache")
            wet_path = work / f"{fam}.wav"
            sf.write(wet_path, wet, 48000, subtype="FLOAT")
            res = run_capture(wet_path, work / fam, support_seconds=opts.support, mlflow=False, meta_model=mm,
                              measure_rtf=False, overwrite=True).results
            nat = res["export"]["native"] or {}
            rtf = fresh_rtf(work / fam, opts.seconds)
            row = {"family": fam, "params": st["params"], "heldout_esr": res["heldout"]["esr"],
                   "bank_units": res["model"]["wiener_units"] or 0,
                   "gain_units": res["model"]["wiener_gain_units"] or 0,
                   "tuned_units": res["model"]["wiener_tuned_units"] or 0,
                   "cascade_units": res["model"]["wiener_cascade_units"] or 0,
                   "dynamics_units": res["model"]["wiener_dynamics_units"] or 0,
                   "capture_seconds": res["seconds"]["capture"], "compile_seconds": nat.get("compile_seconds"),
                   "native_error": nat.get("error"), "max_abs_diff_vs_model_ts": nat.get("max_abs_diff_vs_model_ts"),
                   "rtf_ts_cpu": rtf["ts"]["cpu"], "rtf_ts_wall": rtf["ts"]["wall"],
                   "rtf_native_cpu": rtf["native"]["cpu"] if rtf["native"] else None,
                   "rtf_native_wall": rtf["native"]["wall"] if rtf["native"] else None,
                   "compile_command": nat.get("command")}
            if opts.compare_without and nat.get("command"):
                row["compare"] = compare_without(work / fam, nat["command"], opts.compare_without, opts.seconds)
            rows.append(row)
            print(f"{fam:14s} bank {row['bank_units']:3d}  model.ts {row['rtf_ts_cpu']:6.1f}x  model.so "
                  + (f"{row['rtf_native_cpu']:6.1f}x" if row["rtf_native_cpu"] else "  none") + f"  capture "
                  f"{row['capture_seconds']:.2f} s", flush=True)
    report = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.machine(),
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
              "python": sys.version.split()[0], "support_seconds": opts.support, "seconds": opts.seconds,
              "block": BLOCK, "target_rtf": TARGET_RTF, "speed_probe": speed_probe(), "rows": rows}
    write_report(out_dir, "export_rtf", report, _markdown(report))
    print(f"wrote {out_dir / 'export_rtf.md'} and {out_dir / 'export_rtf.json'}")
    return 0


def _markdown(rep: dict[str, Any]) -> str:
    rows = rep["rows"]
    f = lambda v, nd=1: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
    lines = [
        "# Exported model speed: model.ts (TorchScript) and model.so (native export), every family", "",
        f"Command: `{rep['command']}` ({rep['date']}; {rep['cores']} CPU cores ({rep['cpu']}), load average "
        f"{', '.join(f'{x:.1f}' for x in rep['load_average'])} at the end; Python {rep['python']})."
        + probe_sentence(rep.get("speed_probe")), "",
        f"Each family's held-out setting captured with the shipped meta-model from {rep['support_seconds']:g} s of "
        f"support; each export then timed in a fresh interpreter on one thread over {rep['seconds']:g} s of noise at "
        f"-18 dBFS RMS in blocks of {rep['block']} with the state carried. Real-time factor = seconds of audio per "
        "second of that process's CPU time (wall time in the JSON). The library's largest difference from model.ts "
        "is on the capture's dry file (results.json `export.native`).", "",
        "| family | bank curves | gain | tuned | cascade | dynamics | model.ts | model.so | compile s | "
        "max diff vs model.ts | capture s | held-out ESR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | {r['bank_units']} | {r['gain_units']} | {r['tuned_units']} | "
                     f"{r['cascade_units']} | {r['dynamics_units']} | {f(r['rtf_ts_cpu'])}x | "
                     f"{f(r['rtf_native_cpu'])}x | {f(r['compile_seconds'], 2)} | "
                     f"{'-' if r['max_abs_diff_vs_model_ts'] is None else format(r['max_abs_diff_vs_model_ts'], '.2g')}"
                     f" | {f(r['capture_seconds'], 2)} | {r['heldout_esr']:.4g} |")
    nat = [r["rtf_native_cpu"] for r in rows if r["rtf_native_cpu"] is not None]
    ts = [r["rtf_ts_cpu"] for r in rows]
    met = sum(v >= rep["target_rtf"] for v in nat)
    lines += ["", "## Target", "",
              f"* Exported model >= {rep['target_rtf']:g}x real time (one core, 48 kHz, blocks of {rep['block']}): "
              f"model.so {met} of {len(rows)} families (min {min(nat):.1f}x, median {statistics.median(nat):.1f}x); "
              f"model.ts {sum(v >= rep['target_rtf'] for v in ts)} of {len(rows)} (min {min(ts):.1f}x, median "
              f"{statistics.median(ts):.1f}x)." if nat else "* No library was built (no C compiler).",
              "", "Compiled with: `" + re.sub(r"\S*/(model\.(?:c|so))", r"\1", rows[0]["compile_command"]) + "`."
              if rows and rows[0]["compile_command"] else "", ""]
    cmp = [r for r in rows if r.get("compare")]
    if cmp:
        flag = cmp[0]["compare"]["flag"]
        ups = [r["compare"]["speedup"] for r in cmp]
        lines += [f"## model.so with and without `{flag}`", "",
                  "The same model.c compiled without the flag, the two libraries timed in turn in fresh interpreters "
                  "(two rounds, the best of each: the machine's speed moves within minutes).", "",
                  "| family | with | without | speed-up |", "|---|---|---|---|"]
        lines += [f"| {r['family']} | {f(r['compare']['rtf_with_cpu'])}x | {f(r['compare']['rtf_without_cpu'])}x | "
                  f"{r['compare']['speedup']:.2f}x |" for r in cmp]
        lines += ["", f"Speed-up of `{flag}`: {min(ups):.2f}x to {max(ups):.2f}x (median {statistics.median(ups):.2f}x).",
                  ""]
    return "\n".join(lines)
