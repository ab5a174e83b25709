"""When a capture offers the Wiener bank: its effect against the support length, on validation settings.

    python launch/bench.py bank [-- --per-family 2 --support 0.5,1,2,3]

For each family of the shipped capture study (metafx/shipped/capture_arx.yaml), the first
``--per-family`` settings of its *validation* split (never the test split that
benchmarks/capture.md scores), the shipped capture signal is rendered through the setting
(DAWDreamer, :func:`metafx.bench.capture.render_through`) and the shipped meta-model's head is
fitted on the first S seconds (:func:`metafx.capture.adapt_arx`, continuous fit) twice: without
the bank (``wiener_units=0``) and with the bank always offered (``bank_min_equations=0``: the
support's cross-validation alone decides whether it is kept). Both are scored on the held-out
part (from 10 s to the end, whole-signal ESR).

What it decides: :data:`metafx.wiener.WIENER_MIN_EQUATIONS`, the equations per coefficient below
which the bank is not offered. Per support length, the table gives the equations per coefficient
of the head with the bank, how often the bank was kept, and whether offering it lowered the
held-out ESR (mean log10 ratio; settings more than 1.2x better or worse).

Writes ``benchmarks/capture_bank_rule.md`` and ``.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from metafx.bench.report_files import write_report

SUPPORTS = (0.5, 1.0, 2.0, 3.0)
HELDOUT_FROM = 10.0  # seconds, as in benchmarks/capture.md
RATIO = 1.2  # "better" / "worse": a held-out ESR changed by more than this factor


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the benchmark (see the module docstring)."""
    import torch

    from metafx.bench.capture import render_through
    from metafx.capture import SHIPPED_DIR, adapt_arx, load_meta_model, score
    from metafx.capture.adapt import bank_equations_per_coefficient
    from metafx.config import REPO_ROOT, load_config
    from metafx.data.tasks import load_taskset
    from metafx.wiener import WIENER_MIN_EQUATIONS, WIENER_UNITS, make_bank

    ap = argparse.ArgumentParser(prog="bench bank")
    ap.add_argument("--per-family", type=int, default=2, help="validation settings per family")
    ap.add_argument("--support", default=",".join(f"{s:g}" for s in SUPPORTS))
    ap.add_argument("--cache", default=None, help="render cache (default: a temporary folder)")
    rest = [a for a in rest if a != "--"]
    opts = ap.parse_args(rest)
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    supports = [float(s) for s in opts.support.split(",")]
    command = "python launch/bench.py bank" + (" -- " + shlex.join(rest) if rest else "")
    torch.set_num_threads(1)

    mm = load_meta_model(None)
    model, sr = mm.learner, int(mm.cfg.data.sample_rate)
    study = SHIPPED_DIR / "capture_arx.yaml"
    cfg = load_config(study)
    ts = load_taskset(cfg.data, progress=False)
    cache = Path(opts.cache) if opts.cache else Path(tempfile.mkdtemp(prefix="metafx-bench-bank-"))
    h0 = int(HELDOUT_FROM * sr)
    bank = make_bank(WIENER_UNITS, sample_rate=sr)
    n_coef = model.n_coef + bank.head_coefficients(model.nb)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for fam in cfg.data.families:
        val = [t for t in ts.tasks if t["family"] == fam.name and t["split"] == "val"][: opts.per_family]
        for task in val:
            dry, wet = render_through({"name": fam.name, "dsp": Path(fam.dsp).name}, dict(task["params"]), cache)
            x = torch.from_numpy(np.ascontiguousarray(dry))
            for S in supports:
                n = int(round(S * sr))
                esr = {}
                kept = 0
                with torch.no_grad():
                    for name, kw in (("without", {"wiener_units": 0}),
                                     ("offered", {"wiener_units": WIENER_UNITS, "bank_min_equations": 0})):
                        st = adapt_arx(model, dry, wet, n, sr, 0, **kw)
                        esr[name] = score(st.process(x).numpy()[h0:], wet[h0:])["esr"]
                        kept = kept or int(st.n_bank)
                row = {"family": fam.name, "task_id": task["id"], "support_seconds": S,
                       "equations_per_coefficient": bank_equations_per_coefficient(model, n, bank.n_units,
                                                                                   bank.n_gains),
                       "bank_kept": bool(kept), "esr_without": esr["without"], "esr_offered": esr["offered"]}
                rows.append(row)
                print(f"{fam.name:13s} S={S:4g} kept={row['bank_kept']!s:5s} ESR without {esr['without']:.4g} "
                      f"offered {esr['offered']:.4g}", flush=True)
    report = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "seconds": time.perf_counter() - t_all, "load_average": os.getloadavg(),
              "study": str(study.relative_to(REPO_ROOT)), "split": "val", "heldout_from_seconds": HELDOUT_FROM,
              "wiener_units": WIENER_UNITS, "wiener_gain_units": bank.n_gains, "head_coefficients_with_bank": n_coef,
              "wiener_min_equations": WIENER_MIN_EQUATIONS, "rows": rows}
    write_report(out_dir, "capture_bank_rule", report, report_markdown(report))
    print(f"wrote {out_dir / 'capture_bank_rule.md'} and {out_dir / 'capture_bank_rule.json'}")
    return 0


