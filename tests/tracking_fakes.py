"""Small, deterministic stand-ins for what a trial produces (shared by the tracking/plot tests)."""
from __future__ import annotations

import numpy as np

SR = 8000


def one_pole_lowpass(x: np.ndarray, cutoff: float, sr: int) -> np.ndarray:
    """A one-pole low-pass: enough of an 'effect' for the plots to show something."""
    a = np.exp(-2 * np.pi * cutoff / sr)
    y = np.zeros_like(x)
    acc = 0.0
    for i, v in enumerate(x):
        acc = (1 - a) * v + a * acc
        y[i] = acc
    return y


def make_examples(n: int = 2, length: int = 4000, tcn_crop: int = 300, sr: int = SR) -> list[dict]:
    """Examples as train.py hands them to write_trial_artifacts; pred_post is TCN-cropped."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        cutoff = 400.0 * (i + 1)
        x = (0.15 * rng.standard_normal(length)).astype(np.float32)
        y = one_pole_lowpass(x, cutoff, sr).astype(np.float32)
        out.append(
            {
                "task_id": f"moog_vcf-{i:03d}",
                "family": "moog_vcf",
                "params": {"cutoff": cutoff, "resonance": 0.5},
                "input": x,
                "target": y,
                "pred_pre": (0.7 * x).astype(np.float32),
                "pred_post": (y[tcn_crop:] + 0.01 * rng.standard_normal(length - tcn_crop)).astype(np.float32),
            }
        )
    return out


def make_history(steps: int = 10, val_every: int = 2) -> list[dict]:
    """Training reports like train.py's: train losses every step, val every few steps."""
    hist = []
    for s in range(steps):
        h = {
            "step": s,
            "support_l1_pre": 0.2 / (s + 1) + 0.05,
            "support_l1_post": 0.15 / (s + 1) + 0.04,
            "query_l1_post": 0.16 / (s + 1) + 0.045,
        }
        if s % val_every == 0:
            h["val/query_l1_post"] = 0.17 / (s + 1) + 0.05
            h["val/support_l1_pre"] = 0.21 / (s + 1) + 0.05
        hist.append(h)
    return hist
