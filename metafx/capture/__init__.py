"""Capture: adapt a meta-model to a recording of the user's own device, score it, export it.

The job Neural Amp Modeler does from ~3 minutes of reamped audio and minutes of GPU training,
done from seconds of audio in seconds (docs/design.md): the user plays the capture signal
(:mod:`metafx.capture_signal`) through the device and records the output (the *wet*); the
first ``support_seconds`` of the aligned pair adapt a meta-model, everything after is held
out and scored beside the baselines, and the adapted model is exported as a TorchScript file
that runs without metafx, streaming (:mod:`metafx.export`).

Steps of :func:`run_capture` (each timed, ``results.json`` ``seconds``):

1. ``load_model``: a checkpoint (``best.pt`` / ``checkpoint.pt`` or their folder), a search's
   folder (its ``summary.json`` names the best trial's checkpoint), an MLflow model URI
   (``models:/name/version``, :func:`metafx.tracking.fetch_registered_model`), or the shipped
   meta-model (:data:`SHIPPED_MODEL`); always ``torch.load(weights_only=True)``.
2. ``load_audio``: dry and wet read with :func:`metafx.data.sources.read_audio` (any rate and
   channel count: mixed to mono, resampled to the meta-model's rate, as the source folders).
   Checks: missing or unreadable files, NaN, a silent wet (errors); a clipped wet (a warning
   with the clipped fraction).
3. ``align``: the latency of the wet behind the dry (:func:`find_latency`): on the shipped
   capture signal, the onset of the device's response to the probe's clicks; for any other
   pair, the onset of the phase-transform cross-correlation's peak. Both search up to
   ``max_latency`` (1 s). Lengths that differ by more than that are refused.
4. ``adapt``: the adaptation engine of the meta-model's ``maml.method``. Support slices: all
   the non-overlapping slices of ``maml.slice_len`` that fit in the support seconds (up to
   :data:`MAX_SUPPORT_SLICES`), not only ``maml.k_support`` of them: a least-squares head
   (ridge) and an inner-loop gradient (MAML, ANIL, CAVIA, the encoder) both average over the
   slices, so more slices only lower the variance of the fit at the same meta-learned step
   size or prior strength (the ridge is relative to the mean Gram diagonal). The ridge ARX
   head is fitted on the features computed *continuously* over the whole support (the way the
   exported model runs them, :class:`metafx.export.ARXStream`) rather than per slice from a
   zero state: the envelope features (time constants up to 200 ms) then have the values the
   deployed model will see, and no equation is lost at slice starts (``ridge_fit="slices"``
   keeps the engine's slice-wise fit; ``bench capture`` compares both: continuous is far better).
   The meta-learned ridge was learned for ``k_support`` slices; with seconds of support its
   strength is chosen on the support by cross-validation (:func:`ridge_fit_continuous`). The
   same cross-validation decides whether the head also gets the Wiener bank
   (:mod:`metafx.wiener`: ``--wiener-units`` fixed random curves of x and its low-passes, a
   filter before a nonlinearity that the meta-learned features cannot express), with the
   *tuned units* of a pre-filter fitted to the support (:mod:`metafx.capture.tuned_units`:
   anti-aliased curves of ``g (x - r lp(x))``, found by a variable-projection search) and, where
   those leave much of the support unexplained, *cascade units* (:mod:`metafx.capture.cascade_units`:
   a second curve after a fitted filter of a first one, as in an amp) and *dynamics units*
   (:mod:`metafx.capture.dynamics_units`: gain units over one fitted limiter envelope, a peak hold,
   an attack and a release); the exported model computes the bank only when it was kept.
5. ``predict``: the exported model on the whole dry file from a zero state: prediction.wav is
   produced by the very module written to model.ts.
6. ``baselines`` and ``score``: on the held-out part (after the support), whole-signal ESR
   (error energy / target energy), MAE, STFT and MR-STFT (:mod:`metafx.metrics`) of the adapted
   model and of the baselines fitted on the same support seconds: ``lsfir`` (least-squares FIR,
   ``eval.lsfir_taps``), ``arx`` (classical ARX(13, 12) on [1, x], no meta-learning, the same
   continuous ridge fit, never offered the bank) and ``identity``.

Everything is written into a temporary folder beside ``--out`` and renamed at the end; the
MLflow run (:func:`metafx.tracking.log_capture`) is created only after every check passed and
ends FAILED if logging fails, so neither holds half a capture.
"""
from metafx.capture.adapt import (adapt_and_export, adapt_arx, adapted_network, baseline_predictions,
                                  classical_arx_fit, classical_arx_model, ridge_fit_continuous, score, support_slices)
from metafx.capture.errors import CaptureError
from metafx.capture.meta_model import SHIPPED_DIR, SHIPPED_MODEL, MetaModel, load_meta_model
from metafx.capture.recording import Latency, Recording, find_latency, impulse_response, read_recording
from metafx.capture.run import CaptureResult, apply_exported, run_capture, write_capture_signal

__all__ = ["CaptureError", "CaptureResult", "Latency", "MetaModel", "Recording", "SHIPPED_DIR", "SHIPPED_MODEL",
           "adapt_and_export", "adapt_arx", "adapted_network", "apply_exported", "baseline_predictions",
           "classical_arx_fit", "classical_arx_model", "find_latency", "impulse_response", "load_meta_model",
           "read_recording", "ridge_fit_continuous", "run_capture", "score", "support_slices", "write_capture_signal"]