def report_markdown(rep: dict[str, Any]) -> str:
    """The markdown report of :func:`main`'s JSON."""
    rows = rep["rows"]
    lines = ["# When to offer the Wiener bank: validation settings against the support length", "",
             f"Command: `{rep['command']}` ({rep['date']}, {rep['seconds']:.0f} s, 2 CPU cores). "
             f"Settings: the validation split of `{rep['study']}` ({len({r['task_id'] for r in rows})} settings); "
             f"held-out ESR from {rep['heldout_from_seconds']:g} s to the end of the capture signal. The head with "
             f"the bank has {rep['head_coefficients_with_bank']} coefficients ({rep['wiener_units']} curve units, "
             f"{rep.get('wiener_gain_units', 0)} gain units).", "",
             "| support s | equations / coefficient | bank kept | mean log10(ESR offered / without) | "
             f"better > {RATIO}x | worse > {RATIO}x | ESR <= 0.01 without / offered |", "|---|---|---|---|---|---|---|"]
    for S in sorted({r["support_seconds"] for r in rows}):
        rs = [r for r in rows if r["support_seconds"] == S]
        ratio = np.log10(np.array([r["esr_offered"] for r in rs]) / np.array([r["esr_without"] for r in rs]))
        lines.append(f"| {S:g} | {rs[0]['equations_per_coefficient']:.0f} | {sum(r['bank_kept'] for r in rs)} of {len(rs)} | "
                     f"{ratio.mean():+.3f} | {int((ratio < -np.log10(RATIO)).sum())} | "
                     f"{int((ratio > np.log10(RATIO)).sum())} | {sum(r['esr_without'] <= 0.01 for r in rs)} / "
                     f"{sum(r['esr_offered'] <= 0.01 for r in rs)} |")
    lines += ["", f"The rule in use: the bank is offered from {rep['wiener_min_equations']} equations per coefficient "
              "(metafx/wiener.py `WIENER_MIN_EQUATIONS`).", ""]
    longest = max(r["support_seconds"] for r in rows)
    lines += [f"Per family at {longest:g} s of support (held-out ESR, the mean over its settings):", "",
              "| family | settings | bank kept | ESR without | ESR offered |", "|---|---|---|---|---|"]
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = [r for r in rows if r["family"] == fam and r["support_seconds"] == longest]
        lines.append(f"| {fam} | {len(rs)} | {sum(r['bank_kept'] for r in rs)} | "
                     f"{np.mean([r['esr_without'] for r in rs]):.4g} | {np.mean([r['esr_offered'] for r in rs]):.4g} |")
    return "\n".join(lines) + "\n"


__all__ = ["main", "report_markdown"]
