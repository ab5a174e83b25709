"""The meta-model a capture adapts: a checkpoint, a search's best trial, a registered model, or the shipped one.

Always loaded with ``torch.load(weights_only=True)``; a checkpoint of another format or
version is refused with a :class:`~metafx.capture.errors.CaptureError` naming the file and the fix.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metafx.capture.errors import CaptureError
from metafx.config import Config, ConfigError, config_from_dict

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped"
SHIPPED_MODEL = SHIPPED_DIR / "capture_arx.pt"

@dataclass
class MetaModel:
    """A meta-model ready to adapt: its config, learner and engine, and where it came from."""

    cfg: Config
    learner: nn.Module
    engine: Any
    source: str  # what the user asked for (path, models:/..., "shipped")
    checkpoint: Path  # the file loaded
    step: int | None = None


def _checkpoint_file(path: Path) -> Path:
    """The checkpoint of a path: a file, a folder with best.pt / checkpoint.pt, a ``launch/train.py --workdir`` (its
    ``checkpoint/`` folder), or a search folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CaptureError(f"--model {path}: no such file or folder; pass a best.pt / checkpoint.pt, its folder, "
                           f"a launch/train.py --workdir, a search folder (ray_results/<name>), or models:/<name>/<version>")
    for name in ("best.pt", "checkpoint.pt"):
        if (path / name).is_file():
            return path / name
    if (path / "checkpoint").is_dir():  # the --workdir of launch/train.py
        return _checkpoint_file(path / "checkpoint")
    summary = path / "summary.json"
    if summary.is_file():
        try:
            best = json.loads(summary.read_text(encoding="utf-8")).get("best_checkpoint")
        except (OSError, ValueError) as e:
            raise CaptureError(f"--model {path}: cannot read {summary} ({e}); pass the best trial's checkpoint folder") from e
        if not best:
            raise CaptureError(f"--model {path}: the search recorded no best checkpoint (no trial finished); pass a "
                               f"trial's checkpoint folder instead")
        if "://" in str(best):
            raise CaptureError(f"--model {path}: the best checkpoint is remote ({best}); download it and pass its folder")
        return _checkpoint_file(Path(best))
    raise CaptureError(f"--model {path}: the folder holds no best.pt, checkpoint.pt or summary.json; pass a "
                       f"checkpoint file or folder, or a search folder (ray_results/<name>)")


def _config_of(raw: Any, path: Path) -> Config:
    """The Config stored in a checkpoint; its data section is replaced when only that does not load here.

    A capture never reads the training data, so a study whose source folder or .dsp files do not
    exist on this machine still yields its model.
    """
    if not isinstance(raw, dict):
        raise CaptureError(f"{path}: the checkpoint's config is a {type(raw).__name__}, not a study mapping: "
                           f"it was not written by metafx's training (launch/train.py or a search)")
    try:
        return config_from_dict(raw, path)
    except ConfigError as first:
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        stub = {"sample_rate": data.get("sample_rate", 48000),
                "source": {"kind": "synth", "seconds": 3600},
                "families": [{"name": "moog_vcf", "dsp": "moog_vcf.dsp", "params": {"cutoff": [1000.0]}}]}
        try:
            cfg = config_from_dict({**raw, "data": stub}, path)
        except ConfigError:
            raise CaptureError(f"{path}: its stored config does not load in this metafx version ({first}); "
                               f"re-train with this version or use the metafx version that wrote it") from first
        log.info("%s: the data section of the stored config does not load here (%s); a capture does not need it",
                 path, first)
        return cfg


def load_meta_model(spec: str | os.PathLike[str] | None, tracking_uri: str | None = None,
                    workdir: Path | None = None) -> MetaModel:
    """Load the meta-model a capture adapts.

    Args:
        spec: a checkpoint file or folder, a search folder, ``models:/<name>/<version>`` (or
            ``@alias``), or None for the shipped meta-model.
        tracking_uri: the MLflow store of a ``models:/`` URI (None = the default store).
        workdir: where a registered model is downloaded (a temporary folder by default).

    Returns:
        The :class:`MetaModel` (learner in eval mode, float32, CPU).

    Raises:
        CaptureError: a missing file, a file that is not a metafx checkpoint, a checkpoint of
            another format or version (names the file and the fix).
    """
    from metafx.engines import engine_for

    source = "shipped" if spec is None else str(spec)
    if spec is None:
        path = SHIPPED_MODEL
        if not path.is_file():
            raise CaptureError(f"the shipped meta-model {path} is missing: regenerate it (metafx/shipped/README.md) "
                               f"or pass --model")
    elif str(spec).startswith("models:/"):
        from metafx.tracking import TrackingError, fetch_registered_model

        dst = Path(tempfile.mkdtemp(prefix="metafx-model-", dir=workdir))
        try:
            path = _checkpoint_file(fetch_registered_model(str(spec), dst, tracking_uri))
        except TrackingError as e:
            raise CaptureError(f"--model {spec}: {e}") from e
    else:
        path = _checkpoint_file(Path(spec).expanduser())
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-torch files: all the same answer
        raise CaptureError(f"{path} is not a metafx checkpoint readable with torch.load(weights_only=True) "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a best.pt or "
                           f"checkpoint.pt written by launch/train.py or a search") from e
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or "config" not in ck:
        keys = sorted(ck)[:8] if isinstance(ck, dict) else type(ck).__name__
        raise CaptureError(f"{path} is a checkpoint of another format (found {keys}; a metafx checkpoint has 'model' "
                           f"and 'config'): pass a best.pt or checkpoint.pt written by launch/train.py or a search")
    cfg = _config_of(ck["config"], path)
    engine = engine_for(cfg)
    learner = engine.build_learner(cfg)
    try:
        learner.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CaptureError(f"{path}: its weights do not fit the model of its own config ({str(e).splitlines()[0]}): "
                           f"it was written by another metafx version; re-train or use that version") from e
    learner.eval()
    step = ck.get("step")
    return MetaModel(cfg, learner, engine, source, path, int(step) if isinstance(step, (int, float)) else None)
